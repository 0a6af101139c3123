-- Refunds (2026-12-07): money a completed transfer's recipient gives back to its sender, in all
-- at most what the transfer captured. A refund moves money like a capture the other way: two
-- journal entries of kind 'refund' (the recipient debited, the sender credited) whose ref_id is
-- the refund's id, written in the refund's transaction. The transfer itself is never changed:
-- what it captured stays what the router charged (docs/ledger.md, "Refunds").
-- A key is the caller's, per transfer: the same key again is the same refund.
CREATE TABLE refunds (
    id              TEXT PRIMARY KEY,
    transfer_id     TEXT NOT NULL REFERENCES transfers (id),
    amount          BIGINT NOT NULL CHECK (amount > 0),
    reason          TEXT NOT NULL,
    refunded_by     TEXT NOT NULL CHECK (refunded_by IN ('RECIPIENT', 'ADMIN')),
    idempotency_key TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    UNIQUE (transfer_id, idempotency_key)
);
