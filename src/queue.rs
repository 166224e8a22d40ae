//! Our own commands on the apalis-redis queue, where its defaults would hurt us.
//!
//! - [`QueueOps::promote_due`]: move due jobs from the scheduled set to the ready list in
//!   bounded chunks, before apalis-redis's fetch tries to move them all at once and crashes
//!   (`lua/promote_due.lua`).
//! - [`QueueOps::recover_inflight`]: re-queue the jobs of one of our workers that just died,
//!   without waiting for the orphan timeout, quarantining unreadable ones, and those at the
//!   head of the ready list (`lua/recover_inflight.lua`): jobs whose data Redis lost go to the
//!   dead set with the reason, never kill one run after another, never stay inflight.
//! - [`QueueDepth::read`]: the queue's depth by state, in one consistent snapshot
//!   (`lua/queue_depth.lua`), for the `agent_worker_queue_depth` gauges.

use crate::connection::RedisConn;
use std::sync::LazyLock;

use agent_jobs::QueueKeys;
use redis::Script;

use crate::clock::Clock;

static PROMOTE_DUE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/promote_due.lua")));
static RECOVER_INFLIGHT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/recover_inflight.lua")));

/// Ids moved per promotion call: well below the ~8,000 that break apalis-redis's fetch, and
/// small enough to keep one script call short.
pub const PROMOTE_CHUNK: usize = 1000;

/// Ids at the head of the ready list that [`QueueOps::recover_inflight`] checks: what the next
/// fetches take (`worker.batch_size` each), in one short script call.
pub const RECOVER_HEAD_CHECK: usize = 1000;

/// What [`QueueOps::recover_inflight`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recovered {
    /// Jobs put back at the head of the ready list.
    pub requeued: u64,
    /// Unreadable jobs (the dead worker's, and at the head of the ready list) moved to the dead
    /// set.
    pub quarantined: u64,
}

/// Queue maintenance commands.
#[derive(Clone)]
pub struct QueueOps {
    conn: RedisConn,
    keys: QueueKeys,
    clock: Clock,
}

impl std::fmt::Debug for QueueOps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueOps")
            .field("queue", &self.keys.queue())
            .finish()
    }
}

impl QueueOps {
    /// Commands on the queue `keys`.
    pub fn new(conn: RedisConn, keys: QueueKeys) -> Self {
        Self {
            conn,
            keys,
            clock: Clock::redis(),
        }
    }

    /// The clock that decides which scheduled jobs are due and stamps recoveries; Redis's
    /// unless set.
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Moves every due scheduled job to the ready list, [`PROMOTE_CHUNK`] per call. Returns
    /// how many moved.
    pub async fn promote_due(&self) -> redis::RedisResult<u64> {
        let mut total = 0;
        loop {
            let moved: u64 = PROMOTE_DUE
                .key(self.keys.scheduled())
                .key(self.keys.active())
                .arg(self.clock.unix_now())
                .arg(PROMOTE_CHUNK)
                .invoke_async(&mut self.conn.clone())
                .await?;
            total += moved;
            if moved < PROMOTE_CHUNK as u64 {
                return Ok(total);
            }
        }
    }

    /// Re-queues the jobs fetched by the dead worker `worker` and deregisters it; moves the
    /// unreadable ones among them and among the first [`RECOVER_HEAD_CHECK`] ready jobs to the
    /// dead set.
    pub async fn recover_inflight(&self, worker: &str) -> redis::RedisResult<Recovered> {
        let (requeued, quarantined): (u64, u64) = RECOVER_INFLIGHT
            .key(self.keys.inflight(worker))
            .key(self.keys.active())
            .key(self.keys.data())
            .key(self.keys.dead())
            .key(self.keys.workers())
            .key(self.keys.worker_metadata(worker))
            .arg(self.keys.meta_prefix())
            .arg(worker)
            .arg(self.clock.unix_now())
            .arg(RECOVER_HEAD_CHECK)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(Recovered {
            requeued,
            quarantined,
        })
    }
}

/// Depth of one job queue, as read by [`QueueDepth::read`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueDepth {
    /// Ready task ids (`<queue>:active`).
    pub ready: u64,
    /// Task ids waiting for their due time (`<queue>:scheduled`).
    pub scheduled: u64,
    /// Task ids fetched by a registered worker and not yet acknowledged.
    pub inflight: u64,
    /// Failed task ids (`<queue>:dead`).
    pub dead: u64,
    /// Finished task ids (`<queue>:done`), until retention trims them.
    pub done: u64,
}

static QUEUE_DEPTH_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/queue_depth.lua")));

impl QueueDepth {
    /// Reads the depth of the queue `keys` in one round trip (`lua/queue_depth.lua`).
    pub async fn read(conn: &RedisConn, keys: &QueueKeys) -> redis::RedisResult<Self> {
        let (ready, scheduled, inflight, dead, done): (u64, u64, u64, u64, u64) =
            QUEUE_DEPTH_SCRIPT
                .key(keys.active())
                .key(keys.scheduled())
                .key(keys.workers())
                .key(keys.dead())
                .key(keys.done())
                .arg(keys.inflight_prefix())
                .invoke_async(&mut conn.clone())
                .await?;
        Ok(Self {
            ready,
            scheduled,
            inflight,
            dead,
            done,
        })
    }

    /// Sets the [`crate::metrics::QUEUE_DEPTH`] gauges of `queue`.
    pub fn record(&self, queue: &str) {
        for (state, value) in [
            ("ready", self.ready),
            ("scheduled", self.scheduled),
            ("inflight", self.inflight),
            ("dead", self.dead),
            ("done", self.done),
        ] {
            metrics::gauge!(crate::metrics::QUEUE_DEPTH, "queue" => queue.to_owned(), "state" => state).set(value as f64);
        }
    }
}
