-- PostgreSQL's version 3 adds the function that applies a batch in one round trip; SQLite's batches run on
-- the ledger's own thread and need nothing in the schema. Kept so that both backends share version numbers.
SELECT 1;
