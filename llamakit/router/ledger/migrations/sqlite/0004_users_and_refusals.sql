-- The OpenAI `user` of a request, kept on its hold and its usage record; refused requests get usage records
-- too (no hold, no cost), with the HTTP status they were refused with.
ALTER TABLE holds ADD COLUMN user TEXT;
ALTER TABLE usage ADD COLUMN user TEXT;
ALTER TABLE usage ADD COLUMN http_status INTEGER;
-- The dashboard's "today" figures and `llamakit usage --since` read usage by time.
CREATE INDEX usage_created ON usage (created);
