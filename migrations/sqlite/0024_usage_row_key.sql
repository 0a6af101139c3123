-- A key the recording router gives a usage row, so that a row sent again (a call that failed over
-- after its commit) is recorded once. Refusal rows need it: they do not take their request id
-- (0005), so nothing else makes a second copy of one recognisable. NULL: the row has no key.
ALTER TABLE usage_records ADD COLUMN row_key TEXT;
CREATE UNIQUE INDEX usage_records_row_key ON usage_records (recipient_id, row_key)
    WHERE row_key IS NOT NULL;
