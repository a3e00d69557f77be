-- Protected instances (issue 11): only the team's owners deploy flows to a protected instance.
-- Existing instances stay unprotected. Tandem 0.1 can still use the database: it names the
-- columns it writes, and this one has a default. BIGINT 0 or 1, as `users.admin`.
ALTER TABLE instances ADD COLUMN protected BIGINT NOT NULL DEFAULT 0;
