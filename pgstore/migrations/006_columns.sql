-- keybroker schema, version 6: the encrypted columns of application tables
-- (package pgcolumn).
--
-- One row per declared column. table_name and column_name are the names as
-- declared (they are bound into every value's associated data and make the
-- data keys' scope, "column:<table_name>.<column_name>"); project_column and
-- key_columns name the columns whose values (as text) are the project id
-- and the row's key. accept_legacy says whether unsealed values (legacy
-- plaintext or ciphertexts of an earlier scheme) may still be read and
-- written; switching it off (pgcolumn's RefuseLegacy) is one-way and
-- recorded in legacy_refused_at.
--
-- pgcolumn.Install writes a row and, in the same transaction, the column's
-- fence: a SECURITY DEFINER trigger function {{.schema}}.column_fence_<id>
-- (owned by the installing role, EXECUTE revoked from PUBLIC) attached
-- BEFORE INSERT OR UPDATE OF the value column as trigger <schema>_fence_<id>;
-- docs/STORAGE.md, "The fence trigger". Services (pgcolumn.New) need SELECT
-- on this table only.
CREATE TABLE {{.schema}}.columns (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    table_name        text NOT NULL CHECK (length(table_name) BETWEEN 1 AND 199),
    column_name       text NOT NULL CHECK (length(column_name) BETWEEN 1 AND 199),
    project_column    text NOT NULL CHECK (length(project_column) BETWEEN 1 AND 63),
    key_columns       text[] NOT NULL CHECK (cardinality(key_columns) BETWEEN 1 AND 16),
    accept_legacy     boolean NOT NULL DEFAULT true,
    legacy_refused_at timestamptz,
    installed_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (table_name, column_name),
    CHECK (accept_legacy OR legacy_refused_at IS NOT NULL)
);
