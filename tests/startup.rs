//! The build step of the worker (`Worker::build`), on its own: what it refuses at once, what
//! it waits out, and that it starts nothing until `Worker::run`. The same refusals through the
//! binary are in `tests/data_loss.rs`, `tests/secrets.rs` and `tests/tls.rs`; here no worker
//! process or loop is needed to see them.

mod common;

use agent_worker::connection::RedisConn;
use std::{net::SocketAddr, time::Duration};

use agent_jobs::keys::WORKERS;
use agent_worker::{
    shutdown::Shutdown,
    worker::{self, RefusedToStart, Worker},
};
use common::*;
use redis::AsyncCommands;

/// Keys in the test's Redis: a build step writes none.
async fn dbsize(conn: &RedisConn) -> u64 {
    redis::cmd("DBSIZE")
        .query_async(&mut conn.clone())
        .await
        .expect("DBSIZE")
}

/// Whether something accepts connections on `addr`.
async fn listening(addr: SocketAddr) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_ok()
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_http_address_is_refused_before_redis_is_tried() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().unwrap();
    // No Redis answers here: a build step that tried Redis first would wait, not refuse.
    let settings = settings(
        &format!("redis://127.0.0.1:{}", free_port()),
        &[("AGENT_WORKER__HTTP__ADDR", &addr.to_string())],
    );
    let launcher = worker::process_launcher(&settings.agent);
    let built = tokio::time::timeout(
        Duration::from_secs(5),
        Worker::build(settings, launcher, &Shutdown::new()),
    )
    .await
    .expect("refused at once, without waiting for Redis");
    match built {
        Err(RefusedToStart::Http { addr: refused, .. }) => assert_eq!(refused, addr),
        other => panic!("expected the http.addr refusal: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_redis_is_refused_by_the_build_step_which_starts_nothing() {
    let redis = TestRedis::start_with(&["--maxmemory-policy", "allkeys-lru"]).await;
    let http = local(free_port());
    let http_addr = http.to_string();
    let refused = redis.settings("ready", &[("AGENT_WORKER__HTTP__ADDR", &http_addr)]);
    let launcher = worker::process_launcher(&refused.agent);
    let refusal = Worker::build(refused, launcher, &Shutdown::new())
        .await
        .expect_err("an evicting Redis is refused");
    let RefusedToStart::EvictingRedis(message) = &refusal else {
        panic!("expected the eviction refusal: {refusal:?}");
    };
    assert!(
        message.contains("maxmemory-policy allkeys-lru"),
        "{message}"
    );
    assert!(message.contains("redis.allow_eviction"), "{message}");
    // Nothing ran: no presence, no registration, no session; the listener is gone already.
    assert_eq!(dbsize(&redis.conn).await, 0);
    assert!(
        !listening(http).await,
        "the listener stops before the refusal"
    );

    // Allowed, the same Redis builds a worker that has still started nothing.
    let allowed = redis.settings(
        "ready",
        &[
            ("AGENT_WORKER__REDIS__ALLOW_EVICTION", "true"),
            ("AGENT_WORKER__HTTP__ADDR", &http_addr),
            ("AGENT_WORKER__AGENT__CONTAINMENT", "process-group"),
        ],
    );
    let launcher = worker::process_launcher(&allowed.agent);
    let worker = Worker::build(allowed, launcher, &Shutdown::new())
        .await
        .expect("eviction allowed")
        .expect("not stopped");
    assert_eq!(worker.http_addr(), http);
    assert_eq!(worker.containment().name(), "process-group");
    let (code, body) = get(http, "/readyz").await;
    assert_eq!(code, 503, "built, not running: {body}");
    assert_eq!(dbsize(&redis.conn).await, 0);
    // Dropped without running, it stops its listener.
    drop(worker);
    wait_for(
        "the listener of a dropped worker to stop",
        Duration::from_secs(5),
        || async { (!listening(http).await).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_waited_out_and_the_right_ones_build_a_worker_that_runs() {
    let redis = TestRedis::start_requiring("right-one", "right-one").await;
    let port = redis.redis.port();
    let http = local(free_port());
    let http_addr = http.to_string();
    let wrong = settings(
        &format!("redis://:wrong-one@127.0.0.1:{port}"),
        &[("AGENT_WORKER__HTTP__ADDR", &http_addr)],
    );
    let shutdown = Shutdown::new();
    let build = tokio::spawn({
        let shutdown = shutdown.clone();
        let launcher = worker::process_launcher(&wrong.agent);
        async move { Worker::build(wrong, launcher, &shutdown).await }
    });
    let (code, body) = wait_for(
        "/readyz to name the refused credentials",
        Duration::from_secs(10),
        || async {
            http_get(http, "/readyz")
                .await
                .filter(|(_, body)| body.contains("authentication"))
        },
    )
    .await;
    assert_eq!(
        (code, body.as_str()),
        (503, "not ready: redis authentication failed\n")
    );
    assert!(!build.is_finished(), "refused credentials are waited out");
    shutdown.graceful.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(5), build)
        .await
        .expect("a stop ends the wait at once")
        .expect("the build step does not panic");
    assert!(matches!(stopped, Ok(None)), "{stopped:?}");
    assert!(
        !listening(http).await,
        "the listener stops before build returns"
    );

    let command = format!("{TEST_AGENT},--behaviour,ready");
    let right = settings(
        &format!("redis://:right-one@127.0.0.1:{port}"),
        &[("AGENT_WORKER__AGENT__COMMAND", &command)],
    );
    let shutdown = Shutdown::new();
    let launcher = worker::process_launcher(&right.agent);
    let worker = Worker::build(right, launcher, &shutdown)
        .await
        .expect("the right credentials")
        .expect("not stopped");
    let id = worker.id().to_owned();
    assert!(id.contains(&format!("-{}-", std::process::id())), "{id}");
    let http = worker.http_addr();
    assert_ne!(http.port(), 0, "the port bound, not the one asked for");
    let run = tokio::spawn(worker.run());
    wait_for("/readyz ready", Duration::from_secs(10), || async {
        http_get(http, "/readyz")
            .await
            .filter(|(code, _)| *code == 200)
    })
    .await;
    let present = |conn: RedisConn, id: String| async move {
        let workers: Vec<String> = conn.clone().zrange(WORKERS, 0, -1).await.expect("ZRANGE");
        workers.contains(&id)
    };
    wait_for(
        "presence under the id the build step gave",
        Duration::from_secs(10),
        || async { present(redis.conn.clone(), id.clone()).await.then_some(()) },
    )
    .await;
    shutdown.stop_now();
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the worker stops")
        .expect("the run step does not panic");
    assert!(!present(redis.conn.clone(), id).await, "deregistered");
    assert!(!listening(http).await, "the listener stopped last");
}
