-- Issue 13. Tokens of standalone proxies (`tandem proxy --control-plane`): they read the route
-- feed, report, and ask the editor gate's question, and nothing else. Only the SHA-256 of a
-- token is kept; its value is shown once, when a platform admin creates it.
CREATE TABLE proxy_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);
