//! One start's trace: the worker's `agent_start` span, continued from the job's W3C
//! `traceparent` (and `tracestate`) or a root span without one, the context handed to the
//! agent (`TRACEPARENT`, `TRACESTATE` in its environment, whatever the start mode), and the
//! phase spans under it.
//!
//! Spans of one start:
//! - `agent_start` (of [`TARGET`], the target the exporter sends): from the launch's beginning to its end; the log
//!   events of the start (`agent_spawn_failed`, `agent_ready`, ...) are its span events;
//! - `claim`: the claim's round trip, with `session_config_loaded` as its span event;
//! - `queue_wait` (the producer's enqueue to the claim), `spawn` (claim to spawn or warm
//!   handoff), `alive` (spawn to the alive line), `ready` (alive to the ready line): written
//!   when the agent is ready, from its [`StartTimeline`], with their real start and end times.
//!
//! Without traces on ([`super::otel`]), no span is exported and the agent is handed the job's
//! own context (validated), so its spans still join the producer's trace.

use std::{
    collections::HashMap,
    time::{Duration, UNIX_EPOCH},
};

use opentelemetry::{
    Context, KeyValue,
    propagation::TextMapPropagator,
    trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _},
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::start_timeline::StartTimeline;

pub use super::otel::TARGET;

/// The trace of one start (see the module docs).
#[derive(Debug)]
pub struct StartTrace {
    span: tracing::Span,
    /// `TRACEPARENT`, `TRACESTATE` for the agent, when there is a context.
    agent_env: Vec<(String, String)>,
}

impl StartTrace {
    /// Begins the start's span for `session_id`, continuing `traceparent`/`tracestate` (the
    /// job's, untrusted: an invalid one is ignored and the span is a root).
    pub fn begin(session_id: &str, traceparent: Option<&str>, tracestate: Option<&str>) -> Self {
        let span = tracing::info_span!(
            target: TARGET,
            parent: None,
            "agent_start",
            session_id,
            otel.kind = "consumer",
        );
        let remote = traceparent.map(|tp| extract(tp, tracestate));
        let remote = remote.filter(|cx| cx.span().span_context().is_valid());
        if let Some(cx) = &remote {
            let _ = span.set_parent(cx.clone());
        }
        let own = span.context();
        let handed = if own.span().span_context().is_valid() {
            Some(own)
        } else {
            // Traces off: the job's own context, re-encoded from its parsed form.
            remote
        };
        let agent_env = handed.map(|cx| inject(&cx)).unwrap_or_default();
        Self { span, agent_env }
    }

    /// The start's span: the launch runs inside it.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// `TRACEPARENT` (and `TRACESTATE`) for the agent's environment; empty without a context.
    pub fn agent_env(&self) -> &[(String, String)] {
        &self.agent_env
    }

    /// A span for one claim, inside the start's.
    pub fn claim_span(&self) -> tracing::Span {
        tracing::info_span!(target: TARGET, parent: &self.span, "claim")
    }

    /// The start is over: without an agent (`error`, why), its span's status says so.
    pub fn finished(&self, error: Option<String>) {
        if let Some(error) = error {
            self.span.set_status(Status::error(error));
        }
    }

    /// Writes the phase spans of a ready start (nothing when traces are off).
    pub fn phases(&self, timeline: &StartTimeline) {
        let Some(tracer) = super::otel::tracer() else {
            return;
        };
        let parent = self.span.context();
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        let mode = KeyValue::new("agent.start", timeline.start.clone());
        let mut phases = vec![
            ("spawn", timeline.claimed, timeline.spawned),
            ("alive", timeline.spawned, timeline.alive),
            ("ready", timeline.alive, timeline.ready),
        ];
        if let Some(enqueued) = timeline.enqueued {
            phases.insert(0, ("queue_wait", enqueued, timeline.claimed));
        }
        for (name, from, to) in phases {
            let mut span = tracer
                .span_builder(name)
                .with_kind(SpanKind::Internal)
                .with_start_time(at(from))
                .with_attributes([mode.clone()])
                .start_with_context(tracer, &parent);
            span.end_with_timestamp(at(to.max(from)));
        }
    }
}

/// The context a W3C `traceparent` (and `tracestate`) carries; empty when it does not parse.
fn extract(traceparent: &str, tracestate: Option<&str>) -> Context {
    let mut carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    if let Some(state) = tracestate {
        carrier.insert("tracestate".to_owned(), state.to_owned());
    }
    TraceContextPropagator::new().extract(&carrier)
}

/// `TRACEPARENT` and, when not empty, `TRACESTATE` of `cx`.
fn inject(cx: &Context) -> Vec<(String, String)> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    let mut env = Vec::with_capacity(2);
    for (name, var) in [("traceparent", "TRACEPARENT"), ("tracestate", "TRACESTATE")] {
        if let Some(value) = carrier.remove(name).filter(|v| !v.is_empty()) {
            env.push((var.to_owned(), value));
        }
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn without_traces_the_agent_gets_the_jobs_context_validated() {
        let trace = StartTrace::begin("s-1", Some(PARENT), Some("vendor=x"));
        assert_eq!(
            trace.agent_env(),
            [
                ("TRACEPARENT".to_owned(), PARENT.to_owned()),
                ("TRACESTATE".to_owned(), "vendor=x".to_owned())
            ]
        );
        for junk in [
            "",
            "00-zz-00f067aa0ba902b7-01",
            "$(touch /tmp/x)",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            assert!(
                StartTrace::begin("s-1", Some(junk), None)
                    .agent_env()
                    .is_empty(),
                "{junk}"
            );
        }
        assert!(StartTrace::begin("s-1", None, None).agent_env().is_empty());
    }
}
