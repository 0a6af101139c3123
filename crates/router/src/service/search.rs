//! The paid search: validate, price, hold the per-query price, run the search, then capture only
//! when it succeeded **and** found at least one result; an empty answer or a failure is voided
//! (users pay for answers). One usage row per request: `prompt_tokens` is the query's length in
//! tokens, `completion_tokens` the number of results.

use std::time::Instant;

use prost::Message;
use syft_error::UsageStatus;
use syft_proto::router::{ProviderInfo, SearchRequest, SearchResponse, SearchResult};
use tracing::Instrument;

use super::admission::{Authorized, Presence, Ticket, Units};
use super::hold::{Claim, HoldGuard};
use super::refusal::Attempt;
use super::replay::search_record;
use super::{elapsed_ms, RouterService};
use crate::config::ServiceKind;
use crate::error::RouterError;
use crate::limits::RateHeaders;
use crate::metrics;
use crate::search::SearchHit;
use crate::tokens;
use crate::upstream::UpstreamError;
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
            request_id = %req.request_id.escape_debug(),
            user = %req.user_email.escape_debug(),
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
        // A refused request leaves a usage row with its refusal status (`refusal.rs`), a router
        // without a search backend too (as a disabled chat does), even when its client left.
        let provider = self.inner.search.as_ref().map_or("", |b| b.provider());
        let attempt = Attempt::search(&req, provider);
        let admission =
            |svc: RouterService, presence| async move { svc.admit_search(req, &presence).await };
        let admitted = match self.admit_detached(attempt, admission).await? {
            SearchAdmission::Run(admitted) => *admitted,
            SearchAdmission::Replay(response, headers) => {
                metrics::observe(provider, "search", "replay", started, Default::default());
                return Ok((*response, headers));
            }
        };
        let (v, t, mut claim, mut hold) = admitted;
        let backend = (self.inner.search.as_ref())
            .ok_or_else(|| RouterError::Internal("a search admitted without a backend".into()))?;
        let query_tokens = tokens::count_text(&v.query.query);
        // From here the backend has the query: a client that leaves keeps it in its token
        // windows, as a unary chat keeps its prompt (it gave all back: searches sent and left
        // before each answer were counted nothing). A failed or empty search still gives all.
        if let Some(pass) = &t.pass {
            pass.keep_if_dropped(query_tokens);
        }
        let up_start = Instant::now();
        let waiting = metrics::UpstreamWait::start(backend.provider());
        let searched = self.until_shutdown(backend.search(&v.query));
        let result = super::hold::keeping_alive(&mut hold, searched).await;
        drop(waiting);
        let upstream_time = up_start.elapsed();
        let upstream_ms = elapsed_ms(up_start);
        let units = |results: usize| Units {
            input: query_tokens,
            output: results as u64,
        };
        let transfer_id = hold
            .as_ref()
            .map(|h| h.transfer_id.clone())
            .unwrap_or_default();
        let mut response = SearchResponse {
            id: t.request_id.clone(),
            query: v.query.query.clone(),
            results: Vec::new(),
            // Its largest value, while the answer's size is worked out.
            cost_micros: t.hold_micros,
            transfer_id: transfer_id.clone(),
            provider_info: Some(ProviderInfo {
                provider: backend.provider().into(),
                ..ProviderInfo::default()
            }),
            currency: t.pricing.currency.clone(),
            replay: false,
        };
        let fitted = result.and_then(|hits| fit_answer(hits, response.encoded_len()));
        response.results = match fitted {
            Ok(results) => results,
            Err(e) => {
                if let Some(pass) = &t.pass {
                    pass.keep_if_dropped(0);
                }
                tracing::warn!(request_id = %t.request_id, error = %e.summary(), "search failed");
                tracing::debug!(request_id = %t.request_id, error = %e, "search failure in its words");
                let usage = self.usage(&t, e.usage_status(), units(0), started, upstream_ms);
                self.release(hold, &e.summary(), usage).await;
                claim.recorded();
                metrics::observe_failure(backend.provider(), "search", &e, started, upstream_time);
                return Err(e.into());
            }
        };
        let found = response.results.len();
        let cost = match found {
            0 => 0,
            _ => t.pricing.cost_micros(0, 0).min(t.hold_micros),
        };
        response.cost_micros = cost;
        let settled = if found == 0 {
            if let Some(pass) = &t.pass {
                pass.keep_if_dropped(0);
            }
            let usage = self.usage(&t, UsageStatus::NoResults, units(0), started, upstream_ms);
            self.release(hold, "no results", usage).await;
            Ok(transfer_id)
        } else {
            Self::settle_pass(&t, query_tokens).await;
            let usage = self.usage(&t, UsageStatus::Success, units(found), started, upstream_ms);
            // Stored with the capture, so a retry whose answer was lost gets it again (and is
            // not refused as "already charged").
            let answer = hold
                .as_ref()
                .and_then(|_| self.answer_to_store(&v.request_id, search_record(&v, &response)));
            self.settle(&t, hold, cost, usage, answer).await
        };
        claim.recorded();
        let outcome = match (&settled, found == 0) {
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
        settled?;
        Ok((response, Self::rate_headers(&t)))
    }
}

impl RouterService {
    /// Validates and prices a search, claims its id and places its hold when it is paid.
    async fn admit_search(
        &self,
        req: SearchRequest,
        presence: &Presence,
    ) -> Result<SearchAdmission, RouterError> {
        let (Some(backend), Some(bounds)) = (&self.inner.search, &self.inner.config.search) else {
            return Err(super::admission::disabled(ServiceKind::Search));
        };
        let v = validate_search(req, bounds)?;
        let pricing = self.price_for(ServiceKind::Search, &v.user_email, &v.transaction_token)?;
        let mut t = Ticket {
            started: tokio::time::Instant::now(),
            kind: ServiceKind::Search,
            request_id: v.request_id.clone(),
            user_email: v.user_email.clone(),
            transaction_token: v.transaction_token.clone(),
            hold_micros: pricing.hold_micros(0, 0),
            pricing,
            bound: None,
            model: backend.provider().into(),
            pass: None,
            free_row_key: String::new(),
        };
        // A search counts its query's tokens in the token windows (what its usage row reports
        // as `prompt_tokens`).
        let reserve = if self.counts_tokens(ServiceKind::Search) {
            tokens::count_text(&v.query.query)
        } else {
            0
        };
        let (claim, authorized) = self.admit_ticket(&mut t, reserve, presence).await?;
        let hold = match authorized {
            Authorized::Free => None,
            Authorized::Hold(h) => Some(h),
            // A retry of a captured search gets the stored answer (or a refusal saying why not).
            Authorized::Resolved(transfer) => {
                let response = self.replay_search(&v, &transfer).await?;
                let headers = Self::rate_headers(&t);
                return Ok(SearchAdmission::Replay(Box::new(response), headers));
            }
        };
        Ok(SearchAdmission::Run(Box::new((v, t, claim, hold))))
    }
}

/// An admitted search: the valid request, its ticket, its id claim and its hold (paid only).
type Admitted = (ValidSearch, Ticket, Claim, Option<HoldGuard>);

enum SearchAdmission {
    Run(Box<Admitted>),
    /// The stored answer of an earlier attempt, and the rate-limit headers of this retry.
    Replay(Box<SearchResponse>, RateHeaders),
}

/// The most an answer may hold: a standard gRPC client reads messages of up to 4 MiB, and an
/// answer it could not read was still charged (the embedded index's chunks are small; an `http`
/// backend may send up to 32 MiB).
const MAX_SEARCH_ANSWER: usize = syft_error::MAX_ANSWER_BYTES;

/// The best results that fit in an answer whose other fields take `base` bytes: the rest are
/// left out, as a search engine shows fewer. A best result that does not fit alone is the
/// backend's failure (nothing is charged).
fn fit_answer(hits: Vec<SearchHit>, base: usize) -> Result<Vec<SearchResult>, UpstreamError> {
    let mut size = base;
    let mut results = Vec::with_capacity(hits.len());
    for hit in hits {
        let result = result_proto(hit);
        size += prost::encoding::message::encoded_len(RESULTS_TAG, &result);
        if size > MAX_SEARCH_ANSWER {
            break;
        }
        results.push(result);
    }
    if results.is_empty() && size > MAX_SEARCH_ANSWER {
        return Err(UpstreamError::InvalidResponse(format!(
            "its best result alone is more than the {MAX_SEARCH_ANSWER} bytes an answer may hold"
        )));
    }
    Ok(results)
}

/// `SearchResponse.results`' field number (proto/syft/router/v1/router.proto).
const RESULTS_TAG: u32 = 3;

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

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// `RESULTS_TAG` is `SearchResponse.results`' field number, so the sizes `fit_answer` adds
    /// are the answer's own: a response holding only results starts with that field's key
    /// (number << 3 | length-delimited), and its length is the sum `fit_answer` makes.
    #[test]
    fn results_tag_is_the_proto_field_and_sizes_add_up() {
        let hit = |id: &str| SearchHit {
            id: id.into(),
            score: 0.5,
            content: "x".repeat(300),
            metadata: None,
        };
        let results = fit_answer(vec![hit("a"), hit("b")], 0).expect("fits");
        let response = SearchResponse {
            results: results.clone(),
            ..Default::default()
        };
        let bytes = response.encode_to_vec();
        assert_eq!(u32::from(bytes[0]), RESULTS_TAG << 3 | 2);
        let summed: usize = results
            .iter()
            .map(|r| prost::encoding::message::encoded_len(RESULTS_TAG, r))
            .sum();
        assert_eq!(bytes.len(), summed);
    }
}
