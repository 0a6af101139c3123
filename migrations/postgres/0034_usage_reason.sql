-- Why a refusal was refused, as the router's machine-readable reason (the ErrorInfo reason its
-- client was answered with: TOKEN_REVOKED, TOKEN_EXPIRED, RATE_LIMITED, CONCURRENCY_LIMITED, …):
-- a refusal's status alone told a revoked token from an expired one, or a rate limit from a
-- concurrency limit, nowhere (a support agent, 2026-12-06). Empty on other rows and on rows of
-- routers that send none. A constant default: no table rewrite.
-- The ALTER takes the table's lock for an instant, but waits for it behind any long reader (an
-- analytics scan), and every write waits behind the ALTER meanwhile, captures included: give up
-- after 5 s rather than stall them (the ledger then fails to start and says so; start it again).
SET LOCAL lock_timeout = '5s';
ALTER TABLE usage_records ADD COLUMN reason TEXT NOT NULL DEFAULT '';
