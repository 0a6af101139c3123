-- The Postgres migration of the same number adds the rollup queue. SQLite writers keep adding to
-- the rollups in the usage row's own transaction (one writer at a time: the commit is the cost,
-- not the upsert), so here the queue exists only to keep `verify`'s SQL the same, and stays empty.
CREATE TABLE usage_rollup_queue (usage_id TEXT NOT NULL);
