-- Running totals: the figures the books, the dashboard and an account's view read, kept by every deposit, hold,
-- settlement, release and refusal in its own transaction, so that reading them costs the same after a million
-- requests as after one. The full scans that prove them are the audit (Ledger.audit, `llamakit books --audit`).
-- Filled here from the history the ledger already holds.

-- Per account: credits in its open holds, charged and deposited in all (archived records included), and the
-- time of its newest usage record.
ALTER TABLE accounts ADD COLUMN held INTEGER NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN spent INTEGER NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN deposited INTEGER NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN last_seen REAL;

-- Per account and UTC period ('2026-12-07': a day, '2026-12': a month): credits charged, usage records (refused
-- requests included) and refused requests. A row exists once the account has a usage record in the period.
CREATE TABLE account_periods (
    account_id INTEGER NOT NULL REFERENCES accounts (id),
    period TEXT NOT NULL,
    spent INTEGER NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    refusals INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, period)
) WITHOUT ROWID;
-- The dashboard's accounts: the period's biggest spenders first.
CREATE INDEX account_periods_top ON account_periods (period, spent DESC, account_id);

-- The same figures for the whole ledger per period, and how many accounts were active in it.
CREATE TABLE ledger_periods (
    period TEXT PRIMARY KEY,
    spent INTEGER NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    refusals INTEGER NOT NULL DEFAULT 0,
    accounts INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- Credits charged per node that served the request ('' for charges that name none), in all.
CREATE TABLE node_fees (
    node TEXT PRIMARY KEY,
    charged INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- The whole ledger, one row: deposited, in balances, in open holds, charged (in all, archived included);
-- accounts; usage records ever made; prompt tokens read from the nodes' caches and the credits that saved the
-- clients; and the time before which `llamakit ledger archive` moved the records out.
CREATE TABLE ledger_totals (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    deposits INTEGER NOT NULL,
    balances INTEGER NOT NULL,
    holds INTEGER NOT NULL,
    charges INTEGER NOT NULL,
    accounts INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    cache_discount INTEGER NOT NULL DEFAULT 0,
    archived_before REAL
);

-- What archives took out of the hot tables, one line per account (credits charged, usage records, cached prompt
-- tokens and what they saved) and per node (credits charged), so that the audit still adds up after them.
CREATE TABLE archived_accounts (
    account_id INTEGER PRIMARY KEY REFERENCES accounts (id),
    charged INTEGER NOT NULL DEFAULT 0,
    records INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    cache_discount INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE archived_nodes (
    node TEXT PRIMARY KEY,
    charged INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- The dashboard's keys dialog pages through the active keys that have a limit.
CREATE INDEX api_keys_limited ON api_keys (account_id, created, prefix) WHERE revoked IS NULL AND (
    spend_cap IS NOT NULL OR spend_cap_day IS NOT NULL OR spend_cap_month IS NOT NULL OR rpm_limit IS NOT NULL
    OR tpm_limit IS NOT NULL OR max_parallel_requests IS NOT NULL OR expires_at IS NOT NULL OR models IS NOT NULL);

UPDATE accounts SET
    held = (SELECT COALESCE(SUM(amount), 0) FROM holds WHERE account_id = accounts.id AND status = 'open'),
    spent = (SELECT COALESCE(SUM(amount), 0) FROM charges WHERE account_id = accounts.id),
    deposited = (SELECT COALESCE(SUM(amount), 0) FROM deposits WHERE account_id = accounts.id),
    last_seen = (SELECT MAX(created) FROM usage WHERE account_id = accounts.id);

-- A period is that of the whole second (as Python's time.gmtime takes it).
INSERT INTO account_periods (account_id, period, spent, requests, refusals)
SELECT account_id, period, SUM(spent), SUM(requests), SUM(refusals) FROM (
    SELECT account_id, strftime('%Y-%m-%d', CAST(created AS INTEGER), 'unixepoch') AS period, 0 AS spent,
           1 AS requests, http_status IS NOT NULL AS refusals FROM usage
    UNION ALL
    SELECT account_id, strftime('%Y-%m', CAST(created AS INTEGER), 'unixepoch'), 0, 1, http_status IS NOT NULL
    FROM usage
    UNION ALL
    SELECT account_id, strftime('%Y-%m-%d', CAST(created AS INTEGER), 'unixepoch'), amount, 0, 0 FROM charges
    UNION ALL
    SELECT account_id, strftime('%Y-%m', CAST(created AS INTEGER), 'unixepoch'), amount, 0, 0 FROM charges
) GROUP BY account_id, period;

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

-- Archives find each request's remembered answer.
CREATE INDEX idempotency_request ON idempotency (request_id);
