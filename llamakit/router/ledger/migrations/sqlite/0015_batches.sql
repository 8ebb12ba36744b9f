-- Batches, as OpenAI's Batch API (`/v1/files`, `/v1/batches`; llamakit.router.batches): the files a tenant
-- uploaded, its batches, and each batch's lines with what became of them. No money lives here: a line is held,
-- charged and refunded in the ledger's own tables like any request, under the idempotency key
-- 'batch:<batch id>:<line>' (its answer is remembered with its charge, until the line's output is written).

-- A file: uploaded (`content`), or a batch's output or error file (`batch_id` and `kind`, made from its lines).
CREATE TABLE files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    account_id INTEGER NOT NULL REFERENCES accounts (id),
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    lines INTEGER NOT NULL,
    created REAL NOT NULL,
    content BLOB,
    batch_id TEXT,
    kind TEXT
);
CREATE INDEX files_account ON files (account_id, seq);

-- A batch: what it runs (`endpoint`, the lines of `input_file_id`, each priced at `discount` × its price), where
-- it is (`status`: in_progress, cancelling, then completed, failed, expired or cancelled at `finished`), what
-- stopped it early (`stopped`: the error's JSON), and its lines' running figures.
CREATE TABLE batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    account_id INTEGER NOT NULL REFERENCES accounts (id),
    key_hash TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    model TEXT,
    metadata TEXT,
    discount TEXT NOT NULL,
    status TEXT NOT NULL,
    stopped TEXT,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    cancelling_at REAL,
    finished REAL,
    output_file_id TEXT,
    error_file_id TEXT,
    total INTEGER NOT NULL,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    cost INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX batches_account ON batches (account_id, seq);
CREATE INDEX batches_open ON batches (seq) WHERE status IN ('in_progress', 'cancelling');

-- A batch's lines: `request`, the line as it was uploaded; `pending`, `running` on the router `router_id` (its
-- `attempt`-th try), then `completed` or `failed` with `output`, its line of the output or the error file.
CREATE TABLE batch_lines (
    batch_id TEXT NOT NULL REFERENCES batches (id),
    line INTEGER NOT NULL,
    model TEXT NOT NULL,
    request TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    router_id TEXT,
    attempt INTEGER NOT NULL DEFAULT 0,
    output TEXT,
    PRIMARY KEY (batch_id, line)
) WITHOUT ROWID;
CREATE INDEX batch_lines_pending ON batch_lines (model, batch_id, line) WHERE status = 'pending';
CREATE INDEX batch_lines_running ON batch_lines (router_id) WHERE status = 'running';
CREATE INDEX batch_lines_done ON batch_lines (batch_id, status, line) WHERE status IN ('completed', 'failed');
