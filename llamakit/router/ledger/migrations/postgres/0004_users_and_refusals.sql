-- The OpenAI `user` of a request, kept on its hold and its usage record; refused requests get usage records
-- too (no hold, no cost), with the HTTP status they were refused with.
ALTER TABLE holds ADD COLUMN "user" text;
ALTER TABLE usage ADD COLUMN "user" text;
ALTER TABLE usage ADD COLUMN http_status integer;
-- The dashboard's "today" figures and `llamakit usage --since` read usage by time.
CREATE INDEX usage_created ON usage (created);

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
    INSERT INTO holds (id, account_id, model, amount, bid, created, "user")
        VALUES (op->>'request_id', account, op->>'model', amount, op->>'bid', (op->>'now')::float8, op->>'user');
    RETURN '{}'::jsonb;
END
$$;

CREATE OR REPLACE FUNCTION llamakit_close(op jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    hold holds%ROWTYPE;
    settling boolean := jsonb_typeof(op->'charge') = 'number';
    charged bigint := 0;
    balance bigint;
    now_ float8 := (op->>'now')::float8;
BEGIN
    SELECT * INTO hold FROM holds WHERE id = op->>'request_id' FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('error', 'closed', 'status', NULL);
    END IF;
    IF hold.status <> 'open' THEN
        RETURN jsonb_build_object('error', 'closed', 'status', hold.status);
    END IF;
    IF settling THEN
        -- The hold is the most the client agreed to pay; see fees.settle_amount.
        charged := LEAST((op->>'charge')::bigint, hold.amount);
        INSERT INTO charges (hold_id, account_id, node, model, amount, prompt_tokens, completion_tokens, created)
            VALUES (hold.id, hold.account_id, op->>'node', hold.model, charged, (op->>'prompt_tokens')::bigint,
                    (op->>'completion_tokens')::bigint, now_);
    END IF;
    UPDATE accounts SET balance = accounts.balance + hold.amount - charged WHERE id = hold.account_id
        RETURNING accounts.balance INTO balance;
    UPDATE holds SET status = CASE WHEN settling THEN 'settled' ELSE 'released' END, closed = now_
        WHERE id = hold.id;
    INSERT INTO usage (request_id, account_id, model, node, status, prompt_tokens, completion_tokens, cost, bid,
                       held, latency_ms, queue_ms, error, created, "user")
        VALUES (hold.id, hold.account_id, hold.model, op->>'node', op->>'status', (op->>'prompt_tokens')::bigint,
                (op->>'completion_tokens')::bigint, charged, COALESCE(op->>'bid', hold.bid), hold.amount,
                (op->>'latency_ms')::float8, (op->>'queue_ms')::float8, op->>'error', now_, hold."user");
    IF jsonb_typeof(op->'remember') = 'object' THEN
        INSERT INTO idempotency (account_id, key, request_id, fingerprint, response, created)
            VALUES (hold.account_id, op->'remember'->>'key', hold.id, op->'remember'->>'fingerprint',
                    op->'remember'->>'response', now_);
    END IF;
    RETURN jsonb_build_object('account_id', hold.account_id, 'held', hold.amount, 'charged', charged,
                              'balance', balance);
END
$$;
