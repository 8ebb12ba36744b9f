-- Per-key limits (NULL: none) and the key's spend so far, kept by every hold and settlement of the key; the
-- key that made each hold, and the display prefix of the key on each usage record. Spend of keys made before
-- this version counts from here.
ALTER TABLE api_keys ADD COLUMN spend_cap bigint;
ALTER TABLE api_keys ADD COLUMN spend_cap_day bigint;
ALTER TABLE api_keys ADD COLUMN spend_cap_month bigint;
ALTER TABLE api_keys ADD COLUMN rpm_limit bigint;
ALTER TABLE api_keys ADD COLUMN tpm_limit bigint;
ALTER TABLE api_keys ADD COLUMN max_parallel_requests bigint;
ALTER TABLE api_keys ADD COLUMN expires_at double precision;
ALTER TABLE api_keys ADD COLUMN models text;  -- a JSON list of model names
ALTER TABLE api_keys ADD COLUMN spent bigint NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN held bigint NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN spent_day bigint NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN day text;  -- the UTC day of spent_day, '2026-11-30'
ALTER TABLE api_keys ADD COLUMN spent_month bigint NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN month text;  -- the UTC month of spent_month, '2026-11'
ALTER TABLE holds ADD COLUMN key_hash text;
ALTER TABLE usage ADD COLUMN key_prefix text;

-- {"request_id", "account_id", "model", "amount", "bid", "now", "user", "router_id", "key_hash", "day", "month"}
-- → {} or {"error": "unknown_account" | "duplicate" | "insufficient" ("balance") | "unknown_key" |
-- "spend_cap" ("period", "cap", "available")}. The key's caps are checked under its row's lock, after the
-- account's: the order every operation takes them in.
CREATE OR REPLACE FUNCTION llamakit_hold(op jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    account bigint := (op->>'account_id')::bigint;
    amount bigint := (op->>'amount')::bigint;
    balance bigint;
    k api_keys%ROWTYPE;
    k_day bigint;
    k_month bigint;
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
    IF op->>'key_hash' IS NOT NULL THEN
        SELECT * INTO k FROM api_keys WHERE key_hash = op->>'key_hash' FOR UPDATE;
        IF NOT FOUND THEN
            RETURN jsonb_build_object('error', 'unknown_key');
        END IF;
        k_day := CASE WHEN k.day = op->>'day' THEN k.spent_day ELSE 0 END;
        k_month := CASE WHEN k.month = op->>'month' THEN k.spent_month ELSE 0 END;
        IF k.spend_cap IS NOT NULL AND k.spent + k.held + amount > k.spend_cap THEN
            RETURN jsonb_build_object('error', 'spend_cap', 'period', 'total', 'cap', k.spend_cap,
                                      'available', GREATEST(0, k.spend_cap - k.spent - k.held));
        END IF;
        IF k.spend_cap_day IS NOT NULL AND k_day + k.held + amount > k.spend_cap_day THEN
            RETURN jsonb_build_object('error', 'spend_cap', 'period', 'day', 'cap', k.spend_cap_day,
                                      'available', GREATEST(0, k.spend_cap_day - k_day - k.held));
        END IF;
        IF k.spend_cap_month IS NOT NULL AND k_month + k.held + amount > k.spend_cap_month THEN
            RETURN jsonb_build_object('error', 'spend_cap', 'period', 'month', 'cap', k.spend_cap_month,
                                      'available', GREATEST(0, k.spend_cap_month - k_month - k.held));
        END IF;
        UPDATE api_keys SET held = k.held + amount, spent_day = k_day, day = op->>'day', spent_month = k_month,
                            month = op->>'month'
            WHERE key_hash = k.key_hash;
    END IF;
    UPDATE accounts SET balance = accounts.balance - amount WHERE id = account;
    INSERT INTO holds (id, account_id, model, amount, bid, created, "user", router_id, key_hash)
        VALUES (op->>'request_id', account, op->>'model', amount, op->>'bid', (op->>'now')::float8, op->>'user',
                op->>'router_id', op->>'key_hash');
    RETURN '{}'::jsonb;
END
$$;

-- As version 4's, and the charge counts to the spend of the key that made the hold ("day", "month": the UTC
-- day and month of "now").
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
                       held, latency_ms, queue_ms, error, created, "user", key_prefix)
        VALUES (hold.id, hold.account_id, hold.model, op->>'node', op->>'status', (op->>'prompt_tokens')::bigint,
                (op->>'completion_tokens')::bigint, charged, COALESCE(op->>'bid', hold.bid), hold.amount,
                (op->>'latency_ms')::float8, (op->>'queue_ms')::float8, op->>'error', now_, hold."user",
                (SELECT prefix FROM api_keys WHERE api_keys.key_hash = hold.key_hash));
    IF jsonb_typeof(op->'remember') = 'object' THEN
        INSERT INTO idempotency (account_id, key, request_id, fingerprint, response, created)
            VALUES (hold.account_id, op->'remember'->>'key', hold.id, op->'remember'->>'fingerprint',
                    op->'remember'->>'response', now_);
    END IF;
    RETURN jsonb_build_object('account_id', hold.account_id, 'held', hold.amount, 'charged', charged,
                              'balance', balance);
END
$$;
