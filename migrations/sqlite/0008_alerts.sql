-- Alerts (issue 13): webhook endpoints, level-triggered rule state, and the transactional outbox.
--
-- A rule's state row and the event it fires are written in one transaction (compare-and-set on
-- `level`), so an event is never lost and never written twice, whichever ledger replica evaluates.
-- Deliveries claim due events with a lease (lease_owner, lease_until),
-- so two replicas never send one event in parallel.

CREATE TABLE alert_endpoints (
    id                     TEXT PRIMARY KEY,
    account_id             BIGINT NOT NULL REFERENCES accounts (id),
    url                    TEXT NOT NULL,
    format                 TEXT NOT NULL CHECK (format IN ('json', 'slack')),
    -- Signing secrets sealed (ChaCha20-Poly1305) under the ledger's --alerts-key; never clear text.
    secret_sealed          TEXT NOT NULL,
    previous_secret_sealed TEXT,
    previous_secret_until  BIGINT,
    -- JSON array of rules; immutable (remove and add to change them): state rows refer to indexes.
    rules                  TEXT NOT NULL,
    rate_per_minute        BIGINT NOT NULL CHECK (rate_per_minute > 0),
    failing_since          BIGINT,
    disabled_at            BIGINT,
    removed_at             BIGINT,
    created_at             BIGINT NOT NULL
);
CREATE INDEX alert_endpoints_account ON alert_endpoints (account_id);

CREATE TABLE alert_state (
    endpoint_id TEXT NOT NULL REFERENCES alert_endpoints (id),
    rule_index  BIGINT NOT NULL,
    -- What the rule watches: '' (the account), a token id, or a UTC day.
    subject     TEXT NOT NULL,
    -- 0 = armed; otherwise what fired (1, or the highest budget step in percent).
    level       BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (endpoint_id, rule_index, subject)
);

CREATE TABLE alert_events (
    -- The webhook-id: the same on every attempt, so receivers deduplicate on it.
    id              TEXT PRIMARY KEY,
    endpoint_id     TEXT NOT NULL REFERENCES alert_endpoints (id),
    kind            TEXT NOT NULL,
    -- The exact body sent (and signed) on every attempt.
    payload         TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('PENDING', 'DELIVERED', 'FAILED')),
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    lease_owner     TEXT,
    lease_until     BIGINT,
    created_at      BIGINT NOT NULL,
    finished_at     BIGINT
);
CREATE INDEX alert_events_due ON alert_events (next_attempt_at) WHERE status = 'PENDING';
CREATE INDEX alert_events_endpoint ON alert_events (endpoint_id, created_at);

CREATE TABLE alert_deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        TEXT NOT NULL REFERENCES alert_events (id),
    endpoint_id     TEXT NOT NULL REFERENCES alert_endpoints (id),
    attempt         BIGINT NOT NULL,
    worker          TEXT NOT NULL,
    started_at      BIGINT NOT NULL,
    latency_ms      BIGINT NOT NULL,
    -- NULL: no HTTP response (timeout, refused connection, dropped connection).
    status_code     BIGINT,
    outcome         TEXT NOT NULL CHECK (outcome IN ('DELIVERED', 'RETRY', 'GAVE_UP')),
    error           TEXT NOT NULL,
    next_attempt_at BIGINT
);
CREATE INDEX alert_deliveries_endpoint ON alert_deliveries (endpoint_id, id);
