//! Session lifecycle across processes: heartbeats, remote stop, the stale-session sweep and its
//! one-replica-per-tick rule. Staleness is injected by back-dating heartbeats, never waited for.

mod common;

use agent_worker::connection::RedisConn;
use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use agent_jobs::{SessionId, SessionKeys, keys::SESSION_HEARTBEATS};
use agent_worker::{
    clock::unix_now,
    jobs::sweep::StaleSessionSweep,
    session::{ClaimAttempt, EndRecord, SessionEnd, SessionStore},
};
use common::*;
use redis::AsyncCommands;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn all_keys(id: &SessionId) -> Vec<String> {
    let k = SessionKeys::new(id);
    vec![
        k.state(),
        k.config(),
        k.agent_pid(),
        k.agent_logs(),
        k.agent_health(),
    ]
}

async fn keys_left(conn: &RedisConn, id: &SessionId) -> usize {
    conn.clone().exists(all_keys(id)).await.unwrap()
}

async fn backdate(conn: &RedisConn, id: &SessionId, secs: u64) {
    let _: () = conn
        .clone()
        .zadd(SESSION_HEARTBEATS, id.as_str(), unix_now() - secs)
        .await
        .unwrap();
}

fn worker_command(url: &str, args: &[&str], env: &[(&str, &str)]) -> std::process::Command {
    common::worker_command(url, args, "ready", env)
}

/// `agent-worker run` with the test agent ready at once, and `env`.
fn run_worker(url: &str, env: &[(&str, &str)]) -> WorkerProcess {
    WorkerProcess::run(url, "ready", env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_workers_session_is_swept_by_another_worker_process() {
    let redis = TestRedis::start().await;
    let id = sid("orphaned-1");
    write_config(&redis.conn, &id, "Craig", "u").await;
    // Worker A runs the agent; its sweep is far away so it cannot be the one sweeping.
    let mut a = run_worker(&redis.url(), &[("AGENT_WORKER__SWEEP__INTERVAL", "1h")]);
    start_ready(&redis.conn, &id).await;
    let pid = agent_pid(&redis.conn, &id).await;
    a.kill();
    wait_gone(
        "the agent to die with its worker",
        Duration::from_secs(5),
        pid,
    )
    .await;
    // Nobody heartbeats the session any more; make it as old as stale_after would. (Its log
    // key may be missing: output is shipped asynchronously and the worker died abruptly.)
    let state_and_pid: usize = redis
        .conn
        .clone()
        .exists(&[
            SessionKeys::new(&id).state(),
            SessionKeys::new(&id).agent_pid(),
        ])
        .await
        .unwrap();
    assert_eq!(state_and_pid, 2);
    backdate(&redis.conn, &id, 60).await;

    let b = run_worker(&redis.url(), &[("AGENT_WORKER__SWEEP__INTERVAL", "1s")]);
    wait_for(
        "worker B to sweep the session",
        Duration::from_secs(15),
        || async { (keys_left(&redis.conn, &id).await == 0).then_some(()) },
    )
    .await;
    assert_eq!(heartbeat_score(&redis.conn, &id).await, None);
    assert!(!is_member(&redis.conn, "session:ready", id.as_str()).await);
    let output = b.stop_cleanly().await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let swept = events(&output.stderr).iter().any(|e| {
        e["message"] == "session_swept"
            && e["session_id"] == "orphaned-1"
            && e["reason"] == "heartbeat_stale"
    });
    assert!(swept, "worker B logged session_swept: {stderr}");
}

/// libfaketime, which shifts one process's clock: where `cargo xtask test` put it
/// (`AGENT_WORKER_TEST_LIBFAKETIME`), or where Debian's `libfaketime` package installs it.
fn libfaketime() -> &'static str {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        std::env::var("AGENT_WORKER_TEST_LIBFAKETIME")
            .into_iter()
            .chain(
                [
                    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
                    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
                    "/usr/lib/faketime/libfaketime.so.1",
                ]
                .map(String::from),
            )
            .find(|path| std::path::Path::new(path).exists())
            .expect(
                "a worker with a skewed clock needs libfaketime: run the suite with \
             `cargo xtask test` (installs it) or apt-get install libfaketime",
            )
    })
}

/// Settings of a worker whose wall clock is `skew` off (its timers, on the monotonic clock,
/// stay true).
fn skewed<'a>(skew: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("LD_PRELOAD", libfaketime()),
        ("FAKETIME", skew),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    env.extend_from_slice(extra);
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_clock_runs_behind_keeps_its_sessions() {
    let redis = TestRedis::start().await;
    let id = sid("skewed-1");
    write_config(&redis.conn, &id, "Craig", "u").await;
    // A wide orphan window, so that a clock 20 s off is still allowed to run jobs.
    let orphan = ("AGENT_WORKER__WORKER__ORPHAN_TIMEOUT", "60s");
    // Worker A's clock runs 20 s behind; it never sweeps.
    let a = run_worker(
        &redis.url(),
        &skewed("-20s", &[("AGENT_WORKER__SWEEP__INTERVAL", "1h"), orphan]),
    );
    start_ready(&redis.conn, &id).await;
    // Its heartbeats are stamped with Redis's clock, not its own.
    let (redis_now, _): (u64, u64) = redis::cmd("TIME")
        .query_async(&mut redis.conn.clone())
        .await
        .unwrap();
    let stamped = heartbeat_score(&redis.conn, &id).await.expect("indexed") as u64;
    assert!(
        redis_now.abs_diff(stamped) < 5,
        "heartbeat stamped {stamped}, Redis says {redis_now}"
    );

    // Worker B, whose clock is right, sweeps every second with stale_after 6 s: to it, a
    // heartbeat on A's own clock would be 20 s old.
    let b = run_worker(
        &redis.url(),
        &[("AGENT_WORKER__SWEEP__INTERVAL", "1s"), orphan],
    );
    b.wait_events("sweep_complete", 3, Duration::from_secs(20))
        .await;
    assert_eq!(status(&redis.conn, &id).await.as_deref(), Some("ready"));
    assert!(heartbeat_score(&redis.conn, &id).await.is_some());
    assert!(b.events_named("session_swept").is_empty());
    for worker in [a, b] {
        worker.stop_cleanly().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_sessions_keys_stops_its_agent_within_a_heartbeat() {
    let redis = TestRedis::start().await;
    let worker = TestWorker::start(redis.settings("ready", &[HEARTBEAT_EVERY_SECOND]));
    let (ended, kept) = (sid("ended-by-orchestrator"), sid("kept-running"));
    for id in [&ended, &kept] {
        start_ready(&redis.conn, id).await;
    }
    let pid = agent_pid(&redis.conn, &ended).await;
    // What the orchestrator does to end a session.
    let _: () = redis.conn.clone().del(all_keys(&ended)).await.unwrap();
    wait_gone("the agent to be stopped", Duration::from_secs(5), pid).await;
    wait_for(
        "the session to stay removed",
        Duration::from_secs(5),
        || async {
            (keys_left(&redis.conn, &ended).await == 0
                && heartbeat_score(&redis.conn, &ended).await.is_none())
            .then_some(())
        },
    )
    .await;
    // The other session is untouched and keeps heartbeating.
    let before = heartbeat_score(&redis.conn, &kept).await.unwrap();
    wait_for(
        "a heartbeat of the other session",
        Duration::from_secs(5),
        || async { (heartbeat_score(&redis.conn, &kept).await.unwrap() > before).then_some(()) },
    )
    .await;
    assert_eq!(status(&redis.conn, &kept).await.as_deref(), Some("ready"));
    let health = hget(
        &redis.conn,
        &SessionKeys::new(&kept).agent_health(),
        "status",
    )
    .await;
    assert_eq!(health.as_deref(), Some("alive"));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_starts_are_swept_and_ended_records_wait_out_their_window() {
    let redis = TestRedis::start().await;
    let ended_ttl = Duration::from_secs(600);
    let store = SessionStore::new(redis.conn.clone(), Duration::from_secs(3600), "Ashley", 100)
        .ended_ttl(ended_ttl);
    let sweep = StaleSessionSweep::new(
        redis.conn.clone(),
        store.clone(),
        2,
        Duration::from_secs(60),
        Duration::from_secs(4 * 3600),
    )
    .ended_ttl(ended_ttl);
    let (starting, failed, fresh, completed, expired) = (
        sid("stuck-starting"),
        sid("failed-start"),
        sid("fresh-start"),
        sid("completed-unrecorded"),
        sid("completed-long-ago"),
    );
    for id in [&starting, &failed, &fresh, &completed, &expired] {
        store
            .claim(id, None, "t", "w", ClaimAttempt::default())
            .await
            .unwrap();
    }
    // A start that failed for good is ended at once: out of the index, kept for the
    // orchestrator with a bounded TTL.
    let end = SessionEnd {
        error: Some("boom"),
        ..SessionEnd::default()
    };
    assert_eq!(
        store.end(&failed, "w", &end).await.unwrap(),
        EndRecord::Kept(agent_jobs::SessionStatus::Error)
    );
    assert_eq!(heartbeat_score(&redis.conn, &failed).await, None);
    assert!(ttl_of(&redis.conn, &SessionKeys::new(&failed).state()).await <= 600);
    // Agents that wrote `completed` on workers that died before recording the end: one a
    // moment ago, one longer ago than the ended window.
    let now = unix_now();
    for (id, last) in [(&completed, now - 70), (&expired, now - 700)] {
        let _: () = redis
            .conn
            .clone()
            .hset_multiple(
                SessionKeys::new(id).state(),
                &[
                    ("status", "completed".to_owned()),
                    ("lastActive", last.to_string()),
                ],
            )
            .await
            .unwrap();
    }
    for id in [&starting, &completed, &expired] {
        backdate(&redis.conn, id, 61).await;
    }

    let dry = sweep.run(unix_now(), true).await.unwrap();
    assert_eq!(dry.removed.len(), 2, "{dry:?}");
    // The claim wrote the session hash and, the config being absent, the default config.
    assert_eq!(
        keys_left(&redis.conn, &starting).await,
        2,
        "a dry run removes nothing"
    );
    assert!(heartbeat_score(&redis.conn, &completed).await.is_some());

    let report = sweep.run(unix_now(), false).await.unwrap();
    let mut removed: Vec<_> = report
        .removed
        .iter()
        .map(|(id, reason)| (id.as_str().to_owned(), reason.as_str()))
        .collect();
    removed.sort();
    assert_eq!(
        removed,
        [
            ("completed-long-ago".to_owned(), "ended_expired"),
            ("stuck-starting".to_owned(), "stuck_starting")
        ]
    );
    assert_eq!(keys_left(&redis.conn, &starting).await, 0);
    assert!(!is_member(&redis.conn, "session:starting", "stuck-starting").await);
    assert_eq!(keys_left(&redis.conn, &expired).await, 0);
    // The recent end stays for the orchestrator, out of the index, with the time it has left.
    assert_eq!(
        status(&redis.conn, &completed).await.as_deref(),
        Some("completed")
    );
    assert_eq!(heartbeat_score(&redis.conn, &completed).await, None);
    let left = ttl_of(&redis.conn, &SessionKeys::new(&completed).state()).await;
    assert!((1..=530).contains(&left), "TTL {left}");
    assert_eq!(status(&redis.conn, &failed).await.as_deref(), Some("error"));
    assert_eq!(
        status(&redis.conn, &fresh).await.as_deref(),
        Some("starting")
    );
}

/// For every removal, the last heartbeat that session received before it was removed must be at
/// or before the cutoff the sweep used: a session whose heartbeat was fresh at delete time is
/// never removed. (A sweep that checked staleness outside the delete script fails this.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_heartbeats_and_sweeps_never_remove_a_fresh_session() {
    const SESSIONS: usize = 1_000;
    const ROUNDS: u64 = 10_000;
    const STALE: u64 = 5;
    let redis = TestRedis::start().await;
    let store = SessionStore::new(redis.conn.clone(), Duration::from_secs(3600), "Ashley", 100);
    let sweep = StaleSessionSweep::new(
        redis.conn.clone(),
        store.clone(),
        100,
        Duration::from_secs(STALE),
        Duration::from_secs(1 << 40),
    );
    let ids: Vec<SessionId> = (0..SESSIONS).map(|i| sid(&format!("race-{i}"))).collect();
    let base = 1_000_000u64;
    async fn create(conn: &RedisConn, ids: &[SessionId], at: u64) {
        if ids.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.hset_multiple(
                format!("session:{id}"),
                &[("status", "ready"), ("workerId", "race-worker")],
            )
            .ignore()
            .zadd(SESSION_HEARTBEATS, id.as_str(), at)
            .ignore();
        }
        pipe.query_async::<()>(&mut conn.clone()).await.unwrap();
    }
    create(&redis.conn, &ids, base).await;

    let clock = Arc::new(AtomicU64::new(base));
    let done = Arc::new(AtomicBool::new(false));
    // Per session: the last successful heartbeat time of each incarnation, in order.
    let heartbeater = {
        let (store, conn, ids, clock, done) = (
            store.clone(),
            redis.conn.clone(),
            ids.clone(),
            clock.clone(),
            done.clone(),
        );
        tokio::spawn(async move {
            let mut incarnations: HashMap<SessionId, Vec<u64>> =
                ids.iter().map(|id| (id.clone(), vec![base])).collect();
            for round in 1..=ROUNDS {
                let now = base + round;
                // A rotating tenth of the sessions heartbeats each round; the others age.
                let picked: Vec<(SessionId, _)> = ids
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| (*i as u64 + round) % 10 == 0)
                    .map(|(_, id)| (id.clone(), None))
                    .collect();
                let report = store
                    .heartbeat("race-worker", &picked, now, 0)
                    .await
                    .unwrap();
                // A session the sweep removed is missing with its index entry: reported as
                // vanished (a live worker would write it again).
                let removed: Vec<SessionId> = report
                    .gone
                    .iter()
                    .chain(&report.vanished)
                    .cloned()
                    .collect();
                for (id, _) in &picked {
                    if !removed.contains(id) {
                        *incarnations.get_mut(id).unwrap().last_mut().unwrap() = now;
                    }
                }
                // A removed session starts again as a new incarnation.
                create(&conn, &removed, now).await;
                for id in &removed {
                    incarnations.get_mut(id).unwrap().push(now);
                }
                clock.store(now, Ordering::SeqCst);
            }
            done.store(true, Ordering::SeqCst);
            incarnations
        })
    };
    let sweeper = {
        let (clock, done) = (clock.clone(), done.clone());
        tokio::spawn(async move {
            let mut removals: HashMap<SessionId, Vec<u64>> = HashMap::new();
            let mut sweeps = 0u64;
            while !done.load(Ordering::SeqCst) || sweeps == 0 {
                let now = clock.load(Ordering::SeqCst);
                let report = sweep.run(now, false).await.unwrap();
                for (id, _) in report.removed {
                    removals.entry(id).or_default().push(now - STALE);
                }
                sweeps += 1;
            }
            (removals, sweeps)
        })
    };
    let incarnations = heartbeater.await.unwrap();
    let (removals, sweeps) = sweeper.await.unwrap();
    let total: usize = removals.values().map(Vec::len).sum();
    assert!(
        total > 1_000,
        "the race removed sessions ({total} in {sweeps} sweeps)"
    );
    for (id, cutoffs) in &removals {
        let lives = &incarnations[id];
        assert!(
            cutoffs.len() <= lives.len(),
            "{id}: more removals than lives"
        );
        for (k, cutoff) in cutoffs.iter().enumerate() {
            assert!(
                lives[k] <= *cutoff,
                "{id} was removed with cutoff {cutoff} after a heartbeat at {}",
                lives[k]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_sweep_exactly_once_per_tick() {
    let redis = TestRedis::start().await;
    let workers: Vec<_> = (0..3)
        .map(|_| run_worker(&redis.url(), &[("AGENT_WORKER__SWEEP__INTERVAL", "1s")]))
        .collect();
    // The sweep ticks a worker logged so far.
    let ticks_of = |events: Vec<serde_json::Value>| -> Vec<u64> {
        events.iter().filter_map(|e| e["tick"].as_u64()).collect()
    };
    // The three run side by side until they have swept ten ticks between them.
    wait_for("ten sweeps", Duration::from_secs(30), || async {
        let swept: usize = workers
            .iter()
            .map(|w| w.events_named("sweep_complete").len())
            .sum();
        (swept >= 10).then_some(())
    })
    .await;
    let mut ticks = Vec::new();
    let mut sweepers = 0;
    for worker in workers {
        let output = worker.stop_cleanly().await;
        let mine = ticks_of(
            events(&output.stderr)
                .into_iter()
                .filter(|e| e["message"] == "sweep_complete")
                .collect(),
        );
        sweepers += usize::from(!mine.is_empty());
        ticks.extend(mine);
    }
    let total = ticks.len();
    ticks.sort();
    ticks.dedup();
    assert_eq!(ticks.len(), total, "a tick was swept twice");
    assert!(total >= 10, "got {total}");
    let span = ticks.last().unwrap() - ticks.first().unwrap() + 1;
    assert!(
        span as usize - total <= 1,
        "at most one tick missed: {ticks:?}"
    );
    assert!(sweepers >= 1);
}

async fn sweep_cli(url: &str, args: &[&str]) -> String {
    let mut all = vec!["sweep"];
    all.extend_from_slice(args);
    let output = worker_command(url, &all, &[]).output().unwrap();
    stdout_of("agent-worker sweep", &output)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_mode_removes_an_old_legacy_session_and_leaves_a_young_one() {
    let redis = TestRedis::start().await;
    let mut conn = redis.conn.clone();
    let now = unix_now();
    let (old, young) = (sid("legacy-old"), sid("legacy-young"));
    let _: () = conn
        .hset_multiple(
            SessionKeys::new(&old).state(),
            &[
                ("status", "ready"),
                ("lastActive", &(now - 5 * 3600).to_string()),
                ("createdAt", &(now - 6 * 3600).to_string()),
            ],
        )
        .await
        .unwrap();
    let _: () = conn
        .set(SessionKeys::new(&old).agent_pid(), 4242)
        .await
        .unwrap();
    let _: () = conn
        .rpush(SessionKeys::new(&old).agent_logs(), "line")
        .await
        .unwrap();
    write_config(&redis.conn, &old, "Craig", "u").await;
    let _: () = conn
        .hset_multiple(
            SessionKeys::new(&young).state(),
            &[
                ("status", "ready"),
                ("lastActive", &(now - 60).to_string()),
                ("createdAt", &(now - 600).to_string()),
            ],
        )
        .await
        .unwrap();

    let dry = sweep_cli(&redis.url(), &["--scan", "--dry-run"]).await;
    assert!(
        dry.contains("would remove legacy-old (legacy_max_age)"),
        "{dry}"
    );
    assert_eq!(keys_left(&redis.conn, &old).await, 4);

    let out = sweep_cli(&redis.url(), &["--scan"]).await;
    assert!(out.contains("removed legacy-old (legacy_max_age)"), "{out}");
    assert!(!out.contains("legacy-young"), "{out}");
    assert_eq!(keys_left(&redis.conn, &old).await, 0);
    assert_eq!(status(&redis.conn, &young).await.as_deref(), Some("ready"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_during_a_sweep_shows_no_keys_command() {
    let redis = TestRedis::start().await;
    let store = SessionStore::new(redis.conn.clone(), Duration::from_secs(3600), "Ashley", 100);
    for i in 0..50 {
        let id = sid(&format!("monitored-{i}"));
        store
            .claim(&id, None, "t", "w", ClaimAttempt::default())
            .await
            .unwrap();
        backdate(&redis.conn, &id, 3600).await;
    }
    let mut monitor = tokio::net::TcpStream::connect(("127.0.0.1", redis.redis.port()))
        .await
        .unwrap();
    monitor.write_all(b"MONITOR\r\n").await.unwrap();
    let mut lines = BufReader::new(monitor).lines();
    assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("+OK"));

    let out = sweep_cli(&redis.url(), &["--scan"]).await;
    assert!(
        out.contains("heartbeat index: examined 50, removed 50"),
        "{out}"
    );
    // The sweep's last command is the SCAN that ends the walk; read until we have seen it.
    let mut seen = Vec::new();
    let saw_end = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let upper = line.to_uppercase();
            seen.push(upper.clone());
            if upper.contains("\"SCAN\"") {
                return;
            }
        }
    })
    .await;
    assert!(saw_end.is_ok(), "MONITOR showed the sweep: {seen:?}");
    assert!(seen.iter().any(|l| l.contains("\"ZRANGEBYSCORE\"")));
    assert!(
        !seen.iter().any(|l| l.contains("\"KEYS\"")),
        "a KEYS command was sent: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_write_ready_only_over_starting_and_keep_everyone_elses_status() {
    let redis = TestRedis::start().await;
    let worker = TestWorker::start(redis.settings("ready", &[HEARTBEAT_EVERY_SECOND]));
    let id = sid("statuses-1");
    start_ready(&redis.conn, &id).await;
    let state = SessionKeys::new(&id).state();
    let set_status = |value: &'static str| {
        let conn = redis.conn.clone();
        let state = state.clone();
        async move {
            let _: () = conn.clone().hset(&state, "status", value).await.unwrap();
        }
    };
    // The orchestrator's late `starting` is ours to replace.
    set_status("starting").await;
    wait_status(&redis.conn, &id, "ready", Duration::from_secs(5)).await;
    // Anything else stays, heartbeat after heartbeat, while the agent runs on.
    for other in ["completed", "error", "something-new"] {
        set_status(other).await;
        let before = heartbeat_score(&redis.conn, &id).await.unwrap();
        wait_for("two more heartbeats", Duration::from_secs(10), || async {
            (heartbeat_score(&redis.conn, &id).await.unwrap() >= before + 2.0).then_some(())
        })
        .await;
        assert_eq!(status(&redis.conn, &id).await.as_deref(), Some(other));
    }
    let pid = hget(&redis.conn, &state, "agentPid").await.unwrap();
    assert!(
        alive(pid.parse().unwrap()),
        "only `terminated` stops the agent"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_for_a_terminated_or_completed_session_starts_no_agent() {
    let redis = TestRedis::start().await;
    let worker = TestWorker::start(redis.settings("ready", &[]));
    for (name, ended) in [
        ("was-terminated", "terminated"),
        ("was-completed", "completed"),
    ] {
        let id = sid(name);
        let _: () = redis
            .conn
            .clone()
            .hset(SessionKeys::new(&id).state(), "status", ended)
            .await
            .unwrap();
        let task = enqueue(&redis.conn, &id, None).await;
        wait_done(&redis.conn, &task, Duration::from_secs(20)).await;
        assert_eq!(status(&redis.conn, &id).await.as_deref(), Some(ended));
        assert!(received(&redis.conn, &id).await.is_none(), "no agent ran");
        assert_eq!(heartbeat_score(&redis.conn, &id).await, None);
        let config: bool = redis
            .conn
            .clone()
            .exists(SessionKeys::new(&id).config())
            .await
            .unwrap();
        assert!(!config, "no default config is written for an ended session");
    }
    worker.stop().await;
}
