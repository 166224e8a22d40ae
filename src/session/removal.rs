//! The removal of sessions with every key they own (`lua/remove_sessions.lua`): the stale ones
//! of dead workers and the legacy ones of the old worker, decided and deleted atomically so a
//! session that comes back to life meanwhile is not removed.

use std::sync::LazyLock;

use agent_jobs::{
    SessionId, SessionKeys,
    keys::{SESSION_HEARTBEATS, SESSIONS_READY, SESSIONS_STARTING},
};
use redis::Script;

use super::{SessionStore, flag, session_script};

static REMOVE: LazyLock<Script> =
    LazyLock::new(|| session_script(include_str!("../lua/remove_sessions.lua")));

/// Which sessions [`SessionStore::remove`] may remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// Only those whose heartbeat index entry is at or before `cutoff` (unix time). A live
    /// session there has lost its agent and goes; an ended one (its end was not recorded)
    /// goes only once it ended at or before `ended_cutoff`, and until then just leaves the
    /// index.
    Stale {
        /// The heartbeat cutoff.
        cutoff: u64,
        /// The end cutoff: now minus `session.ended_ttl`.
        ended_cutoff: u64,
        /// `<queue>:meta` of the agent-start jobs, whose claim record of a removed live
        /// session is cleared (so a re-delivered job starts it again).
        job_meta_prefix: Option<String>,
    },
    /// Only legacy sessions (not in the index) whose newest of `lastActive` / `createdAt`
    /// is before this unix time.
    Legacy {
        /// The cutoff.
        cutoff: u64,
    },
}

impl SessionStore {
    /// Removes the sessions among `ids` that `removal` allows, with every key they own, in one
    /// atomic script call (`lua/remove_sessions.lua`). Returns each removed session and why.
    /// With `dry_run`, the same decisions and nothing written.
    pub async fn remove(
        &self,
        removal: &Removal,
        ids: &[SessionId],
        dry_run: bool,
    ) -> redis::RedisResult<Vec<(SessionId, String)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let (mode, cutoff, ended_cutoff, meta_prefix) = match removal {
            Removal::Stale {
                cutoff,
                ended_cutoff,
                job_meta_prefix,
            } => (
                "stale",
                *cutoff,
                *ended_cutoff,
                job_meta_prefix.as_deref().unwrap_or_default(),
            ),
            Removal::Legacy { cutoff } => ("legacy", *cutoff, 0, ""),
        };
        let mut invocation = REMOVE.prepare_invoke();
        invocation
            .key(SESSION_HEARTBEATS)
            .key(SESSIONS_STARTING)
            .key(SESSIONS_READY)
            .arg(mode)
            .arg(cutoff)
            .arg(ended_cutoff)
            .arg(flag(dry_run))
            .arg(meta_prefix);
        for id in ids {
            for key in SessionKeys::new(id).all() {
                invocation.key(key);
            }
            invocation.arg(id.as_str());
        }
        self.events(&mut invocation);
        let flat: Vec<String> = invocation.invoke_async(&mut self.conn.clone()).await?;
        Ok(flat
            .chunks_exact(2)
            .filter_map(|pair| Some((SessionId::parse(&pair[0]).ok()?, pair[1].clone())))
            .collect())
    }
}
