-- Every request leaves a usage row, refused ones included (payment required, token refused,
-- insufficient funds, invalid request, ...). A refused row must not take its request id: a client
-- retries the same id after topping up, and that attempt's own row (and its capture) must still be
-- written. So the one-row-per-request-id rule holds only for rows that are not refusals.
ALTER TABLE usage_records ADD COLUMN refused BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE usage_records DROP CONSTRAINT usage_records_request;
CREATE UNIQUE INDEX usage_records_request ON usage_records (recipient_id, user_email, request_id)
    WHERE NOT refused;
