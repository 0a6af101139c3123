//! `RecordUsageBatch` (issue 16): a router's free rows in one call are written as `RecordUsage`
//! writes each (request ids idempotent, refusals a row per attempt), an invalid row or too many
//! rows refuse the whole call and write nothing, on SQLite and Postgres; a refusal sent again with
//! its row key is recorded once; `verify` (rollups included) holds after every scenario.

use syft_proto::ledger as pb;
use syft_testkit::{code, req, store_suite, Harness};
use tonic::Code;

const OWNER: &str = "owner@router.example";

fn usage(n: usize, status: &str) -> pb::Usage {
    let user = format!("user{}@example.com", n % 3);
    pb::Usage {
        model: "m".into(),
        prompt_tokens: 5,
        completion_tokens: n as i64,
        latency_ms: 2 + n as i64,
        upstream_latency_ms: 1,
        ..req::usage(&format!("free-{n}"), "free-app", &user, status)
    }
}

async fn batch_writes_each_row_once(h: Harness) -> Harness {
    let owner = h.account(OWNER, 0).await;
    let mut c = h.client(&owner);
    // Ten answered requests and five refusals.
    let usages: Vec<pb::Usage> = (0..15)
        .map(|n| {
            usage(
                n,
                if n < 10 {
                    "success"
                } else {
                    "payment_required"
                },
            )
        })
        .collect();
    let req = pb::RecordUsageBatchRequest {
        usages: usages.clone(),
    };
    let first = c
        .record_usage_batch(req.clone())
        .await
        .expect("batch")
        .into_inner()
        .records;
    assert_eq!(first.len(), 15);
    for (r, u) in first.iter().zip(&usages) {
        assert_eq!(r.usage.as_ref().map(|x| &x.request_id), Some(&u.request_id));
    }
    assert_eq!(h.usage_rows().await.len(), 15);
    // The same call again: the answered requests keep their rows (same ids), refusals add rows.
    let again = c
        .record_usage_batch(req)
        .await
        .expect("batch again")
        .into_inner()
        .records;
    assert_eq!(
        first[..10].iter().map(|r| &r.id).collect::<Vec<_>>(),
        again[..10].iter().map(|r| &r.id).collect::<Vec<_>>()
    );
    assert_eq!(h.usage_rows().await.len(), 20);
    h
}

async fn bad_batches_write_nothing(h: Harness) -> Harness {
    let owner = h.account(OWNER, 0).await;
    let mut c = h.client(&owner);
    let mut usages: Vec<pb::Usage> = (0..5).map(|n| usage(n, "success")).collect();
    usages[3].request_id.clear();
    let bad = c
        .record_usage_batch(pb::RecordUsageBatchRequest { usages })
        .await;
    assert_eq!(code(bad), Code::InvalidArgument);
    let too_many = pb::RecordUsageBatchRequest {
        usages: (0..1_001).map(|n| usage(n, "success")).collect(),
    };
    assert_eq!(
        code(c.record_usage_batch(too_many).await),
        Code::InvalidArgument
    );
    // A list longer than any the ledger takes is refused before it is decoded, credential or not
    // (an empty row is 2 bytes on the wire and about 240 decoded: 4 MiB of them cost the ledger
    // almost 500 MiB before it looked at the caller).
    let flood = pb::RecordUsageBatchRequest {
        usages: vec![pb::Usage::default(); syft_proto::codec::LEDGER_MAX_FIELDS + 1],
    };
    for mut caller in [h.client("not-a-secret"), c.clone()] {
        let err = caller
            .record_usage_batch(flood.clone())
            .await
            .expect_err("flood");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("before decoding"), "{err:?}");
    }
    // The admin is no recipient of usage rows.
    let admin = h
        .admin()
        .record_usage_batch(pb::RecordUsageBatchRequest {
            usages: vec![usage(1, "success")],
        })
        .await;
    assert!(admin.is_err(), "{admin:?}");
    assert!(h.usage_rows().await.is_empty());
    h
}

/// A refusal row does not take its request id, so a call that failed over after its commit used
/// to record it twice. Sent again with its row key (alone, in a batch, twice in one batch) it is
/// recorded once and the same row is answered; another key, or no key, is another row; the key is
/// the recipient's own (another router's row under the same key is its own row); a key too long
/// is refused and writes nothing.
async fn refusals_sent_again_with_their_key_are_recorded_once(h: Harness) -> Harness {
    let owner = h.account(OWNER, 0).await;
    let other = h.account("other@router.example", 0).await;
    let mut c = h.client(&owner);
    let keyed = |key: &str| pb::Usage {
        row_key: key.into(),
        ..usage(1, "payment_required")
    };
    let record = |c: &mut pb::ledger_client::LedgerClient<_>, u: pb::Usage| {
        let mut c = c.clone();
        async move {
            let req = pb::RecordUsageRequest { usage: Some(u) };
            c.record_usage(req).await.expect("record").into_inner()
        }
    };
    let first = record(&mut c, keyed("refusal-a")).await;
    let again = record(&mut c, keyed("refusal-a")).await;
    assert_eq!(first.id, again.id, "the same row is answered");
    let batch = pb::RecordUsageBatchRequest {
        usages: vec![keyed("refusal-a"), keyed("refusal-b"), keyed("refusal-b")],
    };
    let batched = c
        .record_usage_batch(batch)
        .await
        .expect("batch")
        .into_inner()
        .records;
    assert_eq!(batched[0].id, first.id);
    assert_eq!(
        batched[1].id, batched[2].id,
        "one row for a key twice in a batch"
    );
    assert_eq!(h.usage_rows().await.len(), 2, "refusal-a and refusal-b");
    record(&mut c, keyed("")).await;
    record(&mut c, keyed("")).await;
    assert_eq!(
        h.usage_rows().await.len(),
        4,
        "keyless refusals: a row each"
    );
    let theirs = record(&mut h.client(&other), keyed("refusal-a")).await;
    assert_ne!(theirs.id, first.id);
    assert_eq!(theirs.recipient_email, "other@router.example");
    assert_eq!(
        h.usage_rows().await.len(),
        5,
        "another recipient's key is its own"
    );
    let long = c
        .record_usage(pb::RecordUsageRequest {
            usage: Some(keyed(&"k".repeat(201))),
        })
        .await;
    assert_eq!(code(long), Code::InvalidArgument);
    assert_eq!(h.usage_rows().await.len(), 5);
    h
}

/// A free row is dated when its recorder says it answered, if that was at most 30 days ago (a
/// router's spool ships rows written during a ledger outage later); a time in the future or
/// older is replaced by the ledger's clock. The rollups follow the row's date (verify).
async fn free_rows_keep_their_answer_time(h: Harness) -> Harness {
    let owner = h.account(OWNER, 0).await;
    let mut c = h.client(&owner);
    let now = syft_ledger::store::now_micros();
    let day = 86_400_000_000i64;
    let cases = [
        ("yesterday", Some(now - day), Some(now - day)),
        ("last-month", Some(now - 40 * day), None),
        ("tomorrow", Some(now + day), None),
        ("unsaid", None, None),
    ];
    let usages: Vec<pb::Usage> = (cases.iter().enumerate())
        .map(|(n, (id, at, _))| pb::Usage {
            request_id: (*id).into(),
            answered_at_unix_micros: *at,
            ..usage(n, "success")
        })
        .collect();
    let rows = c
        .record_usage_batch(pb::RecordUsageBatchRequest { usages })
        .await
        .expect("batch")
        .into_inner()
        .records;
    let after = syft_ledger::store::now_micros();
    for ((id, _, kept), row) in cases.iter().zip(&rows) {
        match kept {
            Some(at) => assert_eq!(row.created_at_unix_micros, *at, "{id}"),
            None => assert!(
                (now..=after).contains(&row.created_at_unix_micros),
                "{id}: dated by the ledger"
            ),
        }
    }
    // One row alone, over `RecordUsage`, the same.
    let one = c
        .record_usage(pb::RecordUsageRequest {
            usage: Some(pb::Usage {
                request_id: "an-hour-ago".into(),
                answered_at_unix_micros: Some(now - day / 24),
                ..usage(9, "success")
            }),
        })
        .await
        .expect("one")
        .into_inner();
    assert_eq!(one.created_at_unix_micros, now - day / 24);
    h
}

store_suite!(
    batch_writes_each_row_once,
    bad_batches_write_nothing,
    refusals_sent_again_with_their_key_are_recorded_once,
    free_rows_keep_their_answer_time
);
