-- A dashboard session belongs to the credential it was opened with: a fingerprint of the
-- account's secret hash (of the admin key's hash for the admin). A session whose credential
-- has changed since (a new password, another admin key) no longer signs anyone in. Sessions
-- opened before this migration have none and end: their holders sign in again.
ALTER TABLE dashboard_sessions ADD COLUMN credential TEXT;
