//! The agents' log lists, `agent:<id>:logs` (`lua/append_logs.lua`): the last lines of each
//! agent's output, for sessions that still exist, batched into one round trip.

use std::sync::LazyLock;

use agent_jobs::{SessionId, SessionKeys};
use redis::Script;

use super::SessionStore;

static APPEND_LOGS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/append_logs.lua")));

impl SessionStore {
    /// Appends output lines to the agents' `agent:<id>:logs`, keeping the last `log_lines`,
    /// for sessions that still exist, with the record's TTL (`lua/append_logs.lua`). One round
    /// trip for the batch.
    pub async fn append_logs(&self, batch: &[(SessionId, Vec<String>)]) -> redis::RedisResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut invocation = APPEND_LOGS.prepare_invoke();
        invocation.arg(self.log_lines).arg(self.ttl_secs());
        for (id, lines) in batch {
            let keys = SessionKeys::new(id);
            invocation
                .key(keys.state())
                .key(keys.agent_logs())
                .arg(lines.len());
            for line in lines {
                invocation.arg(line);
            }
        }
        invocation
            .invoke_async::<u64>(&mut self.conn.clone())
            .await
            .map(drop)
    }
}
