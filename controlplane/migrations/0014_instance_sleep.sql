-- Issue 17. Sleep and wake: an instance that has had no traffic for `sleep_after_s` seconds has
-- its replica stopped, and the first request wakes it. NULL: sleep off, as every existing
-- instance (HA instances always have it off). `asleep_since` (epoch ms) is set while the
-- instance sleeps, NULL while it is awake. Tandem 0.1 can still use the database: it names the
-- columns it writes, and these are nullable.
ALTER TABLE instances ADD COLUMN sleep_after_s BIGINT;
ALTER TABLE instances ADD COLUMN asleep_since BIGINT;
