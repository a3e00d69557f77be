-- Flows in Tandem's store, snapshots, deployments and pipelines (issue 11).
--
-- `instances.flows` was the flows given at creation; replicas kept what the editor deployed in
-- their own `flows.json`. From here on the store holds each instance's flows and their encrypted
-- credentials, and replicas read and save them through the storage API. Existing instances keep
-- `flows_in_store = 0` until their first replica started by this version hands its own files to
-- the store (`POST /api/v1/storage/{id}/flows/import`), so nothing deployed before is lost.
-- Tandem 0.1 can still use the database: the new columns have defaults and the new tables are
-- its own.
ALTER TABLE instances ADD COLUMN credentials TEXT NOT NULL DEFAULT '{}';
ALTER TABLE instances ADD COLUMN flows_in_store BIGINT NOT NULL DEFAULT 0;

-- An immutable record of one instance's state. `credentials` stay encrypted with the instance's
-- credential secret; `env` is the instance's stored variables, secrets sealed for the instance.
CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL,
    team_id TEXT NOT NULL,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    author_id TEXT,
    author TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    nodered_version TEXT NOT NULL,
    flows TEXT NOT NULL,
    credentials TEXT NOT NULL,
    settings TEXT NOT NULL,
    env TEXT NOT NULL,
    modules TEXT NOT NULL,
    sha256 TEXT NOT NULL
);
CREATE INDEX snapshots_instance ON snapshots (instance_id, id);

-- A deploy of a snapshot to an instance. `previous_snapshot_id` is what the instance ran before
-- (captured as a snapshot when the deploy began): what a rollback restores. `scope` is what it
-- changes: `flows` (flows and credentials) or `everything` (settings and environment too).
-- `replicas` is JSON.
CREATE TABLE deployments (
    id TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL,
    team_id TEXT NOT NULL,
    snapshot_id TEXT NOT NULL,
    previous_snapshot_id TEXT NOT NULL,
    scope TEXT NOT NULL,
    status TEXT NOT NULL,
    replicas TEXT NOT NULL,
    probe TEXT,
    error TEXT,
    actor_id TEXT,
    started_at BIGINT NOT NULL,
    finished_at BIGINT
);
CREATE INDEX deployments_instance ON deployments (instance_id, id);
CREATE INDEX deployments_status ON deployments (status);

CREATE TABLE pipelines (
    id TEXT PRIMARY KEY,
    application_id TEXT NOT NULL,
    team_id TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX pipelines_application ON pipelines (application_id, id);

-- Stages in `position` order; `action` is create_snapshot, use_latest_snapshot or prompt.
CREATE TABLE pipeline_stages (
    id TEXT PRIMARY KEY,
    pipeline_id TEXT NOT NULL,
    position BIGINT NOT NULL,
    name TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    action TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX pipeline_stages_pipeline ON pipeline_stages (pipeline_id, position);

-- The library of an instance's editor (saved flows, functions, templates): one row per entry,
-- `meta` a JSON object, `path` relative to its type (`flows`, `functions`...), `/`-separated.
CREATE TABLE library_entries (
    instance_id TEXT NOT NULL,
    type TEXT NOT NULL,
    path TEXT NOT NULL,
    meta TEXT NOT NULL,
    body TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (instance_id, type, path)
);

-- One deploy per instance at a time, whatever the number of control planes.
CREATE UNIQUE INDEX deployments_one_running ON deployments (instance_id) WHERE status = 'running';
