-- keybroker schema, version 5: data keys belong to a scope.
--
-- scope separates the data keys of one project by what they encrypt: ''
-- (the empty string) for keybroker's own encrypted_secrets, and one scope per
-- encrypted column declared in an application's table (package pgcolumn,
-- "column:<schema>.<table>.<column>"). Each scope has at most one active key
-- per project, and re-encrypting one scope (pgstore.Store.Reencrypt for '',
-- pgcolumn for a column) retires and destroys only that scope's keys, so it
-- can never shred values stored in another table. KEK rotation, rewrap,
-- retirement and project shredding span every scope.
ALTER TABLE {{.schema}}.data_keys
    ADD COLUMN scope text NOT NULL DEFAULT '' CHECK (length(scope) <= 200);

DROP INDEX {{.schema}}.data_keys_one_active;
CREATE UNIQUE INDEX data_keys_one_active ON {{.schema}}.data_keys (project_id, scope) WHERE state = 'active';
