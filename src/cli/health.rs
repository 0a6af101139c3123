//! `syft-router health`: ask a ledger or router for its gRPC health (`grpc.health.v1`); exits 0
//! when SERVING. Made for container healthchecks and scripts.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[derive(Args, Debug)]
pub struct HealthArgs {
    /// gRPC URL of the ledger or router (https:// for TLS).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub url: String,
    /// Service to check, e.g. syft.ledger.v1.Ledger; empty: the whole server.
    #[arg(long, default_value = "")]
    pub service: String,
    /// Give up after this long.
    #[arg(long, default_value = "3s", value_parser = super::parse_duration)]
    pub timeout: Duration,
    /// PEM CA to trust for an https:// URL.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// PEM client certificate, for a server that requires mutual TLS (with --key).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// The name the server's certificate is checked against instead of the URL's host: a
    /// Kubernetes exec probe dials `https://127.0.0.1:…` (its own pod) and checks the Service's
    /// name, which the certificate carries.
    #[arg(long)]
    pub server_name: Option<String>,
}

pub async fn run(args: HealthArgs) -> anyhow::Result<()> {
    let mut tls = super::client_tls(args.ca.as_ref(), args.cert.as_ref(), args.key.as_ref())?;
    if let Some(name) = &args.server_name {
        tls = Some(tls.unwrap_or_default().with_domain(name));
    }
    let endpoint = tonic::transport::Endpoint::from_shared(args.url.clone())
        .with_context(|| format!("invalid url {:?}", args.url))?
        .connect_timeout(args.timeout)
        .timeout(args.timeout);
    let endpoint = syft_tls::configure_endpoint(endpoint, tls.as_ref())?;
    let check = async {
        let channel = endpoint.connect().await.map_err(|e| {
            let cause = super::errors::root_cause(&e).unwrap_or_else(|| e.to_string());
            anyhow::anyhow!("cannot reach {} ({cause})", args.url)
        })?;
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: args.service.clone(),
            })
            .await
            .map_err(|s| {
                anyhow::anyhow!(
                    "{} answered {}: {}",
                    args.url,
                    s.code().description(),
                    s.message()
                )
            })?
            .into_inner()
            .status();
        anyhow::Ok(status)
    };
    let status = tokio::time::timeout(args.timeout, check)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {} within {:?}", args.url, args.timeout))??;
    println!("{}", status.as_str_name());
    if status != ServingStatus::Serving {
        anyhow::bail!("{} is {}", args.url, status.as_str_name());
    }
    Ok(())
}
