//! The flags both served services take: where to listen, TLS on those listeners, and the shutdown
//! grace period; and binding those addresses. One definition for `ledger` and `router`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use syft_tls::ServerTls;
use tokio::net::TcpListener;

/// Binds `addr`, saying which address could not be had.
pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// One struct per service rather than one shared struct: clap takes each flag's env var and
/// default as part of the type, and those differ between the services (`SYFT_LEDGER_*`,
/// `SYFT_ROUTER_*`). `tt` fragments, not `literal`, so clap's derive sees plain literals.
macro_rules! serve_flags {
    ($(
        $name:ident: $prefix:tt, $grpc_default:tt, $http_default:tt,
        http: $http_doc:tt,
        grace: $grace_doc:tt;
    )+) => {$(
        #[derive(clap::Args, Debug, Clone)]
        pub struct $name {
            /// gRPC listen address.
            #[arg(long = "grpc-addr", env = concat!($prefix, "_GRPC_ADDR"), default_value = $grpc_default)]
            pub grpc_addr: String,
            #[doc = $http_doc]
            #[arg(long = "http-addr", env = concat!($prefix, "_HTTP_ADDR"), default_value = $http_default)]
            pub http_addr: String,
            /// PEM certificate chain: serve gRPC and HTTP over TLS (with --tls-key).
            #[arg(long, env = concat!($prefix, "_TLS_CERT"))]
            pub tls_cert: Option<PathBuf>,
            /// PEM private key of --tls-cert.
            #[arg(long, env = concat!($prefix, "_TLS_KEY"))]
            pub tls_key: Option<PathBuf>,
            #[doc = $grace_doc]
            #[arg(long, env = concat!($prefix, "_SHUTDOWN_GRACE"), default_value = "30s", value_parser = super::parse_duration)]
            pub shutdown_grace: Duration,
            /// HTTP connections served at once; past this, new ones wait in the listen backlog.
            #[arg(long, env = concat!($prefix, "_HTTP_MAX_CONNECTIONS"), default_value_t = syft_server::DEFAULT_MAX_CONNECTIONS as u32, value_parser = clap::value_parser!(u32).range(1..))]
            pub http_max_connections: u32,
            /// An HTTP connection that sends no complete request head for this long (idle between
            /// HTTP/1 requests, or sending its head slowly) is closed; one silent since it opened
            /// after 30 s. Keep it above the idle timeout of a load balancer in front.
            #[arg(long, env = concat!($prefix, "_HTTP_IDLE_TIMEOUT"), default_value = "620s", value_parser = super::parse_idle_timeout)]
            pub http_idle_timeout: Duration,
        }

        impl $name {
            /// The gRPC and the HTTP listener.
            pub async fn bind(&self) -> anyhow::Result<(TcpListener, TcpListener)> {
                Ok((bind(&self.grpc_addr).await?, bind(&self.http_addr).await?))
            }

            /// The HTTP listener's idle timeout and connection cap.
            pub fn http_limits(&self) -> syft_server::HttpLimits {
                syft_server::HttpLimits {
                    max_connections: self.http_max_connections as usize,
                    idle_timeout: self.http_idle_timeout,
                }
            }

            /// TLS of both listeners, requiring client certificates signed by `client_ca`.
            pub fn tls(&self, client_ca: Option<&PathBuf>) -> anyhow::Result<Option<ServerTls>> {
                super::server_tls(self.tls_cert.as_ref(), self.tls_key.as_ref(), client_ca)
            }
        }
    )+};
}

// Where and how `syft-router ledger` and `syft-router router` serve.
serve_flags! {
    LedgerServe: "SYFT_LEDGER", "127.0.0.1:50051", "127.0.0.1:8081",
        http: " HTTP listen address: /healthz, /readyz and, with --accounting-api, the accounting REST API.",
        grace: " On SIGTERM/SIGINT: stop accepting, let in-flight calls finish for this long, then exit.";
    RouterServe: "SYFT_ROUTER", "127.0.0.1:50052", "127.0.0.1:8080",
        http: " HTTP listen address (OpenAI-compatible front, health).",
        grace: " On SIGTERM/SIGINT: stop accepting, let in-flight requests (streams included) finish \
                for this long, then cancel the rest and void their holds.";
}
