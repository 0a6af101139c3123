-- A refund names its transfer's parties (2026-12-07): the statistics' `refunded_micros` and the
-- per-account refund listings read an owner's (or a user's) refunds in a time range by index.
-- Summed through the transfers instead, one owner's 30 days read every transfer it received:
-- 235 – 315 ms with 100,000 refunds of 1,000,000 transfers, against the dashboard's 50 ms.
-- The indexes carry the amount, so a sum without an app filter reads no table row: with the
-- transfers joined, an owner with 20,000 refunds in 30 days took 350 – 415 ms.
-- Copies of the transfer's own columns, set with the refund in its transaction; `verify` checks
-- that they match. The table is new since migration 0036, so the backfill is small.
ALTER TABLE refunds ADD COLUMN recipient_id BIGINT NOT NULL DEFAULT 0;
ALTER TABLE refunds ADD COLUMN sender_id BIGINT NOT NULL DEFAULT 0;
UPDATE refunds SET
    recipient_id = (SELECT t.recipient_id FROM transfers t WHERE t.id = refunds.transfer_id),
    sender_id = (SELECT t.sender_id FROM transfers t WHERE t.id = refunds.transfer_id);
CREATE INDEX refunds_recipient_time ON refunds (recipient_id, created_at, amount);
CREATE INDEX refunds_sender_time ON refunds (sender_id, created_at, amount);
CREATE INDEX refunds_time ON refunds (created_at, amount);
