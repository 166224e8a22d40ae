//! Redis as production runs it, for the failover tests: a primary with a replica behind a
//! loopback endpoint that leads *new* connections to the current primary (a managed service's
//! primary endpoint), and Sentinel (three sentinels, quorum 2).
//!
//! A failover is made the way the services make a planned one: the replica is promoted
//! (`REPLICAOF NO ONE`), the old primary is demoted (`REPLICAOF <new>`) and keeps its open
//! connections, which now answer every write with `-READONLY`; then the endpoint moves.

use std::{
    net::TcpListener as StdListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_worker::cli::local_redis::LocalRedis;
use redis::aio::MultiplexedConnection;
use tokio::net::{TcpListener, TcpStream};

use super::wait_for;

/// Deadline of each wait for the servers and sentinels to settle.
const WAIT: Duration = Duration::from_secs(30);

/// A loopback TCP endpoint that forwards each new connection to the port it currently
/// points at; connections made before a [`Endpoint::point_at`] stay where they were.
pub struct Endpoint {
    port: u16,
    target: Arc<Mutex<u16>>,
    /// Dropping it stops the forwarding runtime, which closes every forwarded connection.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        // Tests drop it inside their own runtime, where blocking on a shutdown is not allowed.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Endpoint {
    /// An endpoint leading to `target` (a port on 127.0.0.1).
    pub fn start(target: u16) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for the endpoint");
        let listener = StdListener::bind("127.0.0.1:0").expect("bind the endpoint");
        listener.set_nonblocking(true).expect("non-blocking");
        let port = listener.local_addr().expect("its address").port();
        let target = Arc::new(Mutex::new(target));
        let current = target.clone();
        runtime.spawn(async move {
            let listener = TcpListener::from_std(listener).expect("tokio listener");
            while let Ok((mut inbound, _)) = listener.accept().await {
                let to = *current.lock().expect("target lock");
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", to)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self {
            port,
            target,
            runtime: Some(runtime),
        }
    }

    /// New connections go to `target` from now on.
    pub fn point_at(&self, target: u16) {
        *self.target.lock().expect("target lock") = target;
    }

    /// The endpoint's URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

/// A connection of the test's own, straight to one server.
pub async fn direct(redis: &LocalRedis) -> MultiplexedConnection {
    redis::Client::open(redis.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

/// `INFO replication`'s `role`, and for a replica whether its link to the primary is up.
async fn replication(conn: &mut MultiplexedConnection) -> (String, bool) {
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query_async(conn)
        .await
        .expect("INFO replication");
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.trim_end().strip_prefix(name)?.strip_prefix(':'))
            .unwrap_or_default()
            .to_owned()
    };
    (field("role"), field("master_link_status") == "up")
}

/// Waits until `replica` replicates from its primary with the link up.
pub async fn wait_replicating(replica: &LocalRedis) {
    let conn = direct(replica).await;
    wait_for("the replica's link to its primary is up", WAIT, || {
        let mut conn = conn.clone();
        async move { (replication(&mut conn).await == ("slave".to_owned(), true)).then_some(()) }
    })
    .await;
}

/// A primary, its replica, and an endpoint that leads to the primary.
pub struct ReplicatedRedis {
    /// The first primary.
    pub a: LocalRedis,
    /// The first replica.
    pub b: LocalRedis,
    /// What the worker connects to.
    pub endpoint: Endpoint,
}

impl ReplicatedRedis {
    /// `a` primary, `b` its replica (link up), the endpoint leading to `a`.
    pub async fn start() -> Self {
        let a = LocalRedis::start().await.expect("redis-server a");
        let port = a.port().to_string();
        let b = LocalRedis::start_with(&["--replicaof", "127.0.0.1", &port])
            .await
            .expect("redis-server b");
        wait_replicating(&b).await;
        let endpoint = Endpoint::start(a.port());
        Self { a, b, endpoint }
    }

    /// The planned failover of a managed service: `b` promoted, `a` demoted to its replica
    /// (its open connections stay, and answer writes with READONLY), then the endpoint leads
    /// new connections to `b`.
    pub async fn fail_over_to_b(&self) {
        self.promote_b().await;
        self.demote_a().await;
    }

    /// The first half: `b` stops replicating and takes writes. Until [`Self::demote_a`],
    /// whatever is written to `a` never reaches `b`: the few seconds an asynchronous replica
    /// lags behind, made as long as a test needs.
    pub async fn promote_b(&self) {
        let _: () = redis::cmd("REPLICAOF")
            .arg("NO")
            .arg("ONE")
            .query_async(&mut direct(&self.b).await)
            .await
            .expect("promote b");
    }

    /// The second half: `a` becomes `b`'s replica (its dataset replaced by `b`'s), and the
    /// endpoint leads new connections to `b`.
    pub async fn demote_a(&self) {
        let _: () = redis::cmd("REPLICAOF")
            .arg("127.0.0.1")
            .arg(self.b.port())
            .query_async(&mut direct(&self.a).await)
            .await
            .expect("demote a");
        self.endpoint.point_at(self.b.port());
    }
}

/// Connections of `kind` (`normal`, `pubsub`) to `redis`, other than the caller's own and the
/// sentinels' (named `sentinel-…`).
pub async fn clients(redis: &LocalRedis, kind: &str) -> usize {
    let mut conn = direct(redis).await;
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg(kind)
        .query_async(&mut conn)
        .await
        .expect("CLIENT LIST");
    let me: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut conn)
        .await
        .expect("CLIENT ID");
    list.lines()
        .filter(|line| !line.starts_with(&format!("id={me} ")))
        .filter(|line| !line.contains(" name=sentinel-"))
        .count()
}

/// A `redis-server --sentinel` on a free port, killed when dropped.
pub struct Sentinel {
    port: u16,
    dir: PathBuf,
    child: Child,
}

impl Sentinel {
    /// A sentinel watching the primary `master` at `primary_port` with `quorum`, declaring it
    /// down after 2 s.
    pub async fn start(master: &str, primary_port: u16, quorum: u32) -> Self {
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(format!(
            "agent-worker-sentinel-{}-{}",
            std::process::id(),
            ulid::Ulid::generate()
        ));
        std::fs::create_dir_all(&dir).expect("sentinel dir");
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {master} 127.0.0.1 {primary_port} {quorum}\n\
                 sentinel down-after-milliseconds {master} 2000\n\
                 sentinel failover-timeout {master} 10000\n\
                 sentinel parallel-syncs {master} 1\n",
                dir = dir.display()
            ),
        )
        .expect("sentinel.conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server --sentinel");
        let sentinel = Self { port, dir, child };
        let url = sentinel.url();
        wait_for("the sentinel answers PING", WAIT, || {
            let url = url.clone();
            async move {
                let client = redis::Client::open(url).ok()?;
                let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .ok()
            }
        })
        .await;
        sentinel
    }

    /// `host:port`, as `redis.sentinels` takes it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The sentinel's URL (for the test's own commands).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A connection of the test's own to this sentinel.
    pub async fn conn(&self) -> MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the sentinel")
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A primary with one replica, watched by three sentinels with quorum 2.
pub struct SentinelRedis {
    /// The servers, first primary first.
    pub servers: [LocalRedis; 2],
    /// The sentinels.
    pub sentinels: Vec<Sentinel>,
    /// The name they monitor.
    pub master: String,
}

impl SentinelRedis {
    /// Starts the servers and the sentinels, and waits until every sentinel knows the replica
    /// and the other sentinels (what a failover needs).
    pub async fn start() -> Self {
        let master = "agentworker".to_owned();
        let a = LocalRedis::start().await.expect("redis-server a");
        let port = a.port().to_string();
        let b = LocalRedis::start_with(&["--replicaof", "127.0.0.1", &port])
            .await
            .expect("redis-server b");
        wait_replicating(&b).await;
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            sentinels.push(Sentinel::start(&master, a.port(), 2).await);
        }
        for sentinel in &sentinels {
            let conn = sentinel.conn().await;
            let master = master.clone();
            wait_for(
                "each sentinel knows the replica and the other two sentinels",
                WAIT,
                || {
                    let (mut conn, master) = (conn.clone(), master.clone());
                    async move {
                        let info: Vec<(String, String)> = redis::cmd("SENTINEL")
                            .arg("master")
                            .arg(&master)
                            .query_async::<redis::Value>(&mut conn)
                            .await
                            .ok()
                            .and_then(|v| redis::FromRedisValue::from_redis_value(v).ok())
                            .map(|pairs: Vec<String>| {
                                pairs
                                    .chunks(2)
                                    .filter_map(|p| Some((p.first()?.clone(), p.get(1)?.clone())))
                                    .collect()
                            })
                            .unwrap_or_default();
                        let get = |name: &str| {
                            info.iter()
                                .find(|(k, _)| k == name)
                                .map(|(_, v)| v.as_str())
                                .unwrap_or_default()
                                .to_owned()
                        };
                        (get("num-slaves") == "1" && get("num-other-sentinels") == "2")
                            .then_some(())
                    }
                },
            )
            .await;
        }
        Self {
            servers: [a, b],
            sentinels,
            master,
        }
    }

    /// `redis.sentinels`, comma-separated.
    pub fn addrs(&self) -> String {
        self.sentinels
            .iter()
            .map(Sentinel::addr)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The port of the primary the sentinels name now.
    pub async fn primary_port(&self) -> u16 {
        let mut conn = self.sentinels[0].conn().await;
        let (_, port): (String, u16) = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master)
            .query_async(&mut conn)
            .await
            .expect("the sentinels name a primary");
        port
    }

    /// `SENTINEL FAILOVER`, then waits until the sentinels name the other server and it
    /// answers as a primary.
    pub async fn fail_over(&self) -> u16 {
        let before = self.primary_port().await;
        let mut conn = self.sentinels[0].conn().await;
        let _: () = redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg(&self.master)
            .query_async(&mut conn)
            .await
            .expect("SENTINEL FAILOVER");
        wait_for("the sentinels name a new primary", WAIT, || async move {
            let now = self.primary_port().await;
            (now != before).then_some(now)
        })
        .await
    }
}
