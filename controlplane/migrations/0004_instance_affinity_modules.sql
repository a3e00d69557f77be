-- Issue 12. Cookie affinity of HA instances: 1 on, 0 off, NULL the default, which is on in
-- balanced mode (browsers keep sessions with one replica: dashboards, socket.io). Existing
-- instances get the default.
ALTER TABLE instances ADD COLUMN ha_affinity BIGINT;
-- The npm modules an instance's flows use: a JSON object, name → version or range. Existing
-- instances have none.
ALTER TABLE instances ADD COLUMN modules TEXT NOT NULL DEFAULT '{}';
