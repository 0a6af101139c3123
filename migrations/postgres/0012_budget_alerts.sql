-- Alerts on windowed budgets (issue 13): the per-user spend budgets (per UTC day and month) a
-- router owner's router sent with a budgeted hold, so the alerts evaluator knows each budget's
-- limit (the hold itself carries the budget; nothing else stored it). One row per sender and
-- recipient, written in the budgeted hold's transaction only when the budgets change or on the
-- first budgeted hold of a UTC day (`seen_day`): the evaluator watches a budget only on days it
-- was in force, so a budget the owner removed stops being watched the next day without any write
-- on the unbudgeted hold path.
CREATE TABLE budget_limits (
    sender_id    BIGINT NOT NULL REFERENCES accounts (id),
    recipient_id BIGINT NOT NULL REFERENCES accounts (id),
    per_day      BIGINT CHECK (per_day > 0),
    per_month    BIGINT CHECK (per_month > 0),
    -- Start of the last UTC day (unix micros) a budgeted hold of this pair was placed.
    seen_day     BIGINT NOT NULL,
    PRIMARY KEY (sender_id, recipient_id)
);
CREATE INDEX budget_limits_recipient ON budget_limits (recipient_id, seen_day);
