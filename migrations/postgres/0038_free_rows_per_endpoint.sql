-- A free row is unique per recipient, user, request id and endpoint (it was per request id): a
-- client that names one turn once for its free chat and its free search (a RAG client) kept only
-- the first call's row, and the answered search was missing from usage and analytics. Paid rows
-- stay one per transfer (0032). Every row the old index allowed this one allows, so the
-- migration cannot fail on an existing ledger; it rebuilds one index of usage_records.
DROP INDEX usage_records_request_free;
CREATE UNIQUE INDEX usage_records_request_free
    ON usage_records (recipient_id, user_email, request_id, endpoint)
    WHERE NOT refused AND transfer_id IS NULL AND hosted_transfer_id IS NULL;
