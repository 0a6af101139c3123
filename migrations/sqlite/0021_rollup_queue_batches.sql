-- The Postgres migration of the same number gives the rollup queue one entry per writing
-- statement. SQLite writers add to the rollups in the usage row's own transaction and never
-- queued anything, so the empty queue kept since migration 0019 goes.
DROP TABLE usage_rollup_queue;
