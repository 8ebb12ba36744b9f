-- A checkpoint's cached prompt tokens: how many of delivered_prompt_tokens the node read from its prompt cache
-- (charged at the cached fee in delivered_charge), and what that fee took off the charge. A router that recovers
-- the hold (or releases a lost router's) writes both on the usage record and in the running totals, as a settled
-- stream's are. 0: nothing was cached, or the checkpoint was made before this version (its charge took every
-- prompt token as fresh).
ALTER TABLE holds ADD COLUMN delivered_cached_tokens bigint NOT NULL DEFAULT 0;
ALTER TABLE holds ADD COLUMN delivered_cache_discount bigint NOT NULL DEFAULT 0;

-- As version 14's, its 'checkpoint' operation writing the two above as well (from the op's cached_tokens and
-- cache_discount; 0 when absent).
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
            WHERE o->>'op' = 'close'
    ) ORDER BY id FOR UPDATE;
    FOR op IN SELECT value FROM jsonb_array_elements(ops) LOOP
        IF op->>'op' = 'checkpoint' THEN
            -- One row of an open hold, no money: no account's lock and no subtransaction of its own.
            UPDATE holds SET delivered_prompt_tokens = (op->>'prompt_tokens')::bigint,
                             delivered_completion_tokens = (op->>'completion_tokens')::bigint,
                             delivered_charge = (op->>'charge')::bigint, delivered_model = op->>'model',
                             delivered_node = op->>'node', delivered_at = (op->>'now')::float8,
                             delivered_cached_tokens = COALESCE((op->>'cached_tokens')::bigint, 0),
                             delivered_cache_discount = COALESCE((op->>'cache_discount')::bigint, 0)
                WHERE id = op->>'request_id' AND status = 'open';
            results := results || '[{}]'::jsonb;
            CONTINUE;
        END IF;
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
