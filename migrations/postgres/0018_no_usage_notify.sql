-- Live dashboard updates without NOTIFY (issue 16). A transaction that notifies takes a
-- database-wide lock from its pre-commit until its commit is durable, so migration 0010's trigger
-- serialised the fsync of every usage-writing commit (captures, free rows, the hosted journal):
-- with 8 writers, 3,600 → 200 one-row commits/s on the 2-core VM. The dashboard now checks the
-- newest usage row every 500 ms while a page is open (crates/ledger/src/web/dashboard/live.rs).
DROP TRIGGER IF EXISTS usage_records_notify ON usage_records;
DROP FUNCTION IF EXISTS syft_usage_notify();
