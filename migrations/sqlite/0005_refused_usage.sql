-- Every request leaves a usage row, refused ones included (payment required, token refused,
-- insufficient funds, invalid request, ...). A refused row must not take its request id: a client
-- retries the same id after topping up, and that attempt's own row (and its capture) must still be
-- written. So the one-row-per-request-id rule holds only for rows that are not refusals.
--
-- SQLite cannot drop a UNIQUE constraint, so the table is rebuilt and its rows copied, in the
-- migration's one transaction (nothing references usage_records).

CREATE TABLE usage_copy AS SELECT * FROM usage_records;
DROP TABLE usage_records;

CREATE TABLE usage_records (
    id                  TEXT PRIMARY KEY,
    recipient_id        BIGINT NOT NULL REFERENCES accounts (id),
    request_id          TEXT NOT NULL,
    transfer_id         TEXT REFERENCES transfers (id),
    app_name            TEXT NOT NULL,
    endpoint            TEXT NOT NULL,
    user_email          TEXT NOT NULL,
    model               TEXT NOT NULL,
    prompt_tokens       BIGINT NOT NULL,
    completion_tokens   BIGINT NOT NULL,
    total_tokens        BIGINT NOT NULL,
    cost                BIGINT NOT NULL,
    status              TEXT NOT NULL,
    latency_ms          BIGINT NOT NULL,
    upstream_latency_ms BIGINT NOT NULL,
    created_at          BIGINT NOT NULL,
    hosted_transfer_id  TEXT,
    refused             BOOLEAN NOT NULL DEFAULT FALSE
);
INSERT INTO usage_records (id, recipient_id, request_id, transfer_id, app_name, endpoint, user_email, model, prompt_tokens, completion_tokens, total_tokens, cost, status, latency_ms, upstream_latency_ms, created_at, hosted_transfer_id)
    SELECT id, recipient_id, request_id, transfer_id, app_name, endpoint, user_email, model, prompt_tokens, completion_tokens, total_tokens, cost, status, latency_ms, upstream_latency_ms, created_at, hosted_transfer_id FROM usage_copy;
CREATE UNIQUE INDEX usage_records_request ON usage_records (recipient_id, user_email, request_id)
    WHERE NOT refused;
DROP TABLE usage_copy;
CREATE INDEX usage_recipient ON usage_records (recipient_id, id);
CREATE INDEX usage_user ON usage_records (user_email, id);
