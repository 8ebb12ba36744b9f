-- The books as the first llamakit router kept them (PRAGMA user_version 1).
CREATE TABLE accounts (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('user', 'agent', 'dev')),
    balance INTEGER NOT NULL DEFAULT 0 CHECK (balance >= 0),
    created REAL NOT NULL
);

CREATE TABLE api_keys (
    key_hash TEXT PRIMARY KEY,
    prefix TEXT NOT NULL,
    account_id INTEGER NOT NULL REFERENCES accounts (id),
    created REAL NOT NULL,
    revoked REAL
);
CREATE INDEX api_keys_account ON api_keys (account_id);
CREATE INDEX api_keys_prefix ON api_keys (prefix);

CREATE TABLE deposits (
    id INTEGER PRIMARY KEY,
    account_id INTEGER NOT NULL REFERENCES accounts (id),
    amount INTEGER NOT NULL CHECK (amount > 0),
    note TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL
);
CREATE INDEX deposits_account ON deposits (account_id);

CREATE TABLE holds (
    id TEXT PRIMARY KEY,
    account_id INTEGER NOT NULL REFERENCES accounts (id),
    model TEXT NOT NULL,
    amount INTEGER NOT NULL CHECK (amount >= 0),
    bid TEXT NOT NULL DEFAULT '1',
    status TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'settled', 'released')),
    created REAL NOT NULL,
    closed REAL
);
-- Open holds are few and are what books(), account_state() and recover() look for.
CREATE INDEX holds_open ON holds (account_id) WHERE status = 'open';

CREATE TABLE charges (
    id INTEGER PRIMARY KEY,
    hold_id TEXT NOT NULL UNIQUE REFERENCES holds (id),
    account_id INTEGER NOT NULL REFERENCES accounts (id),
    node TEXT,
    model TEXT NOT NULL,
    amount INTEGER NOT NULL CHECK (amount >= 0),
    prompt_tokens INTEGER NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens INTEGER NOT NULL CHECK (completion_tokens >= 0),
    created REAL NOT NULL
);
CREATE INDEX charges_account ON charges (account_id);
CREATE INDEX charges_node ON charges (node);

CREATE TABLE usage (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    account_id INTEGER NOT NULL REFERENCES accounts (id),
    model TEXT NOT NULL,
    node TEXT,
    status TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost INTEGER NOT NULL DEFAULT 0 CHECK (cost >= 0),
    bid TEXT NOT NULL,
    held INTEGER NOT NULL,
    latency_ms REAL,
    queue_ms REAL,
    error TEXT,
    created REAL NOT NULL
);
CREATE INDEX usage_account ON usage (account_id, id);

CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    account_id INTEGER NOT NULL REFERENCES accounts (id),
    kind TEXT NOT NULL,
    data TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX events_account ON events (account_id, id);
