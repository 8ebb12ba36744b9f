-- PostgreSQL's version 10 redefines its settlement function to keep a release's http_status; SQLite's settlement
-- is Python (_sqlite.py) and has kept it since version 4. Nothing to do here: the versions stay in step.
SELECT 1;
