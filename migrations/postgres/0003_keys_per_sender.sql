-- Idempotency keys are scoped per paying user: unique per (recipient, sender, key), not per
-- recipient alone, so two users of one router who both send `Idempotency-Key: req-1` get two
-- transfers (as Stripe scopes keys per account). Usage rows follow: one per (recipient, user,
-- request id). Every existing row stays valid: the old uniqueness implies the new one.

ALTER TABLE transfers DROP CONSTRAINT transfers_recipient_id_idempotency_key_key;
ALTER TABLE transfers ADD CONSTRAINT transfers_idempotency
    UNIQUE (recipient_id, sender_id, idempotency_key);

-- Failures are keyed by the sender email of the request (a refused request may name no account).
-- Failures recorded before this migration have no sender ('') and are no longer replayed: a retry
-- of such a key is evaluated afresh (a failure moved no money, so nothing can be charged twice).
ALTER TABLE authorize_failures ADD COLUMN sender_email TEXT NOT NULL DEFAULT '';
ALTER TABLE authorize_failures DROP CONSTRAINT authorize_failures_pkey;
ALTER TABLE authorize_failures ADD PRIMARY KEY (recipient_id, sender_email, idempotency_key);

ALTER TABLE usage_records DROP CONSTRAINT usage_records_recipient_id_request_id_key;
ALTER TABLE usage_records ADD CONSTRAINT usage_records_request
    UNIQUE (recipient_id, user_email, request_id);

ALTER TABLE hosted_transfers DROP CONSTRAINT hosted_transfers_idempotency_key_key;
ALTER TABLE hosted_transfers ADD CONSTRAINT hosted_transfers_idempotency
    UNIQUE (recipient_email, sender_email, idempotency_key);
