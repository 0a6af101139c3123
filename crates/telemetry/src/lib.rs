//! Telemetry shared by the ledger and the router: structured logs (`RUST_LOG`, text or JSON),
//! OpenTelemetry traces exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, W3C
//! trace context across calls, and Prometheus metrics for every request.
//!
//! Standard OpenTelemetry environment variables apply: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` and
//! `OTEL_SDK_DISABLED`.

pub mod layer;
pub mod metrics;
pub mod propagation;

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub use layer::{RequestLayer, Server};
pub use propagation::{inject_grpc, inject_http};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    #[error("log format {0:?} is neither text nor json")]
    LogFormat(String),
    #[error("{TRACE_INCOMING_ENV}={0:?} is neither follow nor link")]
    Incoming(String),
}

/// The variable that says what a server does with its caller's trace context (`traceparent`).
pub const TRACE_INCOMING_ENV: &str = "SYFT_TRACE_INCOMING";

/// What a server does with its caller's trace context ([`TRACE_INCOMING_ENV`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// The request's span is the caller's child: one trace across the calls, sampled as the
    /// caller decided (the default; what the ledger wants from its routers).
    Follow,
    /// The request starts a trace of this process's own, sampled by its own sampler, with a link
    /// to the caller's: for a server whose callers are not trusted (a router's public front),
    /// which could otherwise force their requests into the traces or keep them out.
    Link,
}

impl Incoming {
    fn from_env() -> Result<Self, TelemetryError> {
        match std::env::var(TRACE_INCOMING_ENV) {
            Err(_) => Ok(Self::Follow),
            Ok(v) if v.eq_ignore_ascii_case("follow") || v.is_empty() => Ok(Self::Follow),
            Ok(v) if v.eq_ignore_ascii_case("link") => Ok(Self::Link),
            Ok(other) => Err(TelemetryError::Incoming(other)),
        }
    }
}

/// Set once by [`init`]; read by every request ([`layer::RequestLayer`]).
static LINK_INCOMING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What this process does with its callers' trace context.
pub fn incoming() -> Incoming {
    if LINK_INCOMING.load(std::sync::atomic::Ordering::Relaxed) {
        Incoming::Link
    } else {
        Incoming::Follow
    }
}

/// Keeps the trace pipeline alive; [`Telemetry::shutdown`] (or drop) flushes pending spans.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// Runs the OTLP exporter's I/O: the SDK exports from its own thread, outside any runtime.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is pending and stops the pipeline.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("telemetry: flushing spans failed: {e}");
            }
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn otlp_configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The variable that filters exported spans (`RUST_LOG` syntax), apart from the logs.
pub const TRACE_FILTER_ENV: &str = "SYFT_TRACE_FILTER";
/// The servers' filter unless `RUST_LOG` (logs) or [`TRACE_FILTER_ENV`] (spans) says otherwise:
/// the request spans and their children, without the libraries' chatter (tantivy logs every
/// commit and merge of a search index at `info`; sqlx warns of each statement over a second with
/// its whole text, and a rollup fold's upserts are ~35 KB each: on a slow database they were most
/// of the log, exactly when an operator reads it).
pub const SERVER_FILTER: &str = "info,sqlx=warn,sqlx::query=error,h2=warn,tower=warn,tantivy=warn";

/// Installs the global subscriber: logs to stderr filtered by `RUST_LOG` (default `info`), in
/// `text` or `json`, plus OpenTelemetry export when an OTLP endpoint is configured, filtered by
/// `SYFT_TRACE_FILTER` (default `info`). Call once, from
/// `main`, inside a Tokio runtime.
pub fn init(service_name: &str, log_format: &str) -> Result<Telemetry, TelemetryError> {
    init_with_default_filter(service_name, log_format, SERVER_FILTER)
}

/// [`init`] with another filter when `RUST_LOG` is unset: commands that print their own story
/// (`demo`, `dev`, client commands) log only warnings by default, so the story stays readable.
/// Text logs are coloured only when stderr is a terminal.
pub fn init_with_default_filter(
    service_name: &str,
    log_format: &str,
    default_filter: &str,
) -> Result<Telemetry, TelemetryError> {
    let filter =
        || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = match log_format {
        "json" => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(filter())
            .boxed(),
        "text" => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(filter())
            .boxed(),
        other => return Err(TelemetryError::LogFormat(other.to_string())),
    };
    let incoming = Incoming::from_env()?;
    LINK_INCOMING.store(
        incoming == Incoming::Link,
        std::sync::atomic::Ordering::Relaxed,
    );
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let (provider, runtime) = if otlp_configured() {
        let (provider, runtime) = otlp_provider(service_name)?;
        (Some(provider), Some(runtime))
    } else {
        (None, None)
    };
    // Exported spans have a filter of their own: an operator who quiets the logs with
    // `RUST_LOG=warn` must not turn the traces off with them.
    let otel = provider.as_ref().map(|p| {
        let spans = EnvFilter::try_from_env(TRACE_FILTER_ENV)
            .unwrap_or_else(|_| EnvFilter::new(SERVER_FILTER));
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("syft"))
            .with_filter(spans)
    });
    // A second init (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init();
    if provider.is_some() {
        tracing::info!(service = service_name, "exporting traces over OTLP");
    }
    Ok(Telemetry { provider, runtime })
}

fn otlp_provider(
    service_name: &str,
) -> Result<(SdkTracerProvider, tokio::runtime::Runtime), TelemetryError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    // The exporter only warns of a compression this build leaves out and sends uncompressed: an
    // operator who asked for gzip (to fit a collector's limit, or a link's budget) would learn
    // of it from a log line at best.
    // The traces' own variable wins over the general one, as in the exporter.
    let compression = [
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
        "OTEL_EXPORTER_OTLP_COMPRESSION",
    ]
    .into_iter()
    .find_map(|name| {
        let v = std::env::var(name).ok()?;
        (!v.trim().is_empty()).then_some((name, v))
    });
    if let Some((name, v)) = compression {
        if !v.trim().eq_ignore_ascii_case("none") {
            runtime.shutdown_background();
            return Err(TelemetryError::Exporter(format!(
                "{name}={v:?}: this build exports over plain http:// gRPC, uncompressed (unset \
                 it, or set it to none)"
            )));
        }
    }
    // The gRPC channel's background work belongs to the exporter's runtime, not the caller's.
    let exporter = {
        let _on_export_runtime = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
    };
    let exporter = match exporter {
        Ok(exporter) => exporter,
        Err(e) => {
            // Dropped here, inside the caller's runtime, the exporter's runtime panics ("Cannot
            // drop a runtime in a context where blocking is not allowed"): the process died with
            // that instead of this error (an `https://` collector, which needs a TLS feature this
            // build leaves out).
            runtime.shutdown_background();
            return Err(TelemetryError::Exporter(format!(
                "{e} (this build exports over plain http:// gRPC, uncompressed)"
            )));
        }
    };
    let exporter = OnRuntime {
        inner: Arc::new(tokio::sync::Mutex::new(exporter)),
        runtime: runtime.handle().clone(),
    };
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service_name.to_string());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    Ok((provider, runtime))
}

/// Runs the OTLP exporter on a runtime of its own: the SDK calls `export` from its batch thread,
/// where the gRPC client would find no reactor.
#[derive(Debug)]
struct OnRuntime {
    inner: Arc<tokio::sync::Mutex<opentelemetry_otlp::SpanExporter>>,
    runtime: tokio::runtime::Handle,
}

impl SpanExporter for OnRuntime {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let inner = self.inner.clone();
        let task = self
            .runtime
            .spawn(async move { inner.lock().await.export(batch).await });
        async move {
            task.await.unwrap_or_else(|e| {
                Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                    e.to_string(),
                ))
            })
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        match self.inner.try_lock() {
            Ok(inner) => inner.shutdown_with_timeout(timeout),
            Err(_) => Ok(()),
        }
    }

    fn set_resource(&mut self, resource: &Resource) {
        if let Ok(mut inner) = self.inner.try_lock() {
            inner.set_resource(resource);
        }
    }
}
