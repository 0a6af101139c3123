-- A paid row is unique per transfer (local or hosted), not per request id. A request id whose
-- paid request failed (its hold voided, nothing charged) may be sent again, and the router then
-- places a new hold for it under a key of its own (docs/router.md, "A failed request's id is
-- retried"): that attempt's row has the same request id and another transfer, and must be
-- written, with its revenue. A transfer is resolved once and its row written in the resolution's
-- own statement; the one way to two rows of one transfer was a void repeated through the ledger's
-- API after the sweep, with usage under another request id or user, which no router sends. Such
-- rows make this migration fail (the ledger does not start): docs/operations.md has the query
-- that finds them. Each insert names the index of its link (crates/ledger/src/store/usage.rs).
DROP INDEX usage_records_request_paid;
CREATE UNIQUE INDEX usage_records_transfer ON usage_records (transfer_id)
    WHERE NOT refused AND transfer_id IS NOT NULL;
CREATE UNIQUE INDEX usage_records_hosted_transfer ON usage_records (hosted_transfer_id)
    WHERE NOT refused AND hosted_transfer_id IS NOT NULL;
