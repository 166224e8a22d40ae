//! The one Redis connection of a process, shared by apalis-redis and our own commands.
//!
//! `apalis_redis::connect` gives a `ConnectionManager` with a 500 ms response timeout, which
//! fails a worker on one slow script call. We build our own with the configured timeouts; it
//! multiplexes every caller over one socket and reconnects by itself after a failure. Start-up
//! waits for Redis with back-off instead of exiting, so a worker that boots before Redis does
//! not crash-loop.
//!
//! Credentials are the exception to retrying: a wrong password (or none where the server asks
//! for one) is found by a first plain connection and a `PING`, and reported at once as
//! [`ConnectError::AuthFailed`] (`redis_auth_failed`): a command-line call fails in
//! milliseconds instead of retrying for seconds, and the worker says what is wrong, keeps
//! waiting (someone may fix the secret) and answers `/readyz` with 503 meanwhile.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use redis::{
    AsyncConnectionConfig, Client, ErrorKind, RedisError,
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

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Redis rejected the credentials of `redis.url` (or wants some and got none). Retrying
    /// cannot help until the secret is fixed.
    #[error(
        "redis_auth_failed: Redis at {url} rejected the credentials in redis.url ({reason}); \
         check the password (and user) of the URL or the server's ACL"
    )]
    AuthFailed {
        /// The URL, redacted.
        url: String,
        /// What the server said.
        reason: String,
    },
    /// Redis did not answer (down, unreachable, too slow).
    #[error("cannot reach Redis at {url}: {source}")]
    Unreachable {
        /// The URL, redacted.
        url: String,
        /// The client's error.
        #[source]
        source: RedisError,
    },
}

impl ConnectError {
    /// True for [`ConnectError::AuthFailed`].
    pub fn is_auth_failure(&self) -> bool {
        matches!(self, Self::AuthFailed { .. })
    }
}

/// True when `error` says the credentials were refused: a failed `AUTH` (`WRONGPASS`), or a
/// command refused because none were given (`NOAUTH`).
pub fn is_auth_error(error: &RedisError) -> bool {
    error.kind() == ErrorKind::AuthenticationFailed
        || matches!(error.code(), Some("NOAUTH" | "WRONGPASS"))
}

/// Opens a client for the configured URL (no I/O yet).
pub fn client(settings: &RedisSettings) -> redis::RedisResult<Client> {
    Client::open(settings.url.expose())
}

/// Connects once, failing if Redis does not answer (after the manager's own reconnect
/// attempts), or at once if it refuses the credentials.
pub async fn connect(settings: &RedisSettings) -> Result<ConnectionManager, ConnectError> {
    let url = settings.url.redacted();
    let unreachable = |source| ConnectError::Unreachable {
        url: url.clone(),
        source,
    };
    let client = client(settings).map_err(unreachable)?;
    // One plain connection first: the manager below retries every failure, a refused password
    // included, for seconds.
    let probe_config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(settings.connection_timeout))
        .set_response_timeout(Some(settings.response_timeout));
    let probe = async {
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&probe_config)
            .await?;
        redis::cmd("PING").query_async::<()>(&mut conn).await
    };
    if let Err(error) = probe.await
        && is_auth_error(&error)
    {
        return Err(ConnectError::AuthFailed {
            url: url.clone(),
            reason: error.to_string(),
        });
    }
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(settings.response_timeout))
        .set_connection_timeout(Some(settings.connection_timeout))
        // Reconnect attempts per failure, backing off up to 2 s; the manager keeps trying on
        // the next command after that.
        .set_number_of_retries(6)
        .set_max_delay(Duration::from_secs(2));
    client
        .get_connection_manager_with_config(config)
        .await
        .map_err(unreachable)
}

/// Connects, retrying with back-off until Redis answers or `shutdown` fires (then `None`).
/// A streak of failures is logged once when it starts and once when it ends, not per attempt;
/// refused credentials are logged as `redis_auth_failed` (an error), other failures as
/// `redis_unreachable`, and `on_failure` is told which, for readiness.
pub async fn connect_with_retry(
    settings: &RedisSettings,
    health: &RedisHealth,
    shutdown: &CancellationToken,
    mut on_failure: impl FnMut(&ConnectError),
) -> Option<ConnectionManager> {
    let mut delay = Duration::from_millis(100);
    let mut failures = 0u32;
    let mut last_was_auth = None;
    loop {
        match connect(settings).await {
            Ok(conn) => {
                if failures > 0 {
                    tracing::info!(redis = %settings.url, failures, "redis_reachable");
                }
                return Some(conn);
            }
            Err(error) => {
                health.failed();
                on_failure(&error);
                let auth = error.is_auth_failure();
                if last_was_auth != Some(auth) {
                    if auth {
                        tracing::error!(error = %error, "redis_auth_failed");
                    } else {
                        tracing::warn!(
                            redis = %settings.url,
                            error = %error,
                            "redis_unreachable: retrying with back-off"
                        );
                    }
                }
                last_was_auth = Some(auth);
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
