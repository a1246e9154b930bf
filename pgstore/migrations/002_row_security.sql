-- Row-level security: a session sees and changes only the rows of the
-- project named by the keybroker.project_id setting. Superusers, roles with
-- BYPASSRLS and (unless FORCE ROW LEVEL SECURITY is added) the tables' owner
-- are not subject to it; tenant roles are. kek has no project and no policy.
ALTER TABLE {{.schema}}.data_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE {{.schema}}.encrypted_secrets ENABLE ROW LEVEL SECURITY;
ALTER TABLE {{.schema}}.key_events ENABLE ROW LEVEL SECURITY;

CREATE POLICY project_isolation ON {{.schema}}.data_keys
    USING (project_id = current_setting('keybroker.project_id', true))
    WITH CHECK (project_id = current_setting('keybroker.project_id', true));
CREATE POLICY project_isolation ON {{.schema}}.encrypted_secrets
    USING (project_id = current_setting('keybroker.project_id', true))
    WITH CHECK (project_id = current_setting('keybroker.project_id', true));
CREATE POLICY project_isolation ON {{.schema}}.key_events
    USING (project_id = current_setting('keybroker.project_id', true))
    WITH CHECK (project_id = current_setting('keybroker.project_id', true));
