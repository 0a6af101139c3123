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
