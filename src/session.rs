//! The session store: reading a session's config and writing its state (contract §1 and §3).
//!
//! Config is found by session id only: `session:<id>:config`, one `HGETALL`. There is no
//! fallback to the user-scoped `user:<name>:config` of the old system, which made two sessions
//! of one user share a voice. The read happens inside the claim (`lua/claim_session.lua`), so a
//! start costs one round trip before the launch: config, ownership check and `starting` at
//! once. A missing hash means defaults, written back in the same atomic step (so only if still
//! absent). A hash that cannot be used (wrong type, no voice, a value the agent's command line
//! cannot carry) is a permanent error naming the key and the problem.
//!
//! Each state transition is one script call or pipeline: one round trip, whatever the number
//! of fields. Every script that changes a session's status also appends the change to the
//! event stream `agent-worker:events` in that same call (`lua/session_events.lua`, the format
//! in jobs/README.md), which is what lets a producer wait for readiness without polling.
//!
//! Layout: this file holds the store (its settings, its errors, the event prologue); each
//! group of its methods is one file, in the order of a session's life:
//! - `claim`: the claim, with `claim_reply` decoding the script's reply and [`config`]
//!   validating the config it read;
//! - `ready`: a failed attempt noted, then `ready`; `record` is what the worker wrote about a
//!   running agent ([`AgentRecord`]);
//! - `liveness`: the heartbeat and the restore of lost records;
//! - `logs`: the agents' log lists;
//! - `end`: the end record;
//! - `removal`: the removal of stale and legacy sessions.

use std::time::Duration;

use agent_jobs::keys::EVENTS;
use redis::{Script, ScriptInvocation};

use crate::{
    clock::Clock,
    connection::{RedisConn, RedisHealth},
};

mod claim;
mod claim_reply;
pub mod config;
mod end;
mod liveness;
mod logs;
mod ready;
mod record;
mod removal;

pub use claim::{Claim, ClaimAttempt, Refusal, RefusalKind};
pub use end::{EndRecord, SessionEnd};
pub use liveness::HeartbeatReport;
pub use ready::{Ready, ReadyRecord};
pub use record::AgentRecord;
pub use removal::Removal;

/// The prologue of every script that changes a session's status: it appends the change to the
/// event stream, so every status change and its event are one atomic call.
const SESSION_EVENTS: &str = include_str!("lua/session_events.lua");

/// A script that changes a session's status: `lua/session_events.lua` followed by `body`. Its
/// last key must be [`EVENTS`] and its last argument the stream's bound
/// ([`SessionStore::events`] adds both).
fn session_script(body: &str) -> Script {
    Script::new(&[SESSION_EVENTS, body].concat())
}

/// Why a session's config or state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The config key holds another Redis type. Permanent.
    #[error("{key} is a Redis {found}, not a hash")]
    WrongType {
        /// The key.
        key: String,
        /// The type found (`string`, `list`, ...).
        found: String,
    },
    /// A field of the config hash cannot be used. Permanent.
    #[error("{key}: field {field} {problem}")]
    UnusableField {
        /// The key.
        key: String,
        /// The field name.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
    /// Redis failed; the same job may succeed later.
    #[error("redis error on {key}: {source}")]
    Redis {
        /// The key being read or written.
        key: String,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
}

impl SessionError {
    /// True when retrying cannot help (the data itself is wrong).
    pub fn is_permanent(&self) -> bool {
        !matches!(self, Self::Redis { .. })
    }
}

/// Reads session config and writes session state.
#[derive(Clone)]
pub struct SessionStore {
    conn: RedisConn,
    ttl: Duration,
    ended_ttl: Duration,
    config_grace: Duration,
    default_voice: String,
    log_lines: usize,
    worker_timeout: Duration,
    redis_health: RedisHealth,
    legacy_metrics: bool,
    events_max_len: u64,
    clock: Clock,
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStore")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl SessionStore {
    /// A store writing keys with `ttl`, defaulting the voice to `default_voice`, keeping
    /// `log_lines` output lines per agent.
    pub fn new(
        conn: RedisConn,
        ttl: Duration,
        default_voice: impl Into<String>,
        log_lines: usize,
    ) -> Self {
        Self {
            conn,
            ttl,
            default_voice: default_voice.into(),
            log_lines,
            worker_timeout: Duration::from_secs(15),
            redis_health: RedisHealth::new(),
            ended_ttl: Duration::from_secs(3600),
            config_grace: Duration::from_secs(60),
            legacy_metrics: false,
            events_max_len: DEFAULT_EVENTS_MAX_LEN,
            clock: Clock::redis(),
        }
    }

    /// A store as the worker's settings say: `session.ttl`, `session.ended_ttl`,
    /// `agent.default_voice`, `agent.log_lines`, `worker.orphan_timeout` and
    /// `compat.legacy_metrics`. Every command that reads or writes sessions builds it here,
    /// so none of them runs on defaults of its own.
    pub fn from_settings(conn: RedisConn, settings: &crate::settings::Settings) -> Self {
        Self::new(
            conn,
            settings.session.ttl,
            settings.agent.default_voice.clone(),
            settings.agent.log_lines,
        )
        .ended_ttl(settings.session.ended_ttl)
        .config_grace(settings.session.config_grace)
        .worker_timeout(settings.worker.orphan_timeout)
        .legacy_metrics(settings.compat.legacy_metrics)
        .events_max_len(settings.events.max_len)
    }

    /// The approximate bound of the event stream [`EVENTS`] (`events.max_len`; 10,000 unless
    /// set): every script that records a status change trims it with `XADD MAXLEN ~`.
    pub fn events_max_len(mut self, max_len: u64) -> Self {
        self.events_max_len = max_len.max(1);
        self
    }

    /// Adds what `lua/session_events.lua` expects last: the stream's key and its bound.
    fn events(&self, invocation: &mut ScriptInvocation<'_>) {
        invocation.key(EVENTS).arg(self.events_max_len);
    }

    /// How long an ended session's record stays (`session.ended_ttl`; 1 h unless set).
    pub fn ended_ttl(mut self, ttl: Duration) -> Self {
        self.ended_ttl = ttl;
        self
    }

    /// The tombstone rule's grace (`session.config_grace`; 60 s unless set): a job enqueued
    /// longer ago whose config is missing at claim starts nothing (see `claim`).
    pub fn config_grace(mut self, grace: Duration) -> Self {
        self.config_grace = grace;
        self
    }

    /// Also write the original worker's `metrics:agent:*` keys (`compat.legacy_metrics`; off
    /// unless set).
    pub fn legacy_metrics(mut self, on: bool) -> Self {
        self.legacy_metrics = on;
        self
    }

    /// Judge other workers' liveness only after this process has been connected for a while
    /// (see [`RedisHealth`]).
    pub fn redis_health(mut self, health: RedisHealth) -> Self {
        self.redis_health = health;
        self
    }

    /// The clock of the timestamps it writes (`createdAt`, `lastActive`, `endedAt`, the
    /// heartbeat index); Redis's unless set.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// How long a worker may be silent before its sessions can be taken over
    /// (`worker.orphan_timeout`; 15 s unless set).
    pub fn worker_timeout(mut self, timeout: Duration) -> Self {
        self.worker_timeout = timeout;
        self
    }

    fn ttl_secs(&self) -> u64 {
        self.ttl.as_secs().max(1)
    }
}
/// `events.max_len` of a store built without settings.
pub const DEFAULT_EVENTS_MAX_LEN: u64 = 10_000;

/// A script flag.
fn flag(on: bool) -> &'static str {
    if on { "1" } else { "0" }
}
