-- The attempt that placed a hosted hold, as 0029 keeps it for local holds: the hosted backend's
-- Authorize names it back (`Transfer.attempt_id`), with `existing` set on a replay of the key, so
-- a router tells its own hold from another's there too (crates/ledger/src/hosted/authorize.rs).
-- NULL: none named, or journalled before.
ALTER TABLE hosted_transfers ADD COLUMN attempt_id TEXT;
