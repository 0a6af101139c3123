//! The paid search: validate, price, hold the per-query price, run the search, then capture only
//! when it succeeded **and** found at least one result; an empty answer or a failure is voided
//! (users pay for answers). One usage row per request: `prompt_tokens` is the query's length in
//! tokens, `completion_tokens` the number of results.

use std::time::Instant;

use syft_error::UsageStatus;
use syft_proto::router::{ProviderInfo, SearchRequest, SearchResponse, SearchResult};
use tracing::Instrument;

use super::admission::{already_processed, Authorized, Ticket, Units};
use super::hold::{Claim, HoldGuard};
use super::refusal::Attempt;
use super::{elapsed_ms, RouterService};
use crate::config::ServiceKind;
use crate::error::RouterError;
use crate::limits::RateHeaders;
use crate::metrics;
use crate::search::SearchHit;
use crate::tokens;
use crate::validate::{validate_search, ValidSearch};

impl RouterService {
    /// One search, with the rate-limit headers of the answer. Returns only after the capture (or
    /// void, or usage row) is committed.
    pub async fn search_with_limits(
        &self,
        req: SearchRequest,
    ) -> Result<(SearchResponse, RateHeaders), RouterError> {
        let span = tracing::info_span!(
            "search",
            request_id = %req.request_id,
            user = %req.user_email,
            app = %self.inner.config.name,
            transfer_id = tracing::field::Empty,
        );
        self.run_search(req).instrument(span).await
    }

    async fn run_search(
        &self,
        req: SearchRequest,
    ) -> Result<(SearchResponse, RateHeaders), RouterError> {
        let started = Instant::now();
        let Some(backend) = &self.inner.search else {
            return Err(super::admission::disabled(ServiceKind::Search));
        };
        // A refused request leaves a usage row with its refusal status (`refusal.rs`).
        let attempt = Attempt::search(&req, backend.provider());
        let admitted = match self.admit_search(req).await {
            Ok(admitted) => admitted,
            Err(e) => {
                self.record_refusal(attempt, &e).await;
                return Err(e);
            }
        };
        let (v, t, mut claim, mut hold) = admitted;
        let query_tokens = tokens::count_text(&v.query.query);
        let up_start = Instant::now();
        let searched = self.until_shutdown(backend.search(&v.query));
        let result = super::hold::keeping_alive(&mut hold, searched).await;
        let upstream_time = up_start.elapsed();
        let upstream_ms = elapsed_ms(up_start);
        let units = |results: usize| Units {
            input: query_tokens,
            output: results as u64,
        };
        let hits = match result {
            Ok(hits) => hits,
            Err(e) => {
                tracing::warn!(request_id = %t.request_id, error = %e, "search failed");
                let usage = self.usage(&t, e.usage_status(), units(0), started, upstream_ms);
                self.release(hold, &e.to_string(), usage).await;
                claim.recorded();
                metrics::observe_failure(backend.provider(), "search", &e, started, upstream_time);
                return Err(e.into());
            }
        };
        let transfer_id = hold
            .as_ref()
            .map(|h| h.transfer_id.clone())
            .unwrap_or_default();
        let (cost, settled) = if hits.is_empty() {
            let usage = self.usage(&t, UsageStatus::NoResults, units(0), started, upstream_ms);
            self.release(hold, "no results", usage).await;
            (0, Ok(transfer_id))
        } else {
            Self::settle_pass(&t, query_tokens).await;
            let cost = t.pricing.cost_micros(0, 0).min(t.hold_micros);
            let usage = self.usage(
                &t,
                UsageStatus::Success,
                units(hits.len()),
                started,
                upstream_ms,
            );
            (cost, self.settle(&t, hold, cost, usage, None).await)
        };
        claim.recorded();
        let outcome = match (&settled, hits.is_empty()) {
            (Err(_), _) => "not_settled",
            (Ok(_), true) => UsageStatus::NoResults.as_str(),
            (Ok(_), false) => "success",
        };
        metrics::observe(
            backend.provider(),
            "search",
            outcome,
            started,
            upstream_time,
        );
        let transfer_id = settled?;
        let headers = Self::rate_headers(&t);
        let response = SearchResponse {
            id: t.request_id,
            query: v.query.query,
            results: hits.into_iter().map(result_proto).collect(),
            cost_micros: cost,
            transfer_id,
            provider_info: Some(ProviderInfo {
                provider: backend.provider().into(),
                ..ProviderInfo::default()
            }),
            currency: t.pricing.currency,
        };
        Ok((response, headers))
    }
}

impl RouterService {
    /// Validates and prices a search, claims its id and places its hold when it is paid.
    async fn admit_search(&self, req: SearchRequest) -> Result<Admitted, RouterError> {
        let (Some(backend), Some(bounds)) = (&self.inner.search, &self.inner.config.search) else {
            return Err(super::admission::disabled(ServiceKind::Search));
        };
        let v = validate_search(req, bounds)?;
        let pricing = self.price_for(ServiceKind::Search, &v.user_email, &v.transaction_token)?;
        let mut t = Ticket {
            kind: ServiceKind::Search,
            request_id: v.request_id.clone(),
            user_email: v.user_email.clone(),
            transaction_token: v.transaction_token.clone(),
            hold_micros: pricing.hold_micros(0, 0),
            pricing,
            bound: None,
            model: backend.provider().into(),
            pass: None,
        };
        // A search counts its query's tokens in the token windows (what its usage row reports
        // as `prompt_tokens`).
        let reserve = if self.counts_tokens(ServiceKind::Search) {
            tokens::count_text(&v.query.query)
        } else {
            0
        };
        let (claim, authorized) = self.admit_ticket(&mut t, reserve).await?;
        let hold = match authorized {
            Authorized::Free => None,
            Authorized::Hold(h) => Some(h),
            // Search answers are not stored for replay: a retry of a settled search is refused.
            Authorized::Resolved(transfer) => {
                return Err(already_processed(&t.request_id, &transfer, ""))
            }
        };
        Ok((v, t, claim, hold))
    }
}

/// An admitted search: the valid request, its ticket, its id claim and its hold (paid only).
type Admitted = (ValidSearch, Ticket, Claim, Option<HoldGuard>);

fn result_proto(h: SearchHit) -> SearchResult {
    SearchResult {
        id: h.id,
        score: h.score,
        content: h.content,
        metadata_json: h
            .metadata
            .map(|m| serde_json::Value::Object(m).to_string())
            .unwrap_or_default(),
    }
}
