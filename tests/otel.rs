//! OpenTelemetry traces end to end: a real OTLP/HTTP receiver in the test (decoding the
//! protobuf the worker binary exports), the Python client enqueueing inside a span of the
//! OpenTelemetry SDK, a real worker process, real test agents. One trace id runs from the
//! client's span through the worker's start and phase spans to the `TRACEPARENT` the agent
//! received; a start without a context is a root; an unreachable collector changes nothing
//! for starts.

mod common;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_jobs::AgentStart;
use axum::{Router, body::Bytes, extract::State, routing::post};
use common::*;
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest, common::v1::any_value::Value, trace::v1::Span,
};
use prost::Message;

/// The service name the worker under test exports as.
const SERVICE: &str = "agent-worker-otel-test";

/// A span as received, with the service that sent it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Span,
}

/// Spans received so far.
type Spans = Arc<Mutex<Vec<Received>>>;

/// A minimal OTLP/HTTP traces receiver on a free port: `POST /v1/traces` with a protobuf
/// `ExportTraceServiceRequest`, answered with an empty (successful) response.
async fn receiver() -> (SocketAddr, Spans) {
    async fn export(State(spans): State<Spans>, body: Bytes) -> &'static [u8] {
        let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf request");
        let mut spans = spans.lock().unwrap();
        for resource in request.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(name) => Some(name.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push(Received {
                    service: service.clone(),
                    span,
                });
            }
        }
        &[]
    }
    let spans = Spans::default();
    let app = Router::new()
        .route("/v1/traces", post(export))
        .with_state(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, spans)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The worker binary exporting to `endpoint`, batches sent every 100 ms.
fn worker_exporting_to(redis: &TestRedis, endpoint: &str) -> WorkerProcess {
    WorkerProcess::run(
        &redis.url(),
        "ready",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
            ("OTEL_SERVICE_NAME", SERVICE),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
}

/// The spans of trace `trace_id`, once `names` have all arrived.
async fn wait_spans(spans: &Spans, trace_id: &str, names: &[&str]) -> Vec<Span> {
    wait_for(
        &format!("spans {names:?} of trace {trace_id}"),
        Duration::from_secs(20),
        || async {
            let got: Vec<Span> = spans
                .lock()
                .unwrap()
                .iter()
                .filter(|r| r.service == SERVICE && hex(&r.span.trace_id) == trace_id)
                .map(|r| r.span.clone())
                .collect();
            names
                .iter()
                .all(|n| got.iter().any(|s| s.name == *n))
                .then_some(got)
        },
    )
    .await
}

/// The worker's `/metrics`, at the address it logged.
async fn scrape(worker: &WorkerProcess) -> String {
    let listening = worker
        .wait_event("http_listening", Duration::from_secs(20))
        .await;
    let addr: SocketAddr = listening["addr"].as_str().unwrap().parse().unwrap();
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of the series line that starts with `series` (name and labels).
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

fn named<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no {name} span in {spans:#?}"))
}

/// Enqueues a start for `id` from Python, inside a span of the OpenTelemetry SDK; returns the
/// span's trace id and span id.
async fn enqueue_from_python_span(redis: &TestRedis, id: &str) -> (String, String) {
    require_python(&["opentelemetry.sdk.trace"]).await;
    const SCRIPT: &str = r#"
import json, sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from agent_worker import Client

trace.set_tracer_provider(TracerProvider())
client = Client.from_url(sys.argv[1])
with trace.get_tracer("orchestrator").start_as_current_span("POST /calls") as span:
    client.enqueue_agent_start(sys.argv[2], "caller-1")
context = span.get_span_context()
print(json.dumps({"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}))
"#;
    let output = python()
        .args(["-c", SCRIPT, &redis.url(), id])
        .output()
        .await
        .expect("run python3");
    let ids: serde_json::Value = printed_json("the Python client in a span", &output);
    let field = |name: &str| ids[name].as_str().unwrap().to_owned();
    (field("trace_id"), field("span_id"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_the_clients_span_through_the_worker_to_the_agent() {
    let (addr, spans) = receiver().await;
    let redis = TestRedis::start().await;
    let worker = worker_exporting_to(&redis, &format!("http://{addr}"));
    worker
        .wait_event("otel_traces_exporting", Duration::from_secs(20))
        .await;

    let id = sid("otel-traced");
    let (trace_id, client_span) = enqueue_from_python_span(&redis, id.as_str()).await;
    wait_status(&redis.conn, &id, "ready", Duration::from_secs(20)).await;
    let phases = [
        "agent_start",
        "claim",
        "queue_wait",
        "spawn",
        "alive",
        "ready",
    ];
    let trace = wait_spans(&spans, &trace_id, &phases).await;

    // The worker's start continues the client's span; every phase is the start's child.
    let start = named(&trace, "agent_start");
    assert_eq!(hex(&start.parent_span_id), client_span, "{start:#?}");
    let start_id = hex(&start.span_id);
    for phase in &phases[1..] {
        let span = named(&trace, phase);
        assert_eq!(hex(&span.parent_span_id), start_id, "{phase}: {span:#?}");
        assert!(
            span.start_time_unix_nano <= span.end_time_unix_nano,
            "{span:#?}"
        );
    }
    // The config load is an event of the claim.
    let claim = named(&trace, "claim");
    assert!(
        claim
            .events
            .iter()
            .any(|e| e.name == "session_config_loaded"),
        "{claim:#?}"
    );
    // The phases follow each other: queue wait, spawn, alive, ready.
    let at = |name: &str| {
        let span = named(&trace, name);
        (span.start_time_unix_nano, span.end_time_unix_nano)
    };
    let ordered = ["queue_wait", "spawn", "alive", "ready"].map(at);
    assert!(
        ordered.windows(2).all(|w| w[0].1 <= w[1].0 + 1_000_000),
        "phases in order: {ordered:?}"
    );

    // The agent received the worker's start span as its parent.
    let received = wait_received(&redis.conn, &id).await;
    assert_eq!(
        received["env"]["TRACEPARENT"],
        format!("00-{trace_id}-{start_id}-01"),
        "{received}"
    );

    // A start without a context is a trace of its own, with a root span.
    let root = sid("otel-root");
    enqueue(&redis.conn, &root, None).await;
    let received = wait_received(&redis.conn, &root).await;
    let parent = received["env"]["TRACEPARENT"]
        .as_str()
        .unwrap_or_else(|| panic!("a root start hands the agent its trace too: {received}"));
    let root_trace = parent.split('-').nth(1).unwrap().to_owned();
    assert_ne!(root_trace, trace_id);
    let trace = wait_spans(&spans, &root_trace, &["agent_start", "ready"]).await;
    let start = named(&trace, "agent_start");
    assert!(start.parent_span_id.is_empty(), "a root span: {start:#?}");
    assert_eq!(
        parent,
        format!("00-{root_trace}-{}-01", hex(&start.span_id))
    );

    // A start that fails for good (its config key is not a hash) ends its span as an error.
    let bad = sid("otel-bad-config");
    let _: () = redis::AsyncCommands::set(
        &mut redis.conn.clone(),
        format!("session:{bad}:config"),
        "not a hash",
    )
    .await
    .unwrap();
    let bad_trace = "0af7651916cd43dd8448eb211c80319c";
    let job = AgentStart::new(bad.clone())
        .with_traceparent(format!("00-{bad_trace}-b7ad6b7169203331-01"))
        .unwrap();
    producer(&redis.conn).enqueue(&job).await.unwrap();
    let trace = wait_spans(&spans, bad_trace, &["agent_start"]).await;
    let status = named(&trace, "agent_start")
        .status
        .clone()
        .unwrap_or_default();
    // OTLP's STATUS_CODE_ERROR, with the reason.
    assert_eq!(status.code, 2, "{trace:#?}");
    assert!(
        status.message.contains("not a hash") || status.message.contains("string"),
        "{status:?}"
    );

    // The phases are histograms too, by start mode; nothing was dropped.
    let metrics = scrape(&worker).await;
    for phase in [
        "queue_wait",
        "claim_to_spawned",
        "spawned_to_alive",
        "alive_to_ready",
    ] {
        let series = format!("agent_worker_start_{phase}_seconds_count{{start=\"cold\"}}");
        assert!(
            sample(&metrics, &series).is_some_and(|n| n >= 1.0),
            "{series}:\n{metrics}"
        );
    }
    assert_eq!(
        sample(&metrics, "agent_worker_otel_spans_dropped_total"),
        Some(0.0),
        "{metrics}"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_changes_nothing_for_starts() {
    let redis = TestRedis::start().await;
    // A collector that takes connections and never answers (the worst case: each export
    // waits for its timeout), and a queue of two spans: what does not fit is dropped.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", hung.local_addr().unwrap());
    let worker = WorkerProcess::run(
        &redis.url(),
        "ready",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "2"),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    );
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut producer_jobs = Vec::new();
    for n in 0..4 {
        let id = sid(&format!("otel-unreachable-{n}"));
        let job = AgentStart::new(id.clone())
            .with_traceparent(parent)
            .unwrap()
            .with_tracestate("vendor=opaque")
            .unwrap();
        producer(&redis.conn).enqueue(&job).await.unwrap();
        producer_jobs.push(id);
    }
    for id in &producer_jobs {
        wait_status(&redis.conn, id, "ready", Duration::from_secs(20)).await;
        let received = wait_received(&redis.conn, id).await;
        let handed = received["env"]["TRACEPARENT"].as_str().unwrap_or_default();
        assert!(
            handed.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
                && !handed.contains("00f067aa0ba902b7"),
            "the agent continues the job's trace under the worker's span: {received}"
        );
        assert_eq!(received["env"]["TRACESTATE"], "vendor=opaque", "{received}");
    }
    // Six spans a start, four starts, room for four while the first export hangs.
    let metrics = scrape(&worker).await;
    assert!(
        sample(&metrics, "agent_worker_otel_spans_dropped_total").is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    worker.stop().await;
    drop(hung);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_start_hands_the_agent_the_jobs_trace_with_traces_off() {
    let redis = TestRedis::start().await;
    let warm_command = format!("{TEST_AGENT},--warm");
    let worker = WorkerProcess::run(
        &redis.url(),
        "ready",
        &[
            ("AGENT_WORKER__AGENT__WARM_COMMAND", warm_command.as_str()),
            ("AGENT_WORKER__AGENT__WARM_POOL", "1"),
            ("RUST_LOG", "info,agent_worker::agent::warm_pool=debug"),
        ],
    );
    worker
        .wait_event("warm_agent_ready", Duration::from_secs(20))
        .await;
    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let id = sid("otel-warm");
    let job = AgentStart::new(id.clone())
        .with_traceparent(parent)
        .unwrap();
    producer(&redis.conn).enqueue(&job).await.unwrap();
    wait_status(&redis.conn, &id, "ready", Duration::from_secs(20)).await;
    let received = wait_received(&redis.conn, &id).await;
    assert_eq!(received["warm"], true, "a warm process took it: {received}");
    // No exporter: the agent continues the job's own context, unchanged.
    assert_eq!(received["env"]["TRACEPARENT"], parent, "{received}");
    assert!(received["env"]["TRACESTATE"].is_null(), "{received}");
    let timeline = hget(&redis.conn, &format!("session:{id}"), "startTimeline")
        .await
        .expect("the record keeps the start's timeline");
    let timeline: serde_json::Value = serde_json::from_str(&timeline).unwrap();
    assert_eq!(timeline["start"], "warm", "{timeline}");
    let metrics = scrape(&worker).await;
    let series = r#"agent_worker_start_alive_to_ready_seconds_count{start="warm"}"#;
    assert_eq!(sample(&metrics, series), Some(1.0), "{metrics}");
    worker.stop().await;
}
