-- keybroker schema, version 5: service tokens and the access log of
-- `keybroker serve` (package server).
--
-- service_tokens holds one row per token. The token itself is never
-- stored: only secret_hash, the SHA-256 of its 32 random secret bytes
-- (a hash of a 256-bit random value needs no salt or stretching). projects
-- is NULL for every project; operations lists read, write, seal, open,
-- admin. A token is valid while revoked_at is NULL and now() < expires_at.
CREATE TABLE {{.schema}}.service_tokens (
    id          uuid        PRIMARY KEY,
    name        text        NOT NULL CHECK (octet_length(name) BETWEEN 1 AND 256),
    secret_hash bytea       NOT NULL CHECK (octet_length(secret_hash) = 32),
    projects    text[],
    operations  text[]      NOT NULL CHECK (cardinality(operations) >= 1
        AND operations <@ ARRAY['read', 'write', 'seal', 'open', 'admin']),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    revoked_at  timestamptz,
    CHECK (expires_at > created_at)
);

-- access_log records every authenticated request the server answers about
-- a project: which token, project, secret names, operation, outcome and
-- when. A write's row is inserted in the write's own transaction (they
-- commit together or not at all); a read's row is committed after the read
-- and before the response is sent; a failed request's row records its
-- outcome.
CREATE TABLE {{.schema}}.access_log (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    token_id   uuid        NOT NULL REFERENCES {{.schema}}.service_tokens (id) ON DELETE RESTRICT,
    project_id text        NOT NULL,
    names      text[]      NOT NULL,
    operation  text        NOT NULL,
    outcome    text        NOT NULL
);
CREATE INDEX access_log_project_at ON {{.schema}}.access_log (project_id, at);
