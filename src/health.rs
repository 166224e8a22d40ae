//! Readiness: what `/readyz` answers from, and the Redis probe that keeps it current.
//!
//! - [`Health`] holds the facts readiness depends on: Redis answers (and accepts our
//!   credentials), the job worker runs, and no shutdown has begun.
//! - [`RedisProbe`] pings Redis every tick with a short timeout (so an outage flips readiness
//!   within about two ticks) and refreshes the queue depth gauges with one script call
//!   ([`crate::queue::QueueDepth`]).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use crate::connection::RedisConn;
use agent_jobs::QueueKeys;
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::{redis_error, redis_up},
    queue::QueueDepth,
};

/// Timeout of one probe command: well under the tick, so an unresponsive Redis flips
/// readiness within about two ticks instead of after `redis.response_timeout`.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// What readiness depends on. Shared as `Arc<Health>`; every flag starts false.
#[derive(Debug, Default)]
pub struct Health {
    redis: AtomicBool,
    redis_auth_failed: AtomicBool,
    redis_tls_failed: AtomicBool,
    job_worker: AtomicBool,
    draining: AtomicBool,
}

impl Health {
    /// A new state: not ready (Redis not yet answered, job worker not yet running).
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Records whether Redis answered the last probe.
    pub fn set_redis(&self, answers: bool) {
        self.redis.store(answers, Ordering::Relaxed);
    }

    /// Records whether Redis refused our credentials (the reason `/readyz` gives).
    pub fn set_redis_auth_failed(&self, refused: bool) {
        self.redis_auth_failed.store(refused, Ordering::Relaxed);
    }

    /// Whether the last connection attempt failed in its TLS handshake (an untrusted
    /// certificate, a client certificate refused, a plain-text port), which retrying alone does
    /// not fix: `/readyz` names it.
    pub fn set_redis_tls_failed(&self, failed: bool) {
        self.redis_tls_failed.store(failed, Ordering::Relaxed);
    }

    /// Records whether the apalis job worker is running (true before each run, false when a
    /// run ends).
    pub fn set_job_worker(&self, running: bool) {
        self.job_worker.store(running, Ordering::Relaxed);
    }

    /// Marks the process as shutting down: not ready from now on, for good.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Whether Redis answered the last probe.
    pub fn redis(&self) -> bool {
        self.redis.load(Ordering::Relaxed)
    }

    /// Whether the job worker is running.
    pub fn job_worker(&self) -> bool {
        self.job_worker.load(Ordering::Relaxed)
    }

    /// Ready: Redis answers, the job worker runs, and no shutdown has begun.
    pub fn is_ready(&self) -> bool {
        self.not_ready_reason().is_none()
    }

    /// Why the process is not ready, or `None` when it is.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if self.draining.load(Ordering::Relaxed) {
            Some("draining")
        } else if self.redis_auth_failed.load(Ordering::Relaxed) {
            Some("redis authentication failed")
        } else if self.redis_tls_failed.load(Ordering::Relaxed) {
            Some("redis TLS handshake failed")
        } else if !self.redis() {
            Some("redis unreachable")
        } else if !self.job_worker() {
            Some("job worker not running")
        } else {
            None
        }
    }
}

/// The Redis probe behind `/readyz`: every `every`, `PING` Redis with a [`PROBE_TIMEOUT`] (at
/// most `every`) and record the answer in `health` and [`crate::metrics::REDIS_UP`]; when it
/// answered, refresh the [`crate::metrics::QUEUE_DEPTH`] gauges of `keys` with one script call.
/// With `every` = 1 s, a Redis that goes away flips readiness within about 2 s. A failure
/// streak is logged once when it starts and once when it ends.
pub struct RedisProbe {
    conn: RedisConn,
    keys: QueueKeys,
    health: Arc<Health>,
    every: Duration,
}

impl RedisProbe {
    /// A probe of `conn` every `every`, recording into `health` and the gauges of `keys`.
    pub fn new(conn: RedisConn, keys: QueueKeys, health: Arc<Health>, every: Duration) -> Self {
        Self {
            conn,
            keys,
            health,
            every,
        }
    }

    /// Probes until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let timeout = PROBE_TIMEOUT.min(self.every);
        let mut ticker = tokio::time::interval(self.every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures = 0u64;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            match ping(&self.conn, timeout).await {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!(failures, "redis_probe_recovered");
                    }
                    failures = 0;
                    self.answered();
                    self.refresh_depth(timeout).await;
                }
                Err(error) => {
                    self.failed(error, failures == 0, timeout);
                    failures += 1;
                }
            }
        }
    }

    fn answered(&self) {
        self.health.set_redis(true);
        self.health.set_redis_auth_failed(false);
        self.health.set_redis_tls_failed(false);
        redis_up(true);
    }

    /// Records a failed probe (`error` is `None` when there was no answer in time); logs it
    /// when it is the `first` of a streak.
    fn failed(&self, error: Option<redis::RedisError>, first: bool, timeout: Duration) {
        // A password rotated under a running worker: say so, not "unreachable".
        let refused = error.as_ref().is_some_and(crate::connection::is_auth_error);
        self.health.set_redis_auth_failed(refused);
        self.health.set_redis_tls_failed(
            error
                .as_ref()
                .is_some_and(|e| crate::connection::tls_error(e).is_some()),
        );
        if first {
            let error = error.map_or_else(
                || format!("no answer within {timeout:?}"),
                |e| e.to_string(),
            );
            if refused {
                tracing::error!(error = %error, "redis_auth_failed");
            } else {
                tracing::warn!(error = %error, "redis_probe_failed");
            }
        }
        self.health.set_redis(false);
        redis_up(false);
        redis_error("ping");
    }

    async fn refresh_depth(&self, timeout: Duration) {
        match tokio::time::timeout(timeout, QueueDepth::read(&self.conn, &self.keys)).await {
            Ok(Ok(depth)) => depth.record(self.keys.queue()),
            Ok(Err(error)) => {
                tracing::debug!(error = %error, "queue_depth_failed");
                redis_error("queue_depth");
            }
            Err(_) => {
                tracing::debug!("queue_depth_timed_out");
                redis_error("queue_depth");
            }
        }
    }
}

/// `PING` within `timeout`: the error, or `None` when there was no answer in time.
async fn ping(conn: &RedisConn, timeout: Duration) -> Result<(), Option<redis::RedisError>> {
    let mut conn = conn.clone();
    let ping = redis::cmd("PING");
    match tokio::time::timeout(timeout, ping.query_async::<String>(&mut conn)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(Some(error)),
        Err(_) => Err(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_redis_and_the_job_worker_and_ends_with_draining() {
        let health = Health::new();
        assert_eq!(health.not_ready_reason(), Some("redis unreachable"));
        health.set_redis(true);
        assert_eq!(health.not_ready_reason(), Some("job worker not running"));
        health.set_job_worker(true);
        assert!(health.is_ready());
        health.set_redis(false);
        assert_eq!(health.not_ready_reason(), Some("redis unreachable"));
        health.set_redis(true);
        health.set_draining();
        assert_eq!(health.not_ready_reason(), Some("draining"));
        health.set_job_worker(true);
        assert!(!health.is_ready());
    }
}
