-- PostgreSQL's version 7 keeps its dispatch function off sorted plans; a SQLite ledger has no shared dispatch.
-- Kept so that both backends share version numbers.
SELECT 1;
