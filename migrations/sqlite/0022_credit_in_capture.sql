-- A capture credits its recipient's balance in its own statement (see the Postgres migration of the
-- same number). This folds the last unrolled journal credits in and drops the flag and its index.
UPDATE accounts SET balance = balance + (
    SELECT COALESCE(SUM(j.amount), 0) FROM journal j
    WHERE j.account_id = accounts.id AND NOT j.rolled_up);
DROP INDEX journal_unrolled;
ALTER TABLE journal DROP COLUMN rolled_up;
