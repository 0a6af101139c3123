//! TLS on every listener and mutual TLS between router and ledger, with certificates made at
//! test time (rcgen).

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use syft_ledger::client::{connect_lazy_tls, LedgerClient};
use syft_ledger::client::{create_account, deposit, issue_token};
use syft_ledger::LedgerConfig;
use syft_proto::ledger as lpb;
use syft_proto::router as rpb;
use syft_proto::router::router_client::RouterClient;
use syft_router_svc::{Pricing, RouterConfig, ECHO_MODEL};
use syft_testkit::{
    assert_consistent, chat_request, ledger_config, lock_transfers_for, Db, LedgerServer,
    RouterHandle, ADMIN_KEY, PRICE,
};
use syft_tls::{ClientTls, ServerTls};
use tonic::transport::{Channel, Endpoint};

/// A test certificate authority.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A PEM certificate and key.
struct Leaf {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("key");
        Ca {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA"),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn leaf(&self, name: &str, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    fn server(&self) -> ServerTls {
        let leaf = self.leaf("server", ExtendedKeyUsagePurpose::ServerAuth);
        ServerTls::from_pem(leaf.cert, leaf.key).expect("server tls")
    }

    fn client_identity(&self, name: &str) -> Leaf {
        self.leaf(name, ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// Trusts this CA only, no client certificate.
    fn trust(&self) -> ClientTls {
        ClientTls::new().with_ca(self.pem()).expect("client tls")
    }

    /// Trusts this CA and presents `identity` (a client certificate, from any CA).
    fn trust_as(&self, identity: Leaf) -> ClientTls {
        self.trust()
            .with_identity(identity.cert, identity.key)
            .expect("identity")
    }
}

/// A ledger serving TLS with `tls`, on a fresh SQLite file (dropped with the `Db`).
async fn tls_ledger(tls: ServerTls) -> (LedgerServer, Db) {
    tls_ledger_with(tls, |_| {}).await
}

async fn tls_ledger_with(
    tls: ServerTls,
    tweak: impl FnOnce(&mut LedgerConfig),
) -> (LedgerServer, Db) {
    let db = Db::sqlite();
    let mut config = LedgerConfig {
        sweep_interval: Duration::from_millis(100),
        tls: Some(tls),
        ..ledger_config(&db.url)
    };
    tweak(&mut config);
    (LedgerServer::start(config).await, db)
}

fn client(ledger: &LedgerServer, secret: &str, tls: Option<&ClientTls>) -> LedgerClient {
    connect_lazy_tls(&ledger.url, secret, tls).expect("client")
}

/// A refused TLS connection: the call fails in the transport (UNAVAILABLE when the handshake
/// fails on the client side; UNKNOWN or CANCELLED when a TLS 1.3 server rejects the client
/// certificate after the client considered the handshake done), never with an answer from the
/// service itself (a status from the wire has no transport error as its source).
fn assert_refused(err: &tonic::Status) {
    assert!(
        matches!(
            err.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        ),
        "{err:?}"
    );
    assert!(
        std::error::Error::source(err).is_some(),
        "expected a transport failure, got a service answer: {err:?}"
    );
}

/// The owner's account and alice's, created through `ledger`'s admin over `tls`, alice funded
/// with 1,000,000 micros: the owner's secret and alice's token for the owner.
async fn owner_and_alice(ledger: &LedgerServer, tls: &ClientTls) -> (String, String) {
    let admin = client(ledger, ADMIN_KEY, Some(tls));
    let owner_secret = create_account(&mut admin.clone(), "owner@example.com", "test")
        .await
        .expect("create account");
    let alice_secret = create_account(&mut admin.clone(), "alice@example.com", "test")
        .await
        .expect("create account");
    deposit(&mut admin.clone(), "alice@example.com", 1_000_000, "fund")
        .await
        .expect("deposit");
    let token = issue_token(
        &mut client(ledger, &alice_secret, Some(tls)),
        "owner@example.com",
    )
    .await
    .expect("token");
    (owner_secret, token)
}

/// A cheap admin call; retried briefly while the server starts.
async fn list_accounts(c: &LedgerClient) -> Result<(), tonic::Status> {
    let mut last = None;
    for _ in 0..40 {
        match c
            .clone()
            .get_account(lpb::GetAccountRequest {
                email: "nobody@example.com".into(),
            })
            .await
        {
            // The call reached the service: the TLS handshake succeeded.
            Ok(_) => return Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(()),
            Err(s) => last = Some(s),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err(last.unwrap_or_else(|| tonic::Status::unknown("no attempt")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_ledger_serves_tls_clients_and_refuses_others() {
    let ca = Ca::new("test CA");
    let (ledger, _db) = tls_ledger(ca.server()).await;
    list_accounts(&client(&ledger, ADMIN_KEY, Some(&ca.trust())))
        .await
        .expect("a client trusting the CA gets through");

    // Plaintext to a TLS port fails.
    let plain_url = ledger.url.replace("https://", "http://");
    let plain = syft_ledger::client::connect_lazy(&plain_url, ADMIN_KEY).expect("client");
    assert!(
        plain
            .clone()
            .get_account(lpb::GetAccountRequest {
                email: "x@example.com".into()
            })
            .await
            .is_err(),
        "plaintext client must not get an answer"
    );
    // A client that does not trust the server's CA refuses the server.
    let other = Ca::new("other CA");
    let err = list_accounts(&client(&ledger, ADMIN_KEY, Some(&other.trust())))
        .await
        .expect_err("untrusted server certificate");
    assert_refused(&err);
    // TLS settings with an http:// URL are a configuration error, not a silent plaintext channel.
    assert!(connect_lazy_tls(&plain_url, ADMIN_KEY, Some(&ca.trust())).is_err());
    ledger.store.close().await;
}

/// Over TLS too, the ledger knows each client's address: wrong secrets sent over gRPC lock the
/// address for HTTPS as well (docs/ledger.md, "Failed authentications"). Without the address
/// the limit would silently not apply to a TLS ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secrets_over_tls_lock_the_address() {
    use tonic::Code::{ResourceExhausted, Unauthenticated};
    let ca = Ca::new("test CA");
    let (ledger, _db) = tls_ledger_with(ca.server(), |c| c.auth_failures_per_address = 3).await;
    let trust = ca.trust();
    list_accounts(&client(&ledger, ADMIN_KEY, Some(&trust)))
        .await
        .expect("the admin gets through");
    // One call each (`list_accounts` retries).
    let once = |secret: String| {
        let mut c = client(&ledger, &secret, Some(&trust));
        async move {
            c.get_account(lpb::GetAccountRequest {
                email: "nobody@example.com".into(),
            })
            .await
            .expect_err("refused")
        }
    };
    // The third reaches the limit: it is refused as locked already.
    for (i, code) in [
        (0, Unauthenticated),
        (1, Unauthenticated),
        (2, ResourceExhausted),
    ] {
        let err = once(format!("wrong-{i}-key")).await;
        assert_eq!(err.code(), code, "{err:?}");
    }
    let err = once(ADMIN_KEY.to_string()).await;
    assert_eq!(err.code(), ResourceExhausted, "{err:?}");
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).expect("ca"))
        .build()
        .expect("https client");
    let resp = https
        .get(format!("{}/users", ledger.http_url))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .expect("https");
    assert_eq!(resp.status(), 429);
    ledger.store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_rejects_clients_without_a_certificate_from_its_ca() {
    let ca = Ca::new("mesh CA");
    let (ledger, _db) = tls_ledger(ca.server().with_client_ca(ca.pem()).expect("client ca")).await;

    let with_cert = ca.trust_as(ca.client_identity("router"));
    list_accounts(&client(&ledger, ADMIN_KEY, Some(&with_cert)))
        .await
        .expect("a client certificate signed by the CA is accepted");

    // No client certificate.
    let err = list_accounts(&client(&ledger, ADMIN_KEY, Some(&ca.trust())))
        .await
        .expect_err("client without a certificate");
    assert_refused(&err);

    // A client certificate from another CA.
    let wrong_ca = ca.trust_as(Ca::new("rogue CA").client_identity("intruder"));
    let err = list_accounts(&client(&ledger, ADMIN_KEY, Some(&wrong_ca)))
        .await
        .expect_err("client certificate from another CA");
    assert_refused(&err);
    ledger.store.close().await;
}

async fn router_client(url: &str, tls: &ClientTls) -> RouterClient<Channel> {
    let endpoint = syft_tls::configure_endpoint(
        Endpoint::from_shared(url.to_string()).expect("url"),
        Some(tls),
    )
    .expect("tls");
    for _ in 0..100 {
        if let Ok(ch) = endpoint.connect().await {
            return RouterClient::new(ch);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("router did not start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_serves_grpc_and_https_over_tls() {
    let ca = Ca::new("router CA");
    let mut config = RouterConfig::new("tls-router", "owner@example.com");
    config.tls = Some(ca.server());
    let router = RouterHandle::start(config).await;
    let (grpc_url, http_url) = (&router.grpc_url, &router.http_url);

    let meta = router_client(grpc_url, &ca.trust())
        .await
        .get_metadata(rpb::GetMetadataRequest {})
        .await
        .expect("metadata over TLS")
        .into_inner();
    assert_eq!(meta.name, "tls-router");

    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).expect("ca"))
        .build()
        .expect("client");
    let resp = https
        .get(format!("{http_url}/healthz"))
        .send()
        .await
        .expect("GET /healthz over TLS");
    assert_eq!(resp.status().as_u16(), 200);
    let models = syft_testkit::get_json(&https, &format!("{http_url}/v1/models")).await;
    assert_eq!(models["data"][0]["id"], ECHO_MODEL);

    // Plain HTTP to the TLS port gets no answer; a client not trusting the CA refuses it.
    let plain = http_url.replace("https://", "http://");
    assert!(reqwest::get(format!("{plain}/healthz")).await.is_err());
    assert!(reqwest::get(format!("{http_url}/healthz")).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_pays_through_a_mutual_tls_ledger() {
    let ca = Ca::new("mesh CA");
    let (ledger, _db) = tls_ledger(ca.server().with_client_ca(ca.pem()).expect("client ca")).await;
    let router_tls = ca.trust_as(ca.client_identity("router"));
    let admin_tls = ca.trust_as(ca.client_identity("admin"));
    let admin = client(&ledger, ADMIN_KEY, Some(&admin_tls));
    let alice_account = || {
        let mut admin = admin.clone();
        async move {
            let request = lpb::GetAccountRequest {
                email: "alice@example.com".into(),
            };
            admin
                .get_account(request)
                .await
                .expect("account")
                .into_inner()
        }
    };
    list_accounts(&admin).await.expect("admin over mTLS");

    let (owner_secret, token) = owner_and_alice(&ledger, &admin_tls).await;

    let mut config = RouterConfig::new("mtls-router", "owner@example.com")
        .with_chat_pricing(Pricing::per_request(PRICE));
    config.ledger.url = ledger.url.clone();
    config.ledger.secret = owner_secret.clone().into();
    config.ledger.tls = Some(router_tls);
    config.tls = Some(ca.server());
    let router = RouterHandle::start(config).await;

    let chat = rpb::ChatRequest {
        model: ECHO_MODEL.into(),
        ..chat_request("alice@example.com", &token, "hello over mTLS")
    };
    let resp = router_client(&router.grpc_url, &ca.trust())
        .await
        .chat(chat.clone())
        .await
        .expect("paid chat through the mTLS ledger")
        .into_inner();
    assert_eq!(resp.cost_micros, PRICE);
    assert!(!resp.transfer_id.is_empty());
    let get = syft_testkit::req::get_transfer(&resp.transfer_id);
    let transfer = syft_testkit::ok(admin.clone().get_transfer(get).await);
    assert_eq!(transfer.status(), lpb::TransferStatus::Completed);
    let alice = alice_account().await;
    assert_eq!(alice.balance_micros, 1_000_000 - PRICE);
    assert_eq!(alice.held_micros, 0);

    // The same router without a client certificate cannot reach the ledger: paid requests are
    // UNAVAILABLE at once (a refused handshake ran nothing, so there is no outcome to settle; a
    // first version asked again for the hold's life, here within 20 s, below the 30 s an unknown
    // outcome is asked again for) and nothing is charged.
    let mut config = RouterConfig::new("no-cert-router", "owner@example.com")
        .with_chat_pricing(Pricing::per_request(PRICE));
    config.ledger.url = ledger.url.clone();
    config.ledger.secret = owner_secret.into();
    config.ledger.tls = Some(ca.trust());
    let no_cert = RouterHandle::start(config).await;
    let mut no_cert_client = no_cert.client().await;
    let refused = no_cert_client.chat(rpb::ChatRequest {
        request_id: "no-cert-1".into(),
        ..chat
    });
    let err = tokio::time::timeout(std::time::Duration::from_secs(20), refused)
        .await
        .expect("refused without settling")
        .expect_err("ledger refuses a router without a client certificate");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let alice = alice_account().await;
    assert_eq!(alice.balance_micros, 1_000_000 - PRICE);
    assert_consistent(&ledger.store).await;
    ledger.store.close().await;
}

/// A round of Authorize in which one ledger replica refused the router's TLS handshake (mutual
/// TLS with a client CA the router's certificate is not from) and another's outcome was unknown
/// (its Authorize timed out on a lock, then committed the hold) goes on asking the second: the
/// hold it placed is this request's, the upstream is called and the user charged once. The
/// router used to give up when the round's last endpoint refused the handshake, answer
/// `UNAVAILABLE` and leave that hold on the user's funds until it expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_handshake_does_not_end_the_wait_for_another_replicas_outcome() {
    let Some(db) = Db::postgres().await else {
        return;
    };
    let ca = Ca::new("replica CA");
    let other_ca = Ca::new("another CA");
    let replica = |tls: ServerTls| LedgerConfig {
        sweep_interval: Duration::from_millis(100),
        tls: Some(tls),
        ..ledger_config(&db.url)
    };
    let slow = LedgerServer::start(replica(ca.server())).await;
    let strict = LedgerServer::start(replica(
        ca.server()
            .with_client_ca(other_ca.pem())
            .expect("client ca"),
    ))
    .await;
    let trust = ca.trust_as(ca.client_identity("router"));
    let admin = client(&slow, ADMIN_KEY, Some(&trust));
    list_accounts(&admin).await.expect("admin over TLS");
    let (owner_secret, token) = owner_and_alice(&slow, &trust).await;

    let mut config = RouterConfig::new("two-replicas", "owner@example.com")
        .with_chat_pricing(Pricing::per_request(PRICE));
    config.ledger.url = format!("{},{}", slow.url, strict.url);
    config.ledger.secret = owner_secret.into();
    config.ledger.tls = Some(trust.clone());
    config.ledger.timeout = Duration::from_millis(500);
    let router = RouterHandle::start(config).await;
    let mut c = router.client().await;
    // The router's health probe (every second) finds the strict replica refusing and backs it
    // off for longer each time (2 s by then), so rounds try the slow replica first and end on
    // the refusal, the order in which the router used to give up.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    // Every hold waits on this lock for 1.5 s: the slow replica's first answers time out.
    let unlock = lock_transfers_for(&slow.store, Duration::from_millis(1500)).await;
    let chat = rpb::ChatRequest {
        model: ECHO_MODEL.into(),
        request_id: "slow-and-strict".into(),
        ..chat_request("alice@example.com", &token, "hello")
    };
    let answered = c.chat(chat).await;
    unlock.await.expect("unlocked");
    let answered = answered
        .expect("answered once the slow replica's hold is known")
        .into_inner();
    assert_eq!(answered.cost_micros, PRICE);
    let get = syft_testkit::req::get_transfer(&answered.transfer_id);
    let transfer = syft_testkit::ok(admin.clone().get_transfer(get).await);
    assert_eq!(transfer.status(), lpb::TransferStatus::Completed);
    let alice = syft_testkit::ok(
        admin
            .clone()
            .get_account(lpb::GetAccountRequest {
                email: "alice@example.com".into(),
            })
            .await,
    );
    assert_eq!(
        (alice.balance_micros, alice.held_micros),
        (1_000_000 - PRICE, 0)
    );
    assert_consistent(&slow.store).await;
    slow.store.close().await;
    strict.store.close().await;
    db.drop_postgres().await;
}
