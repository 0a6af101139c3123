//! Wrong credentials are counted per client address over the whole API (gRPC, REST, dashboard
//! sign-in): past the limit, every authentication from that address is refused until the window
//! ends, a right secret included, so a spray of common passwords across all accounts gets a few
//! tries per address instead of thousands per second (docs/ledger.md, "Failed authentications").
//! Clients connect from distinct loopback addresses (127.0.0.x) to be distinct clients.

use std::net::IpAddr;

use reqwest::StatusCode;
use serde_json::{json, Value};
use syft_error::Reason;
use syft_ledger::client::connect_lazy;
use syft_proto::ledger as pb;
use syft_testkit::{Harness, ADMIN_KEY};

const LIMIT: u32 = 5;
const OWNER: &str = "owner@router.example";

/// A REST client whose connections leave from `from`.
fn rest_from(from: &str) -> reqwest::Client {
    let addr: IpAddr = from.parse().expect("address");
    reqwest::Client::builder()
        .local_address(addr)
        .build()
        .expect("client")
}

/// The answer to an address's `n`-th wrong credential (from 0): 401, and 429 for the one that
/// reaches the limit (it finished after its address got locked, so it tells nothing either).
fn answer_to_failure(n: u32) -> StatusCode {
    if n + 1 < LIMIT {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::TOO_MANY_REQUESTS
    }
}

/// A ledger on SQLite that allows `limit` wrong credentials per address.
async fn harness(limit: u32) -> Harness {
    Harness::with(false, |c| c.auth_failures_per_address = limit)
        .await
        .expect("sqlite harness")
}

/// [`harness`] at [`LIMIT`], its REST base URL, and the secret of a new account `OWNER`.
async fn with_owner() -> (Harness, String, String) {
    let h = harness(LIMIT).await;
    let owner = h.account(OWNER, 0).await;
    let base = h.http_url();
    (h, base, owner)
}

/// `GET /user/my-info` with a Bearer secret (or none): status, body and `Retry-After`.
async fn my_info(
    http: &reqwest::Client,
    base: &str,
    secret: Option<&str>,
) -> (StatusCode, Value, Option<u64>) {
    let mut req = http.get(format!("{base}/user/my-info"));
    if let Some(secret) = secret {
        req = req.bearer_auth(secret);
    }
    let resp = req.send().await.expect("my-info");
    let status = resp.status();
    let retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    (status, resp.json().await.unwrap_or(Value::Null), retry)
}

/// `GetAccount` over gRPC with `secret` (from 127.0.0.1, as tonic connects).
async fn grpc_get(h: &Harness, secret: &str, email: &str) -> Result<pb::Account, tonic::Status> {
    let mut c = connect_lazy(&h.url(), secret).expect("client");
    c.get_account(pb::GetAccountRequest {
        email: email.into(),
    })
    .await
    .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_credentials_lock_their_address_and_only_theirs() {
    let (h, base, owner) = with_owner().await;

    // 127.0.0.1: wrong secrets over gRPC and REST count together.
    for i in 0..LIMIT - 2 {
        let err = grpc_get(&h, &format!("guess-{i}-password"), OWNER)
            .await
            .expect_err("a wrong secret");
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "gRPC try {i}");
    }
    let local = rest_from("127.0.0.1");
    for i in 0..2 {
        let (status, _, _) = my_info(&local, &base, Some(&format!("rest-guess-{i}"))).await;
        assert_eq!(status, answer_to_failure(LIMIT - 2 + i), "REST try {i}");
    }
    // Locked: the right secret, the admin key and any guess are refused alike, over both.
    for secret in [owner.as_str(), ADMIN_KEY, "guess-again"] {
        let (status, body, retry) = my_info(&local, &base, Some(secret)).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
        assert_eq!(body["code"], Reason::AuthLocked.as_str(), "{body}");
        let retry = retry.expect("Retry-After");
        assert!((1..=300).contains(&retry), "{retry}");
        let err = grpc_get(&h, secret, OWNER).await.expect_err("locked");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        assert_eq!(
            syft_error::reason_of(&err).as_deref(),
            Some(Reason::AuthLocked.as_str()),
            "{err:?}"
        );
    }

    let metrics = local
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for outcome in ["failed", "locked"] {
        let line = format!("syft_ledger_auth_refusals_total{{outcome=\"{outcome}\"}}");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }

    // Another address is not locked, and counts its own failures.
    let other = rest_from("127.0.0.2");
    let (status, body, _) = my_info(&other, &base, Some(&owner)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user"]["email"], OWNER, "{body}");
    let (status, _, _) = my_info(&other, &base, Some("not-it-either")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(my_info(&other, &base, Some(&owner)).await.0, StatusCode::OK);

    // Requests without credentials guess nothing and do not count.
    let anonymous = rest_from("127.0.0.3");
    for _ in 0..LIMIT * 2 {
        assert_eq!(
            my_info(&anonymous, &base, None).await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        my_info(&anonymous, &base, Some(&owner)).await.0,
        StatusCode::OK
    );

    // A success does not reset the count (one's own account cannot launder guesses).
    let mixed = rest_from("127.0.0.4");
    for i in 0..LIMIT {
        assert_eq!(my_info(&mixed, &base, Some(&owner)).await.0, StatusCode::OK);
        let (status, _, _) = my_info(&mixed, &base, Some(&format!("spray-{i}"))).await;
        assert_eq!(status, answer_to_failure(i), "try {i}");
    }
    assert_eq!(
        my_info(&mixed, &base, Some(&owner)).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    h.finish().await;
}

/// Setting a chosen password counts as a guess: an attacker could set its own password to a
/// guess and see by a Bearer sign-in whether another account has it (a password two accounts
/// share finds neither), with no wrong credential ever sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn setting_a_chosen_password_counts_as_a_guess() {
    let (h, base, owner) = with_owner().await;
    // Creations from one address, changes (signed in with Basic) from another.
    let (prober, changer) = (rest_from("127.0.0.7"), rest_from("127.0.0.8"));
    for i in 0..LIMIT {
        let (email, guess) = (format!("prober{i}@example.com"), format!("Guess-{i}-2024"));
        let created = prober
            .post(format!("{base}/user/create"))
            .json(&json!({"email": email, "password": guess}));
        assert_eq!(created.send().await.expect("create").status(), 201, "{i}");
        let changed = changer
            .put(format!("{base}/user/update-password"))
            .basic_auth(&email, Some(&guess))
            .json(&json!({"oldPassword": guess, "newPassword": format!("Other-{i}-2025")}));
        assert_eq!(changed.send().await.expect("update").status(), 200, "{i}");
    }
    for client in [&prober, &changer] {
        let (status, body, _) = my_info(client, &base, Some(&owner)).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    }
    h.finish().await;
}

/// A spray through the dashboard's sign-in (one password against many emails: the per-account
/// throttle sees one try each) is counted per address too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sign_in_spray_locks_its_address() {
    let (h, base, owner) = with_owner().await;
    let origin = base.trim_end_matches('/').to_string();
    let login = |http: reqwest::Client, email: String, secret: String| {
        let base = base.clone();
        let origin = origin.clone();
        async move {
            http.post(format!("{base}/dashboard/login"))
                .header("origin", origin)
                .json(&json!({"email": email, "secret": secret}))
                .send()
                .await
                .expect("login")
                .status()
        }
    };
    // The admin key with a space around it is not the admin key (the session would keep a
    // fingerprint of what was sent, and be void at once).
    let padded = login(
        rest_from("127.0.0.9"),
        String::new(),
        format!("{ADMIN_KEY} "),
    )
    .await;
    assert_eq!(padded, StatusCode::UNAUTHORIZED);
    let sprayer = rest_from("127.0.0.5");
    for i in 0..LIMIT {
        let status = login(
            sprayer.clone(),
            format!("user{i}@example.com"),
            "Password123".into(),
        )
        .await;
        assert_eq!(status, answer_to_failure(i), "try {i}");
    }
    for (email, secret) in [(OWNER, owner.as_str()), ("", ADMIN_KEY)] {
        let status = login(sprayer.clone(), email.into(), secret.into()).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{email:?}");
    }
    let status = login(rest_from("127.0.0.6"), OWNER.into(), owner.clone()).await;
    assert_eq!(status, StatusCode::OK);
    h.finish().await;
}

/// `0` turns the limit off: a client may keep getting its secret wrong, and is still let in.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zero_turns_the_limit_off() {
    let h = harness(0).await;
    let owner = h.account(OWNER, 0).await;
    for i in 0..30 {
        let err = grpc_get(&h, &format!("typo-{i}-secret"), OWNER)
            .await
            .expect_err("wrong");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }
    let account = grpc_get(&h, &owner, OWNER).await.expect("let in");
    assert_eq!(account.email, OWNER);
    h.finish().await;
}

/// An authentication that was being checked when its address got locked (a burst of concurrent
/// guesses) is refused even with the right secret: the burst gets no more answers than the
/// limit. Postgres only, where a table lock can hold the right secret's lookup while the address's
/// other guesses are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_right_guess_in_flight_when_its_address_locks_is_refused() {
    let Some(h) = Harness::with(true, |c| c.auth_failures_per_address = LIMIT).await else {
        return;
    };
    let owner = h.account(OWNER, 0).await;
    let mut blocker = h.store.pool().begin().await.expect("begin");
    sqlx::query("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .expect("lock");
    // The right secret, not yet cached: its lookup waits for the lock.
    let right = tokio::spawn({
        let url = h.url();
        let owner = owner.clone();
        async move {
            let mut c = connect_lazy(&url, &owner).expect("client");
            c.get_account(pb::GetAccountRequest {
                email: OWNER.into(),
            })
            .await
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!right.is_finished(), "the lookup waits for the lock");
    // Meanwhile the same address sends the limit of credentials in an unsupported scheme (no
    // lookup needed).
    let local = rest_from("127.0.0.1");
    let base = h.http_url();
    for i in 0..LIMIT {
        let resp = local
            .get(format!("{base}/user/my-info"))
            .header("authorization", format!("Token guess-{i}"))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), answer_to_failure(i), "try {i}");
    }
    blocker.rollback().await.expect("unlock");
    let err = right
        .await
        .expect("join")
        .expect_err("refused although right");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    h.finish().await;
}

/// Open registration is bounded per address: the `accounts_per_address`-th account created from
/// one address is the last (a refused attempt counts too), the next is refused with 429
/// `RATE_LIMITED` and `Retry-After` and creates nothing, while another address still registers
/// and the admin key (a bulk import through the SDK's admin client) is not counted, while a wrong
/// key is refused. Before, one client could create accounts without end.
#[tokio::test]
async fn open_registration_is_bounded_per_address() {
    let h = Harness::with(false, |c| c.accounts_per_address = 3)
        .await
        .expect("sqlite harness");
    let base = h.http_url();
    let (busy, other) = (rest_from("127.0.0.9"), rest_from("127.0.0.10"));
    let create = |client: &reqwest::Client, email: &str| {
        client
            .post(format!("{base}/user/create"))
            .json(&json!({"email": email}))
            .send()
    };
    assert_eq!(
        create(&busy, "a1@example.com").await.expect("1").status(),
        201
    );
    // A refused attempt (an email the ledger does not take) counts.
    assert_eq!(
        create(&busy, "bad@example.local")
            .await
            .expect("2")
            .status(),
        400
    );
    assert_eq!(
        create(&busy, "a3@example.com").await.expect("3").status(),
        201
    );
    let refused = create(&busy, "a4@example.com").await.expect("4");
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = refused.headers()["retry-after"]
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    assert!((1..=300).contains(&wait), "{wait}");
    let body: Value = refused.json().await.expect("json");
    assert_eq!(body["code"], Reason::RateLimited.as_str(), "{body}");
    assert_eq!(
        create(&other, "b1@example.com")
            .await
            .expect("other")
            .status(),
        201
    );
    let as_admin = busy
        .post(format!("{base}/user/create"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"email": "imported@example.com"}))
        .send()
        .await
        .expect("admin");
    assert_eq!(as_admin.status(), 201);
    // A wrong key is no way around the limit, nor a quick test of a key: refused as anywhere.
    let guessed = busy
        .post(format!("{base}/user/create"))
        .bearer_auth("not-the-admin-key")
        .json(&json!({"email": "guess@example.com"}))
        .send()
        .await
        .expect("guess");
    assert_eq!(guessed.status(), StatusCode::UNAUTHORIZED);
    let emails: Vec<String> = h
        .admin()
        .list_accounts(pb::ListAccountsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .accounts
        .into_iter()
        .map(|a| a.email)
        .collect();
    assert!(!emails.iter().any(|e| e == "a4@example.com"), "{emails:?}");
    assert_eq!(emails.len(), 4, "{emails:?}");
    h.finish().await;
}
