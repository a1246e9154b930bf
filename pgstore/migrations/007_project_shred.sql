-- keybroker schema: project shredding. {{.schema}} is the quoted schema
-- name. The functions are owned by the role that migrates (the schema
-- owner), with search_path pinned so a caller's objects cannot stand in
-- for ours.
--
-- Shredding a project deletes every data key row of the project (whatever
-- its state or scope) and every secret sealed under them, and leaves a
-- tombstone: no data key can be created for the project afterwards, so a
-- write racing the shred (or arriving later) cannot bring the project
-- back. reopen_project lifts the tombstone, deliberately.
--
-- The fence. A data key is created only by an INSERT into data_keys, and
-- the trigger data_keys_shred_fence takes a shared transaction advisory
-- lock on (class 'kbsh', hashtext(project_id)) before it looks for the
-- tombstone; shred_project takes the same lock exclusively before it
-- writes the tombstone and deletes. So a data key insert either commits
-- before the shred starts deleting (and is deleted with the rest) or waits
-- for the shred to commit and then sees the tombstone (SQLSTATE KB002).
-- Writes under an existing data key name it FOR KEY SHARE (pgstore's Put,
-- migration, re-encryption); shred_project locks the project's data keys
-- FOR UPDATE before deleting secrets, so such a write either commits
-- first (its secret is then deleted) or waits and finds its key gone.
-- Every statement below runs with a fresh snapshot (READ COMMITTED, a
-- VOLATILE function), which the argument needs; under REPEATABLE READ or
-- SERIALIZABLE a racing write makes the shred fail rather than miss it.
-- A hash collision between two project ids only makes them wait for each
-- other.

-- shredded_projects holds one tombstone per shredded project. No policy:
-- only the owner (and the functions below, which run as the owner) reads
-- or writes it.
CREATE TABLE {{.schema}}.shredded_projects (
    project_id  text PRIMARY KEY CHECK (length(project_id) BETWEEN 1 AND 256),
    shredded_at timestamptz NOT NULL DEFAULT now(),
    actor       text
);

-- data_keys_shred_fence refuses a data key for a shredded project with
-- SQLSTATE KB002 (see the fence above).
CREATE FUNCTION {{.schema}}.data_keys_shred_fence()
RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(1801614184, hashtext(NEW.project_id));
    PERFORM 1 FROM {{.schema}}.shredded_projects WHERE project_id = NEW.project_id;
    IF FOUND THEN
        RAISE EXCEPTION 'keybroker: project % is shredded', NEW.project_id USING ERRCODE = 'KB002';
    END IF;
    RETURN NEW;
END $$;
REVOKE ALL ON FUNCTION {{.schema}}.data_keys_shred_fence() FROM PUBLIC;
CREATE TRIGGER data_keys_shred_fence BEFORE INSERT OR UPDATE OF project_id ON {{.schema}}.data_keys
    FOR EACH ROW EXECUTE FUNCTION {{.schema}}.data_keys_shred_fence();

-- shred_project destroys project p_project: its secrets, all its data
-- keys, and writes the tombstone and one project.shred audit event (count:
-- data keys destroyed; detail: data_keys, secrets, and the session's
-- role). Shredding an unknown or already shredded project succeeds with
-- zero counts (and is audited). p_actor NULL records the session's role as
-- the actor. EXECUTE is the capability to shred any project: grant it only
-- to the role that deletes projects.
CREATE FUNCTION {{.schema}}.shred_project(p_project text, p_actor text,
    OUT data_keys bigint, OUT secrets bigint, OUT data_key_ids uuid[])
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF p_project IS NULL OR length(p_project) NOT BETWEEN 1 AND 256 THEN
        RAISE EXCEPTION 'keybroker: shred_project: project id must be 1..256 characters' USING ERRCODE = '22023';
    END IF;
    PERFORM pg_advisory_xact_lock(1801614184, hashtext(p_project));
    INSERT INTO {{.schema}}.shredded_projects (project_id, actor)
    VALUES (p_project, coalesce(p_actor, session_user::text))
    ON CONFLICT (project_id) DO UPDATE SET shredded_at = now(), actor = EXCLUDED.actor;
    PERFORM 1 FROM {{.schema}}.data_keys WHERE project_id = p_project FOR UPDATE;
    DELETE FROM {{.schema}}.encrypted_secrets WHERE project_id = p_project;
    GET DIAGNOSTICS secrets = ROW_COUNT;
    WITH d AS (DELETE FROM {{.schema}}.data_keys WHERE project_id = p_project RETURNING id)
    SELECT count(*), coalesce(array_agg(id), '{}') INTO data_keys, data_key_ids FROM d;
    INSERT INTO {{.schema}}.key_events (event, project_id, count, actor, detail)
    VALUES ('project.shred', p_project, data_keys, coalesce(p_actor, session_user::text),
            jsonb_build_object('data_keys', data_keys, 'secrets', secrets, 'role', session_user::text));
END $$;
REVOKE ALL ON FUNCTION {{.schema}}.shred_project(text, text) FROM PUBLIC;

-- shred_project_trigger shreds the project whose id is in column
-- TG_ARGV[0] of the deleted row (as text: a uuid in its canonical form),
-- for an application's own projects table:
--
--   CREATE TRIGGER keybroker_shred AFTER DELETE ON projects FOR EACH ROW
--       EXECUTE FUNCTION keybroker.shred_project_trigger('id');
--
-- It runs as the role deleting the row (SECURITY INVOKER), so attaching it
-- to a table grants nothing: that role needs EXECUTE on shred_project. The
-- shred commits or rolls back with the delete. A column that is missing
-- or NULL fails the delete.
CREATE FUNCTION {{.schema}}.shred_project_trigger()
RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    pid text;
BEGIN
    IF TG_NARGS <> 1 OR TG_OP <> 'DELETE' OR TG_LEVEL <> 'ROW' THEN
        RAISE EXCEPTION 'keybroker: shred_project_trigger: attach AFTER DELETE ... FOR EACH ROW with one argument, the project id column'
            USING ERRCODE = '22023';
    END IF;
    pid := to_jsonb(OLD) ->> TG_ARGV[0];
    IF pid IS NULL THEN
        RAISE EXCEPTION 'keybroker: shred_project_trigger: %.% has no column % or it is NULL', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_ARGV[0]
            USING ERRCODE = '22023';
    END IF;
    PERFORM {{.schema}}.shred_project(pid, 'trigger ' || TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME || ' by ' || session_user);
    RETURN NULL;
END $$;

-- reopen_project lifts a project's tombstone, so data keys can be created
-- for it again, and writes a project.reopen event; it returns whether
-- there was one. Nothing shredded comes back. Not granted to anyone.
CREATE FUNCTION {{.schema}}.reopen_project(p_project text, p_actor text)
RETURNS boolean LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1801614184, hashtext(p_project));
    DELETE FROM {{.schema}}.shredded_projects WHERE project_id = p_project;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO {{.schema}}.key_events (event, project_id, count, actor)
    VALUES ('project.reopen', p_project, 1, coalesce(p_actor, session_user::text));
    RETURN true;
END $$;
REVOKE ALL ON FUNCTION {{.schema}}.reopen_project(text, text) FROM PUBLIC;
