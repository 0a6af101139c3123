-- Settled budget days: what one sender committed to one recipient on one UTC day, written once the
-- day can no longer change (it is over by an hour and none of its holds can still be captured).
-- A monthly budget check adds these rows to a scan of the unsettled days only, instead of summing
-- the whole month's transfers on every budgeted hold (crates/ledger/src/store/budget_days.rs).
-- A cache of values the transfers fix: any ledger may write a row, all compute the same value,
-- and `ledger verify` recomputes each row from the transfers.
CREATE TABLE budget_days (
    sender_id BIGINT NOT NULL,
    recipient_id BIGINT NOT NULL,
    -- UTC days since the epoch.
    day BIGINT NOT NULL,
    used BIGINT NOT NULL,
    PRIMARY KEY (sender_id, recipient_id, day)
);
