-- A token's limit per 24 hours counts a pending hold (whatever its age) and a capture while it is
-- less than 24 hours old (crates/ledger/src/store/budget.rs, `used_by_token!`). It counted what
-- was created in the last 24 hours, so a hold captured just before its 24th hour left the window
-- as it was charged. The two halves read a token's unresolved transfers (`resolved_at IS NULL`)
-- and its last day's resolutions, each a range of this index. It replaces the index on
-- (token_id, created_at), which only the old reading used, so a hold and a capture still update
-- as many indexes as before (the paid path). A ledger older than this migration still counts
-- by its old rule, reading the token's transfers through this index's first column (more slowly for a
-- token with a long history).
-- Built before the old index is dropped: a DROP INDEX locks the table until the migration
-- commits, so dropping first held every read of transfers for the whole build.
CREATE INDEX transfers_token_use ON transfers (token_id, resolved_at);
DROP INDEX transfers_token_window;
