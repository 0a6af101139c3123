//! Read paths: transfer, token and account listing and usage queries with keyset paging.

use sqlx::any::AnyArguments;
use sqlx::query::QueryAs;
use sqlx::{Any, FromRow};

use super::turns::Caller;
use super::usage::FREE_ROW;
use super::{
    AccountRow, Micros, Store, TransferRow, TransferStatus, UsageRow, ACCOUNT_COLUMNS, REFUNDED,
    TRANSFER_COLUMNS, TRANSFER_JOINS, USAGE_COLUMNS,
};
use crate::error::Result;

/// One page of a newest-first listing, by keyset: ids strictly below `before_id` (ids are
/// time-ordered UUIDv7; `None`: the first page), at most `limit` of them.
#[derive(Debug, Clone, Default)]
pub struct Keyset {
    pub before_id: Option<String>,
    pub limit: i64,
}

/// `[since, until)` in unix micros; `None` leaves that end open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimeRange {
    pub since: Option<i64>,
    pub until: Option<i64>,
}

impl TimeRange {
    pub fn new(since: Option<i64>, until: Option<i64>) -> Self {
        Self { since, until }
    }

    /// The set ends as conditions on `column`.
    fn push_where(&self, w: &mut Where, column: &str) {
        w.opt_int(&format!("{column} >= ?"), self.since);
        w.opt_int(&format!("{column} < ?"), self.until);
    }
}

/// Exact-match filters on a usage row's dimensions (`None`: any value), shared by the usage
/// listing and the analytics.
#[derive(Debug, Clone, Default)]
pub struct UsageDims {
    pub app_name: Option<String>,
    pub endpoint: Option<String>,
    pub user_email: Option<String>,
    pub model: Option<String>,
    pub status: Option<String>,
}

impl UsageDims {
    /// `{t}.{column} = ?` for each filter that is set, on table alias `t`.
    pub(super) fn push_where(&self, w: &mut Where, t: &str) {
        for (col, v) in [
            ("app_name", &self.app_name),
            ("endpoint", &self.endpoint),
            ("user_email", &self.user_email),
            ("model", &self.model),
            ("status", &self.status),
        ] {
            if let Some(v) = v {
                w.text(&format!("{t}.{col} = ?"), v);
            }
        }
    }
}

/// Whose rows a listing shows: those `account_id` sent and/or received (neither or both flags:
/// either side); `None` (admin) means every account's.
#[derive(Debug, Clone, Copy, Default)]
pub struct Parties {
    pub account_id: Option<i64>,
    pub as_sender: bool,
    pub as_recipient: bool,
}

impl Parties {
    /// The condition on table alias `alias`, which has `sender_id` and `recipient_id` columns.
    fn push_where(&self, w: &mut Where, alias: &str) {
        let Some(account) = self.account_id else {
            return;
        };
        match (self.as_sender, self.as_recipient) {
            (true, false) => w.int(&format!("{alias}.sender_id = ?"), account),
            (false, true) => w.int(&format!("{alias}.recipient_id = ?"), account),
            _ => {
                let p = w.next();
                w.clauses.push(format!(
                    "({alias}.sender_id = {p} OR {alias}.recipient_id = {p})"
                ));
                w.binds.push(Bind::Int(account));
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct TransferFilter {
    pub parties: Parties,
    pub status: Option<TransferStatus>,
    pub range: TimeRange,
    pub app_name: Option<String>,
    /// Paid with this delegation token (its id).
    pub token_id: Option<String>,
    pub page: Keyset,
}

#[derive(Debug, Clone, Default)]
pub struct TokenFilter {
    /// Issuer (sender) and/or recipient.
    pub parties: Parties,
    /// Revoked and expired tokens too.
    pub include_inactive: bool,
    /// The current time, for expiry.
    pub now: i64,
    pub page: Keyset,
}

/// A delegation token as listed (its hash is never read back).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TokenRow {
    pub id: String,
    pub sender_email: String,
    pub recipient_email: String,
    pub currency: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub spend_limit: Option<Micros>,
    pub held: Micros,
    pub spent: Micros,
    pub revoked_at: Option<i64>,
    pub limit_per_day: Option<i64>,
}

#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    /// Rows of this account: as app owner (recipient) or as the user who sent the request.
    pub account: Option<(i64, String)>,
    pub range: TimeRange,
    pub dims: UsageDims,
    /// Only the rows of this request id. Read within the caller's rows and the range (no index
    /// of its own: a support lookup, not a hot path).
    pub request_id: Option<String>,
    pub page: Keyset,
    /// The totals count only the apps whose owners keep this currency (the admin's, once an
    /// account keeps another than the ledger's: costs of two currencies were summed and named
    /// the ledger's). The rows are listed whatever their currency.
    pub totals_currency: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct UsageTotals {
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    pub cost: Micros,
}

#[derive(Debug, Clone, Default)]
pub struct UsagePage {
    pub rows: Vec<UsageRow>,
    pub has_more: bool,
    pub totals: UsageTotals,
}

pub(super) enum Bind {
    Int(i64),
    Text(String),
}

/// A WHERE clause with numbered placeholders that both Postgres and SQLite accept.
#[derive(Default)]
pub(super) struct Where {
    pub(super) clauses: Vec<String>,
    pub(super) binds: Vec<Bind>,
}

impl Where {
    pub(super) fn next(&self) -> String {
        format!("${}", self.binds.len() + 1)
    }

    pub(super) fn int(&mut self, template: &str, value: i64) {
        let clause = template.replace('?', &self.next());
        self.clauses.push(clause);
        self.binds.push(Bind::Int(value));
    }

    pub(super) fn text(&mut self, template: &str, value: &str) {
        let clause = template.replace('?', &self.next());
        self.clauses.push(clause);
        self.binds.push(Bind::Text(value.to_string()));
    }

    /// `template` when the filter is set, else nothing.
    fn opt_int(&mut self, template: &str, value: Option<i64>) {
        if let Some(v) = value {
            self.int(template, v);
        }
    }

    fn opt_text(&mut self, template: &str, value: Option<&str>) {
        if let Some(v) = value {
            self.text(template, v);
        }
    }

    pub(super) fn sql(&self) -> String {
        if self.clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", self.clauses.join(" AND "))
        }
    }

    /// Binds the values to a plain query (rows read by column).
    pub(super) fn bind_query<'q>(
        &'q self,
        mut query: sqlx::query::Query<'q, Any, AnyArguments<'q>>,
    ) -> sqlx::query::Query<'q, Any, AnyArguments<'q>> {
        for b in &self.binds {
            query = match b {
                Bind::Int(v) => query.bind(*v),
                Bind::Text(v) => query.bind(v.as_str()),
            };
        }
        query
    }

    fn bind_as<'q, O>(
        &'q self,
        mut query: QueryAs<'q, Any, O, AnyArguments<'q>>,
    ) -> QueryAs<'q, Any, O, AnyArguments<'q>> {
        for b in &self.binds {
            query = match b {
                Bind::Int(v) => query.bind(*v),
                Bind::Text(v) => query.bind(v.as_str()),
            };
        }
        query
    }
}

/// Keyset pages read `limit + 1` rows: the extra one only says that more exist.
fn page<T>(mut rows: Vec<T>, limit: i64) -> (Vec<T>, bool) {
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    (rows, has_more)
}

impl Store {
    /// Returns up to `limit` tokens, newest first, and whether more exist.
    pub async fn list_tokens(&self, f: &TokenFilter) -> Result<(Vec<TokenRow>, bool)> {
        let mut w = Where::default();
        f.parties.push_where(&mut w, "k");
        if !f.include_inactive {
            w.clauses.push("k.revoked_at IS NULL".into());
            w.int("(k.expires_at IS NULL OR k.expires_at > ?)", f.now);
        }
        w.opt_text("k.id < ?", f.page.before_id.as_deref());
        let sql = format!(
            "SELECT k.id, s.email AS sender_email, r.email AS recipient_email, s.currency, \
             k.created_at, k.expires_at, k.spend_limit, k.held, k.spent, k.revoked_at, \
             k.limit_per_day \
             FROM tokens k JOIN accounts s ON s.id = k.sender_id \
             JOIN accounts r ON r.id = k.recipient_id {} ORDER BY k.id DESC LIMIT {}",
            w.sql(),
            f.page.limit + 1
        );
        let rows = w.bind_as(sqlx::query_as(&sql)).fetch_all(self.pool());
        Ok(page(rows.await?, f.page.limit))
    }

    /// Up to `limit` accounts with ids above `after_id`, oldest first, and whether more exist.
    pub async fn list_accounts_page(
        &self,
        after_id: Option<i64>,
        limit: i64,
    ) -> Result<(Vec<AccountRow>, bool)> {
        let sql = format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts a WHERE a.id > $1 ORDER BY a.id LIMIT {}",
            limit + 1
        );
        let accounts = sqlx::query_as(&sql)
            .bind(after_id.unwrap_or(i64::MIN))
            .fetch_all(self.pool());
        Ok(page(accounts.await?, limit))
    }

    /// Returns up to `limit` transfers, newest first, and whether more exist.
    pub async fn list_transfers(&self, f: &TransferFilter) -> Result<(Vec<TransferRow>, bool)> {
        let mut w = Where::default();
        f.parties.push_where(&mut w, "t");
        w.opt_text("t.status = ?", f.status.map(|s| s.as_str()));
        f.range.push_where(&mut w, "t.created_at");
        w.opt_text("t.app_name = ?", f.app_name.as_deref());
        // By its id, or by the token itself (what `token revoke` takes too, and all a user who
        // lost one may have): its hash names it, as at its issue.
        match f.token_id.as_deref() {
            Some(t) if t.starts_with(super::token::TOKEN_PREFIX) => w.text(
                "t.token_id = (SELECT id FROM tokens WHERE token_hash = ?)",
                &super::sha256_hex(t),
            ),
            other => w.opt_text("t.token_id = ?", other),
        }
        w.opt_text("t.id < ?", f.page.before_id.as_deref());
        let sql = format!(
            "SELECT {TRANSFER_COLUMNS}{REFUNDED} FROM transfers t {TRANSFER_JOINS} {} \
             ORDER BY t.id DESC LIMIT {}",
            w.sql(),
            f.page.limit + 1
        );
        let rows = w.bind_as(sqlx::query_as(&sql)).fetch_all(self.pool());
        Ok(page(rows.await?, f.page.limit))
    }

    pub async fn query_usage(&self, f: &UsageFilter) -> Result<UsagePage> {
        // The caller's rows in the range, as filtered: what the totals and the page read.
        let filtered = || {
            let mut w = Where::default();
            usage_account(&mut w, &f.account);
            f.range.push_where(&mut w, "u.created_at");
            f.dims.push_where(&mut w, "u");
            w.opt_text("u.request_id = ?", f.request_id.as_deref());
            w
        };
        // The totals read every row in the range: an analytics answer, with its turn and, on
        // Postgres, its time limit (`analytics.rs`).
        let totals = {
            let caller = match &f.account {
                Some((id, _)) => Caller::Owner(*id),
                None => Caller::Admin,
            };
            let _turn = self.analytics_turn(caller).await?;
            let mut w = filtered();
            if let Some(c) = &f.totals_currency {
                w.text(
                    &format!("u.recipient_id IN {}", super::analytics::OWNERS_IN),
                    c,
                );
            }
            let sql = format!(
                "SELECT COUNT(*) AS requests, \
                 CAST(COALESCE(SUM(u.prompt_tokens), 0) AS BIGINT) AS prompt_tokens, \
                 CAST(COALESCE(SUM(u.completion_tokens), 0) AS BIGINT) AS completion_tokens, \
                 CAST(COALESCE(SUM(u.total_tokens), 0) AS BIGINT) AS total_tokens, \
                 CAST(COALESCE(SUM(u.cost), 0) AS BIGINT) AS cost \
                 FROM usage_records u {}",
                w.sql()
            );
            match self.fetch_stats(&w, &sql, false).await?.first() {
                Some(row) => UsageTotals::from_row(row)?,
                None => UsageTotals::default(),
            }
        };
        let mut w = filtered();
        w.opt_text("u.id < ?", f.page.before_id.as_deref());
        let sql = format!(
            "SELECT {USAGE_COLUMNS} FROM usage_records u JOIN accounts r ON r.id = u.recipient_id {} \
             ORDER BY u.id DESC LIMIT {}",
            w.sql(),
            f.page.limit + 1
        );
        let rows = w.bind_as(sqlx::query_as(&sql)).fetch_all(self.pool());
        let (rows, has_more) = page(rows.await?, f.page.limit);
        Ok(UsagePage {
            rows,
            has_more,
            totals,
        })
    }

    /// The newest (or, `oldest_first`, the oldest) `limit` usage rows with an id above
    /// `after_id` (ids are UUIDv7: time-ordered), of this account as in [`UsageFilter::account`]:
    /// a range of the primary key, so a live tail reads only recent rows however large the table
    /// (no totals either).
    pub async fn usage_after(
        &self,
        account: &Option<(i64, String)>,
        after_id: &str,
        limit: i64,
        oldest_first: bool,
    ) -> Result<Vec<UsageRow>> {
        let mut w = Where::default();
        usage_account(&mut w, account);
        w.text("u.id > ?", after_id);
        let sql = format!(
            "SELECT {USAGE_COLUMNS} FROM usage_records u JOIN accounts r ON r.id = u.recipient_id {} \
             ORDER BY u.id {} LIMIT {limit}",
            w.sql(),
            if oldest_first { "ASC" } else { "DESC" }
        );
        Ok(w.bind_as(sqlx::query_as(&sql))
            .fetch_all(self.pool())
            .await?)
    }

    /// The row `recipient_id` recorded under `row_key`.
    pub async fn usage_by_key(&self, recipient_id: i64, row_key: &str) -> Result<Option<UsageRow>> {
        let sql = format!(
            "SELECT {USAGE_COLUMNS} FROM usage_records u JOIN accounts r ON r.id = u.recipient_id \
             WHERE u.recipient_id = $1 AND u.row_key = $2"
        );
        Ok(sqlx::query_as(&sql)
            .bind(recipient_id)
            .bind(row_key)
            .fetch_optional(self.pool())
            .await?)
    }

    /// The free row (no refusal, no transfer) a user's request id left at a recipient's endpoint.
    pub async fn free_usage_by_request(
        &self,
        recipient_id: i64,
        user_email: &str,
        request_id: &str,
        endpoint: &str,
    ) -> Result<Option<UsageRow>> {
        let sql = format!(
            "SELECT {USAGE_COLUMNS} FROM usage_records u JOIN accounts r ON r.id = u.recipient_id \
             WHERE u.recipient_id = $1 AND u.request_id = $2 AND u.user_email = $3 \
               AND u.endpoint = $4 AND NOT u.refused AND {FREE_ROW}"
        );
        Ok(sqlx::query_as(&sql)
            .bind(recipient_id)
            .bind(request_id)
            .bind(user_email)
            .bind(endpoint)
            .fetch_optional(self.pool())
            .await?)
    }
}

/// Rows of an account: as app owner (recipient) or as the user who sent the request.
fn usage_account(w: &mut Where, account: &Option<(i64, String)>) {
    if let Some((id, email)) = account {
        let (p1, p2) = (
            format!("${}", w.binds.len() + 1),
            format!("${}", w.binds.len() + 2),
        );
        w.clauses
            .push(format!("(u.recipient_id = {p1} OR u.user_email = {p2})"));
        w.binds.push(Bind::Int(*id));
        w.binds.push(Bind::Text(email.clone()));
    }
}
