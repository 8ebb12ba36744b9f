-- PostgreSQL's version 5 adds what several routers share (a queue, leases, membership); a SQLite ledger serves
-- one router and needs none of it. Kept so that both backends share version numbers.
SELECT 1;
