-- Postgres drops its usage NOTIFY trigger here (see the Postgres migration of the same number);
-- SQLite never had one.
SELECT 1;
