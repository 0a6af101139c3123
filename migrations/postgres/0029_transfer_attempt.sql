-- The attempt that placed a hold (the router's id of one request it ran; the same in every call
-- that asked again after an unknown outcome), returned by Authorize as `Transfer.attempt_id`, so
-- that a router tells its own hold from one another attempt placed under the same key
-- (crates/router/src/ledger/mod.rs, `Ledger::authorize`). NULL: none named, or placed before.
ALTER TABLE transfers ADD COLUMN attempt_id TEXT;
