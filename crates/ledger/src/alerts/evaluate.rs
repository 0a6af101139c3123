//! Level-triggered evaluation: every `evaluate_interval`, each rule of each enabled endpoint reads
//! the value it watches and compares it with its stored level (armed = 0, fired > 0).
//!
//! Why this is "never lost": the level change and the events it fires commit in one transaction
//! (the outbox), guarded by a compare-and-set on the level, so a crash either keeps both or
//! neither, and after a crash the next evaluation sees the same value and fires then. Why it is
//! "never a storm": an event fires only when the level rises, and the level falls back (re-arms)
//! only once the value has recovered past a hysteresis margin. Why the hot path is untouched: an
//! authorize or capture writes nothing extra; accounts without rules cost nothing at all.
//!
//! The price: a dip that both starts and ends between two evaluations (seconds) is not seen. The
//! watched values are levels, not edges (a balance, a token's spend, a day's total, a window's
//! counts), so that is a dip nobody needs to be woken for; docs/alerts.md says so.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use syft_error::UsageStatus;

use super::payload::{amount, Fired};
use super::rules::{EventKind, Format, Rule, SpendSide};
use super::store::{self as db, EndpointRecord};
use crate::error::Result;
use crate::store::{first_id_at, windowed_use, AccountRow, Store, ACCOUNT_COLUMNS};

const MINUTE: i64 = 60_000_000;
const DAY: i64 = 86_400_000_000;
/// Usage statuses the app failed (`UsageStatus::is_failure`), as an SQL list.
static FAILED: LazyLock<String> = LazyLock::new(|| UsageStatus::sql_list(UsageStatus::is_failure));
/// Usage statuses refused before the app was asked (a bad token, a limit, funds): not requests
/// of the app's, or a flood of them would dilute its error rate.
static REFUSED: LazyLock<String> = LazyLock::new(|| UsageStatus::sql_list(UsageStatus::is_refusal));

/// One value a rule watches, with the level it should move to and what that move fires.
struct Step {
    subject: String,
    new_level: i64,
    fired: Vec<Fired>,
}

/// Runs the evaluator forever.
pub async fn run(store: Arc<Store>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // The store's clock (its database's, on Postgres): a budget rule's reading settles budget
        // days, and by a host clock an hour ahead it settled a day with a live hold in it as
        // counting nothing, letting a month's budget be exceeded (a reviewer, 2026-12-07).
        if let Err(e) = evaluate_all(&store, store.now()).await {
            tracing::warn!(error = %e, "alert evaluation failed");
        }
    }
}

/// What one evaluation pass has read, shared by every endpoint it evaluates: the accounts of all
/// endpoints in one query, and each measurement once per account (an account's JSON and Slack
/// endpoints, or two rules with the same window, read the database once). docs/alerts.md
/// ("Evaluation cost") counts the queries.
#[derive(Default)]
struct Pass {
    accounts: HashMap<i64, AccountRow>,
    measured: HashMap<(i64, String), Vec<(String, Value)>>,
}

/// What a rule's measurement depends on besides the account (thresholds do not count); `None`
/// for a measurement that also depends on the endpoint (the digest's due time).
fn measure_key(rule: &Rule) -> Option<String> {
    Some(match rule {
        Rule::BalanceLow { .. } => "balance".into(),
        Rule::BudgetThreshold { .. } => "budgets".into(),
        Rule::SpendThreshold { side, .. } => format!("spend:{side:?}"),
        Rule::ErrorsSpike { window_minutes, .. } => format!("errors:{window_minutes}"),
        Rule::HoldsExpired { window_minutes, .. } => format!("expired:{window_minutes}"),
        Rule::DigestDaily { .. } => return None,
    })
}

/// Evaluates every rule of every enabled endpoint once; returns the number of events written.
pub async fn evaluate_all(store: &Store, now: i64) -> Result<usize> {
    let mut written = 0;
    let endpoints = db::endpoints(store.pool(), None).await?;
    let sql = format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts a WHERE a.id IN (SELECT account_id FROM \
         alert_endpoints WHERE removed_at IS NULL AND disabled_at IS NULL)"
    );
    let accounts: Vec<AccountRow> = sqlx::query_as(&sql).fetch_all(store.pool()).await?;
    let mut pass = Pass {
        accounts: accounts.into_iter().map(|a| (a.id, a)).collect(),
        ..Pass::default()
    };
    for endpoint in endpoints {
        if endpoint.disabled_at.is_some() {
            continue;
        }
        match evaluate_endpoint(store, &mut pass, &endpoint, now).await {
            Ok(n) => written += n,
            Err(e) => {
                tracing::warn!(endpoint = %endpoint.id, error = %e, "alert rules not evaluated")
            }
        }
    }
    Ok(written)
}

async fn evaluate_endpoint(
    store: &Store,
    pass: &mut Pass,
    endpoint: &EndpointRecord,
    now: i64,
) -> Result<usize> {
    let rules: Vec<Rule> = serde_json::from_str(&endpoint.rules)
        .map_err(|e| crate::LedgerError::Internal(format!("stored rules unreadable: {e}")))?;
    let format = Format::parse(&endpoint.format)?;
    let account = match pass.accounts.get(&endpoint.account_id) {
        Some(account) => account.clone(),
        // Added after the pass read the accounts.
        None => db::account(store.pool(), endpoint.account_id).await?,
    };
    let mut written = 0;
    for (index, rule) in rules.iter().enumerate() {
        let index = index as i64;
        let key = measure_key(rule).map(|k| (account.id, k));
        let values = match key.as_ref().and_then(|k| pass.measured.get(k)) {
            Some(values) => values.clone(),
            None => {
                let values = measure(store, rule, &account, (endpoint, index), now).await?;
                if let Some(key) = key {
                    pass.measured.insert(key, values.clone());
                }
                values
            }
        };
        for (subject, value) in values {
            let old = db::level(store.pool(), &endpoint.id, index, &subject).await?;
            let step = next_step(rule, &account, subject, old.unwrap_or(0), &value);
            if Some(step.new_level) == old || (old.is_none() && step.new_level == 0) {
                continue;
            }
            written += commit_step(store, endpoint, format, (index, old), step, now).await?;
        }
    }
    Ok(written)
}

/// How far a usage row's `created_at` may be ahead of the time in its id: the usage reads of a
/// window (`errors.spike`, the digest) also bound the id, so that they read the owner's rows of
/// the window through `usage_recipient (recipient_id, id)` rather than every row the owner ever
/// had (an alerts reviewer measured 0.3 s a query over a million rows on SQLite, on the one
/// connection payments use). Both are dated by the ledger's clock (`store::new_id_at`); the
/// margin is for rows of other writers (hosted ones take the host's clock for both) and slack.
const ID_CLOCK_MARGIN: i64 = 3_600_000_000;

/// The most events of one endpoint waiting for delivery before rules stop adding to it. A rule
/// may have 100 steps, an endpoint 16 rules, an account 16 endpoints, and a budget re-arms when a
/// hold is voided: holds of one micro, placed and voided in a loop, wrote thousands of events a
/// cycle into the outbox the money paths share a database with, which the per-minute cap only
/// delays (an alerts reviewer's finding). Past this, a level still moves (the rule does not fire
/// again at every pass) but writes no event; `syft_ledger_alert_events_dropped_total` counts them.
pub const MAX_PENDING_EVENTS: i64 = 1_000;

/// The level move and its events in one transaction; nothing when another replica moved first.
/// Events past the endpoint's [`MAX_PENDING_EVENTS`] are dropped, the lowest steps kept.
async fn commit_step(
    store: &Store,
    endpoint: &EndpointRecord,
    format: Format,
    (index, old): (i64, Option<i64>),
    step: Step,
    now: i64,
) -> Result<usize> {
    let mut tx = store.pool().begin().await?;
    let key = (endpoint.id.as_str(), index, step.subject.as_str());
    if !db::compare_and_set_level(&mut tx, key, old, step.new_level, now).await? {
        return Ok(0);
    }
    let waiting = db::pending_events(&mut *tx, &endpoint.id).await?;
    let room = usize::try_from(MAX_PENDING_EVENTS.saturating_sub(waiting)).unwrap_or(0);
    let (kept, dropped) = step.fired.split_at(step.fired.len().min(room));
    for fired in kept {
        db::insert_event(&mut tx, &endpoint.id, format, fired, now).await?;
    }
    tx.commit().await?;
    for fired in kept {
        super::metrics::written(fired.kind, 1);
    }
    if !dropped.is_empty() {
        super::metrics::dropped(dropped.len());
        tracing::warn!(endpoint = %endpoint.id, dropped = dropped.len(), waiting, "alert events dropped: the endpoint has {MAX_PENDING_EVENTS} waiting for delivery");
    }
    Ok(kept.len())
}

/// What a rule reads: one value per subject.
#[derive(Debug, Clone)]
enum Value {
    Available(i64),
    Budget {
        used: i64,
        limit: i64,
        window: &'static str,
    },
    DayTotal(i64),
    Errors {
        total: i64,
        failed: i64,
    },
    Expired(i64),
    Digest(Option<serde_json::Value>),
}

fn day_start(now: i64) -> i64 {
    now - now.rem_euclid(DAY)
}

fn day_name(now: i64) -> String {
    DateTime::<Utc>::from_timestamp_micros(now)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

async fn measure(
    store: &Store,
    rule: &Rule,
    account: &AccountRow,
    (endpoint, index): (&EndpointRecord, i64),
    now: i64,
) -> Result<Vec<(String, Value)>> {
    let pool = store.pool();
    let id = account.id;
    Ok(match rule {
        Rule::BalanceLow { .. } => vec![(
            String::new(),
            Value::Available(account.balance.get() - account.held.get()),
        )],
        Rule::BudgetThreshold { .. } => budgets(store, id, now)
            .await?
            .into_iter()
            .map(|b| {
                (
                    b.subject,
                    Value::Budget {
                        used: b.used,
                        limit: b.limit,
                        window: b.window,
                    },
                )
            })
            .collect(),
        Rule::SpendThreshold { side, .. } => {
            let column = match side {
                SpendSide::Spend => "sender_id",
                SpendSide::Revenue => "recipient_id",
            };
            let sql = format!(
                "SELECT COALESCE(CAST(SUM(captured) AS BIGINT), 0) FROM transfers \
                 WHERE {column} = $1 AND status = 'COMPLETED' AND resolved_at >= $2"
            );
            let total: i64 = sqlx::query_scalar(&sql)
                .bind(id)
                .bind(day_start(now))
                .fetch_one(pool)
                .await?;
            vec![(day_name(now), Value::DayTotal(total))]
        }
        Rule::ErrorsSpike { window_minutes, .. } => {
            let (failed, refused) = (&*FAILED, &*REFUSED);
            let sql = format!(
                "SELECT COALESCE(CAST(SUM(CASE WHEN status NOT IN {refused} THEN 1 ELSE 0 END) \
                 AS BIGINT), 0), COALESCE(CAST(SUM(CASE WHEN status IN {failed} \
                 THEN 1 ELSE 0 END) AS BIGINT), 0) FROM usage_records \
                 WHERE recipient_id = $1 AND created_at >= $2 AND id >= $3"
            );
            let since = now - i64::from(*window_minutes) * MINUTE;
            let (total, failed): (i64, i64) = sqlx::query_as(&sql)
                .bind(id)
                .bind(since)
                .bind(first_id_at(since - ID_CLOCK_MARGIN))
                .fetch_one(pool)
                .await?;
            vec![(String::new(), Value::Errors { total, failed })]
        }
        Rule::HoldsExpired { window_minutes, .. } => {
            let count: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM transfers WHERE (sender_id = $1 OR recipient_id = $1) \
                 AND status = 'CANCELLED' AND resolved_by = 'SYSTEM' AND resolved_at >= $2",
            )
            .bind(id)
            .bind(now - i64::from(*window_minutes) * MINUTE)
            .fetch_one(pool)
            .await?;
            vec![(String::new(), Value::Expired(count))]
        }
        Rule::DigestDaily { hour } => {
            let due_at = day_start(now) + i64::from(*hour) * 60 * MINUTE;
            // Due once a day from the chosen hour; an endpoint added after today's hour starts
            // tomorrow (a digest is a schedule, not a backlog).
            let due = now >= due_at && endpoint.created_at <= due_at;
            // Sent today already: its two day-long queries are not run again at every pass
            // until midnight (they were, and the level then kept the event from firing twice).
            let day = day_name(now);
            let sent = due
                && db::level(pool, &endpoint.id, index, &day)
                    .await?
                    .unwrap_or(0)
                    > 0;
            let summary = if due && !sent {
                Some(digest(store, account, now).await?)
            } else {
                None
            };
            vec![(day, Value::Digest(summary))]
        }
    })
}

/// A budget the account can hit: every lifetime token limit it issued or receives, and the
/// windowed ones (`store::windowed_use`: per-user budgets per UTC day and month, tokens' rolling
/// 24 hours). A calendar window's subject names the window (`...:day:2026-12-02`), so each window
/// starts armed by itself; a rolling window re-arms by hysteresis as its usage ages out.
struct Budget {
    subject: String,
    used: i64,
    limit: i64,
    window: &'static str,
}

async fn budgets(store: &Store, account_id: i64, now: i64) -> Result<Vec<Budget>> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT id, spent, spend_limit FROM tokens WHERE (sender_id = $1 OR recipient_id = $1) \
         AND spend_limit IS NOT NULL AND revoked_at IS NULL",
    )
    .bind(account_id)
    .fetch_all(store.pool())
    .await?;
    let lifetime = rows.into_iter().map(|(id, used, limit)| Budget {
        subject: format!("token:{id}"),
        used,
        limit,
        window: "lifetime",
    });
    let windowed = windowed_use(store.pool(), account_id, now)
        .await?
        .into_iter()
        .map(|w| Budget {
            subject: w.subject,
            used: w.used,
            limit: w.limit,
            window: w.window,
        });
    Ok(lifetime.chain(windowed).collect())
}

async fn digest(store: &Store, account: &AccountRow, now: i64) -> Result<serde_json::Value> {
    let since = now - DAY;
    let failed = &*FAILED;
    let sql = format!(
        "SELECT COUNT(*), COALESCE(CAST(SUM(cost) AS BIGINT), 0), \
         COALESCE(CAST(SUM(CASE WHEN status IN {failed} THEN 1 ELSE 0 END) AS BIGINT), 0) \
         FROM usage_records WHERE recipient_id = $1 AND created_at >= $2 AND id >= $3"
    );
    let first = first_id_at(since - ID_CLOCK_MARGIN);
    let (requests, revenue, failed): (i64, i64, i64) = sqlx::query_as(&sql)
        .bind(account.id)
        .bind(since)
        .bind(&first)
        .fetch_one(store.pool())
        .await?;
    let top: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT user_email, COUNT(*), COALESCE(CAST(SUM(cost) AS BIGINT), 0) AS spent \
         FROM usage_records WHERE recipient_id = $1 AND created_at >= $2 AND id >= $3 \
         GROUP BY user_email ORDER BY spent DESC, user_email LIMIT 5",
    )
    .bind(account.id)
    .bind(since)
    .bind(&first)
    .fetch_all(store.pool())
    .await?;
    let top: Vec<_> = top
        .into_iter()
        .map(|(user, n, spent)| json!({"user": user, "requests": n, "spent_micros": spent}))
        .collect();
    Ok(json!({
        "requests": requests,
        "failed": failed,
        "revenue_micros": revenue,
        "top_users": top,
    }))
}

/// The pure part: where a rule's level goes for a value, and what that fires.
fn next_step(
    rule: &Rule,
    account: &AccountRow,
    subject: String,
    level: i64,
    value: &Value,
) -> Step {
    let cur = account.currency.as_str();
    let base = json!({"account": account.email, "currency": cur});
    let mut step = Step {
        subject,
        new_level: level,
        fired: Vec::new(),
    };
    let fire = |kind, extra: serde_json::Value, summary: String| {
        let mut data = base.clone();
        if let (Some(d), Some(e)) = (data.as_object_mut(), extra.as_object()) {
            d.extend(e.clone());
        }
        Fired {
            kind,
            data,
            summary,
        }
    };
    match (rule, value) {
        (Rule::BalanceLow { below_micros }, Value::Available(available)) => {
            let below = *below_micros;
            if level == 0 && *available < below {
                step.new_level = 1;
                step.fired.push(fire(
                    EventKind::BalanceLow,
                    json!({"available_micros": available, "threshold_micros": below}),
                    format!(
                        "{} has {} available, below {}",
                        account.email,
                        amount(*available, cur),
                        amount(below, cur)
                    ),
                ));
            } else if level > 0 && *available >= below.saturating_add(rearm_margin(below)) {
                step.new_level = 0;
            }
        }
        (
            Rule::BudgetThreshold { steps },
            Value::Budget {
                used,
                limit,
                window,
            },
        ) => {
            let percent = used.saturating_mul(100) / (*limit).max(1);
            for s in steps.iter().map(|s| i64::from(*s)) {
                if s > level && percent >= s {
                    step.new_level = s;
                    step.fired.push(fire(
                        EventKind::BudgetThreshold,
                        json!({"budget": step.subject, "window": window, "step_percent": s,
                               "used_percent": percent, "used_micros": used, "limit_micros": limit}),
                        format!("{} budget {} passed {s}% ({} of {})", account.email, step.subject, amount(*used, cur), amount(*limit, cur)),
                    ));
                }
            }
            // Re-armed (to the highest step still passed) once usage is 5 points under a step:
            // 75 % exactly under a step of 80, read unrounded (the whole percent's floor needed
            // 6 points: 75.9 % is 75, and `75 + 5 < 80` did not hold at 75 either).
            let under = i128::from(*used) * 100
                <= i128::from(level - BUDGET_HYSTERESIS_POINTS) * i128::from((*limit).max(1));
            if level > 0 && under {
                step.new_level = steps
                    .iter()
                    .map(|s| i64::from(*s))
                    .filter(|s| *s <= percent)
                    .max()
                    .unwrap_or(0);
            }
        }
        (Rule::SpendThreshold { side, above_micros }, Value::DayTotal(total))
            if level == 0 && *total >= *above_micros =>
        {
            step.new_level = 1;
            let side = match side {
                SpendSide::Spend => "spend",
                SpendSide::Revenue => "revenue",
            };
            step.fired.push(fire(
                EventKind::SpendThreshold,
                json!({"side": side, "day": step.subject, "total_micros": total, "threshold_micros": above_micros}),
                format!("{} {side} today is {}, over {}", account.email, amount(*total, cur), amount(*above_micros, cur)),
            ));
        }
        (
            Rule::ErrorsSpike {
                percent,
                window_minutes,
                min_requests,
            },
            Value::Errors { total, failed },
        ) => {
            let p = i64::from(*percent);
            let over = *total >= i64::from(*min_requests) && failed * 100 >= p * total;
            if level == 0 && over {
                step.new_level = 1;
                step.fired.push(fire(
                    EventKind::ErrorsSpike,
                    json!({"window_minutes": window_minutes, "requests": total, "failed": failed,
                           "failure_percent": failed * 100 / (*total).max(1), "threshold_percent": percent}),
                    format!("{} of {total} requests failed in the last {window_minutes} min ({}%)", failed, failed * 100 / (*total).max(1)),
                ));
            } else if level > 0
                && (failed * 100 * 5 < p * total * 4 || *total * 2 < i64::from(*min_requests))
            {
                // Re-armed below four fifths of the threshold rate, or below half the requests it
                // needs: re-armed just under `min_requests`, a count wobbling around it fired again
                // and again in one outage.
                step.new_level = 0;
            }
        }
        (
            Rule::HoldsExpired {
                count,
                window_minutes,
            },
            Value::Expired(expired),
        ) => {
            let threshold = i64::from(*count);
            if level == 0 && *expired >= threshold {
                step.new_level = 1;
                step.fired.push(fire(
                    EventKind::HoldsExpired,
                    json!({"window_minutes": window_minutes, "expired": expired, "threshold": count}),
                    format!("{expired} holds expired in the last {window_minutes} min (a router lost its ledger or crashed)"),
                ));
            } else if level > 0 && *expired < (threshold + 1) / 2 {
                step.new_level = 0;
            }
        }
        (Rule::DigestDaily { .. }, Value::Digest(Some(summary))) if level == 0 => {
            step.new_level = 1;
            let text = format!(
                "{} requests, {} failed, revenue {} in the last 24 h",
                summary["requests"],
                summary["failed"],
                amount(summary["revenue_micros"].as_i64().unwrap_or(0), cur)
            );
            let extra = json!({"day": step.subject, "period_hours": 24, "summary": summary});
            step.fired.push(fire(EventKind::DigestDaily, extra, text));
        }
        _ => {}
    }
    step
}

const BUDGET_HYSTERESIS_POINTS: i64 = 5;

/// balance.low re-arms once the balance is back above the threshold plus a tenth of it.
fn rearm_margin(threshold: i64) -> i64 {
    (threshold / 10).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Micros;

    fn account() -> AccountRow {
        AccountRow {
            id: 1,
            email: "a@example.com".into(),
            organization: String::new(),
            currency: "USD".into(),
            balance: Micros::new(0),
            held: Micros::new(0),
            created_at: 0,
        }
    }

    #[test]
    fn balance_low_fires_once_and_rearms_with_hysteresis() {
        let rule = Rule::BalanceLow { below_micros: 100 };
        let a = account();
        let step = |level, v| next_step(&rule, &a, String::new(), level, &Value::Available(v));
        assert_eq!(step(0, 100).fired.len(), 0);
        let s = step(0, 99);
        assert_eq!((s.new_level, s.fired.len()), (1, 1));
        assert_eq!(step(1, 50).fired.len(), 0);
        assert_eq!(step(1, 105).new_level, 1, "inside the hysteresis band");
        assert_eq!(step(1, 110).new_level, 0);
    }

    #[test]
    fn budget_fires_each_step_passed_once() {
        let rule = Rule::BudgetThreshold {
            steps: vec![50, 80, 100],
        };
        let a = account();
        let v = |used| Value::Budget {
            used,
            limit: 1000,
            window: "lifetime",
        };
        let s = next_step(&rule, &a, "t".into(), 0, &v(850));
        assert_eq!(s.new_level, 80);
        assert_eq!(s.fired.len(), 2);
        let s = next_step(&rule, &a, "t".into(), 80, &v(990));
        assert!(s.fired.is_empty() && s.new_level == 80);
        let s = next_step(&rule, &a, "t".into(), 80, &v(700));
        assert_eq!(s.new_level, 50, "re-armed to the step still passed");
        // Five points under a step re-arms it (docs/alerts.md); four do not.
        assert_eq!(next_step(&rule, &a, "t".into(), 80, &v(759)).new_level, 80);
        assert_eq!(next_step(&rule, &a, "t".into(), 80, &v(750)).new_level, 50);
    }
}
