//! Several ledger processes on one Postgres stay correct: invariants live in the database.

use syft_ledger::client::connect_lazy;
use syft_proto::ledger as pb;
use syft_testkit::{code, Harness, LedgerServer, USD};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_ledgers_on_one_postgres_share_one_truth() {
    let Some(h) = Harness::new(true).await else {
        return;
    };
    let second = LedgerServer::start(h.config.clone()).await;
    let owner = h.account("owner@router.example", 0).await;
    let alice = h.account("alice@example.com", 10 * USD).await;
    let token = h.token(&alice, "owner@router.example").await;
    let replicas = [h.client(&owner), connect_lazy(&second.url, &owner).unwrap()];

    // 100 concurrent holds of 1 USD through both replicas against 10 USD: exactly 10 succeed, and
    // every key is used twice (once per replica) without a second hold.
    let mut tasks = Vec::new();
    for i in 0..100 {
        for replica in &replicas {
            let mut client = replica.clone();
            let req = pb::AuthorizeRequest {
                sender_email: "alice@example.com".into(),
                amount_micros: USD,
                token: token.clone(),
                app_name: "chat".into(),
                app_ep_path: "/chat".into(),
                idempotency_key: format!("k{i}"),
                hold_ttl_seconds: None,
                budget_per_day_micros: None,
                budget_per_month_micros: None,
                attempt_id: String::new(),
            };
            tasks.push(tokio::spawn(async move {
                client.authorize(req).await.map(|r| r.into_inner())
            }));
        }
    }
    let mut held = std::collections::HashMap::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(t) => {
                let previous = held.insert(t.idempotency_key.clone(), t.id.clone());
                assert!(
                    previous.is_none_or(|id| id == t.id),
                    "one key, two transfers"
                );
            }
            Err(s) => assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}"),
        }
    }
    assert_eq!(held.len(), 10);
    assert_eq!(h.balance("alice@example.com").await.held_micros, 10 * USD);

    // Captures race across replicas; each transfer resolves once.
    let mut tasks = Vec::new();
    for id in held.values() {
        for replica in &replicas {
            let mut client = replica.clone();
            let id = id.clone();
            tasks.push(tokio::spawn(async move {
                client
                    .capture(pb::CaptureRequest {
                        answer: None,
                        transfer_id: id,
                        amount: Some(pb::capture_request::Amount::AmountMicros(USD / 2)),
                        usage: None,
                    })
                    .await
            }));
        }
    }
    for task in tasks {
        assert_eq!(
            task.await.unwrap().unwrap().into_inner().captured_micros,
            USD / 2
        );
    }
    let a = h.balance("alice@example.com").await;
    assert_eq!((a.balance_micros, a.held_micros), (5 * USD, 0));
    assert_eq!(
        h.balance("owner@router.example").await.balance_micros,
        5 * USD
    );
    let mut again = replicas[1].clone();
    let late = again.void(pb::VoidRequest {
        transfer_id: held.values().next().unwrap().clone(),
        ..Default::default()
    });
    assert_eq!(code(late.await), Code::FailedPrecondition);
    second.stop().await;
    h.finish().await;
}

/// A capture credits its recipient in its own batch, so a batch locks its recipients' rows as well
/// as its senders'. Three accounts pay each other in a ring (a → b → c → a) through two ledgers
/// with three batch workers each, so resolution batches on six connections lock overlapping
/// accounts at once, each account both as a sender and as a recipient. Every capture lands once,
/// each account ends where the ring says, and the ledger verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ring_of_payers_captured_through_concurrent_batches_moves_exact_money() {
    let Some(h) = Harness::new(true).await else {
        return;
    };
    let mut config = h.config.clone();
    config.batch_workers = 3;
    let (one, two) = (
        LedgerServer::start(config.clone()).await,
        LedgerServer::start(config).await,
    );
    let names = ["a@ring.example", "b@ring.example", "c@ring.example"];
    let mut secrets = Vec::new();
    for name in names {
        secrets.push(h.account(name, 100 * USD).await);
    }
    // Payee i charges payer (i + 2) % 3: b charges a, c charges b, a charges c.
    let mut jobs = Vec::new();
    for (payee, secret) in secrets.iter().enumerate() {
        let payer = (payee + 2) % 3;
        let token = h.token(&secrets[payer], names[payee]).await;
        for server in [&one, &two] {
            jobs.push((
                connect_lazy(&server.url, secret).unwrap(),
                names[payer],
                token.clone(),
            ));
        }
    }
    const PER_JOB: usize = 15;
    let mut tasks = Vec::new();
    for (n, (client, payer, token)) in jobs.into_iter().enumerate() {
        for i in 0..PER_JOB {
            let mut client = client.clone();
            let req = pb::AuthorizeRequest {
                sender_email: payer.into(),
                amount_micros: USD,
                token: token.clone(),
                app_name: "ring".into(),
                app_ep_path: "/pay".into(),
                idempotency_key: format!("{n}-{i}"),
                ..Default::default()
            };
            tasks.push(tokio::spawn(async move {
                let hold = client.authorize(req).await?.into_inner();
                let capture = pb::CaptureRequest {
                    transfer_id: hold.id,
                    amount: Some(pb::capture_request::Amount::AmountMicros(USD / 4 * 3)),
                    ..Default::default()
                };
                client.capture(capture).await.map(|r| r.into_inner())
            }));
        }
    }
    for task in tasks {
        let captured = task.await.unwrap().expect("authorize and capture");
        assert_eq!(captured.captured_micros, USD / 4 * 3);
    }
    // Each account paid 2 × 15 captures and received as many: back where it started.
    for name in names {
        let account = h.balance(name).await;
        assert_eq!(
            (account.balance_micros, account.held_micros),
            (100 * USD, 0)
        );
    }
    let report = h.store.verify().await.unwrap();
    assert!(report.is_ok(), "{:#?}", report.problems);
    assert_eq!(report.transfers, 3 * 2 * PER_JOB as i64);
    one.stop().await;
    two.stop().await;
    h.finish().await;
}
