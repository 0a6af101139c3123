//! Unit tests of the OpenAI-compatible upstream: its own parsing (SSE lines, `Retry-After`,
//! errors), kept apart so that the client stays readable.

use super::*;

#[test]
fn retry_after_is_read_in_every_form_and_bounded() {
    let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let read = |pairs: &[(&str, &str)]| {
        let mut h = reqwest::header::HeaderMap::new();
        for (k, v) in pairs {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes()).expect("name");
            h.insert(name, v.parse().expect("value"));
        }
        retry_after(&h, now)
    };
    assert_eq!(read(&[]), None);
    assert_eq!(read(&[("retry-after", "7")]), Some(Duration::from_secs(7)));
    assert_eq!(
        read(&[("retry-after", " 1.5 ")]),
        Some(Duration::from_millis(1500))
    );
    // OpenAI's milliseconds win over the rounded seconds.
    let both = [("retry-after-ms", "250"), ("retry-after", "1")];
    assert_eq!(read(&both), Some(Duration::from_millis(250)));
    let date = httpdate::fmt_http_date(now + Duration::from_secs(90));
    assert_eq!(
        read(&[("retry-after", &date)]),
        Some(Duration::from_secs(90))
    );
    let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
    assert_eq!(read(&[("retry-after", &past)]), Some(Duration::ZERO));
    assert_eq!(read(&[("retry-after", "86400")]), Some(MAX_RETRY_AFTER));
    for bad in ["-3", "soon", "NaN", "inf"] {
        assert_eq!(read(&[("retry-after", bad)]), None, "{bad}");
    }
}

/// The usage an answer is expected to report.
fn usage(prompt_tokens: u64, completion_tokens: u64) -> Option<UpstreamUsage> {
    Some(UpstreamUsage {
        prompt_tokens,
        completion_tokens,
    })
}

#[test]
fn parses_completion_and_errors() {
    let ok = br#"{"id":"x","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#;
    let c = parse_completion(ok).expect("ok");
    assert_eq!(c.content, "hi");
    assert_eq!(c.usage, usage(5, 1));
    assert!(matches!(
        parse_completion(b"not json"),
        Err(UpstreamError::InvalidResponse(_))
    ));
    // A malformed usage does not throw the answer away: its bad counts are left to the
    // router's own count (0 here), the good ones kept.
    let odd = br#"{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":-1,"completion_tokens":2.5,"total_tokens":"x"}}"#;
    let c = parse_completion(odd).expect("answer kept");
    assert_eq!(c.content, "hi");
    assert_eq!(c.usage, usage(0, 0));
    let chunk =
        parse_chunk(r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":null}}"#)
            .expect("chunk kept");
    assert_eq!(chunk.usage, usage(7, 0));
    assert!(parse_chunk(r#"{"choices":[],"usage":null}"#)
        .expect("chunk")
        .usage
        .is_none());
    assert!(matches!(
        parse_completion(br#"{"choices":[]}"#),
        Err(UpstreamError::Empty)
    ));
    // An error in a 200 answer has the 429 or 5xx its own code says, else it is a 500, not an
    // outage (a 400 is what vLLM calls any failure mid-stream).
    for (body, want) in [
        (
            &br#"{"error":{"code":400,"message":"engine died"}}"#[..],
            500,
        ),
        (br#"{"error":{"code":401,"message":"x"}}"#, 500),
        (br#"{"error":{"code":"429","message":"slow down"}}"#, 429),
        (br#"{"error":{"code":503,"message":"overloaded"}}"#, 503),
        (
            br#"{"error":{"code":"context_length_exceeded","message":"x"}}"#,
            500,
        ),
        (br#"{"error":{"code":200,"message":"odd"}}"#, 500),
        (br#"{"error":{"message":"no code"}}"#, 500),
    ] {
        match parse_completion(body) {
            Err(UpstreamError::Status { status, .. }) => assert_eq!(status, want, "{body:?}"),
            other => panic!("{other:?}"),
        }
    }
    assert!(matches!(
        parse_completion(br#"{"choices":[{"message":{"content":""}}]}"#),
        Err(UpstreamError::Empty)
    ));
}

#[tokio::test]
async fn parses_sse() {
    let parts: Vec<reqwest::Result<Bytes>> = vec![
        Ok(Bytes::from_static(b"data: {\"id\":\"a\",\"choices\":[{\"delta\":{\"content\":\"He\"}}]}\n\nda")),
        Ok(Bytes::from_static(b"ta: {\"choices\":[{\"delta\":{\"content\":\"llo\"},\"finish_reason\":\"stop\"}]}\r\n\r\n")),
        Ok(Bytes::from_static(b": comment\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n")),
    ];
    let s = sse_chunks(futures::stream::iter(parts), Duration::from_secs(1));
    let chunks: Vec<_> = s.collect().await;
    let chunks: Vec<StreamChunk> = chunks.into_iter().map(|c| c.expect("chunk")).collect();
    let text: String = chunks.iter().filter_map(|c| c.delta.clone()).collect();
    assert_eq!(text, "Hello");
    assert_eq!(chunks[1].finish_reason.as_deref(), Some("stop"));
    assert_eq!(chunks[2].usage, usage(3, 2));
}

/// A delta longer than a gRPC client reads in one message is passed on in pieces at character
/// boundaries (3-byte characters, so a piece's end falls inside one): the same text, the id on
/// the first piece, the finish on the last.
#[tokio::test]
async fn a_long_delta_is_split_at_character_boundaries() {
    let text = "€".repeat(MAX_DELTA_BYTES * 2 / 3 + 7);
    let event = serde_json::json!({"id": "a", "choices": [{"delta": {"content": text}, "finish_reason": "stop"}]});
    let body = format!("data: {event}\n\ndata: [DONE]\n\n");
    let parts: Vec<reqwest::Result<Bytes>> = vec![Ok(Bytes::from(body))];
    let s = sse_chunks(futures::stream::iter(parts), Duration::from_secs(1));
    let chunks: Vec<StreamChunk> = s.map(|c| c.expect("chunk")).collect().await;
    assert_eq!(chunks.len(), 3);
    assert!(chunks
        .iter()
        .all(|c| c.delta.as_ref().is_some_and(|d| d.len() <= MAX_DELTA_BYTES)));
    let joined: String = chunks.iter().filter_map(|c| c.delta.clone()).collect();
    assert_eq!(joined, text);
    assert_eq!(chunks[0].id.as_deref(), Some("a"));
    assert_eq!(chunks[1].id, None);
    let finishes: Vec<_> = chunks.iter().map(|c| c.finish_reason.as_deref()).collect();
    assert_eq!(finishes, [None, None, Some("stop")]);
}

/// The same body in pieces of every size from 1 byte up: an event whose separator
/// (`\n\n` or `\r\n\r\n`) is cut by a piece's end is found however it is cut (the search
/// resumes where the last one ended, `SseState::scanned`).
#[tokio::test]
async fn sse_events_are_found_across_any_cut() {
    let body: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"He\"}}]}\r\n\r\ndata: {\"choices\":[{\"delta\":{\"content\":\"llo\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
    for size in 1..body.len() {
        let parts: Vec<reqwest::Result<Bytes>> = body
            .chunks(size)
            .map(|p| Ok(Bytes::copy_from_slice(p)))
            .collect();
        let chunks: Vec<_> = sse_chunks(futures::stream::iter(parts), Duration::from_secs(1))
            .collect()
            .await;
        let text: String = chunks
            .iter()
            .map(|c| c.as_ref().expect("chunk").delta.clone().unwrap_or_default())
            .collect();
        assert_eq!(
            (text.as_str(), chunks.len()),
            ("Hello", 2),
            "pieces of {size}"
        );
    }
}

/// A body that ends without `[DONE]` ends well only after a `finish_reason`: without one the
/// answer was cut short.
#[tokio::test]
async fn a_body_that_ends_before_its_finish_is_an_error() {
    let run = |body: &'static [u8]| async move {
        let parts: Vec<reqwest::Result<Bytes>> = vec![Ok(Bytes::from_static(body))];
        sse_chunks(futures::stream::iter(parts), Duration::from_secs(1))
            .collect::<Vec<_>>()
            .await
    };
    let cut = run(b"data: {\"choices\":[{\"delta\":{\"content\":\"He\"}}]}\n\n").await;
    assert!(
        matches!(
            cut.as_slice(),
            [Ok(_), Err(UpstreamError::InvalidResponse(_))]
        ),
        "{cut:?}"
    );
    let finished =
        run(b"data: {\"choices\":[{\"delta\":{\"content\":\"He\"},\"finish_reason\":\"stop\"}]}")
            .await;
    assert!(matches!(finished.as_slice(), [Ok(_)]), "{finished:?}");
    let done = run(b"data: {\"choices\":[{\"delta\":{\"content\":\"He\"}}]}\n\ndata: [DONE]").await;
    assert!(matches!(done.as_slice(), [Ok(_)]), "{done:?}");
}

#[tokio::test]
async fn sse_garbage_is_invalid() {
    let parts: Vec<reqwest::Result<Bytes>> = vec![Ok(Bytes::from_static(b"data: {garbage\n\n"))];
    let chunks: Vec<_> = sse_chunks(futures::stream::iter(parts), Duration::from_secs(1))
        .collect()
        .await;
    assert!(matches!(
        chunks.as_slice(),
        [Err(UpstreamError::InvalidResponse(_))]
    ));
}
