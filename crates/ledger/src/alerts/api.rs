//! The alerts calls of the ledger core: add, list, remove, rotate, test, deliveries. They take
//! domain inputs; the gRPC adapter (`grpc_alerts.rs`) and the CLI only translate.

use std::time::Duration;

use serde_json::json;
use syft_error::Reason;

use super::payload::Fired;
use super::rules::{EventKind, Format, Rule, MAX_RULES};
use super::seal::{generate_secret, SealKey};
use super::store::{self as db, DeliveryRow, EndpointRecord};
use super::target;
use crate::auth::Caller;
use crate::core::Ledger;
use crate::error::{LedgerError, Result};
use crate::store::{now_micros, AccountRow};
use crate::validate;

const MAX_RATE_PER_MINUTE: u32 = 600;
/// Endpoints one account may have (Stripe's number). Each rule of each endpoint is evaluated
/// every tick: with no cap, one account from the open registration added 20,000 endpoints in
/// 24 s and kept the ledger's two cores busy.
pub const MAX_ENDPOINTS_PER_ACCOUNT: i64 = 16;
const MAX_OVERLAP: Duration = Duration::from_secs(7 * 86_400);
const MAX_DELIVERIES_PAGE: u32 = 500;

/// An endpoint to add (not yet validated).
#[derive(Debug, Clone, Default)]
pub struct NewEndpoint {
    /// Empty: the caller's own account (the admin must name one).
    pub account_email: String,
    pub url: String,
    pub format: Format,
    pub rules: Vec<Rule>,
    /// None: the ledger's default cap.
    pub rate_per_minute: Option<u32>,
}

/// An endpoint as the API shows it (never its secret).
#[derive(Debug, Clone)]
pub struct AlertEndpoint {
    pub id: String,
    pub account_email: String,
    pub url: String,
    pub format: Format,
    pub rules: Vec<Rule>,
    pub rate_per_minute: u32,
    /// Failing without a success since then.
    pub failing_since: Option<i64>,
    /// Disabled after persistent failure (the flag the issue asks for).
    pub disabled_at: Option<i64>,
    /// During a rotation's overlap: when the previous secret stops signing.
    pub previous_secret_until: Option<i64>,
    pub pending_events: i64,
    pub created_at: i64,
}

pub type Delivery = DeliveryRow;

impl Ledger {
    fn alerts_key(&self) -> Result<&SealKey> {
        if self.config().hosted.is_some() {
            return Err(LedgerError::refused(
                Reason::NotSupported,
                "alerts watch local accounting; this ledger runs backend = hosted",
            ));
        }
        self.config().alerts.key.as_deref().ok_or_else(|| {
            LedgerError::FailedPrecondition(
                "alerts are off: start the ledger with --alerts-key (it seals webhook secrets)"
                    .into(),
            )
        })
    }

    /// The account an alerts call is about: the caller's, or (admin) the named one.
    async fn alerts_account(&self, caller: &Caller, email: &str) -> Result<AccountRow> {
        match (email.is_empty(), caller) {
            // The admin has no account of its own: say which field names one (it was told that
            // it needs an account's credentials, 403).
            (true, Caller::Admin) => Err(LedgerError::invalid(
                "the admin names the account whose alerts it manages (account_email; ?account= \
                 when listing over REST)",
            )),
            (true, Caller::Account(_)) => self.me(caller).await,
            (false, _) => self.account(caller, email).await,
        }
    }

    /// An endpoint the caller may manage.
    async fn own_endpoint(&self, caller: &Caller, id: &str) -> Result<EndpointRecord> {
        let id = validate::text("endpoint_id", id, 64, true)?;
        let endpoint = db::endpoint(self.store().pool(), id)
            .await?
            .ok_or_else(|| LedgerError::NotFound(format!("alert endpoint {id} not found")))?;
        match caller {
            Caller::Admin => Ok(endpoint),
            Caller::Account(a) if a.id == endpoint.account_id => Ok(endpoint),
            // Someone else's endpoint is reported as missing, not as forbidden: ids don't leak.
            Caller::Account(_) => Err(LedgerError::NotFound(format!(
                "alert endpoint {id} not found"
            ))),
        }
    }

    /// Adds an endpoint; returns it with its signing secret (shown this once).
    pub async fn add_alert_endpoint(
        &self,
        caller: &Caller,
        req: NewEndpoint,
    ) -> Result<(AlertEndpoint, String)> {
        let key = self.alerts_key()?;
        let account = self.alerts_account(caller, &req.account_email).await?;
        let alerts = &self.config().alerts;
        let url = target::parse_url(req.url.trim(), &alerts.allowed_hosts)?;
        target::resolve(&url, &alerts.allowed_hosts, alerts.request_timeout).await?;
        if req.rules.is_empty() || req.rules.len() > MAX_RULES {
            return Err(LedgerError::invalid(format!(
                "an endpoint needs 1 to {MAX_RULES} rules"
            )));
        }
        for rule in &req.rules {
            rule.validate(self.config().max_amount_micros)?;
        }
        let rate = req.rate_per_minute.unwrap_or(alerts.rate_per_minute);
        if !(1..=MAX_RATE_PER_MINUTE).contains(&rate) {
            return Err(LedgerError::invalid(format!(
                "rate_per_minute must be between 1 and {MAX_RATE_PER_MINUTE}"
            )));
        }
        let id = format!("ep_{}", uuid::Uuid::now_v7().simple());
        let secret = generate_secret();
        let record = EndpointRecord {
            secret_sealed: key.seal(&id, &secret)?,
            id,
            account_id: account.id,
            url: url.to_string(),
            format: req.format.as_str().to_string(),
            previous_secret: Default::default(),
            rules: serde_json::to_string(&req.rules)
                .map_err(|e| LedgerError::Internal(e.to_string()))?,
            rate_per_minute: i64::from(rate),
            failing_since: None,
            disabled_at: None,
            created_at: now_micros(),
        };
        if !db::insert_endpoint(self.store().pool(), &record, MAX_ENDPOINTS_PER_ACCOUNT).await? {
            return Err(LedgerError::FailedPrecondition(format!(
                "{} has {MAX_ENDPOINTS_PER_ACCOUNT} alert endpoints, the most an account may \
                 have (remove one first), or has added and removed {} within the last hour \
                 (try again later)",
                account.email,
                2 * MAX_ENDPOINTS_PER_ACCOUNT
            )));
        }
        tracing::info!(endpoint = %record.id, account = %account.email, "alert endpoint added");
        Ok((self.endpoint_view(record, &account.email).await?, secret))
    }

    pub async fn list_alert_endpoints(
        &self,
        caller: &Caller,
        account_email: &str,
    ) -> Result<Vec<AlertEndpoint>> {
        self.alerts_key()?;
        let account = self.alerts_account(caller, account_email).await?;
        let mut out = Vec::new();
        for record in db::endpoints(self.store().pool(), Some(account.id)).await? {
            out.push(self.endpoint_view(record, &account.email).await?);
        }
        Ok(out)
    }

    pub async fn remove_alert_endpoint(&self, caller: &Caller, id: &str) -> Result<()> {
        self.alerts_key()?;
        let endpoint = self.own_endpoint(caller, id).await?;
        db::remove_endpoint(self.store().pool(), &endpoint.id, now_micros()).await
    }

    /// Enables an endpoint disabled after failing; its pending events are delivered again.
    /// Enabling one that is not disabled changes nothing.
    pub async fn enable_alert_endpoint(&self, caller: &Caller, id: &str) -> Result<AlertEndpoint> {
        self.alerts_key()?;
        let mut endpoint = self.own_endpoint(caller, id).await?;
        if endpoint.disabled_at.is_some() {
            db::enable(self.store().pool(), &endpoint.id, now_micros()).await?;
            tracing::info!(endpoint = %endpoint.id, "alert endpoint enabled");
            // What `enable` wrote; the rest of the record is as read.
            (endpoint.disabled_at, endpoint.failing_since) = (None, None);
        }
        let account = db::account(self.store().pool(), endpoint.account_id).await?;
        self.endpoint_view(endpoint, &account.email).await
    }

    /// A new signing secret; the previous one keeps signing (second signature) for `overlap`.
    pub async fn rotate_alert_secret(
        &self,
        caller: &Caller,
        id: &str,
        overlap: Duration,
    ) -> Result<(String, i64)> {
        let key = self.alerts_key()?;
        if overlap > MAX_OVERLAP {
            return Err(LedgerError::invalid("overlap must be at most 7 days"));
        }
        let endpoint = self.own_endpoint(caller, id).await?;
        let now = now_micros();
        // One previous secret is kept: a second rotation within an overlap would end the first
        // one's at once, and its receivers, promised the older secret until then, would refuse
        // every event (given up on a 4xx). An overlap of 0 ends every earlier secret, as asked.
        let previous = &endpoint.previous_secret;
        // A previous secret this key cannot open (`--alerts-key` changed) signs nothing, and
        // promises nothing: its overlap does not hold a rotation back.
        let signing = |sealed: &String| key.open(&endpoint.id, sealed).is_ok();
        if let (Some(sealed), Some(until), false) =
            (&previous.sealed, previous.until, overlap.is_zero())
        {
            if now < until && signing(sealed) {
                return Err(LedgerError::FailedPrecondition(format!(
                    "endpoint {}'s previous secret signs until {} (unix micros), as its rotation \
                     promised; rotate again after then, or with an overlap of 0 to end every \
                     earlier secret now",
                    endpoint.id, until
                )));
            }
        }
        let secret = generate_secret();
        // A current secret this key cannot open (`--alerts-key` changed) signs nothing: it is
        // not kept for an overlap.
        let opens = key.open(&endpoint.id, &endpoint.secret_sealed).is_ok();
        let until = now + if opens { overlap.as_micros() as i64 } else { 0 };
        let rotated = db::rotate_secret(
            self.store().pool(),
            &endpoint.id,
            &key.seal(&endpoint.id, &secret)?,
            &endpoint.secret_sealed,
            opens.then_some(until),
        )
        .await?;
        if !rotated {
            return Err(LedgerError::FailedPrecondition(format!(
                "endpoint {}'s secret was rotated by another request at the same time; nothing \
                 changed here: rotate again to get a secret of your own",
                endpoint.id
            )));
        }
        tracing::info!(endpoint = %endpoint.id, "alert signing secret rotated");
        Ok((secret, until))
    }

    /// Queues a `test` event for the endpoint (delivered like any other); returns its id.
    pub async fn send_test_alert(&self, caller: &Caller, id: &str) -> Result<String> {
        self.alerts_key()?;
        let endpoint = self.own_endpoint(caller, id).await?;
        if endpoint.disabled_at.is_some() {
            // Nothing is delivered to a disabled endpoint: its event would wait for ever.
            return Err(LedgerError::FailedPrecondition(format!(
                "endpoint {} is disabled after failing; enable it once its receiver works",
                endpoint.id
            )));
        }
        let now = now_micros();
        let fired = Fired {
            kind: EventKind::Test,
            data: json!({"endpoint_id": endpoint.id, "message": "test event from syft-router"}),
            summary: format!("test event for endpoint {}", endpoint.id),
        };
        let format = Format::parse(&endpoint.format)?;
        let mut tx = self.store().pool().begin().await?;
        let most = self.config().alerts.max_pending_tests;
        if db::lock_pending_tests(&mut tx, &endpoint.id).await? >= most {
            return Err(LedgerError::ResourceExhausted(format!(
                "endpoint {} has {most} test events waiting to be delivered; send another once \
                 one is delivered or given up (its deliveries say which)",
                endpoint.id
            )));
        }
        let event = db::insert_event(&mut tx, &endpoint.id, format, &fired, now).await?;
        tx.commit().await?;
        super::metrics::written(EventKind::Test, 1);
        Ok(event)
    }

    /// The endpoint's delivery log, newest first.
    pub async fn alert_deliveries(
        &self,
        caller: &Caller,
        id: &str,
        limit: u32,
    ) -> Result<Vec<Delivery>> {
        self.alerts_key()?;
        let endpoint = self.own_endpoint(caller, id).await?;
        let limit = match limit {
            0 => 100,
            n if n <= MAX_DELIVERIES_PAGE => n,
            n => {
                return Err(LedgerError::invalid(format!(
                    "limit {n} exceeds the maximum of {MAX_DELIVERIES_PAGE}"
                )))
            }
        };
        db::deliveries(self.store().pool(), &endpoint.id, i64::from(limit)).await
    }

    async fn endpoint_view(&self, r: EndpointRecord, email: &str) -> Result<AlertEndpoint> {
        let pending_events = db::pending_events(self.store().pool(), &r.id).await?;
        let rules = serde_json::from_str(&r.rules)
            .map_err(|e| LedgerError::Internal(format!("stored rules unreadable: {e}")))?;
        Ok(AlertEndpoint {
            format: Format::parse(&r.format)?,
            rules,
            rate_per_minute: u32::try_from(r.rate_per_minute).unwrap_or(u32::MAX),
            previous_secret_until: r.previous_secret.until.filter(|u| *u > now_micros()),
            account_email: email.to_string(),
            pending_events,
            id: r.id,
            url: r.url,
            failing_since: r.failing_since,
            disabled_at: r.disabled_at,
            created_at: r.created_at,
        })
    }
}
