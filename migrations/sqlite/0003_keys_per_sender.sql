-- Idempotency keys are scoped per paying user: unique per (recipient, sender, key), not per
-- recipient alone, so two users of one router who both send `Idempotency-Key: req-1` get two
-- transfers (as Stripe scopes keys per account). Usage rows follow: one per (recipient, user,
-- request id). Every existing row stays valid: the old uniqueness implies the new one.
--
-- SQLite cannot drop a UNIQUE constraint, so the four tables are rebuilt and their rows copied, in
-- the migration's one transaction. `usage_records` (the only table whose rows reference
-- `transfers`) is set aside first, so dropping the old `transfers` orphans no row even though
-- foreign keys stay on (they cannot be switched off inside a transaction).

CREATE TABLE usage_copy AS SELECT * FROM usage_records;
DROP TABLE usage_records;

CREATE TABLE transfers_new (
    id              TEXT PRIMARY KEY,
    sender_id       BIGINT NOT NULL REFERENCES accounts (id),
    recipient_id    BIGINT NOT NULL REFERENCES accounts (id),
    token_id        TEXT REFERENCES tokens (id),
    amount          BIGINT NOT NULL CHECK (amount > 0),
    captured        BIGINT NOT NULL DEFAULT 0 CHECK (captured >= 0 AND captured <= amount),
    currency        TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('PENDING', 'COMPLETED', 'CANCELLED')),
    created_by      TEXT NOT NULL,
    resolved_by     TEXT,
    app_name        TEXT NOT NULL,
    app_ep_path     TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    request_hash    TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    resolved_at     BIGINT,
    cancel_reason   TEXT NOT NULL DEFAULT '',
    UNIQUE (recipient_id, sender_id, idempotency_key)
);
INSERT INTO transfers_new (id, sender_id, recipient_id, token_id, amount, captured, currency, status, created_by, resolved_by, app_name, app_ep_path, idempotency_key, request_hash, created_at, expires_at, resolved_at, cancel_reason)
    SELECT id, sender_id, recipient_id, token_id, amount, captured, currency, status, created_by, resolved_by, app_name, app_ep_path, idempotency_key, request_hash, created_at, expires_at, resolved_at, cancel_reason FROM transfers;
DROP TABLE transfers;
ALTER TABLE transfers_new RENAME TO transfers;
CREATE INDEX transfers_pending_expiry ON transfers (expires_at) WHERE status = 'PENDING';
CREATE INDEX transfers_sender ON transfers (sender_id, id);
CREATE INDEX transfers_recipient ON transfers (recipient_id, id);

CREATE TABLE usage_records (
    id                  TEXT PRIMARY KEY,
    recipient_id        BIGINT NOT NULL REFERENCES accounts (id),
    request_id          TEXT NOT NULL,
    transfer_id         TEXT REFERENCES transfers (id),
    app_name            TEXT NOT NULL,
    endpoint            TEXT NOT NULL,
    user_email          TEXT NOT NULL,
    model               TEXT NOT NULL,
    prompt_tokens       BIGINT NOT NULL,
    completion_tokens   BIGINT NOT NULL,
    total_tokens        BIGINT NOT NULL,
    cost                BIGINT NOT NULL,
    status              TEXT NOT NULL,
    latency_ms          BIGINT NOT NULL,
    upstream_latency_ms BIGINT NOT NULL,
    created_at          BIGINT NOT NULL,
    hosted_transfer_id  TEXT,
    UNIQUE (recipient_id, user_email, request_id)
);
INSERT INTO usage_records (id, recipient_id, request_id, transfer_id, app_name, endpoint, user_email, model, prompt_tokens, completion_tokens, total_tokens, cost, status, latency_ms, upstream_latency_ms, created_at, hosted_transfer_id)
    SELECT id, recipient_id, request_id, transfer_id, app_name, endpoint, user_email, model, prompt_tokens, completion_tokens, total_tokens, cost, status, latency_ms, upstream_latency_ms, created_at, hosted_transfer_id FROM usage_copy;
DROP TABLE usage_copy;
CREATE INDEX usage_recipient ON usage_records (recipient_id, id);
CREATE INDEX usage_user ON usage_records (user_email, id);

-- Failures are keyed by the sender email of the request (a refused request may name no account).
-- Failures recorded before this migration have no sender ('') and are no longer replayed: a retry
-- of such a key is evaluated afresh (a failure moved no money, so nothing can be charged twice).
CREATE TABLE authorize_failures_new (
    recipient_id    BIGINT NOT NULL REFERENCES accounts (id),
    sender_email    TEXT NOT NULL DEFAULT '',
    idempotency_key TEXT NOT NULL,
    request_hash    TEXT NOT NULL,
    error_kind      TEXT NOT NULL,
    error_message   TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (recipient_id, sender_email, idempotency_key)
);
INSERT INTO authorize_failures_new (recipient_id, idempotency_key, request_hash, error_kind, error_message, created_at)
    SELECT recipient_id, idempotency_key, request_hash, error_kind, error_message, created_at FROM authorize_failures;
DROP TABLE authorize_failures;
ALTER TABLE authorize_failures_new RENAME TO authorize_failures;

CREATE TABLE hosted_transfers_new (
    id                TEXT PRIMARY KEY,
    idempotency_key   TEXT NOT NULL,
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
    resolved_at       BIGINT,
    UNIQUE (recipient_email, sender_email, idempotency_key)
);
INSERT INTO hosted_transfers_new (id, idempotency_key, request_hash, sender_email, recipient_email, token, amount, captured, currency, status, step, remote_id, capture_amount, capture_remote_id, hold_released, pending_usage, app_name, app_ep_path, created_by, resolved_by, cancel_reason, error_kind, error_message, created_at, expires_at, updated_at, resolved_at)
    SELECT id, idempotency_key, request_hash, sender_email, recipient_email, token, amount, captured, currency, status, step, remote_id, capture_amount, capture_remote_id, hold_released, pending_usage, app_name, app_ep_path, created_by, resolved_by, cancel_reason, error_kind, error_message, created_at, expires_at, updated_at, resolved_at FROM hosted_transfers;
DROP TABLE hosted_transfers;
ALTER TABLE hosted_transfers_new RENAME TO hosted_transfers;
CREATE INDEX hosted_transfers_step ON hosted_transfers (step, expires_at);
