//! The observability module on its own, against a private redis-server: the HTTP endpoints,
//! the queue depth gauges read by the probe, and readiness following Redis away and back.

mod common;

use agent_worker::connection::RedisConn;
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use agent_jobs::QueueKeys;
use agent_worker::{
    cli::local_redis::LocalRedis,
    connection,
    health::{Health, RedisProbe},
    http,
    metrics::{self, JobOutcome},
    queue::QueueDepth,
    settings::Settings,
};
use common::{get, wait_for};
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

/// The value of the sample `series` (name with labels, exactly as exposed) in a scrape.
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

fn depth_series(queue: &str, state: &str) -> String {
    format!(r#"agent_worker_queue_depth{{queue="{queue}",state="{state}"}}"#)
}

/// The process-wide metrics recorder, served with a fresh `Health` on a free loopback port
/// until the token is cancelled.
async fn serve_metrics() -> (http::HttpServer, Arc<Health>, CancellationToken) {
    let health = Health::new();
    let shutdown = CancellationToken::new();
    let server = http::serve(
        "127.0.0.1:0".parse().unwrap(),
        metrics::install_recorder(),
        health.clone(),
        shutdown.clone(),
    )
    .await
    .expect("bind 127.0.0.1:0");
    (server, health, shutdown)
}

async fn connect(redis: &LocalRedis) -> RedisConn {
    let env = [("AGENT_WORKER__REDIS__URL".to_owned(), redis.url())];
    let settings = Settings::load_from(None, env.into_iter().collect()).expect("settings");
    connection::connect(&settings.redis).await.expect("connect")
}

/// Waits until a scrape shows `want` for each of the queue's states.
async fn wait_depth(addr: SocketAddr, queue: &str, want: &[(&str, f64)]) {
    let what = format!("queue depth {want:?}");
    wait_for(&what, Duration::from_secs(5), || async {
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        want.iter()
            .all(|(state, value)| sample(&body, &depth_series(queue, state)) == Some(*value))
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness_follow_redis() {
    let mut redis = LocalRedis::start()
        .await
        .expect("redis-server must be on PATH for the tests");
    let conn = connect(&redis).await;
    // A queue name of its own: the recorder is process-wide, and gauges carry the queue.
    let queue = "obs-test-queue";
    let keys = QueueKeys::new(queue).unwrap();

    let (server, health, shutdown) = serve_metrics().await;
    let addr = server.local_addr();
    let probe = tokio::spawn(
        RedisProbe::new(
            conn.clone(),
            keys.clone(),
            health.clone(),
            Duration::from_secs(1),
        )
        .run(shutdown.clone()),
    );

    assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_owned()));
    // Redis answers, but the job worker is not running yet.
    wait_for("redis probed", Duration::from_secs(5), || async {
        health.redis().then_some(())
    })
    .await;
    assert_eq!(
        get(addr, "/readyz").await,
        (503, "not ready: job worker not running\n".to_owned())
    );
    health.set_job_worker(true);
    assert_eq!(get(addr, "/readyz").await, (200, "ready\n".to_owned()));

    // Every queue state is exposed, at zero on an empty queue.
    wait_depth(
        addr,
        queue,
        &[
            ("ready", 0.0),
            ("scheduled", 0.0),
            ("inflight", 0.0),
            ("dead", 0.0),
            ("done", 0.0),
        ],
    )
    .await;
    let (_, body) = get(addr, "/metrics").await;
    assert_eq!(sample(&body, "agent_worker_redis_up"), Some(1.0), "{body}");

    // The gauges move with the queue: ready ids, scheduled ids, two workers' inflight sets
    // (summed), dead and done ids.
    let mut c = conn.clone();
    let _: () = c.rpush(keys.active(), &["t1", "t2", "t3"]).await.unwrap();
    let _: () = c
        .zadd(keys.scheduled(), "t4", 4_000_000_000u64)
        .await
        .unwrap();
    let _: () = c.zadd(keys.workers(), "w-a", 1).await.unwrap();
    let _: () = c.zadd(keys.workers(), "w-b", 2).await.unwrap();
    let _: () = c.sadd(keys.inflight("w-a"), &["t5", "t6"]).await.unwrap();
    let _: () = c.sadd(keys.inflight("w-b"), "t7").await.unwrap();
    // An inflight set of a worker no longer registered is not counted.
    let _: () = c.sadd(keys.inflight("w-gone"), "t8").await.unwrap();
    let _: () = c.sadd(keys.dead(), &["t9", "t10"]).await.unwrap();
    let _: () = c.sadd(keys.done(), "t11").await.unwrap();
    wait_depth(
        addr,
        queue,
        &[
            ("ready", 3.0),
            ("scheduled", 1.0),
            ("inflight", 3.0),
            ("dead", 2.0),
            ("done", 1.0),
        ],
    )
    .await;
    assert_eq!(
        QueueDepth::read(&conn, &keys).await.unwrap(),
        QueueDepth {
            ready: 3,
            scheduled: 1,
            inflight: 3,
            dead: 2,
            done: 1
        }
    );
    let _: () = c.lpop(keys.active(), None).await.unwrap();
    wait_depth(addr, queue, &[("ready", 2.0)]).await;

    // Redis goes away: not ready within 5 s (the probe's timeout is 1 s, its tick 1 s).
    redis.stop();
    let gone = Instant::now();
    wait_for("readyz 503", Duration::from_secs(5), || async {
        let (status, body) = get(addr, "/readyz").await;
        (status == 503).then_some(body)
    })
    .await;
    let flipped_after = gone.elapsed();
    assert!(
        flipped_after < Duration::from_secs(3),
        "took {flipped_after:?}"
    );
    assert_eq!(
        get(addr, "/readyz").await,
        (503, "not ready: redis unreachable\n".to_owned())
    );
    // Liveness is not Redis's business.
    assert_eq!(get(addr, "/healthz").await.0, 200);
    let (_, body) = get(addr, "/metrics").await;
    assert_eq!(sample(&body, "agent_worker_redis_up"), Some(0.0), "{body}");
    let ping_errors = sample(&body, r#"agent_worker_redis_errors_total{op="ping"}"#);
    assert!(ping_errors.is_some_and(|n| n >= 1.0), "{body}");

    // Redis is back (empty: persistence is off): ready again, and the gauges follow.
    redis.restart().await.expect("restart redis");
    wait_for("readyz 200", Duration::from_secs(10), || async {
        (get(addr, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    wait_depth(addr, queue, &[("ready", 0.0), ("inflight", 0.0)]).await;

    // Stopping ends the probe and the listener.
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), probe)
        .await
        .expect("probe loop ends on shutdown")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), server.stopped())
        .await
        .expect("server ends on shutdown")
        .expect("server ends cleanly");
}

#[tokio::test]
async fn every_listed_series_is_exposed() {
    let (server, _health, shutdown) = serve_metrics().await;

    metrics::job_finished(JobOutcome::Done, Duration::from_millis(800));
    metrics::job_finished(JobOutcome::Dead, Duration::from_millis(3));
    metrics::agent_started(Duration::from_millis(650));
    metrics::agent_spawn_failed();
    metrics::agent_exited();
    metrics::agents_live(3);
    metrics::agents_max(20);
    metrics::sweep_finished(2);
    metrics::sweep_failed();
    metrics::retention_finished(5, 1);
    metrics::redis_error("listed_series_test");
    metrics::job_worker_restarted();
    QueueDepth {
        ready: 4,
        ..Default::default()
    }
    .record("listed-series-queue");

    let (status, body) = get(server.local_addr(), "/metrics").await;
    assert_eq!(status, 200);
    for (name, kind) in [
        ("agent_worker_jobs_total", "counter"),
        ("agent_worker_job_duration_seconds", "histogram"),
        ("agent_worker_agent_startup_seconds", "histogram"),
        ("agent_worker_agent_spawn_failures_total", "counter"),
        ("agent_worker_agent_exits_total", "counter"),
        ("agent_worker_agents_live", "gauge"),
        ("agent_worker_agents_max", "gauge"),
        ("agent_worker_queue_depth", "gauge"),
        ("agent_worker_sweep_runs_total", "counter"),
        ("agent_worker_sweep_sessions_removed_total", "counter"),
        ("agent_worker_retention_jobs_removed_total", "counter"),
        ("agent_worker_redis_errors_total", "counter"),
        ("agent_worker_redis_up", "gauge"),
        ("agent_worker_job_worker_restarts_total", "counter"),
    ] {
        assert!(
            body.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} {kind} missing:\n{body}"
        );
        assert!(
            body.contains(&format!("# HELP {name} ")),
            "{name} help:\n{body}"
        );
    }
    // Histograms are real Prometheus histograms with our buckets, not summaries.
    for series in [
        r#"agent_worker_agent_startup_seconds_bucket{le="1"}"#,
        r#"agent_worker_agent_startup_seconds_bucket{le="60"}"#,
        r#"agent_worker_job_duration_seconds_bucket{outcome="done",le="1"}"#,
        r#"agent_worker_job_duration_seconds_bucket{outcome="dead",le="0.005"}"#,
        r#"agent_worker_queue_depth{queue="listed-series-queue",state="ready"}"#,
        r#"agent_worker_redis_errors_total{op="listed_series_test"}"#,
    ] {
        assert!(
            sample(&body, series).is_some_and(|v| v >= 1.0),
            "{series}:\n{body}"
        );
    }
    shutdown.cancel();
    server.stopped().await.unwrap();
}
