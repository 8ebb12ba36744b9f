-- Per-key limits (NULL: none) and the key's spend so far, kept by every hold and settlement of the key; the
-- key that made each hold, and the display prefix of the key on each usage record. Spend of keys made before
-- this version counts from here.
ALTER TABLE api_keys ADD COLUMN spend_cap INTEGER;
ALTER TABLE api_keys ADD COLUMN spend_cap_day INTEGER;
ALTER TABLE api_keys ADD COLUMN spend_cap_month INTEGER;
ALTER TABLE api_keys ADD COLUMN rpm_limit INTEGER;
ALTER TABLE api_keys ADD COLUMN tpm_limit INTEGER;
ALTER TABLE api_keys ADD COLUMN max_parallel_requests INTEGER;
ALTER TABLE api_keys ADD COLUMN expires_at REAL;
ALTER TABLE api_keys ADD COLUMN models TEXT;  -- a JSON list of model names
ALTER TABLE api_keys ADD COLUMN spent INTEGER NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN held INTEGER NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN spent_day INTEGER NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN day TEXT;  -- the UTC day of spent_day, '2026-11-30'
ALTER TABLE api_keys ADD COLUMN spent_month INTEGER NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN month TEXT;  -- the UTC month of spent_month, '2026-11'
ALTER TABLE holds ADD COLUMN key_hash TEXT;
ALTER TABLE usage ADD COLUMN key_prefix TEXT;
