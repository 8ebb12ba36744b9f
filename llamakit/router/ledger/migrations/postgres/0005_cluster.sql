-- Several routers on one database (`--cluster`): their leases, the herd's membership, one queue for the herd,
-- idempotency claims that every router sees, and the router that made each hold.

-- A router is alive while its lease has not run out (times are the database's clock, epoch seconds).
CREATE TABLE routers (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL DEFAULT '',
    started DOUBLE PRECISION NOT NULL,
    lease_until DOUBLE PRECISION NOT NULL
);

-- The herd: written by /herd/join, drain/undrain and the health checks of whichever router leads them.
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    name TEXT NOT NULL,
    models TEXT[] NOT NULL,
    slots INTEGER NOT NULL CHECK (slots >= 1),
    static BOOLEAN NOT NULL DEFAULT false,
    draining BOOLEAN NOT NULL DEFAULT false,
    up BOOLEAN NOT NULL DEFAULT true,
    resting_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_seen DOUBLE PRECISION NOT NULL,
    -- Requests running on it (rows of `queue` with its node_id), kept under the dispatch lock.
    running INTEGER NOT NULL DEFAULT 0 CHECK (running >= 0)
);
-- Dispatch reads the least-loaded free nodes in this order, so its cost does not grow with the herd.
CREATE INDEX nodes_load ON nodes ((running::float8 / slots), (running - slots), name) WHERE up AND NOT draining;

-- Requests waiting for a node (node_id NULL) or running on one (node_id set): a node's free slots are its
-- slots less its running rows, whichever router sent them. Waiting rows are served by (bid DESC, turn,
-- arrived, seq): the order of the in-process scheduler.
CREATE TABLE queue (
    request_id TEXT PRIMARY KEY,
    router_id TEXT NOT NULL,
    model TEXT NOT NULL,
    bid NUMERIC NOT NULL,
    turn INTEGER NOT NULL,
    arrived DOUBLE PRECISION NOT NULL,
    seq BIGINT GENERATED ALWAYS AS IDENTITY,
    account BIGINT,
    exclude TEXT[] NOT NULL DEFAULT '{}',
    prefer TEXT,
    prefer_chars INTEGER NOT NULL DEFAULT 0,
    node_id TEXT,
    enqueued DOUBLE PRECISION NOT NULL
);
CREATE INDEX queue_waiting ON queue (model, bid DESC, turn, arrived, seq) WHERE node_id IS NULL;
CREATE INDEX queue_running ON queue (node_id) WHERE node_id IS NOT NULL;
CREATE INDEX queue_router ON queue (router_id);

-- Idempotency keys whose first request is running, and on which router.
CREATE TABLE idempotency_claims (
    account_id BIGINT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    router_id TEXT NOT NULL,
    PRIMARY KEY (account_id, key)
);
CREATE INDEX idempotency_claims_router ON idempotency_claims (router_id);

-- The router that made a hold, so that the holds of a router whose lease ran out can be released by another.
ALTER TABLE holds ADD COLUMN router_id TEXT;
CREATE INDEX holds_open_router ON holds (router_id) WHERE status = 'open';

CREATE OR REPLACE FUNCTION llamakit_hold(op jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    account bigint := (op->>'account_id')::bigint;
    amount bigint := (op->>'amount')::bigint;
    balance bigint;
BEGIN
    SELECT accounts.balance INTO balance FROM accounts WHERE id = account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('error', 'unknown_account');
    END IF;
    IF EXISTS (SELECT 1 FROM holds WHERE id = op->>'request_id') THEN
        RETURN jsonb_build_object('error', 'duplicate');
    END IF;
    IF balance < amount THEN
        RETURN jsonb_build_object('error', 'insufficient', 'balance', balance);
    END IF;
    UPDATE accounts SET balance = accounts.balance - amount WHERE id = account;
    INSERT INTO holds (id, account_id, model, amount, bid, created, "user", router_id)
        VALUES (op->>'request_id', account, op->>'model', amount, op->>'bid', (op->>'now')::float8, op->>'user',
                op->>'router_id');
    RETURN '{}'::jsonb;
END
$$;

-- Dispatch: under the herd's advisory lock, give the best waiting rows of `models` (NULL: every model with
-- waiting rows) the least-loaded free nodes, the in-process Scheduler's rules: (bid DESC, turn, arrived, seq);
-- a row whose `exclude` leaves it no free node is passed over, keeping its place; its `prefer` node is taken
-- while the prefix it likely holds (`prefer_chars`) is worth `chars_per` characters per extra running request.
-- Assignments of other routers than `me` are announced on `channel` ("router request node"); all are returned.
-- One statement, so that the lock is held for no round trip to a router.
CREATE FUNCTION llamakit_dispatch(lock_key bigint, models text[], channel text, me text, chars_per integer)
RETURNS TABLE (assigned_request text, assigned_router text, assigned_node text, assigned_bid numeric)
LANGUAGE plpgsql AS $$
DECLARE
    m text;
    w record;
    chosen text;
    chosen_running integer;
    held_running integer;
    now_ float8 := extract(epoch FROM clock_timestamp())::float8;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    IF models IS NULL THEN
        models := ARRAY(SELECT DISTINCT q.model FROM queue q WHERE q.node_id IS NULL);
    END IF;
    FOREACH m IN ARRAY models LOOP
        FOR w IN SELECT q.request_id, q.router_id, q.bid, q.exclude, q.prefer, q.prefer_chars FROM queue q
                 WHERE q.model = m AND q.node_id IS NULL
                 ORDER BY q.bid DESC, q.turn, q.arrived, q.seq LIMIT 64 LOOP
            chosen := NULL;
            SELECT n.id, n.running INTO chosen, chosen_running FROM nodes n
                WHERE n.up AND NOT n.draining AND n.running < n.slots AND m = ANY (n.models)
                  AND n.resting_until <= now_ AND NOT (n.id = ANY (w.exclude))
                ORDER BY n.running::float8 / n.slots, n.running - n.slots, n.name LIMIT 1;
            IF chosen IS NULL THEN
                IF cardinality(w.exclude) = 0 THEN
                    EXIT;  -- no free slot for this model at all
                END IF;
                CONTINUE;  -- passed over: only nodes it must avoid have room
            END IF;
            IF w.prefer IS NOT NULL AND w.prefer <> chosen AND NOT (w.prefer = ANY (w.exclude)) THEN
                SELECT n.running INTO held_running FROM nodes n
                    WHERE n.id = w.prefer AND n.up AND NOT n.draining AND n.running < n.slots
                      AND m = ANY (n.models) AND n.resting_until <= now_;
                IF FOUND AND (held_running - chosen_running) * chars_per <= w.prefer_chars THEN
                    chosen := w.prefer;
                END IF;
            END IF;
            UPDATE nodes SET running = nodes.running + 1 WHERE nodes.id = chosen;
            UPDATE queue SET node_id = chosen WHERE queue.request_id = w.request_id;
            IF w.router_id <> me THEN
                PERFORM pg_notify(channel, w.router_id || ' ' || w.request_id || ' ' || chosen);
            END IF;
            assigned_request := w.request_id;
            assigned_router := w.router_id;
            assigned_node := chosen;
            assigned_bid := w.bid;
            RETURN NEXT;
        END LOOP;
    END LOOP;
END
$$;

-- A request arrives: queue it (its turn: how many of its account's requests wait at its bid for its model)
-- and dispatch its model, in one statement. Raises SQLSTATE LK429 'queue_full <waiting>' or
-- 'queue_share <mine>' when the model's queue, or the account's share of it, is full.
CREATE FUNCTION llamakit_enqueue(lock_key bigint, channel text, me text, chars_per integer, rid text, model text,
                                 bid numeric, account bigint, arrived float8, exclude text[], prefer text,
                                 prefer_chars integer, max_queue integer, max_share integer)
RETURNS TABLE (assigned_request text, assigned_router text, assigned_node text, assigned_bid numeric)
LANGUAGE plpgsql AS $$
DECLARE
    total integer;
    mine integer;
    at_bid integer;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    SELECT count(*), count(*) FILTER (WHERE q.account IS NOT DISTINCT FROM llamakit_enqueue.account),
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

-- A request is done with its slot (or gave up waiting): its row goes, its node's slot is free again, and the
-- models that node serves are dispatched, in one statement.
CREATE FUNCTION llamakit_finish(lock_key bigint, channel text, me text, chars_per integer, rid text)
RETURNS TABLE (assigned_request text, assigned_router text, assigned_node text, assigned_bid numeric)
LANGUAGE plpgsql AS $$
DECLARE
    freed text;
    served text[];
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    DELETE FROM queue q WHERE q.request_id = rid RETURNING q.node_id INTO freed;
    IF freed IS NULL THEN
        RETURN;
    END IF;
    UPDATE nodes SET running = GREATEST(nodes.running - 1, 0) WHERE nodes.id = freed RETURNING nodes.models INTO served;
    IF served IS NOT NULL THEN
        RETURN QUERY SELECT * FROM llamakit_dispatch(lock_key, served, channel, me, chars_per);
    END IF;
END
$$;

-- A batch first locks every account it touches, in id order. Without it, batches of two routers deadlock
-- (one locks a hold and then its account, the other the account and then a hold), and a batch that loses
-- five times in a row fails its callers: seen with three routers selling to one account.
CREATE OR REPLACE FUNCTION llamakit_apply(ops jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    op jsonb;
    result jsonb;
    results jsonb := '[]'::jsonb;
BEGIN
    PERFORM 1 FROM accounts WHERE id IN (
        SELECT (o->>'account_id')::bigint FROM jsonb_array_elements(ops) AS o WHERE o->>'op' = 'hold'
        UNION
        SELECT h.account_id FROM holds h JOIN jsonb_array_elements(ops) AS o ON h.id = o->>'request_id'
            WHERE o->>'op' <> 'hold'
    ) ORDER BY id FOR UPDATE;
    FOR op IN SELECT value FROM jsonb_array_elements(ops) LOOP
        BEGIN
            IF op->>'op' = 'hold' THEN
                result := llamakit_hold(op);
            ELSE
                result := llamakit_close(op);
            END IF;
        EXCEPTION WHEN deadlock_detected OR serialization_failure THEN
            RAISE;  -- the whole batch is tried again
        WHEN unique_violation THEN
            -- Two routers holding for one request id at once: the later one finds the key taken.
            result := jsonb_build_object(
                'error', CASE WHEN op->>'op' = 'hold' THEN 'duplicate' ELSE 'database' END, 'message', SQLERRM);
        WHEN OTHERS THEN
            result := jsonb_build_object('error', 'database', 'message', SQLERRM);
        END;
        results := results || jsonb_build_array(result);
    END LOOP;
    RETURN results;
END
$$;
