//! TLS settings shared by the ledger, the router and the CLI (rustls with the `ring` provider).
//!
//! - [`ServerTls`]: a certificate chain and key for a listener, optionally with a client CA that
//!   makes client certificates mandatory (mutual TLS).
//! - [`ClientTls`]: the CA to trust (default: the public web PKI roots) and an optional client
//!   identity, for gRPC channels to `https://` URLs.
//! - [`TlsListener`]: an [`axum::serve::Listener`] that terminates TLS, for the HTTP fronts and
//!   (through `syft-server`'s `grpc_incoming`) the gRPC listeners.
//!
//! PEM material is validated when loaded, so a bad file fails at startup with its path in the
//! error. Private keys never appear in `Debug` output or logs.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

pub use tokio_rustls::rustls;

/// A server-side TLS connection, as [`TlsListener`] hands it over.
pub type ServerTlsStream = TlsStream<TcpStream>;

/// How long a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Every server (gRPC and HTTP) pings an HTTP/2 peer this often, and closes the connection when
/// a ping is not answered within [`HTTP2_PING_TIMEOUT`]: peers gone without a word are found.
pub const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(30);
pub const HTTP2_PING_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: io::Error,
    },
    #[error("{what} is not valid PEM: {detail}")]
    Pem { what: &'static str, detail: String },
    #[error("invalid TLS settings: {0}")]
    Config(String),
}

/// A PEM certificate chain and private key, as given (validated on construction).
#[derive(Clone)]
struct PemIdentity {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl PemIdentity {
    fn new(cert: Vec<u8>, key: Vec<u8>, what: &'static str) -> Result<Self, TlsError> {
        certs(&cert, what)?;
        PrivateKeyDer::from_pem_slice(&key).map_err(|e| TlsError::Pem {
            what: "private key",
            detail: e.to_string(),
        })?;
        Ok(PemIdentity { cert, key })
    }

    fn tonic(&self) -> Identity {
        Identity::from_pem(&self.cert, &self.key)
    }
}

fn certs(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            detail: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// TLS for a listener: certificate chain + key, and optionally a CA whose client certificates
/// are required (mutual TLS).
#[derive(Clone)]
pub struct ServerTls {
    identity: PemIdentity,
    client_ca: Option<Vec<u8>>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("key", &"<redacted>")
            .field("client_auth", &self.client_ca.is_some())
            .finish()
    }
}

impl ServerTls {
    /// From PEM text: the certificate chain (leaf first) and its private key.
    pub fn from_pem(cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Result<Self, TlsError> {
        Ok(ServerTls {
            identity: PemIdentity::new(cert.into(), key.into(), "server certificate")?,
            client_ca: None,
        })
    }

    /// From PEM files; `client_ca` (optional) turns on mutual TLS.
    pub fn from_files(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
        client_ca: Option<&Path>,
    ) -> Result<Self, TlsError> {
        let tls = Self::from_pem(
            read(cert.as_ref(), "certificate")?,
            read(key.as_ref(), "private key")?,
        )?;
        match client_ca {
            Some(path) => tls.with_client_ca(read(path, "client CA")?),
            None => Ok(tls),
        }
    }

    /// Requires client certificates signed by this CA (PEM, one or more certificates).
    pub fn with_client_ca(mut self, ca_pem: impl Into<Vec<u8>>) -> Result<Self, TlsError> {
        let ca = ca_pem.into();
        certs(&ca, "client CA")?;
        self.client_ca = Some(ca);
        Ok(self)
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_cert(&self) -> bool {
        self.client_ca.is_some()
    }

    /// A rustls server configuration offering HTTP/2 and HTTP/1.1 (gRPC clients ask for HTTP/2).
    pub fn rustls(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in certs(ca, "client CA")? {
                    roots
                        .add(cert)
                        .map_err(|e| TlsError::Config(format!("client CA: {e}")))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| TlsError::Config(format!("client CA: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let key = PrivateKeyDer::from_pem_slice(&self.identity.key).map_err(|e| TlsError::Pem {
            what: "private key",
            detail: e.to_string(),
        })?;
        let mut config = builder
            .with_single_cert(certs(&self.identity.cert, "server certificate")?, key)
            .map_err(|e| TlsError::Config(format!("certificate and key: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// TLS for a gRPC client channel: which CA to trust and, for mutual TLS, a client identity.
#[derive(Clone, Default)]
pub struct ClientTls {
    ca: Option<Vec<u8>>,
    identity: Option<PemIdentity>,
    domain: Option<String>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("custom_ca", &self.ca.is_some())
            .field("client_cert", &self.identity.is_some())
            .field("domain", &self.domain)
            .finish()
    }
}

impl ClientTls {
    /// Trusts the public web PKI roots, no client certificate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts only this CA (PEM).
    pub fn with_ca(mut self, ca_pem: impl Into<Vec<u8>>) -> Result<Self, TlsError> {
        let ca = ca_pem.into();
        certs(&ca, "CA certificate")?;
        self.ca = Some(ca);
        Ok(self)
    }

    /// Presents this client certificate (mutual TLS).
    pub fn with_identity(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Result<Self, TlsError> {
        self.identity = Some(PemIdentity::new(
            cert_pem.into(),
            key_pem.into(),
            "client certificate",
        )?);
        Ok(self)
    }

    /// Verifies the server certificate against this name instead of the URL's host.
    pub fn with_domain(mut self, domain: impl Into<String>) -> Self {
        self.domain = Some(domain.into());
        self
    }

    /// From PEM files: a CA to trust, and a client certificate + key (both or neither).
    pub fn from_files(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Self, TlsError> {
        let mut tls = ClientTls::new();
        if let Some(ca) = ca {
            tls = tls.with_ca(read(ca, "CA certificate")?)?;
        }
        match (cert, key) {
            (Some(cert), Some(key)) => {
                tls.with_identity(read(cert, "client certificate")?, read(key, "client key")?)
            }
            (None, None) => Ok(tls),
            _ => Err(TlsError::Config(
                "a client certificate needs both the certificate and the key".into(),
            )),
        }
    }

    /// Whether a client certificate is presented.
    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    /// The tonic client configuration.
    pub fn tonic(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new().timeout(HANDSHAKE_TIMEOUT);
        config = match &self.ca {
            Some(ca) => config.ca_certificate(Certificate::from_pem(ca)),
            None => config.with_webpki_roots(),
        };
        if let Some(identity) = &self.identity {
            config = config.identity(identity.tonic());
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        config
    }
}

/// Applies `tls` to a gRPC endpoint: TLS is used exactly when the URL is `https://`, with `tls`
/// (or the web PKI roots when `None`). TLS settings with an `http://` URL are a configuration
/// error rather than a silently plaintext channel.
pub fn configure_endpoint(
    endpoint: tonic::transport::Endpoint,
    tls: Option<&ClientTls>,
) -> Result<tonic::transport::Endpoint, TlsError> {
    let https = endpoint.uri().scheme_str() == Some("https");
    match (https, tls) {
        (true, tls) => endpoint
            .tls_config(tls.cloned().unwrap_or_default().tonic())
            .map_err(|e| TlsError::Config(e.to_string())),
        (false, None) => Ok(endpoint),
        (false, Some(_)) => Err(TlsError::Config(format!(
            "TLS is configured but {} is not an https:// URL",
            endpoint.uri()
        ))),
    }
}

/// A TLS-terminating listener for `axum::serve`. Handshakes run in their own tasks (a slow
/// client never blocks accepting others); failed handshakes are logged at debug level and
/// dropped. Dropping the listener stops accepting.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local_addr: SocketAddr,
    acceptor: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// At most `max_pending` connections are held between `accept(2)` and the server taking
    /// them (in their handshake, at most [`HANDSHAKE_TIMEOUT`] each, or handshaken and queued);
    /// past that, new ones wait in the kernel's backlog. A bound, not a defence: connections that
    /// never finish their handshake can fill it for the timeout, as they could fill descriptors
    /// before it.
    pub fn new(
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
        max_pending: usize,
    ) -> io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(config);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(max_pending.max(1)));
        let task = tokio::spawn(async move {
            loop {
                // A slot per connection until it is queued for the server: handshakes that never
                // end (bounded by HANDSHAKE_TIMEOUT) stop the accepting here, in the kernel's
                // backlog, not in open descriptors. The slot is held through the send, so a
                // server at its own cap stops this loop too, at most 64 queued behind it.
                let Ok(slot) = handshakes.clone().acquire_owned().await else {
                    return;
                };
                let (tcp, peer) = match listener.accept().await {
                    Ok(conn) => conn,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(peer = %peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener {
            ready,
            local_addr,
            acceptor: task,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept task ended (it only does when aborted): accept nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

/// Whether `error` (or an error it was caused by) is a TLS handshake that failed: a certificate
/// one side refused, or an alert the peer sent about the handshake. Such a connection carried no
/// request, so a call that failed with it was certainly not applied (the router's ledger calls
/// fail fast on it instead of asking again whether it was). tonic's connector passes rustls's
/// error on as the text of an `io::Error`, so its text is compared too.
pub fn handshake_failed(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return handshake_refusal(tls);
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io.kind() == io::ErrorKind::InvalidData && handshake_refusal_text(&io.to_string()) {
                return true;
            }
        }
        next = e.source();
    }
    false
}

/// The alerts a server sends when it refuses a handshake (a certificate, a version, access).
const HANDSHAKE_ALERTS: [rustls::AlertDescription; 11] = {
    use rustls::AlertDescription as A;
    [
        A::HandshakeFailure,
        A::BadCertificate,
        A::UnsupportedCertificate,
        A::CertificateRevoked,
        A::CertificateExpired,
        A::CertificateUnknown,
        A::CertificateRequired,
        A::UnknownCA,
        A::AccessDenied,
        A::ProtocolVersion,
        A::InsufficientSecurity,
    ]
};

/// The beginnings of rustls's texts for a certificate this side refused and a peer it cannot
/// speak with (a unit test checks them against rustls's own).
const REFUSAL_TEXTS: [&str; 3] = [
    "invalid peer certificate",
    "peer sent no certificates",
    "peer is incompatible",
];

fn handshake_refusal(e: &rustls::Error) -> bool {
    match e {
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::PeerIncompatible(_) => true,
        rustls::Error::AlertReceived(alert) => HANDSHAKE_ALERTS.contains(alert),
        _ => false,
    }
}

fn handshake_refusal_text(text: &str) -> bool {
    REFUSAL_TEXTS.iter().any(|t| text.starts_with(t))
        || (HANDSHAKE_ALERTS.iter()).any(|a| text == rustls::Error::AlertReceived(*a).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a refused handshake looks like, typed and as tonic passes it on (text in an
    /// `io::Error`); anything else is not one.
    #[test]
    fn refused_handshakes_are_told_apart() {
        let texts = [
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
            rustls::Error::NoCertificatesPresented,
            rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic),
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired),
        ];
        for e in texts {
            let text = io::Error::new(io::ErrorKind::InvalidData, e.to_string());
            assert!(handshake_failed(&text), "{e}");
            assert!(handshake_failed(&e), "{e}");
        }
        let closed = rustls::Error::AlertReceived(rustls::AlertDescription::CloseNotify);
        let other = [
            io::Error::new(io::ErrorKind::InvalidData, closed.to_string()),
            io::Error::new(io::ErrorKind::BrokenPipe, "broken pipe"),
        ];
        assert!(!handshake_failed(&closed));
        assert!(!handshake_failed(&other[0]));
        assert!(!handshake_failed(&other[1]));
    }

    fn self_signed() -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    #[test]
    fn keys_never_show_in_debug_output() {
        let (cert, key) = self_signed();
        let server = ServerTls::from_pem(cert.clone(), key.clone())
            .expect("server")
            .with_client_ca(cert.clone())
            .expect("ca");
        let client = ClientTls::new()
            .with_ca(cert.clone())
            .expect("ca")
            .with_identity(cert, key.clone())
            .expect("identity");
        for text in [format!("{server:?}"), format!("{client:?}")] {
            assert!(!text.contains("PRIVATE KEY"), "{text}");
            let body: String = key.lines().nth(1).unwrap_or_default().into();
            assert!(!text.contains(&body), "{text}");
        }
        assert!(server.requires_client_cert());
        assert!(client.has_identity());
        server.rustls().expect("rustls config");
    }

    #[test]
    fn bad_material_is_refused_at_load_time() {
        let (cert, key) = self_signed();
        assert!(ServerTls::from_pem("not pem", key.clone()).is_err());
        assert!(ServerTls::from_pem(cert.clone(), "not a key").is_err());
        assert!(ClientTls::new().with_ca("garbage").is_err());
        assert!(ClientTls::from_files(None, Some(Path::new("/nonexistent")), None).is_err());
        let missing = ServerTls::from_files("/nonexistent/cert.pem", "/nonexistent/key.pem", None);
        let msg = missing.expect_err("missing file").to_string();
        assert!(msg.contains("/nonexistent/cert.pem"), "{msg}");
    }
}
