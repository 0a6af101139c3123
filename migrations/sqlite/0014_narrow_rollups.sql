-- Usage rollups stay narrow (issue 16). Postgres makes its histogram columns nullable here; SQLite
-- already stores an integer 0 in the record header alone (no payload bytes), so nothing changes.
SELECT 1;
