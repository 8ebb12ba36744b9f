-- A name for each API key, to tell it by ("ci runner", "alice's laptop"): free text, not unique, NULL for
-- none. Keys made before this version have none.
ALTER TABLE api_keys ADD COLUMN name text;
