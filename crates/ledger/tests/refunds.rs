//! Refunds (docs/ledger.md, "Refunds"), on SQLite and Postgres: a completed transfer's recipient
//! (or the admin) gives back at most what it captured, once per key, never more in all however
//! many refunds race, only from money it still has; nobody else may, and bad input changes
//! nothing. Every scenario ends with `verify` (the store suite's `finish`).

use syft_proto::ledger as pb;
use syft_testkit::{code, ok, reason, req, store_suite, Harness, ADMIN_KEY, USD};
use tonic::Code;

const OWNER: &str = "owner@router.example";
const OTHER: &str = "other@router.example";
const ALICE: &str = "alice@example.com";

fn refund(id: &str, amount: i64, key: &str) -> pb::RefundRequest {
    pb::RefundRequest {
        transfer_id: id.into(),
        amount_micros: amount,
        reason: "the answer was wrong".into(),
        idempotency_key: key.into(),
    }
}

/// Alice pays the owner one dollar through a captured transfer; returns the owner's secret,
/// Alice's secret and the transfer's id.
async fn paid(h: &Harness) -> (String, String, String) {
    let (owner, alice, token) = h.payer(OWNER, ALICE, 10 * USD).await;
    let mut router = h.client(&owner);
    let captured = syft_testkit::paid(&mut router, req::hold(ALICE, USD, &token, "k1")).await;
    (owner, alice, captured.id)
}

async fn balances(h: &Harness) -> (i64, i64) {
    (
        h.balance(ALICE).await.balance_micros,
        h.balance(OWNER).await.balance_micros,
    )
}

async fn refunds_give_back_what_was_captured(h: Harness) -> Harness {
    let (owner, alice, id) = paid(&h).await;
    let mut router = h.client(&owner);
    let fresh = ok(router.get_transfer(req::get_transfer(&id)).await);
    assert_eq!(fresh.refunded_micros, 0);
    let first = ok(router.refund(refund(&id, 300_000, "r1")).await);
    assert_eq!(first.refunded_micros, 300_000);
    let read = ok(router.get_transfer(req::get_transfer(&id)).await);
    assert_eq!(read.refunded_micros, 300_000);
    let made = first.refund.clone().expect("the refund");
    assert!(!made.by_admin);
    assert_eq!(balances(&h).await, (9 * USD + 300_000, 700_000));
    assert!(!first.existing);
    // Sent twice: the same refund, said to exist, nothing moved again.
    let again = ok(router.refund(refund(&id, 300_000, "r1")).await);
    assert_eq!(again.refund, first.refund);
    assert!(again.existing);
    assert_eq!(again.refunded_micros, 300_000);
    assert_eq!(balances(&h).await, (9 * USD + 300_000, 700_000));
    // The key names that refund: another amount, or another reason, under it is a conflict.
    let other_reason = pb::RefundRequest {
        reason: "a typo, corrected".into(),
        ..refund(&id, 300_000, "r1")
    };
    for changed in [refund(&id, 200_000, "r1"), other_reason] {
        let conflict = router.refund(changed).await;
        assert_eq!(
            reason(&conflict.expect_err("conflict")).as_deref(),
            Some("IDEMPOTENCY_CONFLICT")
        );
    }
    // The rest, then nothing more.
    let rest = ok(router.refund(refund(&id, 700_000, "r2")).await);
    assert_eq!(rest.refunded_micros, USD);
    let over = router.refund(refund(&id, 1, "r3")).await;
    assert_eq!(code(over), Code::FailedPrecondition);
    assert_eq!(balances(&h).await, (10 * USD, 0));
    // The transfer still says what was charged, and what was given back; both parties see its
    // refunds, and a transfer read or listed says them too (gRPC and the accounting API).
    let transfer = rest.transfer.expect("the transfer");
    assert_eq!(
        (transfer.captured_micros, transfer.refunded_micros),
        (USD, USD)
    );
    let read = ok(router.get_transfer(req::get_transfer(&id)).await);
    assert_eq!((read.captured_micros, read.refunded_micros), (USD, USD));
    let listed = ok(h
        .client(&alice)
        .list_transfers(req::transfers_of(ALICE))
        .await);
    let refunded: Vec<i64> = listed.transfers.iter().map(|t| t.refunded_micros).collect();
    assert_eq!(refunded, [USD]);
    let history: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/transactions", h.http_url()))
        .basic_auth(ALICE, Some(&alice))
        .send()
        .await
        .expect("GET /transactions")
        .json()
        .await
        .expect("JSON");
    let shown = &history["transactions"][0];
    assert_eq!(
        (&shown["amount"], &shown["refundedAmount"]),
        (&1.into(), &1.into()),
        "{history}"
    );
    for secret in [&owner, &alice] {
        let listed = ok(h
            .client(secret)
            .list_refunds(pb::ListRefundsRequest {
                transfer_id: id.clone(),
                ..Default::default()
            })
            .await);
        assert_eq!(listed.refunded_micros, USD);
        let amounts: Vec<i64> = listed.refunds.iter().map(|r| r.amount_micros).collect();
        assert_eq!(amounts, [300_000, 700_000]);
    }
    // Without a transfer: the caller's refunds across its transfers, newest first, a page at a
    // time, naming whom each paid back; another account sees none of them, the admin all.
    let mine = |secret: String, page_token: String| {
        let mut client = h.client(&secret);
        async move {
            ok(client
                .list_refunds(pb::ListRefundsRequest {
                    page_size: 1,
                    page_token,
                    ..Default::default()
                })
                .await)
        }
    };
    let first_page = mine(alice.clone(), String::new()).await;
    assert_eq!(first_page.refunds.len(), 1);
    assert_eq!(first_page.refunds[0].amount_micros, 700_000);
    assert_eq!(first_page.refunds[0].sender_email, ALICE);
    assert!(!first_page.next_page_token.is_empty());
    let second_page = mine(alice.clone(), first_page.next_page_token).await;
    let amounts: Vec<i64> = second_page
        .refunds
        .iter()
        .map(|r| r.amount_micros)
        .collect();
    assert_eq!(amounts, [300_000]);
    let stranger = h.account(OTHER, 0).await;
    assert!(mine(stranger, String::new()).await.refunds.is_empty());
    let everyone = ok(h
        .client(ADMIN_KEY)
        .list_refunds(pb::ListRefundsRequest::default())
        .await);
    assert_eq!(everyone.refunded_micros, USD);
    h
}

async fn only_a_captured_transfer_is_refunded_by_its_recipient_or_the_admin(h: Harness) -> Harness {
    let (owner, alice, id) = paid(&h).await;
    let other = h.account(OTHER, 0).await;
    let mut router = h.client(&owner);
    let before = balances(&h).await;
    // Not another owner, nor for an unknown transfer: as if not there. Not its sender, who
    // sees the transfer: told why.
    for (secret, transfer) in [(&other, id.as_str()), (&owner, "no-such-id")] {
        let refused = h.client(secret).refund(refund(transfer, 1, "x")).await;
        assert_eq!(code(refused), Code::NotFound);
    }
    let refused = h.client(&alice).refund(refund(&id, 1, "x")).await;
    assert_eq!(code(refused), Code::PermissionDenied);
    let listed = h
        .client(&other)
        .list_refunds(pb::ListRefundsRequest {
            transfer_id: id.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(listed), Code::NotFound);
    // Bad input, each refused whole.
    let long = "x".repeat(501);
    let bad = [
        refund(&id, 0, "b1"),
        refund(&id, -5, "b2"),
        refund(&id, 1, ""),
        pb::RefundRequest {
            reason: long,
            ..refund(&id, 1, "b3")
        },
        refund("", 1, "b4"),
    ];
    for request in bad {
        let refused = router.refund(request.clone()).await;
        assert_eq!(code(refused), Code::InvalidArgument, "{request:?}");
    }
    // A pending hold and a voided one have nothing captured to give back.
    let token = h.token(&alice, OWNER).await;
    let pending = ok(router.authorize(req::hold(ALICE, USD, &token, "k2")).await);
    let refused = router.refund(refund(&pending.id, 1, "p1")).await;
    assert_eq!(code(refused), Code::FailedPrecondition);
    ok(router.void(req::void(&pending.id)).await);
    let refused = router.refund(refund(&pending.id, 1, "p2")).await;
    assert_eq!(code(refused), Code::FailedPrecondition);
    assert_eq!(balances(&h).await, before);
    // The admin may, and the refund says so.
    let by_admin = ok(h.client(ADMIN_KEY).refund(refund(&id, USD, "a1")).await);
    assert!(by_admin.refund.expect("the refund").by_admin);
    assert_eq!(balances(&h).await, (10 * USD, 0));
    h
}

/// The owner's dollar is held for a payment of its own: it has nothing free to give back.
async fn a_recipient_without_the_money_cannot_refund(h: Harness) -> Harness {
    let (owner, _alice, id) = paid(&h).await;
    let other = h.account(OTHER, 0).await;
    let owner_token = h.token(&owner, OTHER).await;
    let mut seller = h.client(&other);
    let held = ok(seller
        .authorize(req::hold(OWNER, USD, &owner_token, "o1"))
        .await);
    let mut router = h.client(&owner);
    let refused = router.refund(refund(&id, 1, "r1")).await;
    assert_eq!(
        reason(&refused.expect_err("no money")).as_deref(),
        Some("INSUFFICIENT_FUNDS")
    );
    assert_eq!(balances(&h).await, (9 * USD, USD));
    // Released, the money can go back (the refused key was not spent).
    ok(seller.void(req::void(&held.id)).await);
    ok(router.refund(refund(&id, 1, "r1")).await);
    assert_eq!(balances(&h).await, (9 * USD + 1, USD - 1));
    h
}

/// Ten refunds of 0.3 race over one dollar: three are made. Five more under one key: one refund.
/// The owner has money besides, so only the transfer's bound stops the fourth.
async fn concurrent_refunds_never_give_back_more_than_was_captured(h: Harness) -> Harness {
    let (owner, _alice, id) = paid(&h).await;
    syft_testkit::deposit(&h.url(), OWNER, 5 * USD).await;
    let tries = (0..10).map(|i| {
        let mut router = h.client(&owner);
        let request = refund(&id, 300_000, &format!("c{i}"));
        async move { router.refund(request).await }
    });
    let results = futures::future::join_all(tries).await;
    let made = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(made, 3, "{results:?}");
    for refused in results.into_iter().filter_map(Result::err) {
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    }
    let same = (0..5).map(|_| {
        let mut router = h.client(&owner);
        let request = refund(&id, 100_000, "same");
        async move { router.refund(request).await }
    });
    let ids: std::collections::BTreeSet<String> = futures::future::join_all(same)
        .await
        .into_iter()
        .map(|r| ok(r).refund.expect("the refund").id)
        .collect();
    assert_eq!(ids.len(), 1, "one key, one refund: {ids:?}");
    assert_eq!(balances(&h).await, (10 * USD, 5 * USD));
    h
}

/// `verify` checks each refund against its entries and its transfer: a refund row that says more
/// than its entries moved is named (the books are then put right).
async fn verify_names_a_refund_that_does_not_match_its_entries(h: Harness) -> Harness {
    let (owner, _alice, id) = paid(&h).await;
    let made = ok(h.client(&owner).refund(refund(&id, USD, "r1")).await);
    let change = |sql: &'static str| async {
        sqlx::query(sql)
            .execute(h.store.pool())
            .await
            .expect("change the refund");
    };
    let refund_id = made.refund.expect("the refund").id;
    // Its amount, then the parties it names (the statistics read an owner's refunds by them).
    for (wrong, right) in [
        (
            "UPDATE refunds SET amount = amount + 1",
            "UPDATE refunds SET amount = amount - 1",
        ),
        (
            "UPDATE refunds SET recipient_id = sender_id, sender_id = recipient_id",
            "UPDATE refunds SET recipient_id = sender_id, sender_id = recipient_id",
        ),
    ] {
        change(wrong).await;
        let report = h.store.verify().await.expect("verify");
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("refunds do not match") && p.contains(&refund_id)),
            "{wrong}: {:?}",
            report.problems
        );
        change(right).await;
    }
    h
}

/// A hundred refunds of one micro each, then no more: a transfer's refunds are listed in one
/// answer.
async fn a_transfer_has_at_most_a_hundred_refunds(h: Harness) -> Harness {
    let (owner, _alice, id) = paid(&h).await;
    let mut router = h.client(&owner);
    for i in 0..100 {
        ok(router.refund(refund(&id, 1, &format!("m{i}"))).await);
    }
    let refused = router.refund(refund(&id, 1, "m100")).await;
    assert_eq!(code(refused), Code::FailedPrecondition);
    let listed = ok(router
        .list_refunds(pb::ListRefundsRequest {
            transfer_id: id.clone(),
            ..Default::default()
        })
        .await);
    assert_eq!((listed.refunds.len(), listed.refunded_micros), (100, 100));
    h
}

/// The owner's statistics say what it gave back (`refunded_micros`) for the transfers the query
/// covers, by the same role and filters as the groups (model and status by the request's usage
/// row); the revenue still counts the charge.
async fn statistics_say_what_was_refunded(h: Harness) -> Harness {
    let (owner, alice, token) = h.payer(OWNER, ALICE, 10 * USD).await;
    let mut router = h.client(&owner);
    let held = ok(router.authorize(req::hold(ALICE, USD, &token, "k1")).await);
    let capture = pb::CaptureRequest {
        usage: Some(pb::Usage {
            model: "gpt-x".into(),
            ..req::usage("k1", "chat-app", ALICE, "success")
        }),
        ..req::capture_full(&held.id)
    };
    ok(router.capture(capture).await);
    ok(router.refund(refund(&held.id, 250_000, "r1")).await);
    // A charge without a usage row (in no group) refunded too: the owner's refunds count it,
    // a filter by the request's usage row does not.
    let bare = ok(router.authorize(req::hold(ALICE, USD, &token, "k2")).await);
    ok(router.capture(req::capture_full(&bare.id)).await);
    ok(router.refund(refund(&bare.id, 100_000, "r2")).await);
    let stats = |secret: &str, tweak: fn(&mut pb::GetUsageStatsRequest)| {
        let mut client = h.client(secret);
        let mut q = pb::GetUsageStatsRequest::default();
        tweak(&mut q);
        async move { ok(client.get_usage_stats(q).await) }
    };
    let as_owner = stats(&owner, |_| {}).await;
    assert_eq!(as_owner.refunded_micros, 350_000);
    let revenue: i64 = as_owner.groups.iter().map(|g| g.revenue_micros).sum();
    assert_eq!(revenue, USD, "the revenue counts the routed charge");
    let as_user = stats(&alice, |q| q.role = pb::StatsRole::User.into()).await;
    assert_eq!(as_user.refunded_micros, 350_000);
    assert_eq!(stats(ADMIN_KEY, |_| {}).await.refunded_micros, 350_000);
    let app = stats(&owner, |q| q.app_name = "chat-app".into()).await;
    assert_eq!(app.refunded_micros, 350_000);
    // The filters the groups take: matching, then not.
    let model = stats(&owner, |q| q.model = "gpt-x".into()).await;
    assert_eq!(model.refunded_micros, 250_000);
    for other in [
        stats(&owner, |q| q.model = "gpt-y".into()).await,
        stats(&owner, |q| q.app_name = "other-app".into()).await,
        stats(&owner, |q| q.status = "error".into()).await,
        stats(&owner, |q| q.user_email = "bob@example.com".into()).await,
        stats(&owner, |q| {
            q.since_unix_micros = Some(0);
            q.until_unix_micros = Some(60_000_000);
        })
        .await,
    ] {
        assert_eq!(other.refunded_micros, 0, "{other:?}");
    }
    // As a user, Alice's refunds are hers only: the owner, as a user, paid nothing.
    let owner_as_user = stats(&owner, |q| q.role = pb::StatsRole::User.into()).await;
    assert_eq!(owner_as_user.refunded_micros, 0);
    h
}

store_suite!(
    refunds_give_back_what_was_captured,
    statistics_say_what_was_refunded,
    a_transfer_has_at_most_a_hundred_refunds,
    verify_names_a_refund_that_does_not_match_its_entries,
    only_a_captured_transfer_is_refunded_by_its_recipient_or_the_admin,
    a_recipient_without_the_money_cannot_refund,
    concurrent_refunds_never_give_back_more_than_was_captured,
);
