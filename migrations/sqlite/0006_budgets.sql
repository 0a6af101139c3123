-- Spend budgets (issue 11): a hold's budget check sums the sender's transfers to one recipient
-- since the window's start, inside the hold's transaction; this index makes that a range scan.
CREATE INDEX transfers_budget ON transfers (sender_id, recipient_id, created_at);

-- A delegation token's windowed limit: at most this many micros in any 24 hours (NULL: none).
ALTER TABLE tokens ADD COLUMN limit_per_day BIGINT CHECK (limit_per_day > 0);
CREATE INDEX transfers_token_window ON transfers (token_id, created_at);
