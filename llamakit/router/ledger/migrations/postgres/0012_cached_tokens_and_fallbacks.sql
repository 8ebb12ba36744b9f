-- Prompt tokens a node read from its cache ("cached_tokens", among "prompt_tokens") and the credits their own fee
-- saved the client ("cache_discount"), and the models a request's `models` list passed over before the one that
-- served it ("passed_over": JSON, [{"model", "reason", "message"}], NULL when none was). 0 and NULL on records
-- made before this version.
ALTER TABLE usage ADD COLUMN cached_tokens bigint NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN cache_discount bigint NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN passed_over text;

-- As version 11's, and the charge and the usage record are op's "model" when it is given (the model that served a
-- request whose first model was passed over; the hold's otherwise), with op's "cached_tokens", "cache_discount"
-- and "passed_over".
CREATE OR REPLACE FUNCTION llamakit_close(op jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    hold holds%ROWTYPE;
    settling boolean := jsonb_typeof(op->'charge') = 'number';
    charged bigint := 0;
    balance bigint;
    now_ float8 := (op->>'now')::float8;
    served text;
BEGIN
    SELECT * INTO hold FROM holds WHERE id = op->>'request_id' FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('error', 'closed', 'status', NULL);
    END IF;
    IF hold.status <> 'open' THEN
        RETURN jsonb_build_object('error', 'closed', 'status', hold.status);
    END IF;
    served := COALESCE(op->>'model', hold.model);
    IF settling THEN
        -- The hold is the most the client agreed to pay; see fees.settle_amount.
        charged := LEAST((op->>'charge')::bigint, hold.amount);
        INSERT INTO charges (hold_id, account_id, node, model, amount, prompt_tokens, completion_tokens, created)
            VALUES (hold.id, hold.account_id, op->>'node', served, charged, (op->>'prompt_tokens')::bigint,
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
                       http_status, overhead_ms, cached_tokens, cache_discount, passed_over)
        VALUES (hold.id, hold.account_id, served, op->>'node', op->>'status', (op->>'prompt_tokens')::bigint,
                (op->>'completion_tokens')::bigint, charged, COALESCE(op->>'bid', hold.bid), hold.amount,
                (op->>'latency_ms')::float8, (op->>'queue_ms')::float8, op->>'error', now_, hold."user",
                (SELECT prefix FROM api_keys WHERE api_keys.key_hash = hold.key_hash), op->>'credit_value',
                op->>'currency', (op->>'http_status')::integer, (op->>'overhead_ms')::float8,
                COALESCE((op->>'cached_tokens')::bigint, 0), COALESCE((op->>'cache_discount')::bigint, 0),
                op->>'passed_over');
    IF jsonb_typeof(op->'remember') = 'object' THEN
        INSERT INTO idempotency (account_id, key, request_id, fingerprint, response, created)
            VALUES (hold.account_id, op->'remember'->>'key', hold.id, op->'remember'->>'fingerprint',
                    op->'remember'->>'response', now_);
    END IF;
    RETURN jsonb_build_object('account_id', hold.account_id, 'held', hold.amount, 'charged', charged,
                              'balance', balance);
END
$$;
