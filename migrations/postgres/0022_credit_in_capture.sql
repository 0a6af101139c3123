-- A capture credits its recipient's balance in its own statement (issue 16; docs/ledger.md, "Hot
-- recipients"). Credits used to wait in the journal as rows with `rolled_up = FALSE` until a
-- background roll-up folded them into `accounts.balance` with an UPDATE of each row. That update
-- left a dead entry in the partial index `journal_unrolled` for every capture, and reading a busy
-- recipient's balance (or rolling it up) visited every one of them until VACUUM removed them: 98,618
-- entries and 16 ms for no unrolled credit at all after ten minutes of load with autovacuum off.
-- Captures are batched, so one batch takes the recipient's row lock once. The journal is now
-- append-only: this folds the last unrolled credits in and drops the flag and its index.
-- The lock first: a ledger of the previous version still running could otherwise commit a credit
-- after the fold's snapshot and before the column goes, and that credit would be lost to its
-- balance. With the lock its capture waits, then fails on the missing column (docs/ledger.md).
LOCK TABLE journal IN ACCESS EXCLUSIVE MODE;
UPDATE accounts a SET balance = a.balance + u.total
FROM (SELECT account_id, SUM(amount) AS total FROM journal
      WHERE NOT rolled_up AND account_id IS NOT NULL GROUP BY account_id) u
WHERE a.id = u.account_id;
DROP INDEX journal_unrolled;
ALTER TABLE journal DROP COLUMN rolled_up;
