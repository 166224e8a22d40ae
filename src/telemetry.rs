//! Logging: one `tracing` subscriber, `json` or `pretty`, level from `RUST_LOG`.
//!
//! Events that operators grep for carry a stable snake_case name as their message
//! (`session_config_loaded`, `agent_process_spawned`, `agent_ready`, `agent_spawn_failed`,
//! `agent_exited`, `worker_restarted`, ...). Logs go to stderr so that commands like
//! `agent-worker enqueue` keep stdout for their result.
//!
//! Writing a log line must never wait on stderr: the tasks that read agents' output log every
//! line, and a stderr that drains slowly (a full pipe, a slow log shipper) would otherwise
//! stop them reading, fill the agents' pipes and stall the agents themselves (an agent's ready
//! line would go unseen). So `main` logs through [`non_blocking_stderr`]: a bounded queue in
//! memory and a thread that writes it out; when stderr cannot keep up, lines beyond the queue
//! are dropped, never waited for.
//!
//! OpenTelemetry traces of each start ([`otel`], [`start_trace`]), when the standard
//! `OTEL_*` variables ask for them, are one more layer of the same subscriber.

pub mod http1;
pub mod otel;
pub mod span_queue;
pub mod start_trace;

use tracing::Subscriber;
use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{EnvFilter, Layer, fmt::MakeWriter, layer::SubscriberExt};

use crate::settings::LogFormat;

/// Builds a subscriber writing to `sink`. `filter` is used when `RUST_LOG` is unset.
/// Tests pass their own sink to capture output; `main` passes stderr.
pub fn get_subscriber<W>(
    format: LogFormat,
    default_filter: &str,
    sink: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // `RUST_LOG` filters the log lines only: traces have their own filter (see `otel`).
    let registry = tracing_subscriber::registry().with(otel::layer());
    match format {
        LogFormat::Json => Box::new(
            registry.with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(sink)
                    .with_filter(filter),
            ),
        ),
        LogFormat::Pretty => Box::new(
            registry.with(
                tracing_subscriber::fmt::layer()
                    .with_target(false)
                    .with_writer(sink)
                    .with_filter(filter),
            ),
        ),
    }
}

/// Lines queued for stderr before new ones are dropped.
const STDERR_QUEUE_LINES: usize = 16 * 1024;

/// A writer to stderr that never blocks the logging caller (see the module docs). Keep the
/// guard until the process ends: dropping it flushes what is queued.
pub fn non_blocking_stderr() -> (NonBlocking, WorkerGuard) {
    NonBlockingBuilder::default()
        .buffered_lines_limit(STDERR_QUEUE_LINES)
        .lossy(true)
        .thread_name("agent-worker-log")
        .finish(std::io::stderr())
}

/// Installs `subscriber` as the global default. Call once, from `main`.
pub fn init_subscriber(subscriber: Box<dyn Subscriber + Send + Sync>) {
    tracing::subscriber::set_global_default(subscriber)
        .expect("a global tracing subscriber was already set");
}
