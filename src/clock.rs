//! One clock for every replica: Redis's.
//!
//! Staleness is decided by comparing a timestamp one process wrote (a session heartbeat, a
//! worker's presence, a claim) with the time another process reads (the sweep, a takeover).
//! With each host's own clock, a replica whose clock runs two minutes behind writes heartbeats
//! that look two minutes old to every other replica, which then sweep its live sessions and
//! cut their calls. So every timestamp comes from Redis's clock: each process measures its
//! offset to Redis `TIME` when it connects and again on every presence tick, and [`unix_now`]
//! is the local clock plus that offset. No hot path pays a round trip for it.
//!
//! apalis-redis 1.0 judges the liveness of job workers with each host's own clock (its worker
//! registry and orphan recovery), which we cannot change without vendoring it: hosts must
//! agree within `worker.orphan_timeout - worker.heartbeat_interval`, or one replica reaps the
//! others' registrations (they restart: `worker_restarted`). The offset is logged
//! (`clock_offset_from_redis`) so a host that is off can be found. Refusing to run on an
//! offset to Redis would be wrong: if Redis's own clock is off, every replica would refuse.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use redis::aio::ConnectionLike;

/// Redis's clock minus ours, in milliseconds, as last measured (0 until then).
static OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// An offset at least this large is logged: the host's clock is worth fixing.
const NOTABLE_OFFSET_MS: i64 = 2_000;

/// A sample whose round trip took longer than this says little about the offset: skipped.
const MAX_SAMPLE_RTT_MS: i64 = 1_000;

/// Unix seconds now, on Redis's clock (as of the last [`sync`]; the local clock before any).
pub fn unix_now() -> u64 {
    now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Now, on Redis's clock.
pub fn now() -> SystemTime {
    let offset = OFFSET_MS.load(Ordering::Relaxed);
    let local = SystemTime::now();
    let shift = Duration::from_millis(offset.unsigned_abs());
    if offset >= 0 {
        local + shift
    } else {
        local - shift
    }
}

/// Redis's clock minus ours, in milliseconds, as last measured.
pub fn offset_ms() -> i64 {
    OFFSET_MS.load(Ordering::Relaxed)
}

/// Measures the offset to Redis's clock (`TIME`, against the midpoint of the round trip) and
/// uses it from now on. Logs `clock_offset_from_redis` when the offset is notable and changed
/// by more than a second since it was last measured.
pub async fn sync(conn: &mut impl ConnectionLike) -> redis::RedisResult<i64> {
    let before = local_ms();
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(conn).await?;
    let after = local_ms();
    if after - before > MAX_SAMPLE_RTT_MS {
        return Ok(OFFSET_MS.load(Ordering::Relaxed));
    }
    let offset = secs * 1000 + micros / 1000 - (before + after) / 2;
    let previous = OFFSET_MS.swap(offset, Ordering::Relaxed);
    if offset.abs() >= NOTABLE_OFFSET_MS && (offset - previous).abs() > 1000 {
        // Timestamps are right either way; the host's clock is what to fix.
        tracing::warn!(offset_ms = offset, "clock_offset_from_redis");
    }
    Ok(offset)
}

/// The clock a store writes its timestamps with: Redis's ([`Clock::redis`], what the worker
/// uses), or one a test sets ([`Clock::from_fn`]). Handed to the stores when they are built,
/// so what they write does not depend on a process-wide setting the caller cannot see.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> u64 + Send + Sync>);

impl Clock {
    /// Redis's clock: [`unix_now`].
    pub fn redis() -> Self {
        Self(Arc::new(unix_now))
    }

    /// A clock that reads `now` for the time (unix seconds).
    pub fn from_fn(now: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        Self(Arc::new(now))
    }

    /// Unix seconds now, on this clock.
    pub fn unix_now(&self) -> u64 {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::redis()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({})", self.unix_now())
    }
}

fn local_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
