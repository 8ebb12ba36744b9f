-- Prompt tokens a node read from its cache ("cached_tokens", among "prompt_tokens") and the credits their own fee
-- saved the client ("cache_discount"), and the models a request's `models` list passed over before the one that
-- served it ("passed_over": JSON, [{"model", "reason", "message"}], NULL when none was). 0 and NULL on records
-- made before this version.
ALTER TABLE usage ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN cache_discount INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN passed_over TEXT;
