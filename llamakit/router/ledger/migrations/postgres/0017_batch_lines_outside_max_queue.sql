-- Batch lines (bid 0, dispatch.BATCH_BID) wait behind every interactive request and take no place from one:
-- an interactive request counts only the interactive requests waiting (against max_queue, and its account's
-- against max_share); a batch line counts them all. The same as the one-router Scheduler.acquire.
CREATE OR REPLACE FUNCTION llamakit_enqueue(lock_key bigint, channel text, me text, chars_per integer, rid text,
                                            model text, bid numeric, account bigint, arrived float8, exclude text[],
                                            prefer text, prefer_chars integer, max_queue integer, max_share integer)
RETURNS TABLE (assigned_request text, assigned_router text, assigned_node text, assigned_bid numeric)
LANGUAGE plpgsql AS $$
DECLARE
    total integer;
    mine integer;
    at_bid integer;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    SELECT count(*) FILTER (WHERE llamakit_enqueue.bid = 0 OR q.bid <> 0),
           count(*) FILTER (WHERE q.account IS NOT DISTINCT FROM llamakit_enqueue.account
                                  AND (llamakit_enqueue.bid = 0 OR q.bid <> 0)),
           count(*) FILTER (WHERE q.account IS NOT DISTINCT FROM llamakit_enqueue.account AND q.bid = llamakit_enqueue.bid)
        INTO total, mine, at_bid
        FROM queue q WHERE q.model = llamakit_enqueue.model AND q.node_id IS NULL;
    IF total >= max_queue THEN
        RAISE EXCEPTION 'queue_full %', total USING ERRCODE = 'LK429';
    END IF;
    IF account IS NOT NULL AND mine >= max_share THEN
        RAISE EXCEPTION 'queue_share %', mine USING ERRCODE = 'LK429';
    END IF;
    INSERT INTO queue (request_id, router_id, model, bid, turn, arrived, account, exclude, prefer, prefer_chars,
                       enqueued)
        VALUES (rid, me, model, bid, at_bid, arrived, account, exclude, prefer, prefer_chars,
                extract(epoch FROM clock_timestamp())::float8);
    RETURN QUERY SELECT * FROM llamakit_dispatch(lock_key, ARRAY[model], channel, me, chars_per);
END
$$;
