-- Postgres gains extended statistics on (owner, app) here (its migration 0035); SQLite's planner
-- has none to add. Kept so both engines' migrations carry the same numbers.
SELECT 1;
