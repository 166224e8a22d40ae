//! What an operator reads and does, shared by the CLI (`status`, `dead list`, `dead retry`)
//! and the console ([`crate::console`]): one query per question, so both always agree. The
//! console's pages read only through here.
//!
//! All of it reads the same keys the worker writes (see the README's contract section); none
//! of it needs a running worker. Every read is bounded by an index the worker keeps small
//! (workers, the dead set under `retention.dead_max`, one page of a session index), never by
//! the keyspace.
//!
//! - [`fleet`]: the queue's counts, the sessions by state and the workers (`status`).
//! - [`dead`]: the newest dead jobs (`dead list`).
//! - [`sessions`]: one page of live sessions, by a cursor over the session indexes.
//! - [`session`]: one session in full.
//! - [`startups`]: the last hour's starts (from the event stream), for the start-up chart.
//!
//! The two writes, both existing operations rather than new ones, are here: [`retry_dead`]
//! (`dead retry`) and [`stop_session`] (the orchestrator's end of session).

pub mod dead;
pub mod fleet;
pub mod session;
pub mod sessions;
pub mod startups;

use crate::connection::RedisConn;
use std::sync::LazyLock;

use agent_jobs::{
    QueueKeys, SessionId, SessionKeys,
    keys::{SESSIONS_READY, SESSIONS_STARTING},
};
use redis::Script;

pub use self::{
    dead::{DeadJob, DeadJobs, dead_jobs},
    fleet::{QueueCounts, SessionCounts, Status, WorkerRow, heartbeating, status},
};

static RETRY_DEAD: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../jobs/lua/retry_dead.lua")));

/// Puts dead jobs back on the ready list as new; `None` means every dead job. Returns the ids
/// re-queued (ids that are not dead are skipped).
pub async fn retry_dead(
    conn: &RedisConn,
    keys: &QueueKeys,
    ids: Option<Vec<String>>,
) -> redis::RedisResult<Vec<String>> {
    let mut conn = conn.clone();
    let ids = match ids {
        Some(ids) => ids,
        None => {
            redis::cmd("SMEMBERS")
                .arg(keys.dead())
                .query_async(&mut conn)
                .await?
        }
    };
    let mut requeued = Vec::new();
    for chunk in ids.chunks(1000) {
        let mut invocation = RETRY_DEAD.prepare_invoke();
        invocation
            .key(keys.dead())
            .key(keys.dead_at())
            .key(keys.active())
            .key(keys.data())
            .arg(keys.wake_channel());
        for id in chunk {
            invocation.key(keys.meta(id)).arg(id);
        }
        let done: Vec<String> = invocation.invoke_async(&mut conn).await?;
        requeued.extend(done);
    }
    Ok(requeued)
}

/// Ends a session the way the orchestrator's end-of-session handler does (contract §5): its
/// keys (`session:<id>`, its config, pid, logs, health, log file) and its entries in
/// `session:starting` / `session:ready` are deleted in one `MULTI`. The worker that runs its
/// agent notices at its next heartbeat and stops the agent. The entry in the worker's own
/// heartbeat index is left alone on purpose: a record gone *with* that entry reads as Redis
/// data loss, which makes the worker write the record again instead of stopping the agent.
/// Returns whether there was a record to delete.
pub async fn stop_session(conn: &RedisConn, id: &SessionId) -> redis::RedisResult<bool> {
    let keys = SessionKeys::new(id);
    let (deleted, _, _): (u64, u64, u64) = redis::pipe()
        .atomic()
        .del(keys.all().as_slice())
        .srem(SESSIONS_STARTING, id.as_str())
        .srem(SESSIONS_READY, id.as_str())
        .query_async(&mut conn.clone())
        .await?;
    Ok(deleted > 0)
}
