-- Tandem's store. Written once for SQLite and PostgreSQL: TEXT and BIGINT only, times in epoch
-- milliseconds, JSON as TEXT, booleans as 0/1. Ids are time-ordered hex strings.
CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL);

CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    email TEXT,
    password_hash TEXT,
    admin BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS sessions (
    hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    expires_at BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    expires_at BIGINT,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT
);

CREATE TABLE IF NOT EXISTS teams (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    slug TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS members (
    team_id TEXT NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    PRIMARY KEY (team_id, user_id)
);

CREATE TABLE IF NOT EXISTS applications (
    id TEXT PRIMARY KEY,
    team_id TEXT NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL,
    UNIQUE (team_id, name)
);

CREATE TABLE IF NOT EXISTS stacks (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    nodered_version TEXT NOT NULL,
    node_version TEXT,
    memory_mb BIGINT NOT NULL,
    replaced_by TEXT REFERENCES stacks(id),
    created_at BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS templates (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    settings TEXT NOT NULL,
    env TEXT NOT NULL,
    policy TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    team_id TEXT NOT NULL REFERENCES teams(id),
    application_id TEXT NOT NULL REFERENCES applications(id),
    stack_id TEXT NOT NULL REFERENCES stacks(id),
    template_id TEXT REFERENCES templates(id),
    settings TEXT NOT NULL,
    env TEXT NOT NULL,
    flows TEXT NOT NULL,
    ha_replicas BIGINT,
    ha_mode TEXT,
    desired_state TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_team ON instances (team_id, id);
CREATE INDEX IF NOT EXISTS instances_application ON instances (application_id, id);

CREATE TABLE IF NOT EXISTS audit (
    id TEXT PRIMARY KEY,
    ts BIGINT NOT NULL,
    actor_id TEXT,
    actor TEXT NOT NULL,
    event TEXT NOT NULL,
    team_id TEXT,
    instance_id TEXT,
    object_type TEXT NOT NULL,
    object_id TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_team ON audit (team_id, id);
CREATE INDEX IF NOT EXISTS audit_instance ON audit (instance_id, id);
