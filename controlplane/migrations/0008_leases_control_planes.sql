-- Issue 13. Several control planes on one database: the coordinator's lease (one row), held by
-- one control plane at a time until it expires, with a term that grows with every new holder;
-- and every control plane's presence, for GET /api/v1/cluster.
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    address TEXT NOT NULL,
    term BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    renewed_at BIGINT NOT NULL
);
INSERT INTO leases (name, holder, address, term, expires_at, renewed_at)
    VALUES ('coordinator', '', '', 0, 0, 0);
CREATE TABLE control_planes (
    id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    last_seen BIGINT NOT NULL
);
