-- Issue 13. Facts about the platform as a whole: `key_check`, a value derived from the platform
-- key, so that a control plane started with another key (several control planes share one
-- database, each given the key with --platform-key-file) refuses to start instead of deriving
-- secrets no running replica accepts.
CREATE TABLE platform_meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
