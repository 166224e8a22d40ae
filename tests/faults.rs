//! Faults across processes and Redis restarts, observed end to end: no job lost, never two live
//! agents for one session, and the metrics and readiness endpoints of a running worker.

mod common;

use agent_worker::connection::RedisConn;
use std::{collections::HashSet, net::SocketAddr, time::Duration};

use agent_jobs::{AgentStart, QueueKeys, SessionId};
use common::*;
use redis::AsyncCommands;

fn keys() -> QueueKeys {
    QueueKeys::new(QUEUE).unwrap()
}

/// Whether each task finished: `Some("done")`, `Some("dead")`, or `None` while it is not.
async fn outcome(conn: &RedisConn, task: &str) -> Option<&'static str> {
    if is_done(conn, task).await {
        return Some("done");
    }
    is_member(conn, &keys().dead(), task)
        .await
        .then_some("dead")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_with_aof_mid_burst_loses_no_job() {
    let mut redis =
        TestRedis::start_with(&["--appendonly", "yes", "--appendfsync", "always"]).await;
    let worker = TestWorker::start(redis.settings(
        "exit-after-ready",
        &[("AGENT_WORKER__AGENT__MAX_AGENTS", "32")],
    ));
    let mut tasks = Vec::new();
    for round in 0..10 {
        if round == 5 {
            // Mid-burst: Redis dies and comes back from its append-only file.
            redis.redis.stop();
            redis.redis.restart().await.unwrap();
        }
        for i in 0..30 {
            let job = AgentStart::new(sid(&format!("aof-{round}-{i}")));
            // An enqueue that fails during the restart is retried by its producer; only
            // acknowledged enqueues count as jobs that must not be lost.
            let task = wait_for(
                "an enqueue to be acknowledged",
                Duration::from_secs(20),
                || async {
                    producer(&redis.conn)
                        .enqueue(&job)
                        .await
                        .ok()
                        .map(|e| e.task_id)
                },
            )
            .await;
            tasks.push(task);
        }
    }
    for task in &tasks {
        let what = format!("task {task} to finish");
        let result = wait_for(&what, Duration::from_secs(120), || {
            outcome(&redis.conn, task)
        })
        .await;
        assert_eq!(result, "done", "task {task}");
    }
    worker.stop().await;
}

/// Three replicas, 600 session starts with agents that stay up; one replica is SIGKILLed and
/// restarted ten times during the burst. Sampled throughout: never two live agents for one
/// session. At the end: no session stuck in `starting`; every job done (its agent became ready
/// at least once) or dead with a reason; sessions whose agent died with a killed replica are
/// swept once stale; nothing left in a dead worker's in-flight set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_with_one_killed_ten_times_start_every_session_exactly_once() {
    const SESSIONS: usize = 600;
    let redis = TestRedis::start().await;
    let url = redis.url();
    let ledger = std::env::temp_dir().join(format!("agent-ledger-{}", ulid::Ulid::generate()));
    let spawn = || {
        let mut command = worker_command(
            &url,
            &["run"],
            "ready",
            &[
                ("AGENT_WORKER__AGENT__MAX_AGENTS", "400"),
                ("AGENT_WORKER__WORKER__CONCURRENCY", "32"),
                ("AGENT_WORKER__SWEEP__INTERVAL", "2s"),
                // The logs of three workers over the run are not read: do not pipe them.
                ("RUST_LOG", "warn"),
            ],
        );
        command
            .env("TEST_AGENT_LEDGER", &ledger)
            .stderr(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        WorkerProcess::spawn(command)
    };
    let steady = [spawn(), spawn()];
    let mut victim = spawn();
    let ids: Vec<SessionId> = (0..SESSIONS).map(|i| sid(&format!("fault-{i}"))).collect();
    let mut tasks = Vec::new();
    let mut kills = 0;
    let mut violations = Vec::new();
    for (n, chunk) in ids.chunks(SESSIONS / 20).enumerate() {
        let jobs: Vec<AgentStart> = chunk.iter().map(|id| AgentStart::new(id.clone())).collect();
        for enqueued in producer(&redis.conn).enqueue_many(&jobs).await.unwrap() {
            tasks.push(enqueued.task_id);
        }
        // Every other chunk, at a moment that depends on how far the burst got: kill the
        // victim replica (its agents die with it) and start it again.
        if n % 2 == 1 && kills < 10 {
            victim.kill();
            victim = spawn();
            kills += 1;
        }
        for (session, pids) in live_agents(&worker_pids(&steady, &victim)) {
            if pids.len() > 1 {
                violations.push((session, pids));
            }
        }
        tokio::time::sleep(Duration::from_millis(100 + 37 * (n as u64 % 5))).await;
    }
    assert_eq!(kills, 10);

    // Every job finishes: done or dead with a reason. Sample the one-agent rule meanwhile.
    let mut pending: HashSet<String> = tasks.iter().cloned().collect();
    let mut dead = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    while !pending.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} jobs unfinished after 240 s",
            pending.len()
        );
        for (session, pids) in live_agents(&worker_pids(&steady, &victim)) {
            if pids.len() > 1 {
                violations.push((session, pids));
            }
        }
        let mut finished = Vec::new();
        for task in &pending {
            match outcome(&redis.conn, task).await {
                Some("dead") => {
                    finished.push(task.clone());
                    dead.push(task.clone());
                }
                Some(_) => finished.push(task.clone()),
                None => {}
            }
        }
        for task in finished {
            pending.remove(&task);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        violations.is_empty(),
        "two live agents for one session: {violations:?}"
    );
    for task in &dead {
        let result = hget(&redis.conn, &keys().meta(task), "result")
            .await
            .unwrap_or_default();
        assert!(!result.is_empty(), "dead job {task} has a reason");
    }
    // A done job means its agent became ready at least once: each such session has an agent
    // in the ledger (which outlives the sessions' own logs).
    let started: HashSet<String> = std::fs::read_to_string(&ledger)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').next().map(str::to_owned))
        .collect();
    let _ = std::fs::remove_file(&ledger);
    let never: Vec<&str> = ids
        .iter()
        .zip(&tasks)
        .filter(|(id, task)| !dead.contains(task) && !started.contains(id.as_str()))
        .map(|(id, _)| id.as_str())
        .collect();
    assert!(
        never.is_empty(),
        "done without an agent ever starting: {never:?}"
    );

    // No session stuck in `starting`; each is ready with exactly one live agent, or (its
    // agent died with a killed replica) swept once stale.
    wait_for(
        "no session starting, and no stale session left",
        Duration::from_secs(60),
        || async {
            let starting: u64 = redis.conn.clone().scard("session:starting").await.unwrap();
            let live = live_agents(&worker_pids(&steady, &victim));
            let mut stale = 0;
            for id in &ids {
                let status = status(&redis.conn, id).await;
                let agents = live.get(id.as_str()).map_or(0, Vec::len);
                match status.as_deref() {
                    Some("ready") if agents == 1 => {}
                    None if agents == 0 => {}
                    _ => stale += 1,
                }
            }
            (starting == 0 && stale == 0).then_some(())
        },
    )
    .await;

    // Nothing is left in the in-flight set of a dead replica.
    let runs: Vec<String> = redis
        .conn
        .clone()
        .zrange(keys().workers(), 0, -1)
        .await
        .unwrap();
    let mut left = 0u64;
    let inflight_keys: Vec<String> = redis
        .conn
        .clone()
        .keys(format!("{}:inflight:*", QUEUE))
        .await
        .unwrap();
    for key in inflight_keys {
        let run = key.rsplit(':').next().unwrap().to_owned();
        if !runs.contains(&run) {
            let n: u64 = redis.conn.clone().scard(&key).await.unwrap();
            left += n;
        }
    }
    assert_eq!(left, 0, "jobs stranded in a dead worker's in-flight set");

    for worker in steady.into_iter().chain([victim]) {
        let _ = worker.stop().await;
    }
}

fn worker_pids(steady: &[WorkerProcess], victim: &WorkerProcess) -> Vec<u32> {
    steady
        .iter()
        .chain([victim])
        .map(WorkerProcess::pid)
        .collect()
}

/// The value of the first sample of `series` (with its labels) in a Prometheus text page.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_worker_serves_metrics_that_move_with_jobs_and_readiness() {
    let mut redis = TestRedis::start().await;
    let worker = WorkerProcess::run(&redis.url(), "ready", &[]);
    // The worker logs where it listens (port 0 was asked for).
    let addr: SocketAddr = worker
        .wait_event("http_listening", Duration::from_secs(20))
        .await["addr"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("http_listening names the address");

    wait_for("/readyz 200", Duration::from_secs(10), || async {
        (get(addr, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(get(addr, "/healthz").await.0, 200);
    let id = sid("metrics-1");
    let task = enqueue(&redis.conn, &id, None).await;
    wait_done(&redis.conn, &task, Duration::from_secs(20)).await;
    let page = wait_for(
        "the job in the metrics",
        Duration::from_secs(10),
        || async {
            let (_, page) = get(addr, "/metrics").await;
            (sample(&page, "agent_worker_jobs_total{outcome=\"done\"}") == Some(1.0))
                .then_some(page)
        },
    )
    .await;
    assert_eq!(
        sample(&page, "agent_worker_agent_startup_seconds_count"),
        Some(1.0)
    );
    assert_eq!(sample(&page, "agent_worker_agents_live"), Some(1.0));
    for series in [
        "agent_worker_job_duration_seconds_count",
        "agent_worker_queue_depth",
        "agent_worker_sweep_runs_total",
        "agent_worker_sweep_sessions_removed_total",
    ] {
        assert!(page.contains(series), "{series} missing from /metrics");
    }

    // Redis goes away: not ready within 5 s; back: ready again.
    redis.redis.stop();
    wait_for("/readyz 503", Duration::from_secs(5), || async {
        (get(addr, "/readyz").await.0 == 503).then_some(())
    })
    .await;
    wait_for(
        "the probe to see Redis down",
        Duration::from_secs(5),
        || async {
            let (_, page) = get(addr, "/metrics").await;
            (sample(&page, "agent_worker_redis_up") == Some(0.0)).then_some(())
        },
    )
    .await;
    redis.redis.restart().await.unwrap();
    wait_for("/readyz 200 again", Duration::from_secs(20), || async {
        (get(addr, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    // The outage was counted.
    let (_, page) = get(addr, "/metrics").await;
    assert!(
        sample(&page, "agent_worker_redis_errors_total{op=\"ping\"}").is_some_and(|n| n >= 1.0),
        "{page}"
    );
    assert_eq!(sample(&page, "agent_worker_redis_up"), Some(1.0));
    worker.stop_cleanly().await;
}
