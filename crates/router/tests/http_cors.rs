//! CORS (`cors_origins`): pages of an allowed origin may call the HTTP APIs from a browser (the
//! preflight is answered, the answer and its headers are readable); other origins get no CORS
//! header, and a router without origins answers as before (no CORS header, `OPTIONS` refused).

use reqwest::{Method, StatusCode};
use serde_json::json;
use syft_router_svc::Pricing;
use syft_testkit::*;

const APP: &str = "https://app.example";

/// A browser's preflight of a paid OpenAI call from `origin`.
async fn preflight(url: &str, origin: &str) -> reqwest::Response {
    reqwest::Client::new()
        .request(Method::OPTIONS, url)
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type,x-stainless-os",
        )
        .send()
        .await
        .expect("preflight")
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_origins_may_call_from_a_browser() {
    let s = Stack::start_tweaked(Pricing::per_request(PRICE), |c| {
        c.cors_origins = vec![APP.into()];
    })
    .await;
    let url = s.router.chat_completions_url();
    let ok = preflight(&url, APP).await;
    assert!(ok.status().is_success(), "{ok:?}");
    assert_eq!(header(&ok, "access-control-allow-origin"), Some(APP));
    let allowed = header(&ok, "access-control-allow-headers").unwrap_or_default();
    assert!(allowed.contains("authorization"), "{allowed}");
    assert!(allowed.contains("x-stainless-os"), "{allowed}");
    let from_app = |extra| s.openai_chat(extra).header("origin", APP).send();
    let answer = from_app(json!({})).await.expect("call");
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(header(&answer, "access-control-allow-origin"), Some(APP));
    assert_eq!(header(&answer, "access-control-expose-headers"), Some("*"));
    assert!(header(&answer, "x-syft-cost-micros").is_some());

    // A refusal is readable too, and the operator's routes are not.
    let refused = from_app(json!({"n": 2})).await.expect("refused");
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(header(&refused, "access-control-allow-origin"), Some(APP));
    for path in ["/metrics", "/readyz"] {
        let r = reqwest::Client::new()
            .get(format!("{}{path}", s.router.http_url))
            .header("origin", APP)
            .send()
            .await
            .expect("ops");
        assert!(r.status().is_success(), "{path}: {r:?}");
        assert_eq!(header(&r, "access-control-allow-origin"), None, "{path}");
    }
    let foreign = preflight(&url, "https://evil.example").await;
    assert_eq!(header(&foreign, "access-control-allow-origin"), None);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_origins_nothing_changes() {
    let s = Stack::start(Pricing::per_request(PRICE)).await;
    let r = preflight(&s.router.chat_completions_url(), APP).await;
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(header(&r, "access-control-allow-origin"), None);
    s.finish().await;
}
