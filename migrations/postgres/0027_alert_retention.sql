-- An endpoint's rate cap counts its attempts of the last minute (alerts/store.rs
-- `attempts_since`): read by time, not over every attempt the endpoint ever made.
CREATE INDEX alert_deliveries_recent ON alert_deliveries (endpoint_id, started_at);
-- Finished events (and their attempts) are deleted once older than the retention
-- (alerts/store.rs `purge_finished`); they used to be kept for ever.
CREATE INDEX alert_events_finished ON alert_events (finished_at) WHERE status <> 'PENDING';
