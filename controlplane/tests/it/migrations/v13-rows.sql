-- Rows in every table migration 13 added, on top of the v12 rows, as the API writes them: a
-- database at migration 13 with rows everywhere.
INSERT INTO custom_hostnames (instance_id, hostname, certificate, key_sealed, created_at, updated_at) VALUES
    ('0193a1b2c3d4000aa1b2c3de', 'flows.example.org', '-----BEGIN CERTIFICATE-----', 'a6a6', 1734000000000, 1734000000001);
