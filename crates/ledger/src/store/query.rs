//! Read paths: transfer, token and account listing and usage queries with keyset paging.

use sqlx::any::AnyArguments;
use sqlx::query::QueryAs;
use sqlx::Any;

use super::{
    AccountRow, Micros, Store, TransferRow, TransferStatus, UsageRow, ACCOUNT_COLUMNS,
    TRANSFER_COLUMNS, TRANSFER_JOINS, USAGE_COLUMNS,
};
use crate::error::Result;

#[derive(Debug, Clone, Default)]
pub struct TransferFilter {
    /// Only transfers this account sent and/or received; `None` (admin) means every account.
    pub account_id: Option<i64>,
    pub as_sender: bool,
    pub as_recipient: bool,
    pub status: Option<TransferStatus>,
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub app_name: Option<String>,
    /// Keyset cursor: return ids strictly below this one (ids are time-ordered UUIDv7).
    pub before_id: Option<String>,
    pub limit: i64,
}

#[derive(Debug, Clone, Default)]
pub struct TokenFilter {
    /// Only tokens this account issued and/or received; `None` (admin) means every account.
    pub account_id: Option<i64>,
    pub as_sender: bool,
    pub as_recipient: bool,
    /// Revoked and expired tokens too.
    pub include_inactive: bool,
    /// The current time, for expiry.
    pub now: i64,
    /// Keyset cursor: ids strictly below this one (UUIDv7, time-ordered).
    pub before_id: Option<String>,
    pub limit: i64,
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
}

#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    /// Rows of this account: as app owner (recipient) or as the user who sent the request.
    pub account: Option<(i64, String)>,
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub user_email: Option<String>,
    pub app_name: Option<String>,
    pub endpoint: Option<String>,
    pub status: Option<String>,
    pub before_id: Option<String>,
    pub limit: i64,
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

    /// Rows of `account` on the side(s) asked for, in a table aliased `alias` with `sender_id`
    /// and `recipient_id` columns; neither or both sides mean either.
    fn party(&mut self, alias: &str, account: i64, as_sender: bool, as_recipient: bool) {
        match (as_sender, as_recipient) {
            (true, false) => self.int(&format!("{alias}.sender_id = ?"), account),
            (false, true) => self.int(&format!("{alias}.recipient_id = ?"), account),
            _ => {
                let p = self.next();
                self.clauses.push(format!(
                    "({alias}.sender_id = {p} OR {alias}.recipient_id = {p})"
                ));
                self.binds.push(Bind::Int(account));
            }
        }
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
        if let Some(account) = f.account_id {
            w.party("k", account, f.as_sender, f.as_recipient);
        }
        if !f.include_inactive {
            w.clauses.push("k.revoked_at IS NULL".into());
            w.int("(k.expires_at IS NULL OR k.expires_at > ?)", f.now);
        }
        w.opt_text("k.id < ?", f.before_id.as_deref());
        let sql = format!(
            "SELECT k.id, s.email AS sender_email, r.email AS recipient_email, s.currency, \
             k.created_at, k.expires_at, k.spend_limit, k.held, k.spent, k.revoked_at \
             FROM tokens k JOIN accounts s ON s.id = k.sender_id \
             JOIN accounts r ON r.id = k.recipient_id {} ORDER BY k.id DESC LIMIT {}",
            w.sql(),
            f.limit + 1
        );
        let rows = w.bind_as(sqlx::query_as(&sql)).fetch_all(self.pool());
        Ok(page(rows.await?, f.limit))
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
        if let Some(account) = f.account_id {
            w.party("t", account, f.as_sender, f.as_recipient);
        }
        w.opt_text("t.status = ?", f.status.map(|s| s.as_str()));
        w.opt_int("t.created_at >= ?", f.since);
        w.opt_int("t.created_at < ?", f.until);
        w.opt_text("t.app_name = ?", f.app_name.as_deref());
        w.opt_text("t.id < ?", f.before_id.as_deref());
        let sql = format!(
            "SELECT {TRANSFER_COLUMNS} FROM transfers t {TRANSFER_JOINS} {} ORDER BY t.id DESC LIMIT {}",
            w.sql(),
            f.limit + 1
        );
        let rows = w.bind_as(sqlx::query_as(&sql)).fetch_all(self.pool());
        Ok(page(rows.await?, f.limit))
    }

    pub async fn query_usage(&self, f: &UsageFilter) -> Result<UsagePage> {
        let mut w = Where::default();
        usage_account(&mut w, &f.account);
        w.opt_int("u.created_at >= ?", f.since);
        w.opt_int("u.created_at < ?", f.until);
        w.opt_text("u.user_email = ?", f.user_email.as_deref());
        w.opt_text("u.app_name = ?", f.app_name.as_deref());
        w.opt_text("u.endpoint = ?", f.endpoint.as_deref());
        w.opt_text("u.status = ?", f.status.as_deref());
        let totals_sql = format!(
            "SELECT COUNT(*) AS requests, \
             CAST(COALESCE(SUM(u.prompt_tokens), 0) AS BIGINT) AS prompt_tokens, \
             CAST(COALESCE(SUM(u.completion_tokens), 0) AS BIGINT) AS completion_tokens, \
             CAST(COALESCE(SUM(u.total_tokens), 0) AS BIGINT) AS total_tokens, \
             CAST(COALESCE(SUM(u.cost), 0) AS BIGINT) AS cost \
             FROM usage_records u {}",
            w.sql()
        );
        let totals: UsageTotals = w
            .bind_as(sqlx::query_as(&totals_sql))
            .fetch_one(self.pool())
            .await?;
        w.opt_text("u.id < ?", f.before_id.as_deref());
        let sql = format!(
            "SELECT {USAGE_COLUMNS} FROM usage_records u JOIN accounts r ON r.id = u.recipient_id {} \
             ORDER BY u.id DESC LIMIT {}",
            w.sql(),
            f.limit + 1
        );
        let rows = w.bind_as(sqlx::query_as(&sql)).fetch_all(self.pool());
        let (rows, has_more) = page(rows.await?, f.limit);
        Ok(UsagePage {
            rows,
            has_more,
            totals,
        })
    }

    /// The newest `limit` usage rows with an id above `after_id` (ids are UUIDv7: time-ordered),
    /// of this account as in [`UsageFilter::account`]: a range of the primary key, so a live tail
    /// reads only recent rows however large the table (no totals either).
    pub async fn usage_after(
        &self,
        account: &Option<(i64, String)>,
        after_id: &str,
        limit: i64,
    ) -> Result<Vec<UsageRow>> {
        let mut w = Where::default();
        usage_account(&mut w, account);
        w.text("u.id > ?", after_id);
        let sql = format!(
            "SELECT {USAGE_COLUMNS} FROM usage_records u JOIN accounts r ON r.id = u.recipient_id {} \
             ORDER BY u.id DESC LIMIT {limit}",
            w.sql()
        );
        Ok(w.bind_as(sqlx::query_as(&sql))
            .fetch_all(self.pool())
            .await?)
    }

    pub async fn usage_by_request(
        &self,
        recipient_id: i64,
        user_email: &str,
        request_id: &str,
    ) -> Result<Option<UsageRow>> {
        let sql = format!(
            "SELECT {USAGE_COLUMNS} FROM usage_records u JOIN accounts r ON r.id = u.recipient_id \
             WHERE u.recipient_id = $1 AND u.request_id = $2 AND u.user_email = $3 \
               AND NOT u.refused"
        );
        Ok(sqlx::query_as(&sql)
            .bind(recipient_id)
            .bind(request_id)
            .bind(user_email)
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
