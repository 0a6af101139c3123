-- backend = hosted: the ledger's own journal of every transfer it created on the remote accounting
-- service, so that a crash between the remote steps is recovered (see docs/hosted.md).
CREATE TABLE hosted_transfers (
    id                TEXT PRIMARY KEY,
    idempotency_key   TEXT NOT NULL UNIQUE,
    request_hash      TEXT NOT NULL,
    sender_email      TEXT NOT NULL,
    recipient_email   TEXT NOT NULL,
    -- The delegation token, needed to create the actual-amount transaction of a partial capture;
    -- cleared as soon as the transfer is resolved.
    token             TEXT NOT NULL,
    amount            BIGINT NOT NULL CHECK (amount > 0),
    captured          BIGINT NOT NULL DEFAULT 0,
    currency          TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('PENDING', 'COMPLETED', 'CANCELLED')),
    -- creating | held | capturing | voiding | done | failed | unknown
    step              TEXT NOT NULL,
    remote_id         TEXT,
    -- Partial capture: the amount being captured, the remote transaction created for it, and
    -- whether the remote hold was already cancelled.
    capture_amount    BIGINT,
    capture_remote_id TEXT,
    hold_released     BOOLEAN NOT NULL DEFAULT FALSE,
    -- Usage row to write when the resolution completes (JSON), so a resumed resolution keeps it.
    pending_usage     TEXT,
    app_name          TEXT NOT NULL,
    app_ep_path       TEXT NOT NULL,
    created_by        TEXT NOT NULL DEFAULT 'RECIPIENT',
    resolved_by       TEXT,
    cancel_reason     TEXT NOT NULL DEFAULT '',
    error_kind        TEXT,
    error_message     TEXT,
    created_at        BIGINT NOT NULL,
    expires_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    resolved_at       BIGINT
);
CREATE INDEX hosted_transfers_step ON hosted_transfers (step, expires_at);

-- Usage rows of hosted transfers reference them here (transfer_id references local transfers).
ALTER TABLE usage_records ADD COLUMN hosted_transfer_id TEXT;
