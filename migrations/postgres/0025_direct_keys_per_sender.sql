-- A direct transfer's idempotency key (one the sender placed itself, stored as
-- `direct:{sender_id}:{key}`) belongs to the sender whatever the recipient: the same key sent to
-- another recipient is a reused key (409), not a second hold. The unique index of 0003 includes
-- the recipient, so it let that second hold through. Rows written before this migration that
-- reused a key keep their transfers; all but the earliest of each key get their id appended to
-- the stored key, so the index holds and the earliest stays the key's answer.
UPDATE transfers SET idempotency_key = idempotency_key || ':' || id
WHERE created_by = 'SENDER' AND EXISTS (
    SELECT 1 FROM transfers o
    WHERE o.created_by = 'SENDER' AND o.sender_id = transfers.sender_id
      AND o.idempotency_key = transfers.idempotency_key AND o.id < transfers.id);
CREATE UNIQUE INDEX transfers_direct_key ON transfers (sender_id, idempotency_key)
    WHERE created_by = 'SENDER';
