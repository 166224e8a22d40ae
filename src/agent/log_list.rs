//! Shipping agent output to `agent:<id>:logs`, batched, through a queue bounded in bytes.
//!
//! Agent output readers must never wait on Redis (a blocked reader fills the agent's pipe and
//! blocks the agent), so they hand lines to [`OutputSink::offer`], which never waits, and this
//! one task writes whatever has accumulated in one script call (`lua/append_logs.lua`). When
//! Redis is slow or down the queue fills; lines beyond its byte budget are dropped from storage
//! (the last `agent.log_lines` of an agent are what Redis keeps anyway) and the drop is
//! reported. The budget is in bytes, not lines: lines can be up to `agent.max_line_bytes` each.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use agent_jobs::SessionId;
use tokio::sync::mpsc;

use crate::session::SessionStore;

/// Bytes of agent output queued for Redis at most, all agents together.
pub const QUEUE_BYTES: usize = 32 * 1024 * 1024;
/// Most lines written per round trip.
const MAX_BATCH: usize = 1024;

/// One line of agent output.
#[derive(Debug, Clone)]
pub struct AgentLine {
    /// The agent's session.
    pub session_id: SessionId,
    /// The line, without its newline, lossily decoded, cut at `agent.max_line_bytes` (with a
    /// marker saying how much was cut).
    pub line: String,
}

/// Where agent output readers put lines for Redis. Cheap to clone.
#[derive(Debug, Clone)]
pub struct OutputSink {
    tx: mpsc::UnboundedSender<AgentLine>,
    queued: Arc<AtomicUsize>,
}

impl OutputSink {
    /// Queues `line` unless the queue holds [`QUEUE_BYTES`] already (then it is dropped from
    /// storage: it was logged). Never waits.
    pub fn offer(&self, line: AgentLine) {
        let size = line.line.len();
        if self.queued.fetch_add(size, Ordering::Relaxed) + size > QUEUE_BYTES {
            self.queued.fetch_sub(size, Ordering::Relaxed);
            return;
        }
        if self.tx.send(line).is_err() {
            self.queued.fetch_sub(size, Ordering::Relaxed);
        }
    }
}

/// The receiving end of an [`OutputSink`], for [`ship`].
#[derive(Debug)]
pub struct OutputQueue {
    rx: mpsc::UnboundedReceiver<AgentLine>,
    queued: Arc<AtomicUsize>,
}

/// Creates the queue agent output goes into.
pub fn channel() -> (OutputSink, OutputQueue) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        OutputSink {
            tx,
            queued: queued.clone(),
        },
        OutputQueue { rx, queued },
    )
}

/// Writes lines from `queue` to Redis until every sink is gone and the queue is drained.
pub async fn ship(mut queue: OutputQueue, store: SessionStore) {
    let mut buffer = Vec::with_capacity(MAX_BATCH);
    let mut failing = false;
    while queue.rx.recv_many(&mut buffer, MAX_BATCH).await > 0 {
        let mut by_session: HashMap<SessionId, Vec<String>> = HashMap::new();
        let mut bytes = 0;
        for line in buffer.drain(..) {
            bytes += line.line.len();
            by_session
                .entry(line.session_id)
                .or_default()
                .push(line.line);
        }
        let batch: Vec<_> = by_session.into_iter().collect();
        let result = store.append_logs(&batch).await;
        queue.queued.fetch_sub(bytes, Ordering::Relaxed);
        match result {
            Ok(()) if failing => {
                tracing::info!("agent_log_shipping_resumed");
                failing = false;
            }
            Ok(()) => {}
            Err(error) => {
                crate::metrics::redis_error("agent_logs");
                let lines: usize = batch.iter().map(|(_, lines)| lines.len()).sum();
                if !failing {
                    tracing::warn!(error = %error, lines, "agent_log_lines_dropped");
                }
                failing = true;
            }
        }
    }
}
