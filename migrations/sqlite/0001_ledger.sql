-- Times are unix microseconds (BIGINT) so that Postgres and SQLite share one schema and one code path.
-- Money is BIGINT micros.

CREATE TABLE accounts (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    email        TEXT NOT NULL UNIQUE,
    organization TEXT NOT NULL,
    currency     TEXT NOT NULL,
    -- SHA-256 of the secret; not unique, because people may choose the same password.
    secret_hash  TEXT NOT NULL,
    -- Rolled-up balance; credits not yet rolled up live in journal rows with rolled_up = FALSE.
    balance      BIGINT NOT NULL DEFAULT 0,
    held         BIGINT NOT NULL DEFAULT 0,
    created_at   BIGINT NOT NULL,
    CONSTRAINT held_within_balance CHECK (held >= 0 AND balance >= held)
);

-- Append-only double-entry journal. account_id NULL is the SYSTEM side (money entering by deposit).
CREATE TABLE journal (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id BIGINT REFERENCES accounts (id),
    amount     BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    ref_id     TEXT NOT NULL,
    rolled_up  BOOLEAN NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX accounts_secret ON accounts (secret_hash);

-- Only unrolled credits are looked up by account; everything else reads the journal in bulk
-- (verify), so no other index slows down the append path.
CREATE INDEX journal_unrolled ON journal (account_id) WHERE NOT rolled_up;

CREATE TABLE deposits (
    id              TEXT PRIMARY KEY,
    account_id      BIGINT NOT NULL REFERENCES accounts (id),
    amount          BIGINT NOT NULL CHECK (amount > 0),
    idempotency_key TEXT NOT NULL UNIQUE,
    created_at      BIGINT NOT NULL
);

CREATE TABLE tokens (
    id           TEXT PRIMARY KEY,
    token_hash   TEXT NOT NULL UNIQUE,
    sender_id    BIGINT NOT NULL REFERENCES accounts (id),
    recipient_id BIGINT NOT NULL REFERENCES accounts (id),
    expires_at   BIGINT,
    spend_limit  BIGINT,
    held         BIGINT NOT NULL DEFAULT 0 CHECK (held >= 0),
    spent        BIGINT NOT NULL DEFAULT 0 CHECK (spent >= 0),
    revoked_at   BIGINT,
    created_at   BIGINT NOT NULL
);

CREATE TABLE transfers (
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
    UNIQUE (recipient_id, idempotency_key)
);
CREATE INDEX transfers_pending_expiry ON transfers (expires_at) WHERE status = 'PENDING';
CREATE INDEX transfers_sender ON transfers (sender_id, id);
CREATE INDEX transfers_recipient ON transfers (recipient_id, id);

-- Authorizations that failed for a business reason, so that a replay returns the same failure.
CREATE TABLE authorize_failures (
    recipient_id    BIGINT NOT NULL REFERENCES accounts (id),
    idempotency_key TEXT NOT NULL,
    request_hash    TEXT NOT NULL,
    error_kind      TEXT NOT NULL,
    error_message   TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (recipient_id, idempotency_key)
);

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
    UNIQUE (recipient_id, request_id)
);
CREATE INDEX usage_recipient ON usage_records (recipient_id, id);
CREATE INDEX usage_user ON usage_records (user_email, id);
