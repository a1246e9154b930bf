-- keybroker schema: intermediate keys (the key hierarchy). {{.schema}} is
-- the quoted schema name.
--
-- intermediate_keys holds the intermediate keys (IKs) of package
-- pgstore/hierarchy: random 256-bit keys, each wrapped under a version of
-- the deployment's KEK (kek_id), that wrap the data keys locally. A chain
-- (key_id) has versions 1, 2, ... with no gaps; the highest is the current
-- one, the one new data keys are wrapped under. Data keys wrapped under an
-- IK point at the kek row (provider 'intermediate', key_id, version) like
-- any other KEK version's.
CREATE TABLE {{.schema}}.intermediate_keys (
    key_id       text NOT NULL CHECK (length(key_id) BETWEEN 1 AND 128),
    version      integer NOT NULL CHECK (version >= 1),
    kek_id       bigint NOT NULL REFERENCES {{.schema}}.kek (id) ON DELETE RESTRICT,
    wrapped_key  bytea NOT NULL CHECK (length(wrapped_key) BETWEEN 1 AND 8192),
    created_at   timestamptz NOT NULL DEFAULT now(),
    rewrapped_at timestamptz,
    PRIMARY KEY (key_id, version)
);
CREATE INDEX intermediate_keys_kek ON {{.schema}}.intermediate_keys (kek_id);

-- An IK is never wrapped (created or rewrapped) under a retired KEK
-- version: the same fence as data keys', which RetireKEK's FOR UPDATE on
-- the kek row serialises with.
CREATE TRIGGER intermediate_keys_kek_fence BEFORE INSERT OR UPDATE OF kek_id ON {{.schema}}.intermediate_keys
    FOR EACH ROW EXECUTE FUNCTION {{.schema}}.data_keys_kek_fence();

-- add_intermediate_key inserts version p_version of chain p_key_id, the
-- next one (1 for a new chain, else one more than an existing version),
-- with its ik.create audit event, and returns true; it returns false and
-- changes nothing when that version exists already (another process made
-- it first: the primary key is the fence, so a chain has one current
-- version however many processes rotate at once) or would leave a gap.
-- It is how a role other than the owner (a tenant) creates an IK: tenants
-- get SELECT on intermediate_keys and EXECUTE on this function, no
-- INSERT, UPDATE or DELETE, so they cannot alter or remove an IK.
CREATE FUNCTION {{.schema}}.add_intermediate_key(p_key_id text, p_version integer, p_kek_id bigint, p_wrapped bytea, p_actor text)
RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n integer;
BEGIN
    IF p_version > 1 AND NOT EXISTS (SELECT 1 FROM {{.schema}}.intermediate_keys
                                     WHERE key_id = p_key_id AND version = p_version - 1) THEN
        RETURN false;
    END IF;
    INSERT INTO {{.schema}}.intermediate_keys (key_id, version, kek_id, wrapped_key)
    VALUES (p_key_id, p_version, p_kek_id, p_wrapped)
    ON CONFLICT (key_id, version) DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n = 0 THEN
        RETURN false;
    END IF;
    INSERT INTO {{.schema}}.key_events (event, kek_id, count, actor, detail)
    VALUES ('ik.create', p_kek_id, 1, p_actor,
            jsonb_build_object('version', 'intermediate:' || p_key_id || '@' || p_version));
    RETURN true;
END $$;
REVOKE ALL ON FUNCTION {{.schema}}.add_intermediate_key(text, integer, bigint, bytea, text) FROM PUBLIC;
