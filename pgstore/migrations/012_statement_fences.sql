-- keybroker schema: set-based fences for updates of data_keys. {{.schema}}
-- is the quoted schema name. The function is SECURITY DEFINER, owned by
-- the role that migrates (the schema owner), with search_path pinned so a
-- caller's objects cannot stand in for ours.
--
-- Why. Migrations 003 and 010 fence every data key created or rewrapped
-- (kek_id set) with plpgsql row triggers: data_keys_kek_fence reads the
-- kek row FOR SHARE (KB001 if retired), data_keys_tenant_fence reads the
-- project's binding FOR SHARE, the kek row and the chain's owner (KB006).
-- For Rewrap's batch UPDATE of 1,000 data keys that is 1,000 of each
-- trigger, 4,000 lookups and 2,000 row locks of the same one or two kek
-- rows, most of the server's time per data key. An INSERT creates one data
-- key at a time, so the row triggers stay for INSERT; an UPDATE is fenced
-- once per statement, set-based, by data_keys_update_fence below.
--
-- Which rows. PostgreSQL refuses a column list (UPDATE OF kek_id) on a
-- trigger with transition tables, so the statement trigger fires on every
-- UPDATE of data_keys, budget reservations included. Its first query finds
-- the changed rows: new rows whose (id, kek_id, project_id) is not an old
-- row's. A budget reservation or a state change has none and returns
-- after that one query. A row whose kek_id and project_id did not
-- change needs no fence: that pair was fenced when it was written, a
-- retired version has no data key (RetireKEK refuses while one is in use)
-- and a binding change does not re-check existing keys (Rewrap moves them).
--
-- The race arguments, unchanged from the row triggers. The checks run
-- after the rows are written, before the statement ends, inside its
-- transaction; the rows stay invisible to others until it commits.
--  * Rewrap (or any update) to kek version v racing RetireKEK(v): RetireKEK
--    locks v's kek row FOR UPDATE, then counts the data keys under v with a
--    new snapshot, then sets retired_at and commits. The trigger locks v's
--    row FOR SHARE, which conflicts. If the trigger gets the lock first,
--    RetireKEK waits for the updating transaction to end, and its count
--    (a later statement, a later snapshot) sees the committed rows under v
--    and refuses (InUseError). If RetireKEK gets it first, its count does
--    not see the uncommitted rows, it retires v and commits; the trigger's
--    FOR SHARE, which waited, then reads the row's latest version (READ
--    COMMITTED follows the update), sees retired_at and raises KB001, so
--    the update rolls back and nothing is left under v.
--  * An update of a project's data keys racing a binding change
--    (SetProjectKEK, UnsetProjectKEK lock or write the project's
--    project_keks row): the trigger locks the changed rows' projects'
--    project_keks rows FOR SHARE before it reads the bindings with a new
--    statement (a new snapshot): a binding change in progress is waited
--    for and then seen committed, as with the row trigger.
-- The kek rows are locked in id order, the binding rows in project_id
-- order, so two fenced updates lock them in the same order. KB001 and
-- KB006 are raised with the same SQLSTATEs and messages as before.

CREATE FUNCTION {{.schema}}.data_keys_update_fence()
RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ps      text[];
    ks      bigint[];
    k       record;
    v_bound text;
    v_chain text;
BEGIN
    -- The common case, an update that changes neither column (a budget
    -- reservation), in one cheap query.
    IF NOT EXISTS (SELECT 1 FROM new_keys n
                   WHERE NOT EXISTS (SELECT 1 FROM old_keys o
                                     WHERE o.id = n.id AND o.kek_id = n.kek_id AND o.project_id = n.project_id)) THEN
        RETURN NULL;
    END IF;
    -- The changed rows' distinct (project_id, kek_id) pairs.
    SELECT array_agg(c.project_id), array_agg(c.kek_id) INTO ps, ks
    FROM (SELECT DISTINCT n.project_id, n.kek_id
          FROM new_keys n LEFT JOIN old_keys o
            ON o.id = n.id AND o.kek_id = n.kek_id AND o.project_id = n.project_id
          WHERE o.id IS NULL) c;
    IF ps IS NULL THEN
        RETURN NULL;
    END IF;
    -- KB001: every kek row the changed rows point at, locked FOR SHARE.
    FOR k IN SELECT id, retired_at FROM {{.schema}}.kek
             WHERE id IN (SELECT DISTINCT unnest(ks)) ORDER BY id FOR SHARE
    LOOP
        IF k.retired_at IS NOT NULL THEN
            RAISE EXCEPTION 'keybroker: kek version % is retired', k.id USING ERRCODE = 'KB001';
        END IF;
    END LOOP;
    -- KB006: the changed projects' bindings, locked FOR SHARE, then read.
    PERFORM 1 FROM {{.schema}}.project_keks
    WHERE project_id IN (SELECT DISTINCT unnest(ps)) ORDER BY project_id FOR SHARE;
    SELECT b.chain_id, kk.key_id INTO v_bound, v_chain
    FROM unnest(ps, ks) AS c(project_id, kek_id)
    JOIN {{.schema}}.kek kk ON kk.id = c.kek_id
    LEFT JOIN {{.schema}}.project_keks b ON b.project_id = c.project_id
    LEFT JOIN {{.schema}}.tenant_chains t ON kk.provider = 'intermediate' AND t.chain_id = kk.key_id
    WHERE CASE WHEN b.chain_id IS NOT NULL
               THEN kk.provider IS DISTINCT FROM 'intermediate' OR kk.key_id IS DISTINCT FROM b.chain_id
               ELSE t.project_id IS NOT NULL END
    LIMIT 1;
    IF FOUND THEN
        IF v_bound IS NOT NULL THEN
            RAISE EXCEPTION 'keybroker: project is bound to its own KEK (chain %)', v_bound USING ERRCODE = 'KB006';
        END IF;
        RAISE EXCEPTION 'keybroker: chain % is a project''s own and the project is not bound to it', v_chain USING ERRCODE = 'KB006';
    END IF;
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION {{.schema}}.data_keys_update_fence() FROM PUBLIC;

CREATE TRIGGER data_keys_update_fence AFTER UPDATE ON {{.schema}}.data_keys
    REFERENCING OLD TABLE AS old_keys NEW TABLE AS new_keys
    FOR EACH STATEMENT EXECUTE FUNCTION {{.schema}}.data_keys_update_fence();

-- The row triggers now fence INSERT only (same functions, same SQLSTATEs).
DROP TRIGGER data_keys_kek_fence ON {{.schema}}.data_keys;
CREATE TRIGGER data_keys_kek_fence BEFORE INSERT ON {{.schema}}.data_keys
    FOR EACH ROW EXECUTE FUNCTION {{.schema}}.data_keys_kek_fence();
DROP TRIGGER data_keys_tenant_fence ON {{.schema}}.data_keys;
CREATE TRIGGER data_keys_tenant_fence BEFORE INSERT ON {{.schema}}.data_keys
    FOR EACH ROW EXECUTE FUNCTION {{.schema}}.data_keys_tenant_fence();

-- HOT rewraps. Rewrap changes kek_id, wrapped_dek and rewrapped_at of
-- every data key. With kek_id indexed each such update is a new heap
-- tuple plus an entry in each of the table's four indexes; without an
-- index on any of those columns and with free space on the page, it is a
-- heap-only (HOT) update that touches no index (measured: 33 against 19
-- µs of server CPU per data key, docs/BENCHMARKS.md). The index was used
-- only by RetireKEK's count of the data keys under a version, which now
-- reads the whole table (a rare operator command: about 10 ms per 100,000
-- data keys); the foreign key's ON DELETE RESTRICT check would too, but
-- kek rows are never deleted. fillfactor
-- 50 leaves each page room for every row's next version, so even the
-- first rewrap after the keys were written is HOT; it applies to pages
-- written from now on (an existing table gets it as its rows move, or at
-- once with VACUUM FULL, which this migration does not run: it would lock
-- the table).
DROP INDEX {{.schema}}.data_keys_kek;
ALTER TABLE {{.schema}}.data_keys SET (fillfactor = 50);
