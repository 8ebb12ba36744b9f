-- The money each usage record was priced at: what one credit was worth (exact decimal text, '0.000001') and in
-- which currency (ISO 4217), as the router that wrote it ran with. NULL on records made before this version,
-- and by a ledger opened without a router's credit value: those are priced at the value the router runs with.
ALTER TABLE usage ADD COLUMN credit_value TEXT;
ALTER TABLE usage ADD COLUMN currency TEXT;
