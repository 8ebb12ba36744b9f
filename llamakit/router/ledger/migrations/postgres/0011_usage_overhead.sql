-- The router's own time on each request ("overhead_ms": its time less the queue's and the node's, up to its
-- settlement), as X-Llamakit-Overhead-Ms told the client; NULL on refusals and on records made before this version.
ALTER TABLE usage ADD COLUMN overhead_ms double precision;

-- As version 10's, and the usage record keeps op's "overhead_ms".
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
    IF hold.key_hash IS NOT NULL THEN
        UPDATE api_keys SET held = api_keys.held - hold.amount, spent = api_keys.spent + charged,
                            spent_day = CASE WHEN api_keys.day = op->>'day' THEN api_keys.spent_day ELSE 0 END
                                        + charged,
                            day = op->>'day',
                            spent_month = CASE WHEN api_keys.month = op->>'month' THEN api_keys.spent_month ELSE 0 END
                                          + charged,
                            month = op->>'month'
            WHERE key_hash = hold.key_hash;
    END IF;
    UPDATE holds SET status = CASE WHEN settling THEN 'settled' ELSE 'released' END, closed = now_
        WHERE id = hold.id;
    INSERT INTO usage (request_id, account_id, model, node, status, prompt_tokens, completion_tokens, cost, bid,
                       held, latency_ms, queue_ms, error, created, "user", key_prefix, credit_value, currency,
                       http_status, overhead_ms)
        VALUES (hold.id, hold.account_id, hold.model, op->>'node', op->>'status', (op->>'prompt_tokens')::bigint,
                (op->>'completion_tokens')::bigint, charged, COALESCE(op->>'bid', hold.bid), hold.amount,
                (op->>'latency_ms')::float8, (op->>'queue_ms')::float8, op->>'error', now_, hold."user",
                (SELECT prefix FROM api_keys WHERE api_keys.key_hash = hold.key_hash), op->>'credit_value',
                op->>'currency', (op->>'http_status')::integer, (op->>'overhead_ms')::float8);
    IF jsonb_typeof(op->'remember') = 'object' THEN
        INSERT INTO idempotency (account_id, key, request_id, fingerprint, response, created)
            VALUES (hold.account_id, op->'remember'->>'key', hold.id, op->'remember'->>'fingerprint',
                    op->'remember'->>'response', now_);
    END IF;
    RETURN jsonb_build_object('account_id', hold.account_id, 'held', hold.amount, 'charged', charged,
                              'balance', balance);
END
$$;
