-- A free row without a key stays unique per recipient, user, request id and endpoint (0038); a
-- free row with a key is unique per recipient and key (the refusals' index, 0005), and no longer
-- meets the request id's index. A router gives each attempt of a free request a key of its own,
-- shared by the attempt's own row and the `cancelled` row it keeps in case its client leaves:
-- a free request that failed and was sent again under its id (an SDK's retry of a 502) left the
-- failure's row and dropped the answered retry's, which was missing from usage and analytics.
-- Every free row stored so far has no key (only refusals kept one), so every row the old index
-- allowed this one allows, and the migration cannot fail on an existing ledger; it rebuilds one
-- index of usage_records.
DROP INDEX usage_records_request_free;
CREATE UNIQUE INDEX usage_records_request_free
    ON usage_records (recipient_id, user_email, request_id, endpoint)
    WHERE NOT refused AND transfer_id IS NULL AND hosted_transfer_id IS NULL AND row_key IS NULL;
