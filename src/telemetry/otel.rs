//! OpenTelemetry traces, configured only by the standard variables and off unless one of
//! them asks for an exporter.
//!
//! On when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set (or
//! `OTEL_TRACES_EXPORTER=otlp`, then on the default `http://localhost:4318`); off with
//! `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. The exporter is OTLP over
//! HTTP/protobuf (`OTEL_EXPORTER_OTLP_PROTOCOL`/`_TRACES_PROTOCOL` = `http/protobuf`, the
//! default; `grpc` and `http/json` are refused with a message) to a plain `http://` endpoint
//! ([`super::http1`]). The SDK reads the rest itself: `OTEL_SERVICE_NAME` (else
//! `agent-worker`), `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and `_ARG`,
//! `OTEL_EXPORTER_OTLP_HEADERS`, `_TIMEOUT`; the queue, `OTEL_BSP_*` ([`super::span_queue`]).
//!
//! Which spans go out: only those of target [`TARGET`] (each start's: `start_trace.rs`),
//! with the log events inside them (info and above) as span events; the other spans of the
//! process (apalis's, the job's) stay in the logs. `RUST_LOG` filters log lines, not traces. Nothing here can slow a start: see [`super::span_queue`].

use std::{sync::OnceLock, time::Duration};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{SpanExporter, WithHttpConfig};
use opentelemetry_sdk::{
    Resource,
    trace::{SdkTracer, SdkTracerProvider, SpanExporter as _},
};
use tracing::Subscriber;
use tracing_subscriber::{Layer, filter::FilterFn, registry::LookupSpan};

use super::{
    http1::Http1Client,
    span_queue::{Limits, SpanQueue},
};

/// The tracing target of the spans that are exported (see the module docs).
pub const TARGET: &str = "agent_worker::start";

/// The service name when `OTEL_SERVICE_NAME` is not set.
const DEFAULT_SERVICE_NAME: &str = "agent-worker";

/// The process's tracer, once [`init`] turned tracing on.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// What [`init`] decided, to be logged once the subscriber is installed.
#[derive(Debug)]
pub enum OtelStatus {
    /// No variable asks for traces.
    Off,
    /// Exporting to this endpoint (the base or the traces variable, as set).
    On {
        /// The endpoint as configured.
        endpoint: String,
        /// Flushes and stops the exporter when dropped (at the process's end).
        guard: OtelGuard,
    },
    /// Asked for, but refused: why.
    Refused(String),
}

/// Shuts the tracer provider down when dropped: what is queued is exported (bounded by a
/// timeout: an unreachable collector does not hold the exit).
#[derive(Debug)]
pub struct OtelGuard(SdkTracerProvider);

impl Drop for OtelGuard {
    fn drop(&mut self) {
        let _ = self.0.shutdown_with_timeout(Duration::from_secs(2));
    }
}

/// Reads the variables and, if they ask for traces, builds the exporter and the tracer the
/// subscriber's layer uses ([`layer`]). Call once, before building the subscriber.
pub fn init() -> OtelStatus {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return OtelStatus::Off;
    }
    let exporter = var("OTEL_TRACES_EXPORTER").map(|v| v.to_ascii_lowercase());
    let endpoint =
        var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"));
    let endpoint = match (exporter.as_deref(), endpoint) {
        (Some("none"), _) => return OtelStatus::Off,
        (Some("otlp") | None, Some(endpoint)) => endpoint,
        (Some("otlp"), None) => "http://localhost:4318".to_owned(),
        (None, None) => return OtelStatus::Off,
        (Some(other), _) => {
            return OtelStatus::Refused(format!(
                "OTEL_TRACES_EXPORTER={other}: only otlp (or none) is supported"
            ));
        }
    };
    if let Some(protocol) =
        var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        && protocol != "http/protobuf"
    {
        return OtelStatus::Refused(format!(
            "OTLP protocol {protocol}: only http/protobuf is supported"
        ));
    }
    if !endpoint.starts_with("http://") {
        return OtelStatus::Refused(format!(
            "OTLP endpoint {endpoint}: only http:// endpoints are supported"
        ));
    }
    match provider() {
        Ok(provider) => {
            let _ = TRACER.set(provider.tracer("agent-worker"));
            OtelStatus::On {
                endpoint,
                guard: OtelGuard(provider),
            }
        }
        Err(reason) => OtelStatus::Refused(reason),
    }
}

/// The tracer provider: the OTLP exporter behind our bounded queue.
fn provider() -> Result<SdkTracerProvider, String> {
    let service = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned());
    let resource = Resource::builder().with_service_name(service).build();
    // The exporter reads the same variables for its own bound.
    let timeout = [
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]
    .iter()
    .find_map(|name| std::env::var(name).ok()?.trim().parse().ok())
    .map_or(Duration::from_secs(10), Duration::from_millis);
    let mut exporter = SpanExporter::builder()
        .with_http()
        .with_http_client(Http1Client::new(timeout))
        .build()
        .map_err(|e| format!("the OTLP exporter: {e}"))?;
    exporter.set_resource(&resource);
    let queue = SpanQueue::start(exporter, Limits::from_env())
        .map_err(|e| format!("the export thread: {e}"))?;
    Ok(SdkTracerProvider::builder()
        .with_resource(resource)
        .with_span_processor(queue)
        .build())
}

/// Logs what [`init`] decided (once the subscriber is installed).
pub fn log_status(status: &OtelStatus) {
    match status {
        OtelStatus::Off => {}
        OtelStatus::On { endpoint, .. } => {
            tracing::info!(endpoint = %endpoint, "otel_traces_exporting");
        }
        OtelStatus::Refused(reason) => {
            tracing::warn!(reason = %reason, "otel_traces_refused");
        }
    }
}

/// Whether [`init`] turned traces on.
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

/// The tracer, when traces are on.
pub fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get()
}

/// The subscriber's OpenTelemetry layer when traces are on (see the module docs for what it
/// exports), else `None` (a layer that does nothing).
pub fn layer<S>() -> Option<impl Layer<S> + Send + Sync>
where
    S: Subscriber + for<'span> LookupSpan<'span> + Send + Sync,
{
    let tracer = TRACER.get()?.clone();
    // The starts' spans, and the events inside them at info and above (whatever
    // `RUST_LOG` says of the log lines); the hint keeps every debug and trace call site of
    // every crate disabled as before.
    let starts_only = FilterFn::new(|meta: &tracing::Metadata<'_>| {
        if meta.is_span() {
            meta.target() == TARGET
        } else {
            *meta.level() <= tracing::Level::INFO
        }
    })
    .with_max_level_hint(tracing::level_filters::LevelFilter::INFO);
    Some(
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_location(false)
            .with_threads(false)
            .with_filter(starts_only),
    )
}
