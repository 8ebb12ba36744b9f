-- What a running stream has delivered to its client, checkpointed on its open hold (Ledger.checkpoint) every
-- --checkpoint-tokens tokens or --checkpoint-ms, whichever comes first: the prompt and completion tokens, their
-- charge at the request's fees and bid, the model and the node that served them, and when. A router that
-- recovers the hold after a crash charges that (never more than the hold) and refunds the rest, instead of
-- refunding it all. NULL: no checkpoint (a whole request, a stream that had not reached one, a hold made before
-- this version).
ALTER TABLE holds ADD COLUMN delivered_prompt_tokens INTEGER;
ALTER TABLE holds ADD COLUMN delivered_completion_tokens INTEGER;
ALTER TABLE holds ADD COLUMN delivered_charge INTEGER;
ALTER TABLE holds ADD COLUMN delivered_model TEXT;
ALTER TABLE holds ADD COLUMN delivered_node TEXT;
ALTER TABLE holds ADD COLUMN delivered_at REAL;
