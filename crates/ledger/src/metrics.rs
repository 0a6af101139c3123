//! The ledger's own metrics (request counts and latencies come from `syft_telemetry`).

use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};

use crate::domain::{Actor, TransferStatus};
use crate::store::{Store, TransferRow};

/// Declares metrics registered on first use: each one's doc comment is its help text (one line),
/// its string its name, and `["label", ...]` after a `*Vec` type its label names. One frame for
/// every metric, so a new one is two lines and help text cannot drift from the doc.
macro_rules! metrics {
    ($(
        #[doc = $help:literal]
        static $name:ident: $kind:ident $([$($label:literal),+])? = $metric:literal;
    )+) => {
        $(
            #[doc = $help]
            static $name: std::sync::LazyLock<$kind> = std::sync::LazyLock::new(|| {
                $crate::metrics::registered($metric, $help.trim(), |o| {
                    $crate::metrics::metrics!(@build $kind, o $(, $($label),+)?)
                })
            });
        )+
    };
    (@build $kind:ident, $o:ident) => { $kind::with_opts($o) };
    (@build $kind:ident, $o:ident, $($label:literal),+) => { $kind::new($o, &[$($label),+]) };
}
pub(crate) use metrics;

metrics! {
    /// Holds by what happened to them: authorized, captured, voided, expired
    static HOLDS: IntCounterVec["event"] = "syft_ledger_holds_total";
    /// Money captured, in micros of the account currency, by app
    static CAPTURED: IntCounterVec["app"] = "syft_ledger_captured_micros_total";
    /// Expired holds the sweep failed to cancel (each is retried at the next sweep)
    static SWEEP_FAILURES: IntCounter = "syft_ledger_sweep_failures_total";
    /// Holds authorized and not yet captured, voided or expired
    static PENDING: IntGauge = "syft_ledger_pending_holds";
    /// Database pool connections by state (idle, in_use)
    static POOL: IntGaugeVec["state"] = "syft_ledger_db_connections";
    /// 1 when this scrape could not read the gauges kept in the database (pending holds, alert queue) in time: they show their last values
    static STALE: IntGauge = "syft_ledger_database_gauges_stale";
    /// Authentications by outcome where the client's address is known: failed (a wrong credential), locked (refused: the address sent too many)
    static AUTH_REFUSED: IntCounterVec["outcome"] = "syft_ledger_auth_refusals_total";
}

/// A wrong credential (`failed`) or a refusal of a locked-out address (`locked`).
pub fn auth_refused(outcome: &'static str) {
    AUTH_REFUSED.with_label_values(&[outcome]).inc();
}

/// Builds a metric from its name and help and registers it in the default registry (the one
/// `/metrics` renders). Both fail only on a malformed or twice-registered name: a programming
/// error that the first scrape in any test shows, so it panics like the `register_*!` macros.
pub(crate) fn registered<M>(
    name: &str,
    help: &str,
    build: impl FnOnce(Opts) -> prometheus::Result<M>,
) -> M
where
    M: Collector + Clone + 'static,
{
    let metric = build(Opts::new(name, help)).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    prometheus::register(Box::new(metric.clone()))
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
    metric
}

pub fn expired(n: u64) {
    HOLDS.with_label_values(&["expired"]).inc_by(n);
}

/// One expired hold the sweep could not cancel this time.
pub fn sweep_failed() {
    SWEEP_FAILURES.inc();
}

/// A hold this call placed (a router's Authorize says whether its key found one placed; a direct
/// transfer is counted where its insert committed).
pub fn hold_placed() {
    HOLDS.with_label_values(&["authorized"]).inc();
}

/// A transfer this call resolved: called only where the resolving statement is known to have
/// won (`Store::resolve_answered`, the hosted journal's `finish`), so a replay, a concurrent
/// repeat or another replica's sweep of the same hold is not counted again.
pub fn resolved(t: &TransferRow) {
    match t.status {
        TransferStatus::Completed => {
            HOLDS.with_label_values(&["captured"]).inc();
            CAPTURED
                .with_label_values(&[app_label(t.created_by, &t.app_name)])
                .inc_by(t.captured.get().max(0) as u64);
        }
        TransferStatus::Cancelled if t.resolved_by == Some(Actor::System) => expired(1),
        TransferStatus::Cancelled => HOLDS.with_label_values(&["voided"]).inc(),
        TransferStatus::Pending => {}
    }
}

/// The `app` a capture is counted under: the app name of a hold its recipient placed, among the
/// first [`MAX_APP_LABELS`] names seen, [`OTHER_APPS`] past them, and [`DIRECT_APP`] for a
/// transfer its sender created (the accounting API's direct transfers, whose app name the payer
/// writes). A recipient is any account, and open registration makes one: the names are the
/// callers' choice, so their number is bounded here (one label per micro captured grew the
/// scrape without end). On a ledger shared by owners two can use one name: per owner, the
/// analytics are the figures (docs/operations.md).
fn app_label(created_by: Actor, app_name: &str) -> &str {
    if created_by != Actor::Recipient {
        return DIRECT_APP;
    }
    let Ok(mut seen) = APP_LABELS.lock() else {
        return OTHER_APPS;
    };
    // On the capture path: a name seen before costs a lookup, no allocation.
    if !seen.contains(app_name) {
        if seen.len() >= MAX_APP_LABELS {
            return OTHER_APPS;
        }
        seen.insert(app_name.to_string());
    }
    app_name
}

/// The `app` label of transfers their sender created.
pub const DIRECT_APP: &str = "(direct)";
/// The `app` label of captures under names past the first [`MAX_APP_LABELS`].
pub const OTHER_APPS: &str = "(other)";
/// How many app names get a label of their own.
pub const MAX_APP_LABELS: usize = 100;
static APP_LABELS: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<String>>> =
    std::sync::LazyLock::new(Default::default);

/// Shows every counter of a known label set from the first scrape, at zero: a rule on
/// `increase()` or `rate()` sees nothing of a series that does not exist yet, so the first sweep
/// failure or wrong credential would not raise an alert. (`CAPTURED` is by app: its labels are
/// not known before a capture.)
fn zero_counters() {
    for event in ["authorized", "captured", "voided", "expired"] {
        HOLDS.with_label_values(&[event]);
    }
    for outcome in ["failed", "locked"] {
        AUTH_REFUSED.with_label_values(&[outcome]);
    }
    std::sync::LazyLock::force(&SWEEP_FAILURES);
}

/// How long a scrape waits for the gauges read from the database. A scrape waited for them
/// as long as the database did (11 s through a table lock, 20 s while it refused connections):
/// past Prometheus' 10-s scrape timeout the ledger looked down, its pool gauge missing just
/// when it said what was wrong.
const DATABASE_GAUGES_WAIT: Duration = Duration::from_secs(2);

/// Refreshes the gauges that are read from the database (within [`DATABASE_GAUGES_WAIT`]; past
/// it they keep their last values and `syft_ledger_database_gauges_stale` says so), then renders
/// every metric.
pub async fn render(store: &Store) -> axum::response::Response {
    zero_counters();
    // Listed from the first scrape, a stale one included (at 0 until a first read).
    std::sync::LazyLock::force(&PENDING);
    crate::alerts::metrics::at_zero();
    // The pool as the scrape found it, before its own reads take connections (read after them,
    // they were still on their way back: an idle SQLite ledger read `idle -1, in_use 2`).
    let pool = store.pool();
    let size = i64::from(pool.size());
    // sqlx's idle count can wrap below zero for a moment while a connection changes hands.
    let idle = i64::try_from(pool.num_idle())
        .ok()
        .filter(|n| *n <= size)
        .unwrap_or(0);
    POOL.with_label_values(&["idle"]).set(idle);
    POOL.with_label_values(&["in_use"]).set(size - idle);
    // Both reads at once, each setting its own gauges: a lock on one table (or an error) leaves
    // the other's values fresh.
    let refresh = async {
        let (pending, alerts) = tokio::join!(
            async { store.pending_holds().await.map(|n| PENDING.set(n)) },
            crate::alerts::metrics::refresh(store)
        );
        pending.and(alerts)
    };
    let stale = match tokio::time::timeout(DATABASE_GAUGES_WAIT, refresh).await {
        Ok(Ok(())) => false,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "gauges read from the database not all refreshed");
            true
        }
        Err(_) => {
            tracing::warn!(
                "gauges read from the database not refreshed: it did not answer in time"
            );
            true
        }
    };
    STALE.set(i64::from(stale));
    syft_telemetry::metrics::response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// App names are their callers' choice: past the first hundred seen, captures count under
    /// `(other)` (a name seen before keeps its label), and a direct transfer's name is never one.
    #[test]
    fn app_labels_are_bounded() {
        let names: Vec<String> = (0..=MAX_APP_LABELS)
            .map(|i| format!("app-label-test-{i}"))
            .collect();
        let labels: Vec<&str> = names
            .iter()
            .map(|n| app_label(Actor::Recipient, n))
            .collect();
        let own = labels
            .iter()
            .filter(|l| l.starts_with("app-label-test-"))
            .count();
        assert!(own <= MAX_APP_LABELS, "{own} labels of their own");
        assert_eq!(labels.last().copied(), Some(OTHER_APPS));
        let kept = labels.iter().position(|l| *l != OTHER_APPS);
        if let Some(i) = kept {
            assert_eq!(
                app_label(Actor::Recipient, &names[i]),
                names[i],
                "a known name"
            );
        }
        assert_eq!(app_label(Actor::Sender, "router-a"), DIRECT_APP);
    }
}
