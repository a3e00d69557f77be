-- Issue 16. Custom hostnames: a host of an owner's own domain (`flows.example.org`), routed like
-- the instance's `<name>.<base domain>`; at most one per instance, and unique on the platform.
-- `certificate` (PEM chain) and `key_sealed` (its PEM private key, sealed with the platform key:
-- hex of nonce and XChaCha20-Poly1305 ciphertext, as secret variables) are both set or both
-- null; the proxies' HTTPS listeners serve them for the hostname. They go with their instance.
-- Tandem 0.1 can still use the database: the table is new.
CREATE TABLE custom_hostnames (
    instance_id TEXT PRIMARY KEY REFERENCES instances(id) ON DELETE CASCADE,
    hostname TEXT NOT NULL UNIQUE,
    certificate TEXT,
    key_sealed TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
