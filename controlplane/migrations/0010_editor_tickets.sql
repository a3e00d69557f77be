-- Issue 14. Editor tickets: the console's "Open editor" link takes one to the instance's host,
-- where the proxy exchanges it for a session on that host (the console's host and the instances'
-- share no cookie). A ticket is good for 60 s and once, for one user on one instance, and goes
-- with either. Only the SHA-256 of a ticket is kept.
CREATE TABLE editor_tickets (
    hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    instance_id TEXT NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
    expires_at BIGINT NOT NULL
);
