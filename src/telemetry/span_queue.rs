//! The batch span processor: finished spans go into a bounded queue that one thread of its
//! own drains, in batches, to the exporter. A span that finds the queue full is dropped and
//! counted (`agent_worker_otel_spans_dropped_total`), never waited for: ending a span costs a
//! `try_send`, whatever the collector does, so tracing can never slow a start.
//!
//! The SDK's own batch processor drops the same way but only logs how many it dropped; ours
//! counts them in `/metrics`. The thread runs the exporter on a current-thread runtime of its
//! own, so a collector that hangs or retries holds that thread alone, never the worker's
//! runtime. Limits come from the standard variables (`OTEL_BSP_MAX_QUEUE_SIZE`,
//! `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, `OTEL_BSP_SCHEDULE_DELAY`, with the SDK's defaults).

use std::{
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, RecvTimeoutError, SyncSender, TrySendError},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use opentelemetry::Context;
use opentelemetry_sdk::{
    error::{OTelSdkError, OTelSdkResult},
    trace::{Span, SpanData, SpanExporter, SpanProcessor},
};

use crate::metrics as observability;

/// The queue's bounds (see the module docs for the variables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Finished spans waiting for export, at most.
    pub max_queue: usize,
    /// Spans per export request, at most.
    pub max_batch: usize,
    /// Longest time a finished span waits for its batch to fill.
    pub delay: Duration,
}

impl Limits {
    /// From `OTEL_BSP_*` (a value that does not parse, or 0, keeps the default).
    pub fn from_env() -> Self {
        let var = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|n| *n > 0)
                .unwrap_or(default)
        };
        let max_queue = var("OTEL_BSP_MAX_QUEUE_SIZE", 2048) as usize;
        Self {
            max_queue,
            max_batch: (var("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512) as usize).min(max_queue),
            delay: Duration::from_millis(var("OTEL_BSP_SCHEDULE_DELAY", 5000)),
        }
    }
}

/// What the export thread is sent besides spans.
enum Message {
    Span(Box<SpanData>),
    /// Export what is queued, then answer.
    Flush(SyncSender<()>),
    /// Export what is queued, shut the exporter down, answer, end.
    Shutdown(SyncSender<()>),
}

/// The processor (see the module docs).
#[derive(Debug)]
pub struct SpanQueue {
    queue: SyncSender<Message>,
    thread: Mutex<Option<JoinHandle<()>>>,
    dropped: AtomicU64,
}

impl SpanQueue {
    /// Starts the export thread over `exporter`.
    pub fn start<E: SpanExporter + 'static>(exporter: E, limits: Limits) -> std::io::Result<Self> {
        // The flush and shutdown messages get a slot of their own beyond the spans'.
        let (queue, spans) = mpsc::sync_channel(limits.max_queue + 1);
        let thread = std::thread::Builder::new()
            .name("agent-worker-otel".into())
            .spawn(move || export_loop(exporter, spans, limits))?;
        Ok(Self {
            queue,
            thread: Mutex::new(Some(thread)),
            dropped: AtomicU64::new(0),
        })
    }

    /// Spans dropped so far (also counted in `/metrics`).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Sends a control message and waits up to `timeout` for its answer.
    fn ask(&self, message: fn(SyncSender<()>) -> Message, timeout: Duration) -> OTelSdkResult {
        let (done, answered) = mpsc::sync_channel(1);
        // The queue may be full of spans: wait for room, within the timeout.
        let deadline = Instant::now() + timeout;
        let mut pending = message(done);
        loop {
            match self.queue.try_send(pending) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    pending = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(TrySendError::Full(_)) => return Err(OTelSdkError::Timeout(timeout)),
                Err(TrySendError::Disconnected(_)) => return Err(OTelSdkError::AlreadyShutdown),
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        answered
            .recv_timeout(left)
            .map_err(|_| OTelSdkError::Timeout(timeout))
    }
}

impl SpanProcessor for SpanQueue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        match self.queue.try_send(Message::Span(Box::new(span))) {
            Ok(()) => {}
            // Full, or shut down: dropped, counted, never waited for.
            Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                observability::otel_spans_dropped(1);
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.ask(Message::Flush, Duration::from_secs(5))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let Some(thread) = self.thread.lock().expect("thread lock").take() else {
            return Err(OTelSdkError::AlreadyShutdown);
        };
        let answered = self.ask(Message::Shutdown, timeout);
        // Joined only when it answered: a thread stuck on an unreachable collector is left
        // to the process's exit.
        if answered.is_ok() {
            let _ = thread.join();
        }
        answered
    }
}

/// The export thread: batches of at most `max_batch`, sent when full or `delay` after the
/// last export, whichever comes first.
fn export_loop<E: SpanExporter>(exporter: E, spans: mpsc::Receiver<Message>, limits: Limits) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    let export = |batch: &mut Vec<SpanData>| {
        if !batch.is_empty() {
            // A failed export (the collector is down) loses that batch: the spans are
            // diagnostics, and holding them would only fill the queue.
            let _ = runtime.block_on(exporter.export(std::mem::take(batch)));
        }
    };
    let mut batch = Vec::with_capacity(limits.max_batch);
    let mut due = Instant::now() + limits.delay;
    loop {
        match spans.recv_timeout(due.saturating_duration_since(Instant::now())) {
            Ok(Message::Span(span)) => {
                batch.push(*span);
                if batch.len() >= limits.max_batch {
                    export(&mut batch);
                    due = Instant::now() + limits.delay;
                }
            }
            Ok(Message::Flush(done)) => {
                export(&mut batch);
                let _ = done.send(());
            }
            Ok(Message::Shutdown(done)) => {
                export(&mut batch);
                let _ = exporter.shutdown();
                let _ = done.send(());
                return;
            }
            Err(RecvTimeoutError::Timeout) => {
                export(&mut batch);
                due = Instant::now() + limits.delay;
            }
            Err(RecvTimeoutError::Disconnected) => {
                export(&mut batch);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, atomic::AtomicUsize, mpsc::Receiver},
        time::SystemTime,
    };

    use opentelemetry::{
        InstrumentationScope,
        trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
    };
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};

    use super::*;

    /// An exporter that holds every export until its gate closes, counting what it got.
    #[derive(Debug)]
    struct Stuck {
        gate: Mutex<Receiver<()>>,
        exported: Arc<AtomicUsize>,
    }

    impl SpanExporter for Stuck {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            // Blocks the export thread (what a hung collector does) until the gate is closed.
            let _ = self.gate.lock().unwrap().recv();
            self.exported.fetch_add(batch.len(), Ordering::SeqCst);
            Ok(())
        }
    }

    fn span(n: u64) -> SpanData {
        let context = SpanContext::new(
            TraceId::from(1),
            SpanId::from(n + 1),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        SpanData {
            span_context: context,
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: "s".into(),
            start_time: SystemTime::UNIX_EPOCH,
            end_time: SystemTime::UNIX_EPOCH,
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: InstrumentationScope::builder("t").build(),
        }
    }

    #[test]
    fn a_stuck_exporter_never_holds_a_span_end_and_what_does_not_fit_is_dropped() {
        let (close, gate) = mpsc::channel();
        let exported = Arc::new(AtomicUsize::new(0));
        let limits = Limits {
            max_queue: 2,
            max_batch: 1,
            delay: Duration::from_millis(10),
        };
        let stuck = Stuck {
            gate: Mutex::new(gate),
            exported: exported.clone(),
        };
        let queue = SpanQueue::start(stuck, limits).unwrap();
        // Every call returns while the exporter is stuck: one span in its hands, two queued,
        // the rest dropped and counted.
        for n in 0..10 {
            queue.on_end(span(n));
        }
        assert!(queue.dropped() >= 7, "dropped {}", queue.dropped());
        drop(close);
        queue
            .shutdown_with_timeout(Duration::from_secs(10))
            .unwrap();
        assert_eq!(
            exported.load(Ordering::SeqCst) as u64 + queue.dropped(),
            10,
            "each span exported or dropped, none lost otherwise"
        );
    }
}
