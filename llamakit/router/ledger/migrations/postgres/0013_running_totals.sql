-- Running totals, as SQLite's version 13: the figures the books, the dashboard and an account's view read, kept
-- by every deposit, hold, settlement, release and refusal in its own transaction. Holds, settlements and
-- releases keep them in llamakit_hold and llamakit_close (an account's own figures, under its row's lock) and in
-- llamakit_apply (the ledger's, once per batch, at its end: a batch holds the rows every router shares only for
-- the last statements before its commit, always in the same order: ledger_totals, node_fees, ledger_periods).

ALTER TABLE accounts ADD COLUMN held bigint NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN spent bigint NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN deposited bigint NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN last_seen double precision;

CREATE TABLE account_periods (
    account_id bigint NOT NULL REFERENCES accounts (id),
    period text NOT NULL,
    spent bigint NOT NULL DEFAULT 0,
    requests bigint NOT NULL DEFAULT 0,
    refusals bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, period)
);
CREATE INDEX account_periods_top ON account_periods (period, spent DESC, account_id);

CREATE TABLE ledger_periods (
    period text PRIMARY KEY,
    spent bigint NOT NULL DEFAULT 0,
    requests bigint NOT NULL DEFAULT 0,
    refusals bigint NOT NULL DEFAULT 0,
    accounts bigint NOT NULL DEFAULT 0
);

CREATE TABLE node_fees (
    node text PRIMARY KEY,
    charged bigint NOT NULL DEFAULT 0
);

CREATE TABLE ledger_totals (
    id integer PRIMARY KEY CHECK (id = 1),
    deposits bigint NOT NULL,
    balances bigint NOT NULL,
    holds bigint NOT NULL,
    charges bigint NOT NULL,
    accounts bigint NOT NULL,
    requests bigint NOT NULL,
    cached_tokens bigint NOT NULL DEFAULT 0,
    cache_discount bigint NOT NULL DEFAULT 0,
    archived_before double precision
);

CREATE TABLE archived_accounts (
    account_id bigint PRIMARY KEY REFERENCES accounts (id),
    charged bigint NOT NULL DEFAULT 0,
    records bigint NOT NULL DEFAULT 0,
    cached_tokens bigint NOT NULL DEFAULT 0,
    cache_discount bigint NOT NULL DEFAULT 0
);
CREATE TABLE archived_nodes (
    node text PRIMARY KEY,
    charged bigint NOT NULL DEFAULT 0
);

CREATE INDEX api_keys_limited ON api_keys (account_id, created, prefix) WHERE revoked IS NULL AND (
    spend_cap IS NOT NULL OR spend_cap_day IS NOT NULL OR spend_cap_month IS NOT NULL OR rpm_limit IS NOT NULL
    OR tpm_limit IS NOT NULL OR max_parallel_requests IS NOT NULL OR expires_at IS NOT NULL OR models IS NOT NULL);

-- The UTC period of a time in epoch seconds, of the whole second (as Python's time.gmtime takes it).
CREATE FUNCTION llamakit_day(t double precision) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT to_char(to_timestamp(floor(t)) AT TIME ZONE 'UTC', 'YYYY-MM-DD') $$;
CREATE FUNCTION llamakit_month(t double precision) RETURNS text LANGUAGE sql IMMUTABLE AS
    $$ SELECT to_char(to_timestamp(floor(t)) AT TIME ZONE 'UTC', 'YYYY-MM') $$;

UPDATE accounts SET
    held = (SELECT COALESCE(SUM(amount), 0) FROM holds WHERE account_id = accounts.id AND status = 'open'),
    spent = (SELECT COALESCE(SUM(amount), 0) FROM charges WHERE account_id = accounts.id),
    deposited = (SELECT COALESCE(SUM(amount), 0) FROM deposits WHERE account_id = accounts.id),
    last_seen = (SELECT MAX(created) FROM usage WHERE account_id = accounts.id);

INSERT INTO account_periods (account_id, period, spent, requests, refusals)
SELECT account_id, period, SUM(spent), SUM(requests), SUM(refusals) FROM (
    SELECT account_id, llamakit_day(created) AS period, 0 AS spent, 1 AS requests,
           (http_status IS NOT NULL)::int AS refusals FROM usage
    UNION ALL
    SELECT account_id, llamakit_month(created), 0, 1, (http_status IS NOT NULL)::int FROM usage
    UNION ALL
    SELECT account_id, llamakit_day(created), amount, 0, 0 FROM charges
    UNION ALL
    SELECT account_id, llamakit_month(created), amount, 0, 0 FROM charges
) AS history GROUP BY account_id, period;

INSERT INTO ledger_periods (period, spent, requests, refusals, accounts)
SELECT period, SUM(spent), SUM(requests), SUM(refusals), COUNT(*) FROM account_periods GROUP BY period;

INSERT INTO node_fees (node, charged) SELECT COALESCE(node, ''), SUM(amount) FROM charges GROUP BY COALESCE(node, '');

INSERT INTO ledger_totals (id, deposits, balances, holds, charges, accounts, requests, cached_tokens, cache_discount)
SELECT 1,
    (SELECT COALESCE(SUM(amount), 0) FROM deposits),
    (SELECT COALESCE(SUM(balance), 0) FROM accounts),
    (SELECT COALESCE(SUM(amount), 0) FROM holds WHERE status = 'open'),
    (SELECT COALESCE(SUM(amount), 0) FROM charges),
    (SELECT COUNT(*) FROM accounts),
    (SELECT COUNT(*) FROM usage),
    (SELECT COALESCE(SUM(cached_tokens), 0) FROM usage),
    (SELECT COALESCE(SUM(cache_discount), 0) FROM usage);

-- An account's figures for one usage record in `day` and `month`: `spent` credits, a refusal or not (the caller
-- has the account's row locked). Whether the account is new in the day and in the month (1) or not (0), for
-- the ledger's periods.
CREATE FUNCTION llamakit_count_usage(account bigint, day text, month text, spent bigint, refused boolean,
                                     OUT new_in_day integer, OUT new_in_month integer)
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    INSERT INTO account_periods AS p (account_id, period, spent, requests, refusals)
        VALUES (account, day, spent, 1, refused::int)
        ON CONFLICT (account_id, period) DO UPDATE SET spent = p.spent + excluded.spent,
            requests = p.requests + 1, refusals = p.refusals + excluded.refusals
        RETURNING p.requests INTO n;
    new_in_day := (n = 1)::int;
    INSERT INTO account_periods AS p (account_id, period, spent, requests, refusals)
        VALUES (account, month, spent, 1, refused::int)
        ON CONFLICT (account_id, period) DO UPDATE SET spent = p.spent + excluded.spent,
            requests = p.requests + 1, refusals = p.refusals + excluded.refusals
        RETURNING p.requests INTO n;
    new_in_month := (n = 1)::int;
END
$$;

-- The ledger's figures for `n` usage records, `refusals` of them refused, `spent` credits, `accounts_new`
-- accounts active for the first time in `period`.
CREATE FUNCTION llamakit_count_period(period_ text, spent_ bigint, n bigint, refusals_ bigint, accounts_new bigint)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO ledger_periods AS p (period, spent, requests, refusals, accounts)
        VALUES (period_, spent_, n, refusals_, accounts_new)
        ON CONFLICT (period) DO UPDATE SET spent = p.spent + excluded.spent, requests = p.requests + excluded.requests,
            refusals = p.refusals + excluded.refusals, accounts = p.accounts + excluded.accounts
$$;

-- As version 6's, and the account's held credits grow with the hold.
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
    UPDATE accounts SET balance = accounts.balance - amount, held = accounts.held + amount WHERE id = account;
    INSERT INTO holds (id, account_id, model, amount, bid, created, "user", router_id, key_hash)
        VALUES (op->>'request_id', account, op->>'model', amount, op->>'bid', (op->>'now')::float8, op->>'user',
                op->>'router_id', op->>'key_hash');
    RETURN jsonb_build_object('amount', amount);
END
$$;

-- As version 12's, and the account's figures (held, spent, last seen, its day and month) follow the close. The
-- result also says whether the close settled, and whether the account is new in the day and month ("new_in_day",
-- "new_in_month": 0 or 1).
CREATE OR REPLACE FUNCTION llamakit_close(op jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    hold holds%ROWTYPE;
    settling boolean := jsonb_typeof(op->'charge') = 'number';
    charged bigint := 0;
    balance bigint;
    now_ float8 := (op->>'now')::float8;
    served text;
    counted record;
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
    UPDATE accounts SET balance = accounts.balance + hold.amount - charged, held = accounts.held - hold.amount,
                        spent = accounts.spent + charged,
                        last_seen = GREATEST(COALESCE(accounts.last_seen, now_), now_)
        WHERE id = hold.account_id
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
    SELECT * INTO counted FROM llamakit_count_usage(hold.account_id, op->>'day', op->>'month', charged,
                                                    op->>'http_status' IS NOT NULL);
    RETURN jsonb_build_object('account_id', hold.account_id, 'held', hold.amount, 'charged', charged,
                              'balance', balance, 'settled', settling, 'new_in_day', counted.new_in_day,
                              'new_in_month', counted.new_in_month);
END
$$;

-- As version 5's, and the ledger's running figures follow the batch: summed over its operations that were done,
-- and written once, at the end, in a fixed order.
CREATE OR REPLACE FUNCTION llamakit_apply(ops jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    op jsonb;
    result jsonb;
    results jsonb := '[]'::jsonb;
    d_balances bigint := 0;
    d_holds bigint := 0;
    d_charges bigint := 0;
    d_requests bigint := 0;
    d_cached bigint := 0;
    d_discount bigint := 0;
    node_names text[] := '{}';
    node_charged bigint[] := '{}';
    period_names text[] := '{}';
    period_spent bigint[] := '{}';
    period_refused bigint[] := '{}';
    period_new bigint[] := '{}';
    held bigint;
    charged bigint;
    refused bigint;
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
        IF NOT result ? 'error' THEN
            IF op->>'op' = 'hold' THEN
                d_balances := d_balances - (result->>'amount')::bigint;
                d_holds := d_holds + (result->>'amount')::bigint;
                result := '{}'::jsonb;
            ELSE
                held := (result->>'held')::bigint;
                charged := (result->>'charged')::bigint;
                refused := (op->>'http_status' IS NOT NULL)::int;
                d_balances := d_balances + held - charged;
                d_holds := d_holds - held;
                d_charges := d_charges + charged;
                d_requests := d_requests + 1;
                d_cached := d_cached + COALESCE((op->>'cached_tokens')::bigint, 0);
                d_discount := d_discount + COALESCE((op->>'cache_discount')::bigint, 0);
                IF (result->>'settled')::boolean THEN
                    node_names := node_names || COALESCE(op->>'node', '');
                    node_charged := node_charged || charged;
                END IF;
                period_names := period_names || ARRAY[op->>'day', op->>'month'];
                period_spent := period_spent || ARRAY[charged, charged];
                period_refused := period_refused || ARRAY[refused, refused];
                period_new := period_new || ARRAY[(result->>'new_in_day')::bigint, (result->>'new_in_month')::bigint];
            END IF;
        END IF;
        results := results || jsonb_build_array(result);
    END LOOP;
    IF d_balances <> 0 OR d_holds <> 0 OR d_charges <> 0 OR d_requests <> 0 THEN
        UPDATE ledger_totals SET balances = balances + d_balances, holds = holds + d_holds,
                                 charges = charges + d_charges, requests = requests + d_requests,
                                 cached_tokens = cached_tokens + d_cached, cache_discount = cache_discount + d_discount
            WHERE id = 1;
    END IF;
    INSERT INTO node_fees AS f (node, charged)
        SELECT n, SUM(c) FROM unnest(node_names, node_charged) AS t (n, c) GROUP BY n ORDER BY n
        ON CONFLICT (node) DO UPDATE SET charged = f.charged + excluded.charged;
    INSERT INTO ledger_periods AS p (period, spent, requests, refusals, accounts)
        SELECT name, SUM(s), COUNT(*), SUM(r), SUM(a) FROM unnest(period_names, period_spent, period_refused,
                                                                   period_new) AS t (name, s, r, a)
            GROUP BY name ORDER BY name
        ON CONFLICT (period) DO UPDATE SET spent = p.spent + excluded.spent, requests = p.requests + excluded.requests,
            refusals = p.refusals + excluded.refusals, accounts = p.accounts + excluded.accounts;
    RETURN results;
END
$$;

-- Archives find each request's remembered answer.
CREATE INDEX idempotency_request ON idempotency (request_id);
