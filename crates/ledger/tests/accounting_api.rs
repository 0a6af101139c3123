//! The Syft accounting REST API served by the ledger (`--accounting-api`), over SQLite and Postgres:
//! the same store and rules as gRPC, JSON everywhere (errors included), exact amounts.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use syft_proto::ledger as pb;
use syft_testkit::{store_suite, Harness, ADMIN_KEY};

const OWNER: &str = "owner@router.example";
const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";

#[derive(Clone)]
enum Auth<'a> {
    None,
    Admin,
    Basic(&'a str, &'a str),
}

struct Rest {
    http: reqwest::Client,
    base: String,
}

impl Rest {
    fn new(h: &Harness) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: h.http_url(),
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        auth: Auth<'_>,
        body: Option<String>,
        key: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        req = match auth {
            Auth::None => req,
            Auth::Admin => req.bearer_auth(ADMIN_KEY),
            Auth::Basic(email, password) => req.basic_auth(email, Some(password)),
        };
        if let Some(body) = body {
            req = req.header("content-type", "application/json").body(body);
        }
        if let Some(key) = key {
            req = req.header("Idempotency-Key", key);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        let value: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{path} answered {status} with non-JSON {text:?}: {e}"));
        if !status.is_success() {
            assert!(
                value["detail"].as_str().is_some_and(|d| !d.is_empty()),
                "error body without detail: {value}"
            );
        }
        (status, value)
    }

    async fn post(&self, path: &str, auth: Auth<'_>, body: Value) -> (StatusCode, Value) {
        self.send(
            reqwest::Method::POST,
            path,
            auth,
            Some(body.to_string()),
            None,
        )
        .await
    }

    async fn post_raw(&self, path: &str, auth: Auth<'_>, body: &str) -> (StatusCode, Value) {
        self.send(reqwest::Method::POST, path, auth, Some(body.into()), None)
            .await
    }

    async fn put(&self, path: &str, auth: Auth<'_>, body: Value) -> (StatusCode, Value) {
        self.send(
            reqwest::Method::PUT,
            path,
            auth,
            Some(body.to_string()),
            None,
        )
        .await
    }

    async fn get(&self, path: &str, auth: Auth<'_>) -> (StatusCode, Value) {
        self.send(reqwest::Method::GET, path, auth, None, None)
            .await
    }

    /// Creates a user (open registration) and funds it; returns its password.
    async fn user(&self, email: &str, password: &str, units: &str) -> String {
        let (s, v) = self
            .post(
                "/user/create",
                Auth::None,
                json!({"email": email, "password": password, "organization": "acme"}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        if units != "0" {
            let body = format!(r#"{{"recipientEmail":"{email}","amount":{units}}}"#);
            let (s, v) = self.post_raw("/user/add-balance", Auth::Admin, &body).await;
            assert_eq!(s, StatusCode::OK, "{v}");
        }
        password.to_string()
    }

    async fn balance(&self, email: &str) -> String {
        let (s, v) = self.get(&format!("/user/{email}"), Auth::Admin).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["user"]["balance"].to_string()
    }

    async fn token(&self, sender: &str, password: &str, recipient: &str) -> String {
        let (s, v) = self
            .post(
                "/token/create",
                Auth::Basic(sender, password),
                json!({"recipientEmail": recipient}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["token"].as_str().expect("token").to_string()
    }

    async fn delegated(
        &self,
        owner_pw: &str,
        sender: &str,
        amount: &str,
        token: &str,
    ) -> (StatusCode, Value) {
        let body = format!(
            r#"{{"senderEmail":"{sender}","recipientEmail":"{OWNER}","amount":{amount},"token":"{token}","appName":"chat","appEpPath":"/chat"}}"#
        );
        self.post_raw("/transaction/create", Auth::Basic(OWNER, owner_pw), &body)
            .await
    }

    async fn resolve(&self, action: &str, auth: Auth<'_>, id: &str) -> (StatusCode, Value) {
        self.post(
            &format!("/transaction/{action}"),
            auth,
            json!({"transactionId": id}),
        )
        .await
    }
}

/// How many of several concurrent creates succeeded; every other one must be refused for funds.
async fn count_created(tasks: Vec<tokio::task::JoinHandle<StatusCode>>) -> usize {
    let mut created = 0;
    for t in tasks {
        match t.await.expect("join") {
            StatusCode::CREATED => created += 1,
            StatusCode::CONFLICT => {}
            other => panic!("unexpected {other}"),
        }
    }
    created
}

async fn users_and_passwords(h: Harness) -> Harness {
    let api = Rest::new(&h);
    // Generated password when none is given (the SDK sends null).
    let (s, v) = api
        .post(
            "/user/create",
            Auth::None,
            json!({"email": ALICE, "password": null, "organization": "acme"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let generated = v["password"].as_str().expect("password").to_string();
    assert_eq!(v["user"]["email"], ALICE);
    assert_eq!(v["user"]["balance"], json!(0));
    assert!(v["user"]["id"].is_string());
    let (s, _) = api
        .post(
            "/user/create",
            Auth::None,
            json!({"email": ALICE, "organization": "other"}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = api
        .post("/user/create", Auth::None, json!({"email": "not-an-email"}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = api
        .post(
            "/user/create",
            Auth::None,
            json!({"email": BOB, "password": "short"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // Exact amounts: 12.5 in, 12.5 out; a user may not add balance.
    let (s, v) = api
        .post_raw(
            "/user/add-balance",
            Auth::Admin,
            &format!(r#"{{"recipientEmail":"{ALICE}","amount":12.5}}"#),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["user"]["balance"].to_string(), "12.5");
    let (s, _) = api
        .post(
            "/user/add-balance",
            Auth::Basic(ALICE, &generated),
            json!({"recipientEmail": ALICE, "amount": 1}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = api
        .post(
            "/user/add-balance",
            Auth::None,
            json!({"recipientEmail": ALICE, "amount": 1}),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    let (s, v) = api
        .get("/user/my-info", Auth::Basic(ALICE, &generated))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["user"]["organization"], "acme");
    let (s, _) = api
        .get("/user/my-info", Auth::Basic(ALICE, "wrong-password"))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = api.get("/users", Auth::Basic(ALICE, &generated)).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, v) = api.get("/users", Auth::Admin).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["users"].as_array().map(Vec::len), Some(1));
    let (s, _) = api.get("/user/nobody@example.com", Auth::Admin).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let (s, v) = api
        .put(
            "/user/update-organization",
            Auth::Basic(ALICE, &generated),
            json!({"organization": "new-org"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["user"]["organization"], "new-org");
    let (s, _) = api
        .put(
            "/user/update-password",
            Auth::Basic(ALICE, &generated),
            json!({"oldPassword": "not-the-password", "newPassword": "new-password-1"}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, v) = api
        .put(
            "/user/update-password",
            Auth::Basic(ALICE, &generated),
            json!({"oldPassword": generated, "newPassword": "new-password-1"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _) = api
        .get("/user/my-info", Auth::Basic(ALICE, &generated))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = api
        .get("/user/my-info", Auth::Basic(ALICE, "new-password-1"))
        .await;
    assert_eq!(s, StatusCode::OK);
    // The gRPC API accepts the new password too.
    let account = h
        .client("new-password-1")
        .get_account(pb::GetAccountRequest {
            email: ALICE.into(),
        })
        .await
        .expect("grpc with new password")
        .into_inner();
    assert_eq!(account.balance_micros, 12_500_000);
    let (s, _) = api.get("/no/such/endpoint", Auth::None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    h
}

async fn delegated_confirm_and_cancel(h: Harness) -> Harness {
    let api = Rest::new(&h);
    let alice_pw = api.user(ALICE, "alice-password", "10").await;
    let owner_pw = api.user(OWNER, "owner-password", "0").await;
    let token = api.token(ALICE, &alice_pw, OWNER).await;

    let (s, v) = api.delegated(&owner_pw, ALICE, "0.25", &token).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let tx = &v["transaction"];
    assert_eq!(tx["status"], "PENDING");
    assert_eq!(tx["createdBy"], "RECIPIENT");
    assert_eq!(tx["amount"].to_string(), "0.25");
    assert_eq!(tx["appName"], "chat");
    assert!(tx["createdAt"].as_str().is_some_and(|t| t.ends_with('Z')));
    let id = tx["id"].as_str().expect("id").to_string();
    assert_eq!(api.balance(ALICE).await, "9.75");

    // Only the recipient that created it may confirm; the sender may not cancel a service's hold.
    let (s, _) = api
        .resolve("confirm", Auth::Basic(ALICE, &alice_pw), &id)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = api
        .resolve("cancel", Auth::Basic(ALICE, &alice_pw), &id)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, v) = api
        .resolve("confirm", Auth::Basic(OWNER, &owner_pw), &id)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["transaction"]["status"], "COMPLETED");
    assert_eq!(v["transaction"]["resolvedBy"], "RECIPIENT");
    // Confirming again is idempotent; cancelling a completed transaction is a conflict.
    let (s, _) = api
        .resolve("confirm", Auth::Basic(OWNER, &owner_pw), &id)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = api
        .resolve("cancel", Auth::Basic(OWNER, &owner_pw), &id)
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(api.balance(ALICE).await, "9.75");
    assert_eq!(api.balance(OWNER).await, "0.25");

    let (s, v) = api.delegated(&owner_pw, ALICE, "1", &token).await;
    assert_eq!(s, StatusCode::CREATED);
    let cancel_id = v["transaction"]["id"].as_str().expect("id").to_string();
    let (s, v) = api
        .resolve("cancel", Auth::Basic(OWNER, &owner_pw), &cancel_id)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["transaction"]["status"], "CANCELLED");
    let (s, _) = api
        .resolve("confirm", Auth::Basic(OWNER, &owner_pw), &cancel_id)
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(api.balance(ALICE).await, "9.75");

    // A stranger sees neither transaction.
    api.user(BOB, "bob-password", "0").await;
    let (s, _) = api
        .resolve("cancel", Auth::Basic(BOB, "bob-password"), &id)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = api
        .get("/transactions", Auth::Basic(BOB, "bob-password"))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["transactions"].as_array().map(Vec::len), Some(0));

    // History, newest first, and the same transfers over gRPC.
    let (s, v) = api
        .get("/transactions", Auth::Basic(ALICE, &alice_pw))
        .await;
    assert_eq!(s, StatusCode::OK);
    let history: Vec<&str> = v["transactions"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|t| t["id"].as_str())
        .collect();
    assert_eq!(history, vec![cancel_id.as_str(), id.as_str()]);
    let grpc = h
        .client(&alice_pw)
        .get_transfer(pb::GetTransferRequest {
            transfer_id: id.clone(),
        })
        .await
        .expect("grpc sees the REST transfer")
        .into_inner();
    assert_eq!(grpc.captured_micros, 250_000);

    // A hold placed over gRPC with the REST-issued token is confirmed over REST.
    let hold = h
        .client(&owner_pw)
        .authorize(pb::AuthorizeRequest {
            sender_email: ALICE.into(),
            amount_micros: 500_000,
            token: token.clone(),
            app_name: "chat".into(),
            app_ep_path: "/chat".into(),
            idempotency_key: "grpc-hold".into(),
            hold_ttl_seconds: None,
            budget_per_day_micros: None,
            budget_per_month_micros: None,
        })
        .await
        .expect("grpc authorize with a REST token")
        .into_inner();
    let (s, v) = api
        .resolve("confirm", Auth::Basic(OWNER, &owner_pw), &hold.id)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(api.balance(ALICE).await, "9.25");
    assert_eq!(api.balance(OWNER).await, "0.75");
    h
}

async fn direct_transfers(h: Harness) -> Harness {
    let api = Rest::new(&h);
    let alice_pw = api.user(ALICE, "alice-password", "5").await;
    let owner_pw = api.user(OWNER, "owner-password", "0").await;
    let direct = |amount: &str| {
        format!(
            r#"{{"senderEmail":"{ALICE}","recipientEmail":"{OWNER}","amount":{amount},"appName":null,"appEpPath":null}}"#
        )
    };
    // Without a token only the sender may create it.
    let (s, _) = api
        .post_raw(
            "/transaction/create",
            Auth::Basic(OWNER, &owner_pw),
            &direct("1"),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, v) = api
        .post_raw(
            "/transaction/create",
            Auth::Basic(ALICE, &alice_pw),
            &direct("1.5"),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["transaction"]["createdBy"], "SENDER");
    assert_eq!(v["transaction"]["appName"], Value::Null);
    let id = v["transaction"]["id"].as_str().expect("id").to_string();
    let (s, _) = api
        .resolve("confirm", Auth::Basic(OWNER, &owner_pw), &id)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, v) = api
        .resolve("confirm", Auth::Basic(ALICE, &alice_pw), &id)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["transaction"]["resolvedBy"], "SENDER");
    assert_eq!(api.balance(ALICE).await, "3.5");
    assert_eq!(api.balance(OWNER).await, "1.5");

    // Either party may cancel a direct transfer.
    for (who, pw, by) in [
        (ALICE, &alice_pw, "SENDER"),
        (OWNER, &owner_pw, "RECIPIENT"),
    ] {
        let (s, v) = api
            .post_raw(
                "/transaction/create",
                Auth::Basic(ALICE, &alice_pw),
                &direct("1"),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED);
        let id = v["transaction"]["id"].as_str().expect("id").to_string();
        let (s, v) = api.resolve("cancel", Auth::Basic(who, pw), &id).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["transaction"]["resolvedBy"], by);
    }
    let (s, _) = api
        .post_raw(
            "/transaction/create",
            Auth::Basic(ALICE, &alice_pw),
            &direct("3.6"),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "more than the balance");
    assert_eq!(api.balance(ALICE).await, "3.5");
    h
}

async fn bad_input_changes_nothing(h: Harness) -> Harness {
    let api = Rest::new(&h);
    let alice_pw = api.user(ALICE, "alice-password", "2").await;
    let owner_pw = api.user(OWNER, "owner-password", "0").await;
    api.user(BOB, "bob-password", "0").await;
    let token = api.token(ALICE, &alice_pw, OWNER).await;
    let bob_token = api.token(ALICE, &alice_pw, BOB).await;
    for amount in [
        "-1",
        "0",
        "0.0000001",
        "1e400",
        "1000000000000",
        "\"abc\"",
        "null",
        "true",
    ] {
        let (s, v) = api.delegated(&owner_pw, ALICE, amount, &token).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "amount {amount}: {v}");
    }
    // NaN is not JSON: a JSON 400, not a plain-text rejection.
    let (s, _) = api.delegated(&owner_pw, ALICE, "NaN", &token).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = api
        .post_raw("/transaction/create", Auth::Basic(OWNER, &owner_pw), "{")
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = api.delegated(&owner_pw, ALICE, "2.000001", &token).await;
    assert_eq!(s, StatusCode::CONFLICT, "insufficient funds");
    let (s, _) = api.delegated(&owner_pw, ALICE, "1", "not-a-token").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = api.delegated(&owner_pw, ALICE, "1", &bob_token).await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "token issued to another recipient"
    );
    let (s, _) = api.delegated(&owner_pw, BOB, "1", &token).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "token of another sender");
    let (s, _) = api
        .resolve("confirm", Auth::Basic(OWNER, &owner_pw), "no-such-id")
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = api
        .post_raw(
            "/user/add-balance",
            Auth::Admin,
            &format!(r#"{{"recipientEmail":"{ALICE}","amount":-5}}"#),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(api.balance(ALICE).await, "2");
    let (_, v) = api
        .get("/transactions", Auth::Basic(ALICE, &alice_pw))
        .await;
    assert_eq!(v["transactions"].as_array().map(Vec::len), Some(0));
    h
}

async fn concurrent_spend_and_idempotency(h: Harness) -> Harness {
    let api = std::sync::Arc::new(Rest::new(&h));
    let alice_pw = api.user(ALICE, "alice-password", "1").await;
    let owner_pw = api.user(OWNER, "owner-password", "0").await;
    let token = api.token(ALICE, &alice_pw, OWNER).await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (api, owner_pw, token) = (api.clone(), owner_pw.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            api.delegated(&owner_pw, ALICE, "0.3", &token).await.0
        }));
    }
    let created = count_created(tasks).await;
    assert_eq!(created, 3);
    assert_eq!(api.balance(ALICE).await, "0.1");

    // The Idempotency-Key header makes a create safe to retry.
    let body = format!(
        r#"{{"senderEmail":"{ALICE}","recipientEmail":"{OWNER}","amount":0.05,"token":"{token}"}}"#
    );
    let send = |body: String| {
        let api = api.clone();
        let owner_pw = owner_pw.clone();
        async move {
            api.send(
                reqwest::Method::POST,
                "/transaction/create",
                Auth::Basic(OWNER, &owner_pw),
                Some(body),
                Some("retry-key-1"),
            )
            .await
        }
    };
    let (s1, v1) = send(body.clone()).await;
    let (s2, v2) = send(body).await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::CREATED));
    assert_eq!(v1["transaction"]["id"], v2["transaction"]["id"]);
    let other = format!(
        r#"{{"senderEmail":"{ALICE}","recipientEmail":"{OWNER}","amount":0.06,"token":"{token}"}}"#
    );
    let (s, _) = send(other).await;
    assert_eq!(s, StatusCode::CONFLICT, "same key, other amount");
    assert_eq!(api.balance(ALICE).await, "0.05");
    h
}

async fn direct_idempotency_and_concurrent_spend(h: Harness) -> Harness {
    let api = std::sync::Arc::new(Rest::new(&h));
    let alice_pw = api.user(ALICE, "alice-password", "1").await;
    api.user(OWNER, "owner-password", "0").await;
    let direct = |amount: &str| {
        format!(r#"{{"senderEmail":"{ALICE}","recipientEmail":"{OWNER}","amount":{amount}}}"#)
    };
    // A retried create with the same key is the same transfer; another amount is a conflict.
    let send = |body: String, key: &'static str| {
        let (api, alice_pw) = (api.clone(), alice_pw.clone());
        async move {
            api.send(
                reqwest::Method::POST,
                "/transaction/create",
                Auth::Basic(ALICE, &alice_pw),
                Some(body),
                Some(key),
            )
            .await
        }
    };
    let (s1, v1) = send(direct("0.2"), "direct-key").await;
    let (s2, v2) = send(direct("0.2"), "direct-key").await;
    assert_eq!(
        (s1, s2),
        (StatusCode::CREATED, StatusCode::CREATED),
        "{v1} {v2}"
    );
    assert_eq!(v1["transaction"]["id"], v2["transaction"]["id"]);
    let (s, _) = send(direct("0.3"), "direct-key").await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(api.balance(ALICE).await, "0.8");

    // Ten concurrent direct transfers of 0.3 against 0.8 available: exactly two fit.
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (api, alice_pw, body) = (api.clone(), alice_pw.clone(), direct("0.3"));
        tasks.push(tokio::spawn(async move {
            api.post_raw("/transaction/create", Auth::Basic(ALICE, &alice_pw), &body)
                .await
                .0
        }));
    }
    let created = count_created(tasks).await;
    assert_eq!(created, 2);
    assert_eq!(api.balance(ALICE).await, "0.2");
    h
}

store_suite!(
    users_and_passwords,
    delegated_confirm_and_cancel,
    direct_transfers,
    bad_input_changes_nothing,
    concurrent_spend_and_idempotency,
    direct_idempotency_and_concurrent_spend,
);

/// A hold that expired cannot be confirmed over REST either, and the sweep returns the money.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_hold_cannot_be_confirmed() {
    for postgres in [false, true] {
        let Some(h) = Harness::with(postgres, |c| c.hold_ttl = Duration::from_secs(1)).await else {
            continue;
        };
        let api = Rest::new(&h);
        let alice_pw = api.user(ALICE, "alice-password", "1").await;
        let owner_pw = api.user(OWNER, "owner-password", "0").await;
        let token = api.token(ALICE, &alice_pw, OWNER).await;
        let (_, v) = api.delegated(&owner_pw, ALICE, "0.4", &token).await;
        let id = v["transaction"]["id"].as_str().expect("id").to_string();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (s, _) = api
            .resolve("confirm", Auth::Basic(OWNER, &owner_pw), &id)
            .await;
        assert_eq!(s, StatusCode::CONFLICT);
        for _ in 0..50 {
            if api.balance(ALICE).await == "1" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(api.balance(ALICE).await, "1");
        assert_eq!(h.balance(OWNER).await.balance_micros, 0);
        h.finish().await;
    }
}
