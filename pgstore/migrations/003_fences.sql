-- keybroker schema, version 3: fences in the database. {{.schema}} is the
-- quoted schema name. Both functions are SECURITY DEFINER, owned by the
-- role that migrates (the schema owner), with search_path pinned so a
-- caller's objects cannot stand in for ours.

-- record_kek returns the id of the kek row for (provider, key_id,
-- key_version), inserting it if it is new; a new row gets its kek.record
-- audit event in the same statement, so every version that ever wrapped a
-- data key is in the audit trail even if the process recording it (a
-- rotate, say) dies right after. It is the only way a role other than the
-- owner can create a kek row: tenants have no INSERT, UPDATE or DELETE on
-- kek, so they can neither forge a row nor set retired_at.
CREATE FUNCTION {{.schema}}.record_kek(p_provider text, p_key_id text, p_key_version text, p_actor text)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    kid bigint;
BEGIN
    INSERT INTO {{.schema}}.kek (provider, key_id, key_version) VALUES (p_provider, p_key_id, p_key_version)
    ON CONFLICT (provider, key_id, key_version) DO NOTHING RETURNING id INTO kid;
    IF kid IS NOT NULL THEN
        INSERT INTO {{.schema}}.key_events (event, kek_id, count, actor, detail)
        VALUES ('kek.record', kid, 1, p_actor,
                jsonb_build_object('version', p_provider || ':' || p_key_id || '@' || p_key_version));
        RETURN kid;
    END IF;
    -- A row a concurrent call inserted: this statement has a fresh snapshot
    -- (READ COMMITTED) taken after ON CONFLICT waited for it.
    SELECT id INTO kid FROM {{.schema}}.kek
    WHERE provider = p_provider AND key_id = p_key_id AND key_version = p_key_version;
    RETURN kid;
END $$;
REVOKE ALL ON FUNCTION {{.schema}}.record_kek(text, text, text, text) FROM PUBLIC;

-- data_keys_kek_fence refuses a data key created or rewrapped under a
-- retired kek version, with SQLSTATE KB001. It reads the kek row FOR SHARE,
-- which conflicts with the FOR UPDATE RetireKEK holds while it checks that
-- no data key uses the version: a create racing a retire either commits
-- first (and the retire then counts it and refuses) or waits for the
-- retire and then sees its committed retired_at.
CREATE FUNCTION {{.schema}}.data_keys_kek_fence()
RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    retired timestamptz;
BEGIN
    SELECT retired_at INTO retired FROM {{.schema}}.kek WHERE id = NEW.kek_id FOR SHARE;
    IF retired IS NOT NULL THEN
        RAISE EXCEPTION 'keybroker: kek version % is retired', NEW.kek_id USING ERRCODE = 'KB001';
    END IF;
    RETURN NEW;
END $$;
REVOKE ALL ON FUNCTION {{.schema}}.data_keys_kek_fence() FROM PUBLIC;
CREATE TRIGGER data_keys_kek_fence BEFORE INSERT OR UPDATE OF kek_id ON {{.schema}}.data_keys
    FOR EACH ROW EXECUTE FUNCTION {{.schema}}.data_keys_kek_fence();

-- Earlier documentation granted tenants INSERT on kek: take back every
-- write on kek from everyone but its owner.
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT DISTINCT a.grantee FROM pg_class c, aclexplode(c.relacl) a
             WHERE c.oid = '{{.schema}}.kek'::regclass AND a.grantee <> c.relowner
               AND a.privilege_type IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')
    LOOP
        EXECUTE format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON TABLE %s FROM %s', '{{.schema}}.kek'::regclass,
                       CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE g.grantee::regrole::text END);
    END LOOP;
END $$;
