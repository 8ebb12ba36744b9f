-- Answers remembered by idempotency key, so a retried request is answered, not charged, again.
CREATE TABLE idempotency (
    account_id INTEGER NOT NULL REFERENCES accounts (id),
    key TEXT NOT NULL,
    request_id TEXT NOT NULL REFERENCES holds (id),
    fingerprint TEXT NOT NULL,
    response TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (account_id, key)
);
