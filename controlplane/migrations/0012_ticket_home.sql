-- Issue 16. A ticket leads to the editor (the console's "Open editor") or to the instance's own
-- endpoints when they are for its team's members (HTTP auth `members`). Tickets made before
-- lead to the editor.
ALTER TABLE editor_tickets ADD COLUMN home TEXT NOT NULL DEFAULT 'editor';
