-- Issue 16. Access control for flows' HTTP endpoints, enforced by the proxy before Node-RED
-- sees a request. `instances.http_auth` is `none` (open, as before), `tokens` (a bearer token of
-- `http_tokens`) or `members` (a signed-in member of the instance's team). Existing instances
-- stay open. Tandem 0.1 can still use the database: the column has a default and the table is
-- new.
ALTER TABLE instances ADD COLUMN http_auth TEXT NOT NULL DEFAULT 'none';

-- Bearer tokens of one instance's HTTP endpoints, `tdh_…`. Only the SHA-256 of a token is kept;
-- its value is shown once, when an owner creates it. They go with their instance.
-- `created_by` is the user who made it (kept if that user is ever removed: the token is the
-- instance's, not the user's).
CREATE TABLE http_tokens (
    id TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    last_used_at BIGINT,
    created_by TEXT REFERENCES users(id) ON DELETE SET NULL
);
CREATE INDEX http_tokens_instance ON http_tokens (instance_id, id);
