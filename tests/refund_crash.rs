//! A refund killed mid-flight (docs/ledger.md, "Refunds"): a `syft-router ledger` process on a
//! real SQLite file, and on Postgres where `DATABASE_URL` names one, is killed with SIGKILL while
//! support's refunds are streaming in, then restarted on the same database, and every refund is
//! sent again under its key. A refund is one transaction, so the crash leaves each one made whole
//! or not at all: made once in the end, an answer the first process gave is the same refund
//! again (`existing`), the money is where the refunds say, and `verify` passes.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use syft_ledger::store::Store;
use syft_proto::ledger as pb;
use syft_testkit::{
    account, create_account, deposit, issue_token, paid, req, Db, LedgerProcess, USD,
};

/// Transfers refunded, each of 0.10 refunded 0.04.
const TRANSFERS: usize = 160;
/// Support agents refunding at once: the more in flight, the likelier the kill falls between a
/// refund's commit and its answer (the case the same key must then answer).
const AGENTS: usize = 16;
const PRICE: i64 = USD / 10;
const REFUND: i64 = 4 * USD / 100;
/// The kill comes once this many refunds were answered.
const KILL_AFTER: usize = 40;

fn ledger_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_syft-router"));
    command
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    command
}

fn refund(transfer_id: &str, i: usize) -> pb::RefundRequest {
    pb::RefundRequest {
        transfer_id: transfer_id.into(),
        amount_micros: REFUND,
        reason: "wrong answer".into(),
        idempotency_key: format!("support-{i}"),
    }
}

async fn refunds_survive_kill_9(postgres: bool) {
    let Some(db) = Db::fresh(postgres).await else {
        return;
    };
    let ledger = LedgerProcess::start(ledger_command(), &db.url).await;
    let owner = create_account(&ledger.url, "owner").await;
    let alice = create_account(&ledger.url, "alice").await;
    deposit(&ledger.url, &alice.email, 20 * USD).await;
    let token = issue_token(&ledger.url, &alice, &owner.email).await;
    let mut router = ledger.client(&owner.secret);
    let mut ids = Vec::new();
    for i in 0..TRANSFERS {
        let hold = req::hold(&alice.email, PRICE, &token, &format!("k{i}"));
        ids.push(paid(&mut router, hold).await.id);
    }

    // Support agents refund in turn; the ledger dies under them.
    let answered: Arc<Mutex<HashMap<usize, String>>> = Arc::default();
    let killed = Arc::new(AtomicBool::new(false));
    let mut agents = Vec::new();
    for agent in 0..AGENTS {
        let (answered, killed, ids) = (answered.clone(), killed.clone(), ids.clone());
        let mut client = ledger.client(&owner.secret);
        agents.push(tokio::spawn(async move {
            for i in (agent..TRANSFERS).step_by(AGENTS) {
                match client.refund(refund(&ids[i], i)).await {
                    Ok(made) => {
                        let made = made.into_inner();
                        let id = made.refund.map(|r| r.id).unwrap_or_default();
                        answered.lock().expect("lock").insert(i, id);
                    }
                    Err(e) => {
                        assert!(killed.load(Ordering::SeqCst), "refund {i} failed: {e}");
                        return;
                    }
                }
            }
        }));
    }
    while answered.lock().expect("lock").len() < KILL_AFTER {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    killed.store(true, Ordering::SeqCst);
    ledger.kill();
    for agent in agents {
        agent.await.expect("agent");
    }
    let before = answered.lock().expect("lock").clone();
    assert!(before.len() < TRANSFERS, "the kill came after every refund");

    // The same refunds again, under their keys, on a ledger restarted on the same database.
    let ledger = LedgerProcess::start(ledger_command(), &db.url).await;
    let mut support = ledger.client(&owner.secret);
    let mut made_before_unanswered = 0;
    for (i, id) in ids.iter().enumerate() {
        let again = support
            .refund(refund(id, i))
            .await
            .expect("a refund sent again after the crash")
            .into_inner();
        let made = again.refund.clone().expect("the refund");
        match before.get(&i) {
            Some(first) => {
                assert!(again.existing, "refund {i} answered before was made again");
                assert_eq!(&made.id, first, "refund {i} answered as another refund");
            }
            None => made_before_unanswered += usize::from(again.existing),
        }
        // Every refund is of REFUND: in all that much is one refund, never a second.
        assert_eq!(again.refunded_micros, REFUND, "transfer {i}: {again:?}");
    }
    println!(
        "{} refunds answered before the kill, {made_before_unanswered} made but not answered",
        before.len()
    );
    let n = TRANSFERS as i64;
    let alice_now = account(&ledger.url, &alice.email).await;
    assert_eq!(alice_now.balance_micros, 20 * USD - n * PRICE + n * REFUND);
    assert_eq!(alice_now.held_micros, 0);
    let owner_now = account(&ledger.url, &owner.email).await;
    assert_eq!(owner_now.balance_micros, n * (PRICE - REFUND));
    drop(ledger);
    db.finish(&Store::connect(&db.url, 2).await.expect("store"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_survive_kill_9_on_sqlite() {
    refunds_survive_kill_9(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_survive_kill_9_on_postgres() {
    refunds_survive_kill_9(true).await;
}
