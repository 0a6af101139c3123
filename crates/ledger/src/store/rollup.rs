//! Usage rollups, kept up to date with the usage rows they count so analytics never scan raw rows
//! for wide ranges (docs/analytics.md, "Rollups"; when they are written: `rollup_fold.rs`):
//! `usage_rollups` per (grain, bucket, owner, app, endpoint, model, status) at minute, hour and
//! day, WITHOUT the user, with an active-user sketch (`hll.rs`); `usage_user_rollups` per (grain,
//! bucket, owner, app, user) at hour and day; `usage_app_rollups` per (grain, bucket, owner, app)
//! at every grain, with the sketch. All keep sums and fixed log-scale latency histograms.
//!
//! `rollup_upsert::upsert_rollups` takes a slice of usage rows (a fold's page, a SQLite writer's
//! rows): they are aggregated first, so N rows cost one upsert per distinct key and grain, and the
//! keys are written in sorted order so concurrent writers lock rollup rows in one global order (no
//! deadlocks).

use std::sync::atomic::{AtomicBool, Ordering};

use syft_error::UsageStatus;

use super::hll::{register_of, REGISTERS};
use super::UsageInput;

/// Histogram buckets per measure.
pub const HIST_BUCKETS: usize = 64;

/// SQL that is `count` when the `status` column holds the success status and 0 otherwise (summed,
/// it counts successes). The status text is the enum's own (`UsageStatus::as_str`), never
/// caller input, so it is written inline.
pub fn success_case(status: &str, count: &str) -> String {
    format!(
        "CASE WHEN {status} = '{}' THEN {count} ELSE 0 END",
        UsageStatus::Success.as_str()
    )
}

pub const MINUTE: i64 = 60_000_000;
pub const HOUR: i64 = 60 * MINUTE;
pub const DAY: i64 = 24 * HOUR;

/// The rollup grains, finest first; the value is the `grain` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Grain {
    Minute = 0,
    Hour = 1,
    Day = 2,
}

impl Grain {
    pub const ALL: [Grain; 3] = [Grain::Minute, Grain::Hour, Grain::Day];

    pub fn micros(self) -> i64 {
        match self {
            Grain::Minute => MINUTE,
            Grain::Hour => HOUR,
            Grain::Day => DAY,
        }
    }
}

/// The three histogrammed measures, in column order.
pub const MEASURES: [&str; 3] = ["lat", "up", "ttft"];

/// Lower bounds (ms, inclusive) of the histogram buckets: one bucket per integer up to 5 ms, then
/// each bound is the previous one times 1.2 (rounded down), so a bucket's upper bound is at most
/// 1.2 times its lower bound and the last bucket is open (≥ ~150 s).
pub fn bucket_bounds() -> [i64; HIST_BUCKETS] {
    BOUNDS
}

/// [`bucket_bounds`], computed once at compile time (every usage row looks up three buckets).
const BOUNDS: [i64; HIST_BUCKETS] = {
    let mut b = [0i64; HIST_BUCKETS];
    let mut i = 1;
    while i < HIST_BUCKETS {
        let grown = b[i - 1] * 6 / 5;
        b[i] = if grown > b[i - 1] + 1 {
            grown
        } else {
            b[i - 1] + 1
        };
        i += 1;
    }
    b
};

/// The bucket of a value in ms (negative values count as 0).
pub fn bucket_of(ms: i64) -> usize {
    BOUNDS.partition_point(|&lo| lo <= ms).saturating_sub(1)
}

/// The value reported for bucket `i`: the one that minimises the worst relative error over the
/// integers of the bucket (their harmonic midpoint); the open last bucket reports its lower bound.
pub fn bucket_value(i: usize) -> f64 {
    let bounds = bucket_bounds();
    let lo = bounds[i.min(HIST_BUCKETS - 1)] as f64;
    match bounds.get(i + 1) {
        Some(&next) if lo > 0.0 => {
            let hi = (next - 1) as f64;
            2.0 * lo * hi / (lo + hi)
        }
        _ => lo,
    }
}

/// One usage row as the rollups see it.
#[derive(Debug, Clone)]
pub(crate) struct RollupInput<'a> {
    /// The usage row's id (what the Postgres writers queue, `rollup_fold.rs`).
    pub usage_id: &'a str,
    pub recipient_id: i64,
    pub created_at: i64,
    /// Captured micros.
    pub revenue: i64,
    /// Hold amount released (authorized minus captured); 0 for free rows.
    pub refund: i64,
    pub usage: &'a UsageInput,
}

/// The summed columns of `usage_rollups`, as written and read.
pub const SUM_COLUMNS: [&str; 8] = [
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "revenue",
    "refunds",
    "latency_sum",
    "ttft_count",
];

/// The summed columns of `usage_user_rollups`: [`SUM_COLUMNS`] and `successes` (the status is not
/// in its key, so it counts the successes itself).
pub const USER_SUM_COLUMNS: [&str; 9] = {
    let mut cols = [""; 9];
    let mut i = 0;
    while i < SUM_COLUMNS.len() {
        cols[i] = SUM_COLUMNS[i];
        i += 1;
    }
    cols[8] = "successes";
    cols
};

/// The grains of the per-user rollups: minutes of one user are read from the usage rows.
pub const USER_GRAINS: [Grain; 2] = [Grain::Hour, Grain::Day];

/// Every histogram column, in measure then bucket order.
pub fn hist_columns() -> impl Iterator<Item = String> {
    MEASURES
        .iter()
        .flat_map(|m| (0..HIST_BUCKETS).map(move |i| format!("h_{m}_{i:02}")))
}

/// A summed column, in the order of [`USER_SUM_COLUMNS`] (the index into [`Sums`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Summed {
    Requests,
    PromptTokens,
    CompletionTokens,
    TotalTokens,
    Revenue,
    Refunds,
    LatencySum,
    TtftCount,
    Successes,
}

impl Summed {
    /// The summed column called `name` ([`SUM_COLUMNS`], [`USER_SUM_COLUMNS`]).
    fn of(name: &str) -> Option<usize> {
        USER_SUM_COLUMNS.iter().position(|c| *c == name)
    }
}

/// Sums, histograms and (user-less rollups) the active-user sketch of a set of usage rows.
#[derive(Debug, Clone)]
pub(crate) struct Sums {
    /// Indexed by [`Summed`].
    sums: [i64; USER_SUM_COLUMNS.len()],
    pub hist: [[i64; HIST_BUCKETS]; 3],
    /// HyperLogLog registers (`hll.rs`); empty where the user is in the key.
    pub registers: Vec<u8>,
}

impl std::ops::Index<Summed> for Sums {
    type Output = i64;
    fn index(&self, s: Summed) -> &i64 {
        &self.sums[s as usize]
    }
}

impl Sums {
    pub fn new(sketch: bool) -> Self {
        Self {
            sums: [0; USER_SUM_COLUMNS.len()],
            hist: [[0; HIST_BUCKETS]; 3],
            registers: if sketch {
                vec![0; REGISTERS]
            } else {
                Vec::new()
            },
        }
    }

    /// A summed column by name ([`SUM_COLUMNS`], [`USER_SUM_COLUMNS`]); 0 for another name.
    pub fn sum(&self, name: &str) -> i64 {
        Summed::of(name).map_or(0, |i| self.sums[i])
    }

    /// Sets a summed column read back by name (one of [`USER_SUM_COLUMNS`]).
    pub fn set_sum(&mut self, name: &str, value: i64) {
        if let Some(i) = Summed::of(name) {
            self.sums[i] = value;
        }
    }

    /// Adds to every sum; saturating, as a sum never exceeds what 64 bits hold in practice and a
    /// wrapped one would read as negative.
    fn add_sums(&mut self, values: &[i64; USER_SUM_COLUMNS.len()]) {
        for (sum, v) in self.sums.iter_mut().zip(values) {
            *sum = sum.saturating_add(*v);
        }
    }

    pub(super) fn add(&mut self, r: &RollupInput<'_>) {
        let u = r.usage;
        let success = u.status == UsageStatus::Success.as_str();
        // In the order of `Summed`.
        self.add_sums(&[
            1,
            u.prompt_tokens,
            u.completion_tokens,
            u.total_tokens,
            r.revenue,
            r.refund,
            u.latency_ms,
            i64::from(u.ttft_ms.is_some()),
            i64::from(success),
        ]);
        self.hist[0][bucket_of(u.latency_ms)] += 1;
        self.hist[1][bucket_of(u.upstream_latency_ms)] += 1;
        if let Some(ttft) = u.ttft_ms {
            self.hist[2][bucket_of(ttft)] += 1;
        }
        if !self.registers.is_empty() {
            if let Some((i, rank)) = register_of(&u.user_email) {
                self.registers[i] = self.registers[i].max(rank);
            }
        }
    }

    /// Adds another set's sums, histograms and sketch (merged by maximum).
    pub fn merge(&mut self, o: &Sums) {
        self.add_sums(&o.sums);
        for (mine, theirs) in self.hist.iter_mut().zip(&o.hist) {
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a += b;
            }
        }
        for (a, b) in self.registers.iter_mut().zip(&o.registers) {
            *a = (*a).max(*b);
        }
    }
}

/// Whether writers maintain the rollups; only `bench usage/router --rollups false` turns it off.
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Benchmarks only: turns rollup maintenance off (or back on) for the whole process, to measure
/// what it costs the write path (issue 12: the router's throughput may drop by at most 5%). While
/// off, rows are written without rollups and `verify` reports them; call
/// `Store::rebuild_rollups` after turning it back on.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub(crate) fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_sum_is_its_named_column() {
        let order = [
            (Summed::Requests, "requests"),
            (Summed::PromptTokens, "prompt_tokens"),
            (Summed::CompletionTokens, "completion_tokens"),
            (Summed::TotalTokens, "total_tokens"),
            (Summed::Revenue, "revenue"),
            (Summed::Refunds, "refunds"),
            (Summed::LatencySum, "latency_sum"),
            (Summed::TtftCount, "ttft_count"),
            (Summed::Successes, "successes"),
        ];
        assert_eq!(order.len(), USER_SUM_COLUMNS.len());
        let mut s = Sums::new(false);
        for (i, (sum, name)) in order.into_iter().enumerate() {
            s.set_sum(name, i as i64 + 1);
            assert_eq!(s[sum], i as i64 + 1, "{name}");
            assert_eq!(s.sum(name), i as i64 + 1, "{name}");
        }
    }

    #[test]
    fn buckets_are_within_the_error_bound() {
        let b = bucket_bounds();
        assert_eq!(&b[..7], &[0, 1, 2, 3, 4, 5, 6]);
        for i in 0..HIST_BUCKETS - 1 {
            assert!(b[i + 1] > b[i]);
            // Every integer in the bucket is within 10% of the reported value.
            for v in [b[i], b[i + 1] - 1] {
                if v > 0 {
                    let err = (bucket_value(i) - v as f64).abs() / v as f64;
                    assert!(err <= 0.10, "bucket {i} value {v} err {err}");
                }
                assert_eq!(bucket_of(v), i);
            }
        }
        assert!(b[HIST_BUCKETS - 1] >= 120_000, "{}", b[HIST_BUCKETS - 1]);
        assert_eq!(bucket_of(-5), 0);
        assert_eq!(bucket_of(i64::MAX), HIST_BUCKETS - 1);
    }
}
