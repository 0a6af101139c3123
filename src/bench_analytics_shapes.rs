//! The query shapes `bench analytics` times (docs/analytics.md, "Performance at scale"): the
//! dashboard's own queries, as `crates/ledger/src/web/dashboard/assets/app.js` sends them for each
//! range of its picker, for the admin (who sees the owner view over every account), one owner and
//! one user; then the other shapes the API and `syft-router stats` take (each dimension alone,
//! pairs, filters), over the whole loaded range.

use syft_ledger::store::rollup::{DAY, HOUR, MINUTE};
use syft_ledger::store::{now_micros, Dimension, StatsFilter, StatsScope, Top, TopBy, UsageDims};

pub struct Shape {
    pub name: String,
    pub filter: StatsFilter,
    /// One of the dashboard's queries: the p99 target is about these.
    pub dashboard: bool,
}

/// The dashboard's range picker: span, chart buckets and its name (app.js `RANGES`).
const RANGES: [(&str, i64, Dimension); 4] = [
    ("1h", HOUR, Dimension::Minute),
    ("24h", DAY, Dimension::Hour),
    ("7d", 7 * DAY, Dimension::Hour),
    ("30d", 30 * DAY, Dimension::Day),
];

/// `[since, until)` loaded rows' range; `owner` one owner's account id; `user` one user's email.
pub fn shapes(since: i64, until: i64, owner: i64, user: &str) -> Vec<Shape> {
    let mut out = dashboard(owner, user);
    out.extend(api(since, until, owner, user));
    out
}

fn filter(scope: StatsScope, since: i64, until: i64, group_by: &[Dimension]) -> StatsFilter {
    StatsFilter {
        scope,
        since,
        until,
        group_by: group_by.to_vec(),
        dims: UsageDims::default(),
        limit: syft_ledger::core::MAX_GROUPS + 1,
        sums_only: false,
        top: None,
    }
}

/// What one page refresh asks, per range: the owner view (revenue today, 7 and 30 days; the
/// chart series; the range's totals; apps × endpoints; top users, sums only) for the admin and
/// one owner, and the user view (spend per bucket and app). Ranges end now (whole minutes, as the
/// ledger widens them) and start at a whole bucket (app.js `startOf`).
fn dashboard(owner: i64, user: &str) -> Vec<Shape> {
    let now = now_micros().div_euclid(MINUTE) * MINUTE + MINUTE;
    let today = now.div_euclid(DAY) * DAY;
    let mut out = Vec::new();
    let mut add = |name: String, f: StatsFilter| {
        out.push(Shape {
            name,
            filter: f,
            dashboard: true,
        })
    };
    for (who, scope) in [
        ("admin", StatsScope::All),
        ("owner", StatsScope::Owner(owner)),
    ] {
        let q = |since: i64, by: &[Dimension]| filter(scope.clone(), since, now, by);
        add(format!("dash {who}: revenue today"), q(today, &[]));
        add(format!("dash {who}: revenue 7 days"), q(now - 7 * DAY, &[]));
        add(
            format!("dash {who}: revenue 30 days"),
            q(now - 30 * DAY, &[]),
        );
        for (range, span, by) in RANGES {
            let step = by.grain().map_or(DAY, |g| g.micros());
            let since = (now - span).div_euclid(step) * step;
            add(format!("dash {who} {range}: series"), q(since, &[by]));
            add(format!("dash {who} {range}: totals"), q(since, &[]));
            add(
                format!("dash {who} {range}: app x endpoint"),
                q(since, &[Dimension::App, Dimension::Endpoint]),
            );
            // Twice on the page (by spend and by requests); the same reads, ranked differently.
            add(
                format!("dash {who} {range}: top users (sums)"),
                StatsFilter {
                    sums_only: true,
                    top: Some(Top {
                        by: TopBy::Revenue,
                        n: 10,
                    }),
                    ..q(since, &[Dimension::User])
                },
            );
        }
    }
    for (range, span, by) in RANGES {
        let step = by.grain().map_or(DAY, |g| g.micros());
        let since = (now - span).div_euclid(step) * step;
        add(
            format!("dash user {range}: spend by app"),
            filter(
                StatsScope::User(user.to_string()),
                since,
                now,
                &[by, Dimension::App],
            ),
        );
    }
    out
}

/// Each dimension alone, the pairs the CLI uses, the three scopes and the filters, over the whole
/// loaded range (hour buckets: its last 7 days), with every measure (percentiles included).
fn api(since: i64, until: i64, owner: i64, user: &str) -> Vec<Shape> {
    use Dimension::*;
    let mut out = Vec::new();
    let mut add = |name: &str, f: StatsFilter| {
        out.push(Shape {
            name: name.to_string(),
            filter: f,
            dashboard: false,
        })
    };
    let by = |dims: &[Dimension]| filter(StatsScope::All, since, until, dims);
    add("api admin: totals", by(&[]));
    for (name, d) in [
        ("api admin: by day", Day),
        ("api admin: by app", App),
        ("api admin: by endpoint", Endpoint),
        ("api admin: by user", User),
        ("api admin: by model", Model),
        ("api admin: by status", Status),
    ] {
        add(name, by(&[d]));
    }
    for (name, d) in [
        ("api admin: day x app", [Day, App]),
        ("api admin: day x status", [Day, Status]),
        ("api admin: day x model", [Day, Model]),
        ("api admin: app x endpoint", [App, Endpoint]),
        ("api admin: app x user", [App, User]),
        ("api admin: model x status", [Model, Status]),
    ] {
        add(name, by(&d));
    }
    let week = |dims: &[Dimension]| filter(StatsScope::All, until - 7 * DAY, until, dims);
    add("api admin: by hour, 7 days", week(&[Hour]));
    add("api admin: hour x app, 7 days", week(&[Hour, App]));
    let owner_scope = |dims: &[Dimension]| filter(StatsScope::Owner(owner), since, until, dims);
    add("api owner: by day", owner_scope(&[Day]));
    add("api owner: app x endpoint", owner_scope(&[App, Endpoint]));
    add("api owner: by user", owner_scope(&[User]));
    add("api owner: day x app", owner_scope(&[Day, App]));
    let user_scope =
        |dims: &[Dimension]| filter(StatsScope::User(user.to_string()), since, until, dims);
    add("api user: day x app", user_scope(&[Day, App]));
    add(
        "api user: by status (the user's rows)",
        user_scope(&[Status]),
    );
    let filters = [
        (
            "api filter app: by day",
            UsageDims {
                app_name: Some("app-1".into()),
                ..Default::default()
            },
            Day,
        ),
        (
            "api filter model+status: by app",
            UsageDims {
                model: Some("model-2".into()),
                status: Some("success".into()),
                ..Default::default()
            },
            App,
        ),
        (
            "api filter user: by day",
            UsageDims {
                user_email: Some(user.to_string()),
                ..Default::default()
            },
            Day,
        ),
    ];
    for (name, dims, d) in filters {
        add(name, StatsFilter { dims, ..by(&[d]) });
    }
    out
}
