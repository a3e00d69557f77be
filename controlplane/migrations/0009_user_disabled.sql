-- Issue 14. A platform admin disables and re-enables users: a disabled user cannot sign in, and
-- its sessions and tokens open nothing. Existing users are enabled.
ALTER TABLE users ADD COLUMN disabled BIGINT NOT NULL DEFAULT 0;
