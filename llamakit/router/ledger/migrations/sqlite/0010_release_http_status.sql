-- PostgreSQL's version 10 makes its batch function keep a release's HTTP status; SQLite's ledger writes it from
-- Python, and needs nothing in the schema. Kept so that both backends share version numbers.
SELECT 1;
