-- Issue 12. The npm modules a template gives the instances made from it: a JSON object,
-- name → version or range. Existing templates give none. (The template's allow and deny lists
-- of module names are part of its policy, a JSON column already.)
ALTER TABLE templates ADD COLUMN modules TEXT NOT NULL DEFAULT '{}';
