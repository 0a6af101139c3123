-- Dashboard (issue 12): server-side sessions of `/dashboard` (crates/ledger/src/web/dashboard/).
--
-- Only the SHA-256 of the session token is stored, so a database dump cannot sign anyone in; any
-- ledger replica on the same database accepts the cookie. account_id NULL: the admin (signed in
-- with the admin key). The CSRF token is derived from the session token, not stored.
CREATE TABLE dashboard_sessions (
    token_hash TEXT PRIMARY KEY,
    account_id BIGINT REFERENCES accounts (id),
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX dashboard_sessions_expiry ON dashboard_sessions (expires_at);

-- Live updates across replicas: every statement that inserts usage rows notifies channel
-- `syft_usage` (payload empty). NOTIFY is delivered at COMMIT and only if the transaction commits,
-- and identical notifications of one transaction collapse into one, so a batch of rows is one
-- message. Each ledger process LISTENs on one connection and fans out in memory (live.rs). A
-- trigger covers every writer (captures, free rows, the hosted journal) without touching them.
CREATE FUNCTION syft_usage_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('syft_usage', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER usage_records_notify AFTER INSERT ON usage_records
    FOR EACH STATEMENT EXECUTE FUNCTION syft_usage_notify();
