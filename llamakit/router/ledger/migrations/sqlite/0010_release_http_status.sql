-- PostgreSQL's version 10 writes a release's "http_status" in its llamakit_close; SQLite's settlement is written in
-- Python and did so already. Nothing to change here: the version keeps the two backends' numbers in step.
SELECT 1;
