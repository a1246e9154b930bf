-- keybroker schema: per-project KEKs (bring your own key) and recovery
-- wraps of intermediate keys. {{.schema}} is the quoted schema name.
--
-- tenant_chains records each chain of intermediate keys made for one
-- project's own KEK: the chain's key_id (in intermediate_keys and in the
-- kek rows of provider 'intermediate'), the project and the provider URL
-- that wraps the chain's intermediate keys. A row outlives the binding
-- that made it, so data keys still under an old chain keep unwrapping
-- until Rewrap has moved them.
CREATE TABLE {{.schema}}.tenant_chains (
    chain_id   text PRIMARY KEY CHECK (length(chain_id) BETWEEN 1 AND 128),
    project_id text NOT NULL CHECK (length(project_id) BETWEEN 1 AND 256),
    kek_url    text NOT NULL CHECK (length(kek_url) BETWEEN 1 AND 2048),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tenant_chains_project ON {{.schema}}.tenant_chains (project_id);

-- project_keks binds a project to its chain: new data keys of the project
-- are wrapped under that chain's current intermediate key, and Rewrap
-- moves the project's other data keys there. A project without a row
-- uses the deployment's chain.
CREATE TABLE {{.schema}}.project_keks (
    project_id text PRIMARY KEY CHECK (length(project_id) BETWEEN 1 AND 256),
    chain_id   text NOT NULL UNIQUE REFERENCES {{.schema}}.tenant_chains (chain_id) ON DELETE RESTRICT,
    bound_at   timestamptz NOT NULL DEFAULT now()
);

-- A tenant role (subject to row-level security) sees its own project's
-- binding and chains only.
ALTER TABLE {{.schema}}.tenant_chains ENABLE ROW LEVEL SECURITY;
ALTER TABLE {{.schema}}.project_keks ENABLE ROW LEVEL SECURITY;
CREATE POLICY project_isolation ON {{.schema}}.tenant_chains
    USING (project_id = current_setting('keybroker.project_id', true));
CREATE POLICY project_isolation ON {{.schema}}.project_keks
    USING (project_id = current_setting('keybroker.project_id', true));

-- data_keys_tenant_fence refuses, with SQLSTATE KB006, a data key created
-- or rewrapped (kek_id set) under a chain that is not its project's: for a
-- bound project anything but its chain, for any project another
-- project's chain or (unbound) a tenant chain. It reads the binding FOR
-- SHARE, so a create racing a binding change waits for it.
CREATE FUNCTION {{.schema}}.data_keys_tenant_fence()
RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    bound  text;
    kprov  text;
    kkey   text;
    owner  text;
BEGIN
    SELECT chain_id INTO bound FROM {{.schema}}.project_keks WHERE project_id = NEW.project_id FOR SHARE;
    SELECT provider, key_id INTO kprov, kkey FROM {{.schema}}.kek WHERE id = NEW.kek_id;
    IF kprov = 'intermediate' THEN
        SELECT project_id INTO owner FROM {{.schema}}.tenant_chains WHERE chain_id = kkey;
    END IF;
    IF bound IS NOT NULL AND (kprov IS DISTINCT FROM 'intermediate' OR kkey IS DISTINCT FROM bound) THEN
        RAISE EXCEPTION 'keybroker: project is bound to its own KEK (chain %)', bound USING ERRCODE = 'KB006';
    END IF;
    IF bound IS NULL AND owner IS NOT NULL THEN
        RAISE EXCEPTION 'keybroker: chain % is a project''s own and the project is not bound to it', kkey USING ERRCODE = 'KB006';
    END IF;
    RETURN NEW;
END $$;
REVOKE ALL ON FUNCTION {{.schema}}.data_keys_tenant_fence() FROM PUBLIC;
CREATE TRIGGER data_keys_tenant_fence BEFORE INSERT OR UPDATE OF kek_id, project_id ON {{.schema}}.data_keys
    FOR EACH ROW EXECUTE FUNCTION {{.schema}}.data_keys_tenant_fence();

-- intermediate_key_recovery holds recovery (break-glass) wraps: an
-- intermediate key wrapped once more, under a recovery provider's key
-- (provider, recovery_key_id, key_version), with the same associated data
-- as its primary wrap. Retiring the intermediate key removes them.
CREATE TABLE {{.schema}}.intermediate_key_recovery (
    key_id          text NOT NULL,
    version         integer NOT NULL,
    provider        text NOT NULL CHECK (length(provider) BETWEEN 1 AND 32),
    recovery_key_id text NOT NULL CHECK (length(recovery_key_id) BETWEEN 1 AND 2048),
    key_version     text NOT NULL CHECK (length(key_version) BETWEEN 1 AND 256),
    wrapped_key     bytea NOT NULL CHECK (length(wrapped_key) BETWEEN 1 AND 8192),
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key_id, version, provider, recovery_key_id),
    FOREIGN KEY (key_id, version) REFERENCES {{.schema}}.intermediate_keys (key_id, version) ON DELETE CASCADE
);

-- Only the owner writes these tables (no grant is made here): a row of
-- tenant_chains chooses which key service a process talks to, and one of
-- intermediate_key_recovery which key can recover the deployment. Tenant
-- roles get SELECT on tenant_chains and project_keks (docs/SECURITY.md).
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON {{.schema}}.tenant_chains, {{.schema}}.project_keks,
    {{.schema}}.intermediate_key_recovery FROM PUBLIC;
