//! The web dashboard at `/dashboard` (docs/analytics.md, "Dashboard"): a single page served from
//! the binary (vanilla JS, the vendored uPlot), a JSON API under `/dashboard/api/` that calls the
//! ledger core with the signed-in caller (so the permission rules are the analytics API's), and a
//! server-sent event stream of new usage rows (`live.rs`).
//!
//! - `session.rs`: sign-in, sessions (a table; only a hash of the token is kept), sign-out, CSRF.
//! - `throttle.rs`: failed sign-ins per account, refused for a while past a limit.
//! - `api.rs`: account, analytics, transfers, usage rows, tokens; `alerts.rs`: the alerts panel.

mod alerts;
mod api;
mod live;
mod session;
mod throttle;

use std::sync::Arc;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::watch;

use crate::core::Ledger;
use crate::error::LedgerError;
use crate::rest::RestError;

pub(crate) use live::Hub;

/// What every dashboard handler reads.
#[derive(Clone)]
pub(crate) struct Dash {
    pub ledger: Ledger,
    pub live: Arc<Hub>,
    /// The HTTP port serves TLS: the cookie gets `Secure`.
    pub secure: bool,
    /// False while the ledger shuts down (or its database is away): live streams end, so a
    /// graceful shutdown does not wait out its grace period for open pages, which reconnect.
    pub ready: watch::Receiver<bool>,
    /// Failed sign-ins per account (`throttle.rs`).
    pub signins: Arc<throttle::SignInThrottle>,
    /// Live streams open per account on this process (`live.rs`).
    pub streams: Arc<live::OpenStreams>,
}

pub fn router(ledger: Ledger, ready: watch::Receiver<bool>) -> Router {
    let dash = Dash {
        ready,
        secure: ledger.config().tls.is_some(),
        live: Arc::new(Hub::start(ledger.store().clone())),
        signins: Arc::default(),
        streams: Arc::default(),
        ledger,
    };
    Router::new()
        .route("/dashboard", get(|| asset(Asset::Page)))
        .route("/dashboard/", get(|| asset(Asset::Page)))
        .route("/dashboard/app.js", get(|| asset(Asset::Script)))
        .route("/dashboard/app.css", get(|| asset(Asset::Style)))
        .route(
            "/dashboard/vendor/uPlot.min.js",
            get(|| asset(Asset::Uplot)),
        )
        .route(
            "/dashboard/vendor/uPlot.min.css",
            get(|| asset(Asset::UplotStyle)),
        )
        .route("/dashboard/login", post(session::login))
        .route("/dashboard/logout", post(session::logout))
        .route("/dashboard/events", get(live::events))
        .route("/dashboard/api/me", get(api::me))
        .route("/dashboard/api/stats", get(api::stats))
        .route("/dashboard/api/transfers", get(api::transfers))
        .route("/dashboard/api/usage", get(api::usage))
        .route("/dashboard/api/tokens", get(api::tokens))
        .route("/dashboard/api/tokens/revoke", post(api::revoke_token))
        .route("/dashboard/api/alerts", get(alerts::list).post(alerts::add))
        .route("/dashboard/api/alerts/remove", post(alerts::remove))
        .route("/dashboard/api/alerts/enable", post(alerts::enable))
        .route("/dashboard/api/alerts/test", post(alerts::test))
        .route("/dashboard/api/alerts/deliveries", get(alerts::deliveries))
        .with_state(dash)
        .layer(axum::middleware::map_request(host_from_authority))
}

/// HTTP/2 carries the host in the URI (`:authority`), not in a `Host` header; the Origin check
/// compares with `Host`, so it is filled in from the URI when missing.
async fn host_from_authority(mut req: axum::extract::Request) -> axum::extract::Request {
    if !req.headers().contains_key(header::HOST) {
        let authority = req.uri().authority().map(|a| a.as_str().to_string());
        if let Some(value) = authority.and_then(|a| HeaderValue::from_str(&a).ok()) {
            req.headers_mut().insert(header::HOST, value);
        }
    }
    req
}

/// The static files, compiled into the binary: the page works offline and needs no build step.
#[derive(Clone, Copy)]
enum Asset {
    Page,
    Script,
    Style,
    Uplot,
    UplotStyle,
}

/// Scripts and styles only from this origin (no inline script, no CDN), no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

async fn asset(which: Asset) -> Response {
    let (body, kind): (&'static str, &'static str) = match which {
        Asset::Page => (
            include_str!("assets/index.html"),
            "text/html; charset=utf-8",
        ),
        Asset::Script => (
            include_str!("assets/app.js"),
            "text/javascript; charset=utf-8",
        ),
        Asset::Style => (include_str!("assets/app.css"), "text/css; charset=utf-8"),
        Asset::Uplot => (
            include_str!("../vendor/uPlot.iife.min.js"),
            "text/javascript; charset=utf-8",
        ),
        Asset::UplotStyle => (
            include_str!("../vendor/uPlot.min.css"),
            "text/css; charset=utf-8",
        ),
    };
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// A dashboard error: the REST API's JSON body and status, without `WWW-Authenticate` (a browser
/// would answer it with its own password prompt instead of the page's sign-in form).
pub(crate) struct DashError(pub LedgerError);

impl From<LedgerError> for DashError {
    fn from(e: LedgerError) -> Self {
        Self(e)
    }
}

impl IntoResponse for DashError {
    fn into_response(self) -> Response {
        let mut response = RestError(self.0).into_response();
        response.headers_mut().remove(header::WWW_AUTHENTICATE);
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

pub(crate) type Reply = std::result::Result<Response, DashError>;

/// A JSON answer that no cache keeps (it carries account data).
pub(crate) fn json(body: serde_json::Value) -> Reply {
    let mut response = axum::Json(body).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `Host` header after the layer, for a request to `http://127.0.0.1:8081/...`.
    async fn host_after(host: Option<&str>) -> Option<String> {
        let mut req =
            axum::extract::Request::builder().uri("http://127.0.0.1:8081/dashboard/login");
        if let Some(h) = host {
            req = req.header(header::HOST, h);
        }
        let req = host_from_authority(req.body(axum::body::Body::empty()).expect("request")).await;
        let host = req.headers().get(header::HOST)?;
        host.to_str().ok().map(str::to_string)
    }

    #[tokio::test]
    async fn http2_authority_becomes_the_host() {
        assert_eq!(host_after(None).await.as_deref(), Some("127.0.0.1:8081"));
        // A Host header that is there is left alone.
        assert_eq!(
            host_after(Some("example.com")).await.as_deref(),
            Some("example.com")
        );
    }
}
