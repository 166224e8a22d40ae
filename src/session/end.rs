//! The end of a session on this worker (`lua/end_session.lua`): its agent exited, or its start
//! failed for good. The record stays, with a bounded TTL, for the orchestrator's end-of-session
//! handler; a record already gone is not recreated, and another worker's is not touched.

use std::sync::LazyLock;

use agent_jobs::{
    SessionId, SessionKeys, SessionStatus,
    keys::{SESSION_HEARTBEATS, SESSIONS_READY, SESSIONS_STARTING, legacy_metrics},
    session_state::fields,
};
use redis::Script;

use super::{SessionError, SessionStore, flag, session_script};
use crate::agent::exit::AgentExit;

static END: LazyLock<Script> =
    LazyLock::new(|| session_script(include_str!("../lua/end_session.lua")));

/// How a session ended on this worker, for [`SessionStore::end`].
#[derive(Debug, Clone, Default)]
pub struct SessionEnd<'a> {
    /// How its agent exited; `None` for a start that failed for good.
    pub exit: Option<AgentExit>,
    /// Why it failed (`None` for a clean exit).
    pub error: Option<&'a str>,
    /// Why the worker stopped the agent, when it did (`session_ended`, `worker_shutdown`, ...).
    pub stop_reason: Option<&'a str>,
    /// The last attempt timed out (the original worker's start-up timeout counter).
    pub timed_out: bool,
}

/// The outcome of [`SessionStore::end`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndRecord {
    /// The record stays for the orchestrator, with this status.
    Kept(SessionStatus),
    /// The record was already gone (the orchestrator ended the session first).
    Gone,
    /// Another worker owns the session: nothing was written.
    NotOurs,
}

impl SessionStore {
    /// Records the end of a session on this worker (its agent exited, or its start failed for
    /// good), if `worker_id` still owns it (`lua/end_session.lua`): `endedAt` and the exit,
    /// `completed` or `error` only over the worker's own statuses, out of the state sets and
    /// the heartbeat index, every key kept with a TTL of at most `session.ended_ttl` for the
    /// orchestrator's end-of-session handler. A record that is already gone is not recreated.
    pub async fn end(
        &self,
        id: &SessionId,
        worker_id: &str,
        end: &SessionEnd<'_>,
    ) -> Result<EndRecord, SessionError> {
        let keys = SessionKeys::new(id);
        let (exit_field, exit_value) = match end.exit {
            Some(AgentExit::Code(code))
            | Some(AgentExit::MemoryLimit {
                code: Some(code), ..
            }) => (fields::EXIT_CODE, code),
            Some(AgentExit::Signal(signal))
            | Some(AgentExit::MemoryLimit {
                signal: Some(signal),
                ..
            }) => (fields::EXIT_SIGNAL, signal),
            Some(AgentExit::MemoryLimit { .. }) => ("", 0),
            None => ("", 0),
        };
        let mut invocation = END.prepare_invoke();
        for key in keys.all() {
            invocation.key(key);
        }
        invocation
            .key(SESSIONS_STARTING)
            .key(SESSIONS_READY)
            .key(SESSION_HEARTBEATS)
            .key(legacy_metrics::STARTUP_TIMEOUTS)
            .arg(worker_id)
            .arg(self.clock.unix_now())
            .arg(self.ended_ttl.as_secs().max(1))
            .arg(id.as_str())
            .arg(exit_field)
            .arg(exit_value)
            .arg(end.error.unwrap_or_default())
            .arg(end.stop_reason.unwrap_or_default())
            .arg(flag(end.timed_out && self.legacy_metrics));
        self.events(&mut invocation);
        let reply: Option<String> = invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|source| SessionError::Redis {
                key: keys.state(),
                source,
            })?;
        Ok(match reply {
            None => EndRecord::NotOurs,
            Some(status) if status.is_empty() => EndRecord::Gone,
            Some(status) => EndRecord::Kept(SessionStatus::parse(&status)),
        })
    }
}
