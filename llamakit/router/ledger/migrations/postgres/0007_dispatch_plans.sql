-- Dispatch takes the least-loaded node and the best waiting requests by walking the indexes nodes_load and
-- queue_waiting in order, which costs the same for a herd of 1 or 1,000. Without statistics on a table (a
-- herd that has just joined, before autovacuum's ANALYZE: up to a minute), the planner estimates one row, so
-- it reads every node and sorts them instead, and PL/pgSQL keeps that plan for the connection's life: a
-- dispatch then cost 0.5-0.9 ms for 1,000 nodes against 0.03 ms, under the herd's lock. Sorting is never the
-- better plan here (the indexes give the order), so the function does without it whatever the statistics.
ALTER FUNCTION llamakit_dispatch(bigint, text[], text, text, integer) SET enable_sort = off;
