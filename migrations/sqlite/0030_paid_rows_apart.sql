-- A request id is unique among a recipient's free rows and, apart from them, among its paid rows
-- (refusals aside, 0005). One index over both let a free row (a search, say) keep a later paid
-- request of the same user and id from writing its row: the user was charged and the row, with
-- its revenue, was missing from every view. Each insert names the index of its own kind
-- (crates/ledger/src/store/usage.rs); a paid row is one that names a transfer, local or hosted.
-- Both indexes hold on any data the old one held, so this cannot fail on an existing ledger.
DROP INDEX usage_records_request;
CREATE UNIQUE INDEX usage_records_request_free ON usage_records (recipient_id, user_email, request_id)
    WHERE NOT refused AND transfer_id IS NULL AND hosted_transfer_id IS NULL;
CREATE UNIQUE INDEX usage_records_request_paid ON usage_records (recipient_id, user_email, request_id)
    WHERE NOT refused AND (transfer_id IS NOT NULL OR hosted_transfer_id IS NOT NULL);
