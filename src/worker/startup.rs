//! The build step: what a worker needs before it may run, and what it refuses.
//!
//! In order: the HTTP listener (a taken `http.addr` is refused before Redis is tried); Redis,
//! waited for (an outage, refused credentials, a failed TLS handshake: `/readyz` names the
//! last two, and a shutdown request ends the wait with `None`); Redis's eviction policy
//! (refused unless `redis.allow_eviction`); the wake-up listener's client; Redis's clock; the
//! worker's id; the agents' containment (`agent.containment = "cgroup"` without cgroups is
//! refused). Beside the listener, nothing here starts a task, fetches a job or writes a key:
//! the [`Worker`] it returns is inspected by tests, then run ([`Worker::run`]).

use std::{net::SocketAddr, sync::Arc};

use crate::connection::RedisConn;
use agent_jobs::QueueKeys;

use super::{launcher::LauncherFactory, listener::Listener};
use crate::{
    agent::{
        containment::{self, Containment},
        limits::Limits,
    },
    clock,
    connection::{self, RedisHealth},
    dataset,
    health::Health,
    metrics, presence,
    settings::Settings,
    shutdown::Shutdown,
};

/// A process-unique worker id: `<host>-<pid>-<random>`. Written to sessions as `workerId`;
/// apalis worker names add the run number.
pub fn worker_id() -> String {
    let host = presence::host_name();
    let suffix = ulid::Ulid::generate().to_string();
    format!(
        "{host}-{}-{}",
        std::process::id(),
        &suffix[suffix.len() - 6..]
    )
}

/// Why the worker would not start.
#[derive(Debug, thiserror::Error)]
pub enum RefusedToStart {
    /// `http.addr` cannot be bound.
    #[error("cannot listen on http.addr {addr}: {source}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Redis may evict keys and `redis.allow_eviction` is not set.
    #[error("{0}")]
    EvictingRedis(String),
    /// `agent.containment = "cgroup"` and no cgroup can be created.
    #[error(transparent)]
    NoCgroup(#[from] containment::NoCgroup),
}

/// A worker that is connected and may run: built by [`Worker::build`], run by [`Worker::run`].
/// Its HTTP listener already serves; nothing else runs yet. Dropped without running, it stops
/// its listener and releases its containment.
pub struct Worker {
    pub(super) settings: Settings,
    pub(super) make_launcher: LauncherFactory,
    pub(super) shutdown: Shutdown,
    pub(super) health: Arc<Health>,
    pub(super) listener: Listener,
    pub(super) connected: Connected,
}

/// What the build step connected to and chose.
pub(super) struct Connected {
    pub(super) conn: RedisConn,
    pub(super) redis_health: RedisHealth,
    /// For the wake-up listener's own (pub/sub) connection, with the same TLS settings.
    pub(super) keys: QueueKeys,
    pub(super) id: String,
    pub(super) containment: ContainmentInUse,
}

impl Worker {
    /// Binds, connects and checks (see the module docs), and returns the worker ready to run;
    /// `None` when `shutdown` was requested while it waited for Redis (nothing to run, nothing
    /// left running); the refusal when it must not start. Its agents' launcher is built by
    /// `make_launcher` when it runs.
    pub async fn build(
        settings: Settings,
        make_launcher: LauncherFactory,
        shutdown: &Shutdown,
    ) -> Result<Option<Self>, RefusedToStart> {
        let health = Health::new();
        let listener = Listener::start(&settings, health.clone(), shutdown)
            .await
            .map_err(|source| RefusedToStart::Http {
                addr: settings.http.addr,
                source,
            })?;
        match Connected::connect(&settings, shutdown, &health, &listener).await {
            Ok(Some(connected)) => Ok(Some(Self {
                settings,
                make_launcher,
                shutdown: shutdown.clone(),
                health,
                listener,
                connected,
            })),
            // Stopped while connecting, or refused: the listener goes, and its port is free
            // when this returns.
            stopped_or_refused => {
                listener.stop().await;
                stopped_or_refused.map(|_| None)
            }
        }
    }

    /// Its id (`<host>-<pid>-<random>`), as written to sessions and presence.
    pub fn id(&self) -> &str {
        &self.connected.id
    }

    /// The address its HTTP listener bound (the real port when `http.addr` has port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.listener.addr()
    }

    /// How its agents' process trees will be contained.
    pub fn containment(&self) -> &Containment {
        &self.connected.containment.0
    }
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.id())
            .field("http_addr", &self.http_addr())
            .field("containment", &self.containment().name())
            .finish_non_exhaustive()
    }
}

impl Connected {
    /// Waits for Redis (`None` if `shutdown` comes first), then checks and chooses what the
    /// worker needs from it.
    async fn connect(
        settings: &Settings,
        shutdown: &Shutdown,
        health: &Health,
        listener: &Listener,
    ) -> Result<Option<Self>, RefusedToStart> {
        let redis_health = RedisHealth::new();
        let Some(conn) = connection::connect_with_retry(
            &settings.redis,
            &redis_health,
            &shutdown.graceful,
            |error| {
                health.set_redis_auth_failed(error.is_auth_failure());
                health.set_redis_tls_failed(error.is_tls_failure());
            },
        )
        .await
        else {
            return Ok(None);
        };
        health.set_redis_auth_failed(false);
        health.set_redis_tls_failed(false);
        listener.console().connected(conn.clone());
        check_eviction(&conn, settings).await?;
        if let Err(error) = clock::sync(&mut conn.clone()).await {
            tracing::warn!(error = %error, "clock_sync_failed");
        }
        let keys = QueueKeys::new(&settings.redis.queue).expect("redis.queue is validated");
        let id = worker_id();
        let limits = Limits::from_settings(&settings.agent);
        let containment = Containment::start(settings.agent.containment, &id, limits)?;
        Ok(Some(Self {
            conn,
            redis_health,
            keys,
            id,
            containment: ContainmentInUse(Arc::new(containment)),
        }))
    }
}

/// The worker's containment, closed (its own cgroup removed) when the worker is done with it:
/// at the end of the run, or when a built worker is dropped without running.
pub(super) struct ContainmentInUse(pub(super) Arc<Containment>);

impl Drop for ContainmentInUse {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Refuses a Redis whose `maxmemory-policy` evicts keys, unless `redis.allow_eviction`; a
/// policy that cannot be read is warned about (managed services may hide it), not refused.
async fn check_eviction(conn: &RedisConn, settings: &Settings) -> Result<(), RefusedToStart> {
    match dataset::Sample::read(conn).await {
        Ok(sample) => {
            let policy = sample.maxmemory_policy.clone().unwrap_or_default();
            metrics::redis_evicting(sample.evicts());
            if sample.maxmemory_policy.is_none() {
                tracing::warn!(
                    "redis_eviction_policy_unknown: INFO memory has no maxmemory_policy"
                );
            } else if sample.evicts() && !settings.redis.allow_eviction {
                let refusal = dataset::eviction_refusal(&policy);
                tracing::error!(policy = %policy, "redis_eviction_refused: {refusal}");
                return Err(RefusedToStart::EvictingRedis(refusal));
            } else if sample.evicts() {
                tracing::warn!(
                    policy = %policy,
                    "redis_eviction_allowed: session records may be evicted; lost ones are written again"
                );
            }
        }
        Err(error) => {
            tracing::warn!(error = %error, "redis_eviction_policy_unknown: INFO failed");
        }
    }
    Ok(())
}
