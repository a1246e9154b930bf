-- keybroker schema, version 1. {{.schema}} is the quoted schema name.

-- kek records each key-encryption key version that has wrapped a data key.
-- Metadata only: KEK material stays in the key service.
CREATE TABLE {{.schema}}.kek (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider    text NOT NULL CHECK (length(provider) BETWEEN 1 AND 32),
    key_id      text NOT NULL CHECK (length(key_id) BETWEEN 1 AND 1024),
    key_version text NOT NULL CHECK (length(key_version) <= 256),
    created_at  timestamptz NOT NULL DEFAULT now(),
    retired_at  timestamptz,
    UNIQUE (provider, key_id, key_version)
);

-- data_keys holds each project's data keys, wrapped under a kek version.
-- messages counts encryptions reserved under the key (its budget use).
-- state: active (the project's key for new writes, at most one), spent (its
-- budget is used up) or retired (awaiting re-encryption of its secrets). A
-- destroyed key is deleted, which the foreign key from encrypted_secrets
-- refuses while any secret still needs it.
CREATE TABLE {{.schema}}.data_keys (
    id           uuid PRIMARY KEY,
    project_id   text NOT NULL CHECK (length(project_id) BETWEEN 1 AND 256),
    kek_id       bigint NOT NULL REFERENCES {{.schema}}.kek (id) ON DELETE RESTRICT,
    wrapped_dek  bytea NOT NULL CHECK (length(wrapped_dek) BETWEEN 1 AND 8192),
    created_at   timestamptz NOT NULL DEFAULT now(),
    rewrapped_at timestamptz,
    messages     bigint NOT NULL DEFAULT 0 CHECK (messages >= 0),
    state        text NOT NULL DEFAULT 'active'
                 CHECK (state IN ('active', 'spent', 'retired')),
    UNIQUE (id, project_id)
);
-- One active data key per project.
CREATE UNIQUE INDEX data_keys_one_active ON {{.schema}}.data_keys (project_id) WHERE state = 'active';
CREATE INDEX data_keys_kek ON {{.schema}}.data_keys (kek_id);

-- encrypted_secrets holds envelope blobs (encrypted_data) whose header names
-- data_key_id and carries nonce. The composite foreign key keeps a secret on
-- a data key of its own project.
CREATE TABLE {{.schema}}.encrypted_secrets (
    project_id     text NOT NULL CHECK (length(project_id) BETWEEN 1 AND 256),
    name           text NOT NULL CHECK (length(name) BETWEEN 1 AND 1024),
    encrypted_data bytea NOT NULL,
    nonce          bytea NOT NULL,
    data_key_id    uuid NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, name),
    FOREIGN KEY (data_key_id, project_id)
        REFERENCES {{.schema}}.data_keys (id, project_id) ON DELETE RESTRICT
);
-- No index on data_key_id: writes stay cheaper, and the lookups by data key
-- (the foreign key's RESTRICT check, re-encryption) always name the
-- project too, so they use the primary key's project_id prefix.

-- key_events is the audit trail of key management. Never secret material.
CREATE TABLE {{.schema}}.key_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    event       text NOT NULL,
    project_id  text,
    kek_id      bigint,
    data_key_id uuid,
    count       bigint NOT NULL DEFAULT 0,
    actor       text,
    detail      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX key_events_at ON {{.schema}}.key_events (at);
