//! An authenticated gRPC client for the ledger, used by the router, the CLI and tests.

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
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| LedgerError::invalid(format!("invalid ledger url {url:?}: {e}")))?
        .connect_timeout(std::time::Duration::from_secs(3))
        .tcp_nodelay(true);
    let endpoint = syft_tls::configure_endpoint(endpoint, tls)
        .map_err(|e| LedgerError::invalid(e.to_string()))?;
    Ok(with_credentials(
        endpoint.connect_lazy(),
        Credentials::bearer(secret)?,
    ))
}

pub fn with_credentials(channel: Channel, credentials: Credentials) -> LedgerClient {
    syft_proto::ledger::ledger_client::LedgerClient::with_interceptor(channel, credentials)
}
