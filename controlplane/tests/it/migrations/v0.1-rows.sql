-- Rows in every table of tandem 0.1's schema, as its API wrote them: JSON as text, times in epoch
-- milliseconds, NULLs where a column allows them, and text that is not ASCII.
INSERT INTO users (id, username, email, password_hash, admin, created_at) VALUES
    ('0193a1b2c3d40000a1b2c3d4', 'admin', NULL, '$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA', 1, 1732000000000),
    ('0193a1b2c3d40001a1b2c3d5', 'zoë', 'zoe@example.com', NULL, 0, 1732000000001);
INSERT INTO sessions (hash, user_id, expires_at) VALUES
    ('5e55', '0193a1b2c3d40001a1b2c3d5', 9223372036854775807);
INSERT INTO tokens (id, user_id, name, hash, expires_at, created_at, last_used_at) VALUES
    ('0193a1b2c3d40002a1b2c3d6', '0193a1b2c3d40000a1b2c3d4', 'ci', 'a0a0', NULL, 1732000000002, NULL),
    ('0193a1b2c3d40003a1b2c3d7', '0193a1b2c3d40001a1b2c3d5', 'laptop', 'b1b1', 1832000000000, 1732000000003, 1732000000100);
INSERT INTO teams (id, name, slug, created_at) VALUES
    ('0193a1b2c3d40004a1b2c3d8', 'Ünits & Co', 'units', 1732000000004);
INSERT INTO members (team_id, user_id, role) VALUES
    ('0193a1b2c3d40004a1b2c3d8', '0193a1b2c3d40000a1b2c3d4', 'owner'),
    ('0193a1b2c3d40004a1b2c3d8', '0193a1b2c3d40001a1b2c3d5', 'viewer');
INSERT INTO applications (id, team_id, name, description, created_at) VALUES
    ('0193a1b2c3d40005a1b2c3d9', '0193a1b2c3d40004a1b2c3d8', 'plant', '', 1732000000005);
INSERT INTO stacks (id, name, nodered_version, node_version, memory_mb, replaced_by, created_at) VALUES
    ('0193a1b2c3d40006a1b2c3da', 'nr-4.1', '4.1.2', '22.11.0', 256, NULL, 1732000000006),
    ('0193a1b2c3d40007a1b2c3db', 'nr-4.0', '4.0.9', NULL, 128, '0193a1b2c3d40006a1b2c3da', 1732000000007);
INSERT INTO templates (id, name, settings, env, policy, created_at) VALUES
    ('0193a1b2c3d40008a1b2c3dc', 'default', '{"editorTheme":{"projects":{"enabled":false}}}', '{"TZ":"Europe/Paris"}', '{}', 1732000000008);
INSERT INTO instances (id, name, team_id, application_id, stack_id, template_id, settings, env, flows, ha_replicas, ha_mode, desired_state, created_at, updated_at) VALUES
    ('0193a1b2c3d40009a1b2c3dd', 'orders', '0193a1b2c3d40004a1b2c3d8', '0193a1b2c3d40005a1b2c3d9', '0193a1b2c3d40006a1b2c3da', '0193a1b2c3d40008a1b2c3dc', '{}', '{"API_URL":"https://example.com/?a=1;b=2"}', '[{"id":"n1","type":"inject","name":"it''s 5 o''clock"}]', 3, 'balanced', 'running', 1732000000009, 1732000000010),
    ('0193a1b2c3d4000aa1b2c3de', 'line-2', '0193a1b2c3d40004a1b2c3d8', '0193a1b2c3d40005a1b2c3d9', '0193a1b2c3d40007a1b2c3db', NULL, '{"httpNodeCors":{"origin":"*"}}', '{}', '[]', NULL, NULL, 'stopped', 1732000000011, 1732000000011);
INSERT INTO audit (id, ts, actor_id, actor, event, team_id, instance_id, object_type, object_id, body) VALUES
    ('0193a1b2c3d4000ba1b2c3df', 1732000000012, '0193a1b2c3d40000a1b2c3d4', 'admin', 'instance.created', '0193a1b2c3d40004a1b2c3d8', '0193a1b2c3d40009a1b2c3dd', 'instance', '0193a1b2c3d40009a1b2c3dd', '{"name":"orders"}'),
    ('0193a1b2c3d4000ca1b2c3e0', 1732000000013, NULL, 'system', 'platform.bootstrapped', NULL, NULL, 'platform', '-', '{}');
