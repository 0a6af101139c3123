//! CORS for the HTTP fronts (`cors_origins` in the config file, docs/router.md).

use axum::http::{HeaderValue, Method};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer, ExposeHeaders};

/// Lets pages of `origins` call the APIs from a browser (answering preflights, and telling the
/// browser it may read the answer and its headers); with no origins, no CORS header is sent and
/// browsers keep other origins' pages out, as before. No credentials mode: the router reads no
/// cookies (a payment is the `Authorization` header or the body's token, which a page must hold
/// to send), so a page of an allowed origin can do nothing that its script could not do by hand.
/// Request headers are mirrored, since browser SDKs send their own (`x-stainless-*`), and
/// `Authorization` is not covered by a wildcard.
///
/// `None` without origins: the layer would still answer every `OPTIONS` request itself.
pub(crate) fn layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        // Checked when the config was loaded (`RouterConfig::validate`).
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    let layer = CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers(ExposeHeaders::any())
        .max_age(std::time::Duration::from_secs(3600));
    Some(layer)
}
