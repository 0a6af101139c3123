-- Rollups folded from a queue (issues 12 and 16; docs/analytics.md, "Rollups"). Upserting the
-- 330-column rollup rows inside the capture's transaction cost ~1 ms of executor time per table and
-- batch, while that transaction held the payers' account rows: paid throughput fell by a third.
-- Writers now insert the new usage row's id here, in the same transaction as the row; a folder
-- (store/rollup_fold.rs, one at a time by advisory lock) moves queued rows into the rollups and
-- deletes them from the queue in one transaction, every 5 s and before every analytics answer,
-- so answers stay exact and a crash loses nothing. No index: the folder deletes whole pages.
CREATE TABLE usage_rollup_queue (usage_id TEXT NOT NULL);
-- The queue turns over constantly; vacuum it by dead rows alone, not by its (tiny) size.
ALTER TABLE usage_rollup_queue SET (autovacuum_vacuum_threshold = 10000, autovacuum_vacuum_scale_factor = 0);
