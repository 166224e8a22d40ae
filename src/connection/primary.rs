//! [`RedisConn`]: the process's one connection to Redis, which follows the primary through a
//! failover.
//!
//! redis-rs's `ConnectionManager` reconnects after an I/O error, to the one address its client
//! was built with. Two things it does not do are what a failover needs:
//! - **Behind one endpoint** (ElastiCache, Memorystore, Azure), the old primary is demoted to a
//!   replica and keeps its open connections: every write on them answers `-READONLY`, an
//!   ordinary error reply to the manager, so it never reconnects, and the worker would stay on
//!   the replica for good (no new call starts, heartbeats never reach the new primary).
//! - **Under Sentinel**, the primary's address itself changes: reconnecting to the old one lands
//!   on a replica (or on nothing).
//!
//! So every command goes through [`RedisConn`], which holds the current manager and replaces
//! it when a reply says the server is not a usable primary: `READONLY`, `LOADING`,
//! `MASTERDOWN`, and under Sentinel also a reset connection (the sentinels kill clients on a
//! failover) or an announced `+switch-master` ([`super::sentinel`]). The replacement locates
//! the primary again (a new TCP connection to the endpoint, which resolves it again; or a fresh
//! question to the sentinels), checks with `INFO` that what answers is a primary, and only then
//! swaps it in. A command refused with one of those replies was not executed, so it is sent
//! once more on the new connection: a failover costs latency, not an error. A command whose
//! connection was reset may or may not have run, so its error goes back to the caller, whose
//! own retry decides (as after any outage).
//!
//! Moving is single-flight (callers that hit the same fault wait for one attempt) and at most
//! one attempt per [`MIN_GAP`] (a demoted primary answers `READONLY` until the endpoint moves,
//! which may take seconds). A move to another server is logged once as `redis_failover`, with
//! the old and the new server and the reason, and counted in `agent_worker_redis_failovers_total`.
//!
//! Everything else that talks to Redis (the wake-up subscriber's own connection, agents'
//! `REDIS_URL` under Sentinel) asks this handle for the current primary ([`RedisConn::client`])
//! and watches [`RedisConn::moves`] to follow it.

use std::{
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use futures::StreamExt;
use redis::{
    Client, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, Value,
    aio::{ConnectionLike, ConnectionManager},
};
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;

use super::sentinel::Sentinels;
use crate::{metrics, settings::RedisSettings};

/// Pause before subscribing again after a sentinel failed or closed the subscription.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// Shortest time between two attempts to move to another primary.
pub const MIN_GAP: Duration = Duration::from_millis(500);

/// Why the connection may have to move to another server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `-READONLY`: the server is a replica now (a demoted primary).
    ReadOnly,
    /// `-LOADING`: the server is loading its dataset (a restart, or a replica resyncing).
    Loading,
    /// `-MASTERDOWN`: a replica that lost its primary.
    MasterDown,
    /// The connection broke (reset, refused, closed).
    Reset,
    /// The sentinels announced a new primary (`+switch-master`).
    Announced,
}

impl Fault {
    /// The fault a server error code names, if it is one that moving may cure.
    fn of_code(code: &str) -> Option<Self> {
        match code {
            "READONLY" => Some(Self::ReadOnly),
            "LOADING" => Some(Self::Loading),
            "MASTERDOWN" => Some(Self::MasterDown),
            _ => None,
        }
    }

    /// The fault in a reply: redis-rs hands error replies back as values
    /// (`Value::ServerError`), turned into errors only when the caller converts them; in a
    /// pipeline's (or a transaction's) replies, the first such.
    fn in_reply(value: &Value) -> Option<Self> {
        match value {
            Value::ServerError(error) => Self::of_code(error.code()),
            Value::Array(items) => items.iter().find_map(Self::in_reply),
            _ => None,
        }
    }

    /// The fault `error` reports, if it is one that moving may cure.
    pub fn of(error: &RedisError) -> Option<Self> {
        if let Some(fault) = error.code().and_then(Self::of_code) {
            return Some(fault);
        }
        if error.kind() == ErrorKind::Io
            && (error.is_connection_dropped() || error.is_connection_refusal())
        {
            return Some(Self::Reset);
        }
        None
    }

    /// The server refused the command without running it: sending it again elsewhere is safe.
    pub fn refused(self) -> bool {
        matches!(self, Self::ReadOnly | Self::Loading | Self::MasterDown)
    }

    /// The stable name logged and counted.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReadOnly => "readonly",
            Self::Loading => "loading",
            Self::MasterDown => "masterdown",
            Self::Reset => "reset",
            Self::Announced => "announced",
        }
    }
}

/// How the primary is found.
#[derive(Debug, Clone)]
pub enum Locator {
    /// `redis.url` names it: a single server, or a managed service's primary endpoint whose
    /// name moves to the new primary on a failover.
    Endpoint,
    /// The sentinels name it (`redis.sentinels`, `redis.sentinel_master`).
    Sentinel(Sentinels),
}

/// What a connection is connected to, as far as the worker can tell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Server {
    /// `host:port` it was reached at.
    pub addr: String,
    /// Its `run_id` (changes with every restart; differs between servers).
    pub run_id: String,
    /// Its `role` from `INFO replication` (`master`, `slave`).
    pub role: String,
}

impl Server {
    /// Reads `INFO` on `conn`.
    pub(super) async fn read(
        conn: &mut impl ConnectionLike,
        addr: String,
    ) -> redis::RedisResult<Self> {
        let text: String = redis::cmd("INFO").query_async(conn).await?;
        let mut server = Server {
            addr,
            ..Self::default()
        };
        for line in text.lines() {
            match line.trim_end().split_once(':') {
                Some(("run_id", value)) => server.run_id = value.to_owned(),
                Some(("role", value)) => server.role = value.to_owned(),
                _ => {}
            }
        }
        Ok(server)
    }

    /// True for a primary (or a server that does not say: a managed service may hide it).
    pub fn is_primary(&self) -> bool {
        self.role.is_empty() || self.role == "master"
    }
}

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let run = &self.run_id[..self.run_id.len().min(12)];
        write!(f, "{} (run_id {run}, role {})", self.addr, self.role)
    }
}

/// One connection to one server.
struct Link {
    /// Bumped on every move; a caller that saw a fault on generation `n` asks to move only if
    /// the link is still `n`.
    generation: u64,
    manager: ConnectionManager,
    client: Client,
    server: Server,
}

struct Shared {
    settings: RedisSettings,
    locator: Locator,
    link: RwLock<Arc<Link>>,
    /// Held while an attempt to move runs; holds the earliest time of the next attempt.
    moving: Mutex<Instant>,
    moves: watch::Sender<u64>,
}

/// The connection to the current primary (see the module docs). Cheap to clone: every clone
/// shares one connection, and a move made by one is seen by all.
#[derive(Clone)]
pub struct RedisConn {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConn")
            .field("server", &self.link().server.addr)
            .finish_non_exhaustive()
    }
}

impl RedisConn {
    /// Wraps a first connection, made by [`super::connect`] to `server` through `client`.
    pub(super) fn new(
        settings: RedisSettings,
        locator: Locator,
        (client, manager, server): (Client, ConnectionManager, Server),
    ) -> Self {
        let link = Link {
            generation: 0,
            manager,
            client,
            server,
        };
        Self {
            shared: Arc::new(Shared {
                settings,
                locator,
                link: RwLock::new(Arc::new(link)),
                moving: Mutex::new(Instant::now()),
                moves: watch::Sender::new(0),
            }),
        }
    }

    fn link(&self) -> Arc<Link> {
        self.shared.link.read().expect("link lock").clone()
    }

    /// A client for the current primary, for connections of another kind (pub/sub).
    pub fn client(&self) -> Client {
        self.link().client.clone()
    }

    /// The server the connection is on now.
    pub fn server(&self) -> Server {
        self.link().server.clone()
    }

    /// Changes (to the number of moves so far) each time the connection moves to another
    /// server: a connection of another kind should then be made again with [`Self::client`].
    pub fn moves(&self) -> watch::Receiver<u64> {
        self.shared.moves.subscribe()
    }

    /// The number of moves so far (what [`Self::follow`] compares with).
    pub fn generation(&self) -> u64 {
        self.link().generation
    }

    /// How the primary is found.
    pub fn locator(&self) -> &Locator {
        &self.shared.locator
    }

    /// Moves to the current primary if the connection is still on generation `seen` and the
    /// last attempt is at least [`MIN_GAP`] old. Returns once the attempt (this caller's, or
    /// the one in flight) is over.
    pub async fn follow(&self, seen: u64, fault: Fault) {
        let mut next_attempt = self.shared.moving.lock().await;
        let old = self.link();
        // The sentinels' announcement is authoritative, and rare: it never waits for the gap.
        if old.generation != seen || (fault != Fault::Announced && Instant::now() < *next_attempt) {
            return;
        }
        *next_attempt = Instant::now() + MIN_GAP;
        // Behind an endpoint a reset is the manager's own business: it reconnects to the same
        // name, which resolves again, and lands on whatever serves it now.
        if fault == Fault::Reset && matches!(self.shared.locator, Locator::Endpoint) {
            return;
        }
        match super::open(&self.shared.settings, &self.shared.locator).await {
            Ok((client, manager, server)) if server.is_primary() && server != old.server => {
                metrics::redis_failover(fault.as_str());
                tracing::warn!(
                    from = %old.server,
                    to = %server,
                    reason = fault.as_str(),
                    "redis_failover"
                );
                let generation = old.generation + 1;
                *self.shared.link.write().expect("link lock") = Arc::new(Link {
                    generation,
                    manager,
                    client,
                    server,
                });
                self.shared.moves.send_replace(generation);
            }
            // The same server (its connection broke and came back; an announcement we had
            // followed already): the link stays, and the new connection is dropped.
            Ok((_, _, server)) if server.is_primary() => {}
            Ok((_, _, server)) => tracing::debug!(
                server = %server,
                reason = fault.as_str(),
                "redis_primary_not_yet_moved"
            ),
            Err(error) => tracing::debug!(
                error = %error,
                reason = fault.as_str(),
                "redis_primary_unreachable"
            ),
        }
    }

    /// Until `shutdown`: subscribed to `+switch-master` on one sentinel at a time, moves to the
    /// new primary as soon as the sentinels announce a failover of ours.
    pub async fn follow_announcements(self, sentinels: Sentinels, shutdown: CancellationToken) {
        let (conn, settings) = (&self, &self.shared.settings);
        for (host, port) in sentinels.addrs.iter().cycle() {
            let subscribed = async {
                let mut pubsub = sentinels
                    .client(settings, host, *port)?
                    .get_async_pubsub()
                    .await?;
                pubsub.subscribe("+switch-master").await?;
                Ok::<_, RedisError>(pubsub)
            };
            let pubsub = tokio::select! {
                _ = shutdown.cancelled() => return,
                pubsub = subscribed => pubsub,
            };
            match pubsub {
                Ok(pubsub) => {
                    let mut messages = pubsub.into_on_message();
                    loop {
                        let message = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            message = messages.next() => message,
                        };
                        let Some(message) = message else { break };
                        // `<name> <old ip> <old port> <new ip> <new port>`
                        let payload: String = message.get_payload().unwrap_or_default();
                        if payload.split(' ').next() == Some(sentinels.master.as_str()) {
                            tracing::info!(sentinel = %format!("{host}:{port}"), announcement = %payload, "redis_sentinel_switch_master");
                            conn.follow(conn.generation(), Fault::Announced).await;
                        }
                    }
                }
                Err(error) => tracing::debug!(
                    sentinel = %format!("{host}:{port}"),
                    error = %error,
                    "redis_sentinel_unreachable"
                ),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RESUBSCRIBE_AFTER) => {}
            }
        }
    }

    /// Sends `request` on the current link; on a fault that moving may cure, moves and, when
    /// the server refused the request without running it, sends it once more.
    async fn send<R: Request>(&self, request: R) -> redis::RedisResult<R::Reply> {
        let link = self.link();
        let reply = request.send(&mut link.manager.clone()).await;
        let fault = match &reply {
            Ok(reply) => R::fault(reply),
            Err(error) => Fault::of(error),
        };
        let Some(fault) = fault else {
            return reply;
        };
        self.follow(link.generation, fault).await;
        let moved = self.link();
        if !fault.refused() || moved.generation == link.generation {
            return reply;
        }
        request.send(&mut moved.manager.clone()).await
    }
}

/// What a caller sends: one command ([`One`]) or a pipeline ([`Many`]).
trait Request: Copy {
    type Reply;
    /// A fault the server reported in a reply (not as an error).
    fn fault(reply: &Self::Reply) -> Option<Fault>;
    fn send<'m>(self, manager: &'m mut ConnectionManager) -> RedisFuture<'m, Self::Reply>
    where
        Self: 'm;
}

#[derive(Clone, Copy)]
struct One<'a>(&'a Cmd);

impl Request for One<'_> {
    type Reply = Value;
    fn fault(reply: &Value) -> Option<Fault> {
        Fault::in_reply(reply)
    }
    fn send<'m>(self, manager: &'m mut ConnectionManager) -> RedisFuture<'m, Value>
    where
        Self: 'm,
    {
        manager.req_packed_command(self.0)
    }
}

#[derive(Clone, Copy)]
struct Many<'a>(&'a Pipeline, usize, usize);

impl Request for Many<'_> {
    type Reply = Vec<Value>;
    fn fault(replies: &Vec<Value>) -> Option<Fault> {
        replies.iter().find_map(Fault::in_reply)
    }
    fn send<'m>(self, manager: &'m mut ConnectionManager) -> RedisFuture<'m, Vec<Value>>
    where
        Self: 'm,
    {
        manager.req_packed_commands(self.0, self.1, self.2)
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move { self.send(One(cmd)).await })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move { self.send(Many(pipeline, offset, count)).await })
    }

    fn get_db(&self) -> i64 {
        self.link().manager.get_db()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(bytes: &[u8]) -> Value {
        redis::parse_redis_value(bytes).expect("a RESP reply")
    }

    #[test]
    fn replies_that_mean_another_server_is_the_primary_are_faults() {
        for (resp, fault) in [
            (
                &b"-READONLY You can't write against a read only replica.\r\n"[..],
                Fault::ReadOnly,
            ),
            (
                b"-LOADING Redis is loading the dataset in memory\r\n",
                Fault::Loading,
            ),
            (
                b"-MASTERDOWN Link with MASTER is down\r\n",
                Fault::MasterDown,
            ),
        ] {
            assert_eq!(Fault::in_reply(&reply(resp)), Some(fault));
            assert!(fault.refused(), "{fault:?}: not run, so sent again");
        }
        // In a pipeline's (or EXEC's) replies too.
        let exec = reply(b"*2\r\n+OK\r\n-READONLY no\r\n");
        assert_eq!(Fault::in_reply(&exec), Some(Fault::ReadOnly));
        for other in [
            &b"-ERR wrong\r\n"[..],
            b"-NOSCRIPT x\r\n",
            b"+OK\r\n",
            b":1\r\n",
        ] {
            assert_eq!(Fault::in_reply(&reply(other)), None);
        }
        assert!(!Fault::Reset.refused(), "a reset command may have run");
    }
}
