//! Analytics queries: validation and who sees what, over the store's rollups (docs/analytics.md).

use crate::auth::Caller;
use crate::error::{LedgerError, Result};
use crate::store::rollup::{DAY, HOUR, MINUTE};
use crate::store::{
    budget_use, BudgetUse, Dimension, StatsFilter, StatsGroup, StatsScope, TimeRange, Top, TopBy,
};
use crate::validate;

use super::{Ledger, UsageDimsQuery};

/// Widest range per finest time dimension: keeps every answer to a few thousand points.
const MAX_MINUTE_RANGE: i64 = 2 * DAY;
const MAX_HOUR_RANGE: i64 = 92 * DAY;
const MAX_RANGE: i64 = 3_700 * DAY;
/// More groups than this is an error (narrow the range or the dimensions), never a silent cut.
pub const MAX_GROUPS: usize = 10_000;

/// Which rows an account reads: those of the apps it is paid for, or the requests it sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatsRole {
    #[default]
    Owner,
    User,
}

impl StatsRole {
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "owner" => Ok(StatsRole::Owner),
            "user" => Ok(StatsRole::User),
            other => Err(LedgerError::invalid(format!(
                "unknown role {other:?}: use owner or user"
            ))),
        }
    }
}

/// An analytics query as a caller asks for it (not yet validated).
#[derive(Debug, Clone, Default)]
pub struct StatsQuery {
    pub group_by: Vec<Dimension>,
    /// Default: a window fitting the finest time dimension, ending now.
    pub range: TimeRange,
    pub role: StatsRole,
    pub dims: UsageDimsQuery,
    /// No latency percentiles: only sums and counts (cheaper over many groups).
    pub sums_only: bool,
    /// Only the groups with the largest measure (at most [`MAX_TOP`]), largest first.
    /// Above 0: only the `top` groups with the largest `top_by` (at most [`MAX_TOP`]), largest
    /// first. The two go together.
    pub top: usize,
    pub top_by: Option<TopBy>,
}

/// The most groups a top-N answer names.
pub const MAX_TOP: usize = 100;

/// The answer: groups in key order, with the range actually used (whole minutes).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stats {
    pub group_by: Vec<Dimension>,
    pub since: i64,
    pub until: i64,
    pub currency: String,
    pub groups: Vec<StatsGroup>,
    /// Refunds (`Refund`) made in the range of the transfers the query covers, in all: money
    /// given back after its capture, which the groups' `revenue_micros` still count.
    pub refunded_micros: i64,
}

/// Parses dimension names (`day`, `app`, ...), as adapters receive them.
pub fn parse_dimensions<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Vec<Dimension>> {
    names
        .into_iter()
        .filter(|n| !n.trim().is_empty())
        .map(|n| {
            Dimension::parse(n).ok_or_else(|| {
                LedgerError::invalid(format!(
                    "unknown dimension {n:?}: use minute, hour, day, app, endpoint, user, model \
                     or status"
                ))
            })
        })
        .collect()
}

fn check_group_by(group_by: &[Dimension]) -> Result<()> {
    if group_by.len() > 2 {
        return Err(LedgerError::invalid(
            "group_by takes at most two dimensions",
        ));
    }
    if group_by.len() == 2 && group_by[0] == group_by[1] {
        return Err(LedgerError::invalid("group_by names a dimension twice"));
    }
    if group_by.iter().filter(|d| d.grain().is_some()).count() > 1 {
        return Err(LedgerError::invalid(
            "group_by takes at most one time dimension (minute, hour or day)",
        ));
    }
    Ok(())
}

/// `[since, until)` checked against the finest time dimension, then widened to whole minutes.
fn range(q: &StatsQuery, now: i64) -> Result<(i64, i64)> {
    let finest = q.group_by.iter().filter_map(|d| d.grain()).min();
    let (max, default) = match finest.map(|g| g.micros()) {
        Some(MINUTE) => (MAX_MINUTE_RANGE, HOUR),
        Some(HOUR) => (MAX_HOUR_RANGE, 2 * DAY),
        _ => (MAX_RANGE, 30 * DAY),
    };
    let until = q.range.until.unwrap_or(now);
    let since = q.range.since.unwrap_or(until.saturating_sub(default));
    if since < 0 || until < 0 {
        return Err(LedgerError::invalid("since and until must not be negative"));
    }
    // Widened to whole days downstream: a range near `i64::MAX` overflowed there (a debug build
    // panicked; a release one wrapped and answered the caller's all-time totals).
    if since > MAX_INSTANT || until > MAX_INSTANT {
        return Err(LedgerError::invalid(
            "since and until must be before the year 10000 (unix microseconds)",
        ));
    }
    if since >= until {
        return Err(LedgerError::invalid("since must be before until"));
    }
    // The range as asked is bounded, not as widened: `--since 2d` (now minus two days, mid-minute)
    // widened to 2 days and a minute, and the widest documented range was always refused.
    if until - since > max {
        let what = match finest.map(|g| g.micros()) {
            Some(MINUTE) => "minute buckets: at most 2 days",
            Some(HOUR) => "hour buckets: at most 92 days",
            _ => "a query: at most 3700 days",
        };
        return Err(LedgerError::invalid(format!("range too wide for {what}")));
    }
    let since = since.div_euclid(MINUTE) * MINUTE;
    let until = until.saturating_add(MINUTE - 1).div_euclid(MINUTE) * MINUTE;
    Ok((since, until))
}

/// 10000-01-01T00:00:00Z in unix microseconds: the latest `since` or `until` a query may name.
const MAX_INSTANT: i64 = 253_402_300_800_000_000;

impl Ledger {
    /// What `sender_email` has used of the caller's per-user budgets now (`GetBudgetUse`). The
    /// caller is the recipient (a router's owner account); it learns only the sums its own
    /// budgets are checked against.
    pub async fn budget_use(&self, caller: &Caller, sender_email: &str) -> Result<BudgetUse> {
        let recipient = caller.account()?;
        if self.config().hosted.is_some() {
            // Budgets are refused with hosted accounting (hosted/backend.rs): there is no use
            // to report, and a zero would read as a whole budget.
            return Err(LedgerError::refused(
                syft_error::Reason::NotSupported,
                "spend budgets need a local ledger; this ledger uses hosted accounting",
            ));
        }
        let sender = validate::email("sender_email", sender_email)?;
        let Some(sender_id) = self.store().account_id(&sender).await? else {
            return Err(LedgerError::NotFound(format!("account {sender} not found")));
        };
        let pool = self.store().pool();
        Ok(budget_use(pool, sender_id, recipient.id, self.store().now()).await?)
    }

    /// Grouped usage measures. An owner reads the rows of the apps it is paid for, a user the rows
    /// of the requests it sent, the admin every row.
    pub async fn usage_stats(&self, caller: &Caller, q: &StatsQuery) -> Result<Stats> {
        check_group_by(&q.group_by)?;
        let (since, until) = range(q, self.store().now())?;
        let (scope, currency) = match caller {
            // Money of the ledger's currency only, once an account keeps another: it was all
            // summed and named the ledger's (5 USD and 3 EUR answered "8 USD").
            Caller::Admin => {
                let currency = self.config().currency.clone();
                let scope = if self.store().other_currencies_than(&currency).await? {
                    StatsScope::Currency(currency.clone())
                } else {
                    StatsScope::All
                };
                (scope, currency)
            }
            Caller::Account(a) => (
                match q.role {
                    StatsRole::Owner => StatsScope::Owner(a.id),
                    StatsRole::User => StatsScope::User(a.email.clone()),
                },
                a.currency.clone(),
            ),
        };
        let filter = StatsFilter {
            scope,
            since,
            until,
            group_by: q.group_by.clone(),
            dims: q.dims.validate()?,
            limit: MAX_GROUPS + 1,
            sums_only: q.sums_only,
            top: top(q)?,
        };
        let groups = self.store().usage_stats(&filter).await?;
        if groups.len() > MAX_GROUPS {
            return Err(LedgerError::invalid(format!(
                "more than {MAX_GROUPS} groups: narrow the range, the filters or the dimensions"
            )));
        }
        let refunded_micros = self.store().refunded_in(&filter).await?;
        Ok(Stats {
            group_by: q.group_by.clone(),
            since,
            until,
            currency,
            groups,
            refunded_micros,
        })
    }
}

/// The query's top-N, checked once for every adapter.
fn top(q: &StatsQuery) -> Result<Option<Top>> {
    match (q.top, q.top_by) {
        (0, None) => Ok(None),
        (0, Some(_)) => Err(LedgerError::invalid("top_by goes with top")),
        (_, None) => Err(LedgerError::invalid(
            "top needs top_by (revenue or requests)",
        )),
        (n, Some(by)) if n <= MAX_TOP => Ok(Some(Top { by, n })),
        (n, Some(_)) => Err(LedgerError::invalid(format!(
            "top must be 1 to {MAX_TOP}, not {n}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_whole_minutes_and_bounded() {
        let q = |since, until, by: &[Dimension]| StatsQuery {
            range: TimeRange { since, until },
            group_by: by.to_vec(),
            ..Default::default()
        };
        let now = 100 * DAY + 30_000_000;
        assert_eq!(
            range(&q(None, None, &[]), now).ok(),
            Some((70 * DAY, 100 * DAY + MINUTE))
        );
        assert_eq!(
            range(&q(Some(5), Some(MINUTE + 1), &[]), now).ok(),
            Some((0, 2 * MINUTE))
        );
        assert!(range(&q(Some(10), Some(10), &[]), now).is_err());
        assert!(range(&q(Some(DAY), Some(0), &[]), now).is_err());
        assert!(range(&q(Some(0), Some(3 * DAY), &[Dimension::Minute]), now).is_err());
        assert!(range(&q(Some(0), Some(2 * DAY), &[Dimension::Minute]), now).is_ok());
        // Two days ending mid-minute (`--since 2d`): whole minutes around them, a minute more.
        let (mid, minute) = (30_000_000, &[Dimension::Minute][..]);
        assert_eq!(
            range(&q(Some(mid), Some(2 * DAY + mid), minute), now).ok(),
            Some((0, 2 * DAY + MINUTE))
        );
        assert!(range(&q(Some(mid), Some(2 * DAY + mid + 1), minute), now).is_err());
        assert!(check_group_by(&[Dimension::Day, Dimension::Hour]).is_err());
        assert!(check_group_by(&[Dimension::App, Dimension::App]).is_err());
        assert!(check_group_by(&[Dimension::Day, Dimension::App]).is_ok());
        assert!(parse_dimensions(["day", "weekday"]).is_err());
        assert_eq!(
            parse_dimensions(["Day", "app"]).ok(),
            Some(vec![Dimension::Day, Dimension::App])
        );
    }
}
