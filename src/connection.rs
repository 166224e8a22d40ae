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
//!
//! TLS (`rediss://`) is rustls with the ring provider, installed once per process by
//! [`client`]. The server's certificate is checked against the system's roots or
//! `redis.tls_ca_file`; a client certificate is presented when `redis.tls_cert_file` and
//! `redis.tls_key_file` are set; `redis.tls_insecure` turns verification off. A handshake that
//! fails (an untrusted certificate, a refused client certificate, a server that does not speak
//! TLS) is as permanent as a wrong password and reported the same way, as
//! [`ConnectError::TlsFailed`] (`redis_tls_failed`).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ErrorKind, IntoConnectionInfo, RedisError,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use tokio_util::sync::CancellationToken;

use crate::settings::{RedisSettings, TlsMode};

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
    /// The TLS handshake failed: the server's certificate is not trusted (or does not name the
    /// host), the server refused our client certificate, or it does not speak TLS. Retrying
    /// cannot help until the certificates or settings are fixed.
    #[error("redis_tls_failed: TLS with Redis at {url} failed: {reason}; {hint}")]
    TlsFailed {
        /// The URL, redacted.
        url: String,
        /// What rustls said.
        reason: String,
        /// What to check.
        hint: &'static str,
    },
    /// Redis did not answer (down, unreachable, too slow).
    #[error("cannot reach Redis at {url}: {source}{hint}")]
    Unreachable {
        /// The URL, redacted.
        url: String,
        /// What else to check, or empty.
        hint: &'static str,
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

    /// True for [`ConnectError::TlsFailed`].
    pub fn is_tls_failure(&self) -> bool {
        matches!(self, Self::TlsFailed { .. })
    }

    /// True for [`ConnectError::AuthFailed`] and [`ConnectError::TlsFailed`]: failures that
    /// retrying does not fix, so a command-line call reports them at once.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::AuthFailed { .. } | Self::TlsFailed { .. })
    }
}

/// True when `error` says the credentials were refused: a failed `AUTH` (`WRONGPASS`), or a
/// command refused because none were given (`NOAUTH`).
pub fn is_auth_error(error: &RedisError) -> bool {
    error.kind() == ErrorKind::AuthenticationFailed
        || matches!(error.code(), Some("NOAUTH" | "WRONGPASS"))
}

/// The rustls error behind a failed connection, if TLS is what failed.
pub fn tls_error(error: &RedisError) -> Option<&rustls::Error> {
    /// `error` itself as rustls's error, also behind the wrappers redis-rs and tokio-rustls put
    /// around it (an `Arc`, an `io::Error`, whose own `source()` skips what it wraps).
    fn as_tls<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
        type Shared = Arc<dyn std::error::Error + Send + Sync>;
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(shared) = error.downcast_ref::<Shared>() {
            return as_tls(shared.as_ref());
        }
        error
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| as_tls(inner))
    }
    let mut source = std::error::Error::source(error);
    while let Some(current) = source {
        if let Some(tls) = as_tls(current) {
            return Some(tls);
        }
        source = current.source();
    }
    None
}

/// What to check after a TLS failure.
fn tls_hint(error: &rustls::Error) -> &'static str {
    match error {
        rustls::Error::InvalidCertificate(_) => {
            "the server's certificate must chain to redis.tls_ca_file (or, when that is unset, \
             to the system's roots) and name the host of redis.url"
        }
        rustls::Error::AlertReceived(_) => {
            "the server refused the handshake; if it requires client certificates, set \
             redis.tls_cert_file and redis.tls_key_file to one it trusts"
        }
        _ => "is the port of redis.url a TLS port (tls-port) of the server?",
    }
}

/// Installs rustls's ring provider as the process default, once (a provider installed before,
/// by us or anyone, is kept).
pub fn install_crypto_provider() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Logs how the connection is protected, once at start-up; `redis.tls_insecure` as a warning.
pub fn log_tls_mode(settings: &RedisSettings) {
    match settings.tls_mode() {
        TlsMode::Insecure => tracing::warn!(
            redis = %settings.url,
            "redis_tls_insecure: redis.tls_insecure = true, the server's certificate is NOT \
             verified; anyone on the network path can impersonate Redis and read the traffic"
        ),
        TlsMode::Off => {}
        mode => tracing::debug!(redis = %settings.url, tls = %mode, "redis_tls"),
    }
}

/// Opens a client for the configured URL (no I/O yet), with the TLS settings: a CA bundle,
/// a client certificate and verification turned off as configured. The TLS files are read
/// here, on each call.
pub fn client(settings: &RedisSettings) -> redis::RedisResult<Client> {
    let mut info = settings.url.expose().into_connection_info()?;
    if !settings.uses_tls() {
        return Client::open(info);
    }
    install_crypto_provider();
    if settings.tls_insecure
        && let ConnectionAddr::TcpTls {
            host,
            port,
            tls_params,
            ..
        } = info.addr().clone()
    {
        info = info.set_addr(ConnectionAddr::TcpTls {
            host,
            port,
            insecure: true,
            tls_params,
        });
    }
    let certificates = settings.tls_certificates().map_err(|error| {
        RedisError::from((
            ErrorKind::InvalidClientConfig,
            "TLS settings",
            error.to_string(),
        ))
    })?;
    match certificates {
        Some(certificates) => Client::build_with_tls(info, certificates),
        None => Client::open(info),
    }
}

/// Connects once, failing if Redis does not answer (after the manager's own reconnect
/// attempts), or at once if it refuses the credentials.
pub async fn connect(settings: &RedisSettings) -> Result<ConnectionManager, ConnectError> {
    let url = settings.url.redacted();
    let unreachable = |source: RedisError| ConnectError::Unreachable {
        url: url.clone(),
        // A server port without TLS never answers the handshake.
        hint: if settings.uses_tls() && source.is_timeout() {
            " (with rediss://, also check that the port is the server's TLS port)"
        } else {
            ""
        },
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
    if let Err(error) = probe.await {
        if is_auth_error(&error) {
            return Err(ConnectError::AuthFailed {
                url: url.clone(),
                reason: error.to_string(),
            });
        }
        if let Some(tls) = tls_error(&error) {
            return Err(ConnectError::TlsFailed {
                url: url.clone(),
                reason: tls.to_string(),
                hint: tls_hint(tls),
            });
        }
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
/// refused credentials are logged as `redis_auth_failed` and failed TLS handshakes as
/// `redis_tls_failed` (errors), other failures as `redis_unreachable`, and `on_failure` is
/// told which, for readiness.
pub async fn connect_with_retry(
    settings: &RedisSettings,
    health: &RedisHealth,
    shutdown: &CancellationToken,
    mut on_failure: impl FnMut(&ConnectError),
) -> Option<ConnectionManager> {
    let mut delay = Duration::from_millis(100);
    let mut failures = 0u32;
    let mut last_kind = None;
    loop {
        // A connect attempt against a Redis that is down can take seconds (the connection
        // manager's own retries): a SIGTERM meanwhile must not wait for it.
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return None,
            attempt = connect(settings) => attempt,
        };
        match attempt {
            Ok(conn) => {
                if failures > 0 {
                    tracing::info!(redis = %settings.url, failures, "redis_reachable");
                }
                return Some(conn);
            }
            Err(error) => {
                health.failed();
                on_failure(&error);
                let kind = std::mem::discriminant(&error);
                if last_kind != Some(kind) {
                    match error {
                        ConnectError::AuthFailed { .. } => {
                            tracing::error!(error = %error, "redis_auth_failed")
                        }
                        ConnectError::TlsFailed { .. } => {
                            tracing::error!(error = %error, "redis_tls_failed")
                        }
                        ConnectError::Unreachable { .. } => tracing::warn!(
                            redis = %settings.url,
                            error = %error,
                            "redis_unreachable: retrying with back-off"
                        ),
                    }
                }
                last_kind = Some(kind);
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::settings::Settings;

    fn settings(pairs: &[(&str, &str)]) -> RedisSettings {
        let env: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::load_from(None, env).unwrap().redis
    }

    #[test]
    fn clients_carry_the_tls_settings() {
        let insecure =
            |settings: &RedisSettings| match client(settings).unwrap().get_connection_info().addr()
            {
                ConnectionAddr::TcpTls { insecure, .. } => Some(*insecure),
                _ => None,
            };
        let url = ("AGENT_WORKER__REDIS__URL", "rediss://127.0.0.1:6380/");
        assert_eq!(insecure(&settings(&[url])), Some(false));
        assert_eq!(
            insecure(&settings(&[
                url,
                ("AGENT_WORKER__REDIS__TLS_INSECURE", "true")
            ])),
            Some(true)
        );
        assert_eq!(insecure(&settings(&[])), None);
    }
}
