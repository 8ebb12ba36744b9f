-- PostgreSQL's version 5 adds what several routers on one database share (leases, nodes, the queue, claims);
-- one router on SQLite keeps all that in its process. Kept so that both backends share version numbers.
SELECT 1;
