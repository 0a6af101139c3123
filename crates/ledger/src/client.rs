//! An authenticated gRPC client for the ledger, used by the router, the CLI and tests, and the
//! account set-up calls they share.

use syft_proto::ledger as pb;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

use crate::error::{LedgerError, Result};

pub type LedgerClient =
    syft_proto::ledger::ledger_client::LedgerClient<InterceptedService<Channel, Credentials>>;

/// Adds `authorization: Bearer <secret>` to every call. The secret never appears in Debug output.
#[derive(Clone)]
pub struct Credentials(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(..)")
    }
}

impl Credentials {
    pub fn bearer(secret: &str) -> Result<Self> {
        if secret.is_empty() {
            return Ok(Self(None));
        }
        format!("Bearer {secret}")
            .parse()
            .map(|v| Self(Some(v)))
            .map_err(|_| LedgerError::invalid("secret contains characters not allowed in a header"))
    }
}

impl Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A lazily connecting client: the first call connects, and a down ledger is `UNAVAILABLE`.
/// An `https://` URL is verified against the public web PKI roots; see [`connect_lazy_tls`].
pub fn connect_lazy(url: &str, secret: &str) -> Result<LedgerClient> {
    connect_lazy_tls(url, secret, None)
}

/// Like [`connect_lazy`], with TLS settings for an `https://` URL (the CA to trust and, for
/// mutual TLS, a client certificate). TLS settings with an `http://` URL are refused.
pub fn connect_lazy_tls(
    url: &str,
    secret: &str,
    tls: Option<&syft_tls::ClientTls>,
) -> Result<LedgerClient> {
    Ok(with_credentials(
        lazy_channel(url, tls)?,
        Credentials::bearer(secret)?,
    ))
}

/// The `syft.ledger.v1.Alerts` service of a ledger, like [`connect_lazy_tls`].
pub fn connect_alerts_lazy(
    url: &str,
    secret: &str,
    tls: Option<&syft_tls::ClientTls>,
) -> Result<AlertsClient> {
    Ok(
        syft_proto::ledger::alerts_client::AlertsClient::with_interceptor(
            lazy_channel(url, tls)?,
            Credentials::bearer(secret)?,
        ),
    )
}

pub type AlertsClient =
    syft_proto::ledger::alerts_client::AlertsClient<InterceptedService<Channel, Credentials>>;

fn lazy_channel(url: &str, tls: Option<&syft_tls::ClientTls>) -> Result<Channel> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| LedgerError::invalid(format!("invalid ledger url {url:?}: {e}")))?
        .connect_timeout(std::time::Duration::from_secs(3))
        .tcp_nodelay(true);
    let endpoint = syft_tls::configure_endpoint(endpoint, tls)
        .map_err(|e| LedgerError::invalid(e.to_string()))?;
    Ok(endpoint.connect_lazy())
}

pub fn with_credentials(channel: Channel, credentials: Credentials) -> LedgerClient {
    syft_proto::ledger::ledger_client::LedgerClient::with_interceptor(channel, credentials)
}

// Account set-up used by `dev`, `demo`, the benchmarks and the test kit: one implementation, so
// what tests set up is what the binary sets up.

/// Waits until the ledger answers (any answer but `UNAVAILABLE`); `UNAVAILABLE` after ~5 s.
pub async fn wait_for_ledger(client: &mut LedgerClient) -> std::result::Result<(), tonic::Status> {
    for _ in 0..100 {
        match client
            .get_account(pb::GetAccountRequest {
                email: "probe@ledger.local".into(),
            })
            .await
        {
            Err(s) if s.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            _ => return Ok(()),
        }
    }
    Err(tonic::Status::unavailable("the ledger did not start"))
}

/// Creates `email` in `organization` (as the admin); returns the new account's secret.
pub async fn create_account(
    admin: &mut LedgerClient,
    email: &str,
    organization: &str,
) -> std::result::Result<String, tonic::Status> {
    Ok(admin
        .create_account(pb::CreateAccountRequest {
            email: email.into(),
            organization: organization.into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .secret)
}

/// Deposits `micros` into `email` (as the admin), once per `idempotency_key`.
pub async fn deposit(
    admin: &mut LedgerClient,
    email: &str,
    micros: i64,
    idempotency_key: &str,
) -> std::result::Result<pb::Account, tonic::Status> {
    Ok(admin
        .deposit(pb::DepositRequest {
            email: email.into(),
            amount_micros: micros,
            idempotency_key: idempotency_key.into(),
        })
        .await?
        .into_inner())
}

/// Issues a token from the client's account to `recipient`, without expiry or limit.
pub async fn issue_token(
    sender: &mut LedgerClient,
    recipient: &str,
) -> std::result::Result<String, tonic::Status> {
    Ok(sender
        .issue_token(pb::IssueTokenRequest {
            recipient_email: recipient.into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .token)
}
