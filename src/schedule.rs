//! Scheduled jobs on exactly one replica per tick: the sweep and retention.
//!
//! Every replica wakes at the same wall-clock boundaries (multiples of `sweep.interval`) and
//! tries `SET agent-worker:tick-lease:sweep:<tick> <worker> NX EX <2 × interval>`; only the winner
//! sweeps. We chose this lease over apalis-cron ticks enqueued with a per-tick idempotency key:
//! both give one run per tick, but the cron route costs every replica an enqueue script
//! (SET NX, 2 × HSET, RPUSH, PUBLISH: 6 commands) and the winner a fetch and an ack, and leaves a
//! job record per tick for retention to clean, where the lease costs one `SET` per replica
//! per tick and leaves one self-expiring key. Clock skew between replicas below the lease TTL
//! cannot cause a second run: a late replica computes the same tick and finds it taken.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::connection::RedisConn;
use agent_jobs::keys::tick_lease;
use tokio_util::sync::CancellationToken;

/// Claims ticks of scheduled jobs: one replica per tick (see the module docs).
#[derive(Clone)]
pub struct TickLease {
    conn: RedisConn,
    holder: String,
}

impl std::fmt::Debug for TickLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TickLease")
            .field("holder", &self.holder)
            .finish()
    }
}

impl TickLease {
    /// Leases taken in the name of `holder` (the worker id).
    pub fn new(conn: RedisConn, holder: impl Into<String>) -> Self {
        Self {
            conn,
            holder: holder.into(),
        }
    }

    /// Claims `tick` of the job `name` for `ttl`; true if this caller won it.
    pub async fn claim(&self, name: &str, tick: u64, ttl: Duration) -> redis::RedisResult<bool> {
        let won: Option<String> = redis::cmd("SET")
            .arg(tick_lease(name, tick))
            .arg(&self.holder)
            .arg("NX")
            .arg("EX")
            .arg(ttl.as_secs().max(1))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(won.is_some())
    }
}

/// The tick a wall-clock time falls in, for a period of `interval`.
pub fn tick_of(time: SystemTime, interval: Duration) -> u64 {
    let ms = time
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    (ms / interval.as_millis().max(1)) as u64
}

/// A scheduled job: `job` runs once per tick of `interval` on exactly one replica. Errors are
/// logged and the loop goes on at the next tick.
pub struct EveryTick<F> {
    name: &'static str,
    lease: TickLease,
    interval: Duration,
    job: F,
}

impl<F, Fut> EveryTick<F>
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    /// The job `name` (the lease's name too), run as `job(tick)` by the replica that wins
    /// `lease` for the tick.
    pub fn new(name: &'static str, lease: TickLease, interval: Duration, job: F) -> Self {
        Self {
            name,
            lease,
            interval,
            job,
        }
    }

    /// Runs the job at every tick this replica wins, until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let (name, interval) = (self.name, self.interval);
        loop {
            // Sleep to the next boundary of Redis's clock, so that all replicas wake together.
            let now = crate::clock::now();
            let tick = tick_of(now, interval);
            let next_ms = (tick + 1) as u128 * interval.as_millis();
            let now_ms = now
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis();
            let wait = Duration::from_millis((next_ms - now_ms) as u64);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let tick = tick + 1;
            match self.lease.claim(name, tick, interval * 2).await {
                Ok(true) => (self.job)(tick).await,
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(job = name, tick, error = %error, "tick_lease_failed")
                }
            }
        }
    }
}
