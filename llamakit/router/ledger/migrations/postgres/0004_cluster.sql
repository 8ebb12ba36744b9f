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
    INSERT INTO holds (id, account_id, model, amount, bid, created, router_id)
        VALUES (op->>'request_id', account, op->>'model', amount, op->>'bid', (op->>'now')::float8,
                op->>'router_id');
    RETURN '{}'::jsonb;
END
$$;
