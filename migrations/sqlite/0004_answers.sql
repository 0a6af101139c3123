-- Paid answers kept for idempotent replay (issue 15): a client that retries a request whose capture
-- committed gets the stored answer back instead of a 409. The body is opaque to the ledger (the
-- router's encoding of its response). A row is written just before its capture, in the same call,
-- and is only ever served once the transfer is COMPLETED, so an answer is replayable exactly when
-- it was paid for. Rows are deleted by the expiry sweep once past `expires_at` (the retention).
CREATE TABLE answers (
    transfer_id  TEXT PRIMARY KEY,
    recipient_id BIGINT NOT NULL,
    body         BLOB NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL
);
CREATE INDEX answers_expires_at ON answers (expires_at);
