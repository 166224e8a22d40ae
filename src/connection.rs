//! The one Redis connection of a process, shared by apalis-redis and our own commands.
//!
//! `apalis_redis::connect` gives a `ConnectionManager` with a 500 ms response timeout, which
//! fails a worker on one slow script call. We build our own with the configured timeouts; it
//! multiplexes every caller over one socket and reconnects by itself after a failure. Start-up
//! waits for Redis with back-off instead of exiting, so a worker that boots before Redis does
//! not crash-loop.
//!
//! What callers hold is a [`RedisConn`] ([`primary`]): the manager of the current primary,
//! replaced when a failover demotes it (`READONLY`) or the sentinels name another
//! ([`sentinel`], with `redis.sentinels`). [`connect`] finds the primary the same way for the
//! worker and for every CLI command.
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

pub mod primary;
pub mod sentinel;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, ErrorKind, IntoConnectionInfo,
    RedisConnectionInfo, RedisError,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use tokio_util::sync::CancellationToken;

pub use self::primary::{Fault, Locator, RedisConn, Server};
use self::sentinel::Sentinels;
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
    with_tls(settings, settings.url.expose().into_connection_info()?)
}

/// A client for `host:port` with the credentials, database and TLS settings of `redis.url`,
/// adjusted by `adjust` (a sentinel's own password, say).
pub fn client_at(
    settings: &RedisSettings,
    host: &str,
    port: u16,
    adjust: impl FnOnce(RedisConnectionInfo) -> RedisConnectionInfo,
) -> redis::RedisResult<Client> {
    let info = settings.url.expose().into_connection_info()?;
    let addr = match info.addr() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host.to_owned(), port),
    };
    let redis = adjust(info.redis_settings().clone());
    with_tls(settings, info.set_addr(addr).set_redis_settings(redis))
}

fn with_tls(settings: &RedisSettings, mut info: ConnectionInfo) -> redis::RedisResult<Client> {
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

impl Locator {
    /// How `settings` say the primary is found.
    pub fn from_settings(settings: &RedisSettings) -> Self {
        if settings.sentinels.is_empty() {
            Self::Endpoint
        } else {
            Self::Sentinel(Sentinels {
                addrs: settings.sentinel_addrs(),
                master: settings.sentinel_master.clone(),
                password: settings
                    .sentinel_password
                    .is_set()
                    .then(|| settings.sentinel_password.clone()),
            })
        }
    }

    /// A client for the primary: the configured URL, or the address the sentinels give now.
    pub async fn client(&self, settings: &RedisSettings) -> redis::RedisResult<Client> {
        match self {
            Self::Endpoint => client(settings),
            Self::Sentinel(sentinels) => {
                let (host, port) = sentinels.primary(settings).await?;
                client_at(settings, &host, port, |info| info)
            }
        }
    }
}

/// `host:port` a client connects to, for logs (never with credentials); an IPv6 host in
/// brackets.
fn address(client: &Client) -> String {
    match client.get_connection_info().addr() {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. }
            if host.contains(':') =>
        {
            format!("[{host}]:{port}")
        }
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            format!("{host}:{port}")
        }
        ConnectionAddr::Unix(path) => path.display().to_string(),
        _ => "unknown".to_owned(),
    }
}

/// `redis.url` with its host and port replaced by `addr` (`host:port`, as [`Server::addr`]):
/// the credentials, database and scheme (TLS) stay. For agents under Sentinel; it carries the
/// password, so it never goes to a log.
pub fn url_at(settings: &RedisSettings, addr: &str) -> String {
    let url = settings.url.expose();
    let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let userinfo = authority
        .rsplit_once('@')
        .map(|(user, _)| format!("{user}@"))
        .unwrap_or_default();
    format!("{scheme}://{userinfo}{addr}{path}")
}

/// The manager of every long-lived connection: the configured timeouts, and reconnect
/// attempts per failure backing off up to 2 s (it keeps trying on the next command after that).
fn manager_config(settings: &RedisSettings) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(settings.response_timeout))
        .set_connection_timeout(Some(settings.connection_timeout))
        .set_number_of_retries(6)
        .set_max_delay(Duration::from_secs(2))
}

/// Opens a managed connection to the primary `locator` finds, and reads what answers there.
pub(crate) async fn open(
    settings: &RedisSettings,
    locator: &Locator,
) -> redis::RedisResult<(Client, ConnectionManager, Server)> {
    let client = locator.client(settings).await?;
    open_with(settings, client).await
}

async fn open_with(
    settings: &RedisSettings,
    client: Client,
) -> redis::RedisResult<(Client, ConnectionManager, Server)> {
    let manager = client
        .get_connection_manager_with_config(manager_config(settings))
        .await?;
    // A server that hides INFO (a managed service's restricted command set) is taken for a
    // primary: what it answers to writes says otherwise soon enough.
    let addr = address(&client);
    let server = Server::read(&mut manager.clone(), addr.clone())
        .await
        .unwrap_or(Server {
            addr,
            ..Server::default()
        });
    Ok((client, manager, server))
}

/// Connects once, failing if Redis does not answer (after the manager's own reconnect
/// attempts), or at once if it refuses the credentials. Under Sentinel, the sentinels are
/// asked for the primary first.
pub async fn connect(settings: &RedisSettings) -> Result<RedisConn, ConnectError> {
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
    let locator = Locator::from_settings(settings);
    let client = locator.client(settings).await.map_err(unreachable)?;
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
    let first = open_with(settings, client).await.map_err(unreachable)?;
    Ok(RedisConn::new(settings.clone(), locator, first))
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
) -> Option<RedisConn> {
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
    fn a_url_at_another_address_keeps_credentials_db_and_scheme() {
        let at =
            |url: &str, addr: &str| url_at(&settings(&[("AGENT_WORKER__REDIS__URL", url)]), addr);
        assert_eq!(
            at("rediss://app:p%40ss@cache:6380/2", "10.0.0.7:6379"),
            "rediss://app:p%40ss@10.0.0.7:6379/2"
        );
        assert_eq!(at("redis://cache", "[::1]:7000"), "redis://[::1]:7000");
        assert_eq!(at("redis://:pw@cache:6379/", "h:1"), "redis://:pw@h:1/");
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
