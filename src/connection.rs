//! The one Redis connection of a process, shared by apalis-redis and our own commands.
//!
//! `apalis_redis::connect` gives a `ConnectionManager` with a 500 ms response timeout, which
//! fails a worker on one slow script call. We build our own with the configured timeouts; it
//! multiplexes every caller over one socket and reconnects by itself after a failure. Start-up
//! waits for Redis with back-off instead of exiting, so a worker that boots before Redis does
//! not crash-loop.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use redis::{
    Client,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use tokio_util::sync::CancellationToken;

use crate::settings::RedisSettings;

/// When this process last saw Redis fail. Liveness in Redis is judged from heartbeats that
/// nobody can write during an outage; right after one, every worker looks dead. Takeovers and
/// sweeps wait until this process has been connected long enough for live workers to have
/// heartbeated again. Cheap to clone; shared by everything that talks to Redis.
#[derive(Debug, Clone, Default)]
pub struct RedisHealth {
    last_failure: Arc<Mutex<Option<Instant>>>,
}

impl RedisHealth {
    /// No failure seen yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Redis just failed.
    pub fn failed(&self) {
        *self.last_failure.lock().expect("health lock") = Some(Instant::now());
    }

    /// How long Redis has answered since the last failure this process saw (`Duration::MAX`
    /// if it saw none).
    pub fn connected_for(&self) -> Duration {
        self.last_failure
            .lock()
            .expect("health lock")
            .map_or(Duration::MAX, |at| at.elapsed())
    }
}

/// Opens a client for the configured URL (no I/O yet).
pub fn client(settings: &RedisSettings) -> redis::RedisResult<Client> {
    Client::open(settings.url.expose())
}

/// Connects once, failing if Redis does not answer.
pub async fn connect(settings: &RedisSettings) -> redis::RedisResult<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(settings.response_timeout))
        .set_connection_timeout(Some(settings.connection_timeout))
        // Reconnect attempts per failure, backing off up to 2 s; the manager keeps trying on
        // the next command after that.
        .set_number_of_retries(6)
        .set_max_delay(Duration::from_secs(2));
    client(settings)?
        .get_connection_manager_with_config(config)
        .await
}

/// Connects, retrying with back-off until Redis answers or `shutdown` fires (then `None`).
/// A streak of failures is logged once when it starts and once when it ends, not per attempt.
pub async fn connect_with_retry(
    settings: &RedisSettings,
    health: &RedisHealth,
    shutdown: &CancellationToken,
) -> Option<ConnectionManager> {
    let mut delay = Duration::from_millis(100);
    let mut failures = 0u32;
    loop {
        match connect(settings).await {
            Ok(conn) => {
                if failures > 0 {
                    tracing::info!(
                        redis = %settings.url,
                        failures,
                        "redis_reachable"
                    );
                }
                return Some(conn);
            }
            Err(error) => {
                health.failed();
                if failures == 0 {
                    tracing::warn!(
                        redis = %settings.url,
                        error = %error,
                        "redis_unreachable: retrying with back-off"
                    );
                }
                failures += 1;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
