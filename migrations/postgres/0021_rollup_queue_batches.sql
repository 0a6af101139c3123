-- The rollup queue holds one entry per writing statement instead of one per usage row (issue 16;
-- docs/analytics.md, "Rollups"). A batch of usage rows (up to 4,000 free rows, or a batch of
-- captures) now queues one tuple holding its ids, so the queue's inserts, deletes and vacuum no
-- longer grow with the rows. `row_count` lets the folder take a page of about the same number of
-- rows without reading the arrays. The ids are random text, which compresses poorly: stored out
-- of line uncompressed.
ALTER TABLE usage_rollup_queue RENAME TO usage_rollup_queue_0019;
CREATE TABLE usage_rollup_queue (row_count INT NOT NULL, usage_ids TEXT[] NOT NULL);
ALTER TABLE usage_rollup_queue ALTER COLUMN usage_ids SET STORAGE EXTERNAL;
-- The queue turns over constantly; vacuum it (and its TOAST table) by dead rows alone.
ALTER TABLE usage_rollup_queue SET (autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_scale_factor = 0, toast.autovacuum_vacuum_threshold = 1000,
    toast.autovacuum_vacuum_scale_factor = 0);
-- Rows queued by a ledger of the previous version stay queued, as one entry.
INSERT INTO usage_rollup_queue (row_count, usage_ids)
    SELECT COUNT(*), array_agg(usage_id) FROM usage_rollup_queue_0019 HAVING COUNT(*) > 0;
DROP TABLE usage_rollup_queue_0019;
