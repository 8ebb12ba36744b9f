-- A checkpoint's cached prompt tokens: how many of delivered_prompt_tokens the node read from its prompt cache
-- (charged at the cached fee in delivered_charge), and what that fee took off the charge. A router that recovers
-- the hold writes both on the usage record and in the running totals, as a settled stream's are. 0: nothing was
-- cached, or the checkpoint was made before this version (its charge took every prompt token as fresh).
ALTER TABLE holds ADD COLUMN delivered_cached_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE holds ADD COLUMN delivered_cache_discount INTEGER NOT NULL DEFAULT 0;
