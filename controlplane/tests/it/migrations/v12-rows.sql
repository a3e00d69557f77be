-- Rows in every table migrations 2 to 12 added, on top of the 0.1 rows, as the API writes them:
-- a database at migration 12 with rows everywhere.
UPDATE instances SET protected = 1, ha_affinity = 0, modules = '{"node-red-node-random":"0.4.1"}', http_auth = 'tokens'
    WHERE id = '0193a1b2c3d40009a1b2c3dd';
UPDATE templates SET modules = '{"node-red-dashboard":"3.6.5"}';
UPDATE users SET disabled = 1 WHERE id = '0193a1b2c3d40001a1b2c3d5';
INSERT INTO snapshots (id, instance_id, team_id, name, description, author_id, author, created_at, nodered_version, flows, credentials, settings, env, modules, sha256) VALUES
    ('0193a1b2c3d40100a1b2c3d4', '0193a1b2c3d40009a1b2c3dd', '0193a1b2c3d40004a1b2c3d8', 'first', 'before the upgrade', '0193a1b2c3d40000a1b2c3d4', 'admin', 1733000000000, '4.1.2', '[]', '{}', '{}', '{}', '{}', 'e3b0');
INSERT INTO deployments (id, instance_id, team_id, snapshot_id, previous_snapshot_id, scope, status, replicas, probe, error, actor_id, started_at, finished_at) VALUES
    ('0193a1b2c3d40101a1b2c3d4', '0193a1b2c3d40009a1b2c3dd', '0193a1b2c3d40004a1b2c3d8', '0193a1b2c3d40100a1b2c3d4', '', 'full', 'succeeded', '[]', NULL, NULL, '0193a1b2c3d40000a1b2c3d4', 1733000000001, 1733000000002);
INSERT INTO pipelines (id, application_id, team_id, name, created_at, updated_at) VALUES
    ('0193a1b2c3d40102a1b2c3d4', '0193a1b2c3d40005a1b2c3d9', '0193a1b2c3d40004a1b2c3d8', 'to prod', 1733000000003, 1733000000003);
INSERT INTO pipeline_stages (id, pipeline_id, position, name, instance_id, action, created_at, updated_at) VALUES
    ('0193a1b2c3d40103a1b2c3d4', '0193a1b2c3d40102a1b2c3d4', 0, 'dev', '0193a1b2c3d40009a1b2c3dd', 'create_snapshot', 1733000000004, 1733000000004);
INSERT INTO library_entries (instance_id, type, path, meta, body, updated_at) VALUES
    ('0193a1b2c3d40009a1b2c3dd', 'functions', 'a.js', '{}', 'return msg;', 1733000000005);
INSERT INTO proxy_tokens (id, name, token_hash, created_at) VALUES
    ('0193a1b2c3d40104a1b2c3d4', 'edge', 'c2c2', 1733000000006);
INSERT INTO platform_meta (name, value) VALUES ('key_check', 'd3d3');
UPDATE leases SET holder = 'cp-1', address = '127.0.0.1:8081', term = 3, expires_at = 1733000010000, renewed_at = 1733000000007
    WHERE name = 'coordinator';
INSERT INTO control_planes (id, address, started_at, last_seen) VALUES
    ('cp-1', '127.0.0.1:8081', 1733000000000, 1733000000007);
INSERT INTO editor_tickets (hash, user_id, instance_id, expires_at, home) VALUES
    ('e4e4', '0193a1b2c3d40000a1b2c3d4', '0193a1b2c3d40009a1b2c3dd', 1733000060000, 'endpoints');
INSERT INTO http_tokens (id, instance_id, name, hash, created_at, expires_at, last_used_at, created_by) VALUES
    ('0193a1b2c3d40105a1b2c3d4', '0193a1b2c3d40009a1b2c3dd', 'sensor', 'f5f5', 1733000000008, NULL, 1733000000009, '0193a1b2c3d40000a1b2c3d4');
