//! Shipping agent output to `agent:<id>:logs`, batched.
//!
//! Agent output readers must never wait on Redis (a blocked reader fills the agent's pipe and
//! blocks the agent), so they hand lines to a bounded channel without waiting, and this one
//! task writes whatever has accumulated in one pipelined round trip: `RPUSH`, `LTRIM` to the
//! last N lines and `EXPIRE` per session. When Redis is slow or down, lines are dropped from
//! storage (they are still in the process's own log) and the drop is counted and reported.

use std::collections::HashMap;

use agent_jobs::SessionId;
use tokio::sync::mpsc;

use crate::{launcher::AgentLine, session::SessionStore};

/// Lines buffered between readers and Redis before new ones are dropped.
pub const CHANNEL_CAPACITY: usize = 16 * 1024;
/// Most lines written per round trip.
const MAX_BATCH: usize = 1024;

/// Creates the channel agent output goes into.
pub fn channel() -> (mpsc::Sender<AgentLine>, mpsc::Receiver<AgentLine>) {
    mpsc::channel(CHANNEL_CAPACITY)
}

/// Writes lines from `rx` to Redis until every sender is gone and the channel is drained.
pub async fn ship(mut rx: mpsc::Receiver<AgentLine>, store: SessionStore) {
    let mut buffer = Vec::with_capacity(MAX_BATCH);
    let mut failing = false;
    while rx.recv_many(&mut buffer, MAX_BATCH).await > 0 {
        let mut by_session: HashMap<SessionId, Vec<String>> = HashMap::new();
        for line in buffer.drain(..) {
            by_session
                .entry(line.session_id)
                .or_default()
                .push(line.line);
        }
        let batch: Vec<_> = by_session.into_iter().collect();
        match store.append_logs(&batch).await {
            Ok(()) if failing => {
                tracing::info!("agent_log_shipping_resumed");
                failing = false;
            }
            Ok(()) => {}
            Err(error) => {
                crate::observability::redis_error("agent_logs");
                let lines: usize = batch.iter().map(|(_, lines)| lines.len()).sum();
                if !failing {
                    tracing::warn!(error = %error, lines, "agent_log_lines_dropped");
                }
                failing = true;
            }
        }
    }
}
