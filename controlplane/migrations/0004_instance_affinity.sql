-- Cookie affinity of HA instances (issue 12): 1 on, 0 off, NULL the default, which is on in
-- balanced mode (browsers keep sessions with one replica: dashboards, socket.io). Existing
-- instances get the default.
ALTER TABLE instances ADD COLUMN ha_affinity BIGINT;
