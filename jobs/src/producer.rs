//! [`Producer`]: enqueue agent-start jobs the way the worker wants them.
//!
//! One script call per batch writes each job's payload and meta in the apalis-redis wire format,
//! claims its idempotency key (`<queue>:idempotency:session:<id>`, with a TTL) and pushes it on
//! the ready list, then publishes once on the queue's wake channel so idle workers fetch at once.
//! Jobs never go through the scheduled set (see `lua/enqueue.lua` for why). A job with a
//! relative deadline ([`AgentStart::with_start_within`]) costs one `TIME` round trip before the
//! script, so its `start_by` is on Redis's clock like the worker's comparison.

use std::{sync::LazyLock, time::Duration};

use redis::{Script, aio::ConnectionLike};

use crate::{AgentStart, QueueKeys, SessionKeys};

static ENQUEUE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/enqueue.lua")));

/// Default lifetime of an idempotency key: the default session TTL, so a session cannot be
/// started twice while it can still exist.
pub const DEFAULT_IDEMPOTENCY_TTL: Duration = Duration::from_secs(4 * 3600);

/// Written as `max_attempts` in each task's meta (apalis-redis requires the field). The worker
/// retries launches in-process and sends every permanent failure straight to the dead set; only
/// a transient Redis error while reading the session config is handed back to apalis-redis,
/// which reschedules it (it ignores `max_attempts` and allows up to 25 attempts).
pub const MAX_ATTEMPTS: u32 = 1;

/// What happened to one enqueued job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    /// The task id holding the job: the new one, or the existing one for a duplicate.
    pub task_id: String,
    /// True when the session was already enqueued within the idempotency TTL and nothing new
    /// was written.
    pub duplicate: bool,
}

/// Why an enqueue failed.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// Redis refused or could not be reached. An idempotency key holding something other than
    /// a task id fails the call with an error naming the key, and nothing of the call is
    /// written (the script claims every key before it writes any job and releases its claims).
    #[error("enqueue failed: {0}")]
    Redis(#[from] redis::RedisError),
    /// The script answered something this code does not understand (a version mismatch).
    #[error("enqueue script returned an unexpected reply: {0}")]
    UnexpectedReply(String),
}

/// Enqueues [`AgentStart`] jobs onto one queue.
#[derive(Debug, Clone)]
pub struct Producer<C> {
    conn: C,
    keys: QueueKeys,
    idempotency_ttl: Duration,
}

impl<C> Producer<C>
where
    C: ConnectionLike + Clone + Send + Sync,
{
    /// A producer for the queue `keys`, over `conn` (typically a
    /// `redis::aio::ConnectionManager`, which is cheap to clone and shares one connection).
    pub fn new(conn: C, keys: QueueKeys) -> Self {
        Self {
            conn,
            keys,
            idempotency_ttl: DEFAULT_IDEMPOTENCY_TTL,
        }
    }

    /// How long a session stays deduplicated after it was enqueued (at least one second).
    pub fn idempotency_ttl(mut self, ttl: Duration) -> Self {
        self.idempotency_ttl = ttl.max(Duration::from_secs(1));
        self
    }

    /// The queue this producer writes to.
    pub fn keys(&self) -> &QueueKeys {
        &self.keys
    }

    /// Enqueues one job. A session already enqueued within the TTL is not enqueued again.
    pub async fn enqueue(&self, job: &AgentStart) -> Result<Enqueued, ProduceError> {
        let mut out = self.enqueue_many(std::slice::from_ref(job)).await?;
        out.pop()
            .ok_or_else(|| ProduceError::UnexpectedReply("empty reply".into()))
    }

    /// Enqueues many jobs in one round trip, atomically. Returns one [`Enqueued`] per job, in
    /// order. Two jobs of the same session in one batch are stored once.
    pub async fn enqueue_many(&self, jobs: &[AgentStart]) -> Result<Vec<Enqueued>, ProduceError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let redis_now_ms = match jobs.iter().any(needs_clock) {
            true => Some(redis_time_ms(&mut conn).await?),
            false => None,
        };
        let mut invocation = ENQUEUE.prepare_invoke();
        invocation
            .key(self.keys.data())
            .key(self.keys.active())
            .arg(self.idempotency_ttl.as_secs().max(1))
            .arg(MAX_ATTEMPTS)
            .arg(self.keys.wake_channel());
        for job in jobs {
            let task_id = ulid::Ulid::generate().to_string();
            let idempotency = idempotency_key(job);
            invocation
                .key(self.keys.meta(&task_id))
                .key(self.keys.idempotency(&idempotency))
                .arg(task_id)
                .arg(resolved(job, redis_now_ms).to_wire())
                .arg(idempotency);
        }
        let reply: Vec<redis::Value> = invocation.invoke_async(&mut conn).await?;
        parse_reply(reply, jobs.len())
    }
}

/// A relative deadline with no absolute one: `start_by` must come from Redis's clock.
fn needs_clock(job: &AgentStart) -> bool {
    job.start_by.is_none() && job.start_within.is_some()
}

/// `job` with its relative deadline turned into `start_by` (`now_ms` is Redis's `TIME`).
fn resolved(job: &AgentStart, now_ms: Option<i64>) -> std::borrow::Cow<'_, AgentStart> {
    match (job.start_within, now_ms) {
        (Some(within), Some(now)) if job.start_by.is_none() => {
            let within = i64::try_from(within.as_millis()).unwrap_or(i64::MAX);
            std::borrow::Cow::Owned(job.clone().with_start_by(now.saturating_add(within)))
        }
        _ => std::borrow::Cow::Borrowed(job),
    }
}

/// Redis's clock in unix milliseconds: the one clock every producer and worker shares, so a
/// producer host's skew never moves a deadline.
async fn redis_time_ms<C: ConnectionLike>(conn: &mut C) -> Result<i64, ProduceError> {
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(conn).await?;
    Ok(secs * 1000 + micros / 1000)
}

/// The idempotency key of a job: one agent per session, whoever enqueues it
/// ([`SessionKeys::job_idempotency_key`]).
pub fn idempotency_key(job: &AgentStart) -> String {
    SessionKeys::new(&job.session_id).job_idempotency_key()
}

fn parse_reply(reply: Vec<redis::Value>, expected: usize) -> Result<Vec<Enqueued>, ProduceError> {
    if reply.len() != expected * 2 {
        return Err(ProduceError::UnexpectedReply(format!(
            "{} values for {expected} jobs",
            reply.len()
        )));
    }
    reply
        .chunks_exact(2)
        .map(|pair| {
            let new = redis::from_redis_value_ref::<i64>(&pair[0])
                .map_err(|e| ProduceError::UnexpectedReply(e.to_string()))?;
            let task_id = redis::from_redis_value_ref::<String>(&pair[1])
                .map_err(|e| ProduceError::UnexpectedReply(e.to_string()))?;
            Ok(Enqueued {
                task_id,
                duplicate: new == 0,
            })
        })
        .collect()
}
