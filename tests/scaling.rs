//! Horizontal scaling and fault tolerance: capacity, one agent per session across replicas,
//! crash recovery, graceful drain, retention, and the operator commands.

mod common;

use agent_worker::connection::RedisConn;
use std::time::Duration;

use agent_jobs::{
    QueueKeys, SessionKeys,
    keys::{WORKER_AGENTS, WORKER_INFO, WORKERS},
};
use agent_worker::{clock::unix_now, jobs::retention::Retention};
use common::*;
use nix::sys::signal::Signal;
use redis::AsyncCommands;

fn keys() -> QueueKeys {
    QueueKeys::new(QUEUE).unwrap()
}

async fn ready_count(conn: &RedisConn) -> u64 {
    conn.clone().scard("session:ready").await.unwrap()
}

async fn queued(conn: &RedisConn) -> u64 {
    conn.clone().llen(keys().active()).await.unwrap()
}

async fn inflight_total(conn: &RedisConn) -> u64 {
    let mut total = 0;
    for run in worker_runs(conn).await {
        let n: u64 = conn.clone().scard(keys().inflight(&run)).await.unwrap();
        total += n;
    }
    total
}

async fn live_workers(conn: &RedisConn) -> usize {
    conn.clone().zcard(WORKERS).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_of_five_agents_take_ten_sessions_and_leave_two_queued() {
    let redis = TestRedis::start().await;
    let settings = redis.settings(
        "ready",
        &[
            ("AGENT_WORKER__AGENT__MAX_AGENTS", "5"),
            HEARTBEAT_EVERY_SECOND,
        ],
    );
    let a = TestWorker::start(settings.clone());
    let b = TestWorker::start(settings);
    let ids: Vec<_> = (0..12).map(|i| sid(&format!("cap-{i}"))).collect();
    for id in &ids {
        enqueue(&redis.conn, id, None).await;
    }
    wait_for("10 ready and 2 queued", Duration::from_secs(30), || async {
        (ready_count(&redis.conn).await == 10 && queued(&redis.conn).await == 2).then_some(())
    })
    .await;
    // The two left over are in the queue, not held by a full replica.
    assert_eq!(inflight_total(&redis.conn).await, 0);
    let per_worker: Vec<u64> = {
        let agents: std::collections::HashMap<String, u64> = redis
            .conn
            .clone()
            .hgetall(agent_jobs::keys::WORKER_AGENTS)
            .await
            .unwrap();
        agents.into_values().collect()
    };
    assert!(per_worker.iter().all(|n| *n <= 5), "{per_worker:?}");

    // The orchestrator ends two sessions; their agents stop and the queued two start.
    let running: Vec<_> = {
        let mut v = Vec::new();
        for id in &ids {
            if status(&redis.conn, id).await.as_deref() == Some("ready") {
                v.push(id.clone());
            }
        }
        v
    };
    for id in &running[..2] {
        end_as_orchestrator(&redis.conn, id).await;
    }
    wait_for(
        "the two queued sessions to start",
        Duration::from_secs(30),
        || async {
            let mut ready = 0;
            for id in &ids {
                ready += usize::from(status(&redis.conn, id).await.as_deref() == Some("ready"));
            }
            (ready == 10 && queued(&redis.conn).await == 0).then_some(())
        },
    )
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_delivered_to_two_replicas_gets_one_agent() {
    let redis = TestRedis::start().await;
    let a = TestWorker::start(redis.settings("ready", &[]));
    let b = TestWorker::start(redis.settings("ready", &[]));
    wait_for("both replicas present", Duration::from_secs(10), || async {
        (live_workers(&redis.conn).await == 2).then_some(())
    })
    .await;
    for round in 0..5 {
        let id = sid(&format!("dup-{round}"));
        // The same job twice, bypassing the producer's idempotency (a crash re-run, a foreign
        // producer): both replicas may take one copy at the same moment.
        let payload = format!(r#"{{"session_id":"{id}"}}"#);
        let first = push_raw(&redis.conn, payload.as_bytes()).await;
        let second = push_raw(&redis.conn, payload.as_bytes()).await;
        wait_done(&redis.conn, &first, Duration::from_secs(20)).await;
        wait_done(&redis.conn, &second, Duration::from_secs(20)).await;
        let agents = live_agents(&[std::process::id()])
            .remove(id.as_str())
            .unwrap_or_default();
        assert_eq!(
            agents.len(),
            1,
            "round {round}: one live agent for the session: {agents:?}"
        );
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_of_a_live_worker_stands_and_a_dead_workers_claim_is_taken_over() {
    let redis = TestRedis::start().await;
    let mut conn = redis.conn.clone();
    let now = unix_now();
    let (held, orphaned) = (sid("held-elsewhere"), sid("orphaned-claim"));
    for (id, owner) in [(&held, "live-worker"), (&orphaned, "dead-worker")] {
        let _: () = conn
            .hset_multiple(
                SessionKeys::new(id).state(),
                &[("status", "ready"), ("workerId", owner)],
            )
            .await
            .unwrap();
    }
    // Alive for the whole test, however slowly it runs.
    let _: () = conn.zadd(WORKERS, "live-worker", now + 3600).await.unwrap();
    let _: () = conn.zadd(WORKERS, "dead-worker", now - 3600).await.unwrap();
    let ledger = Ledger::new();
    let worker = TestWorker::start(ledger.worker_settings(&redis, "ready", &[]));
    let held_task = enqueue(&redis.conn, &held, None).await;
    let orphan_task = enqueue(&redis.conn, &orphaned, None).await;
    wait_done(&redis.conn, &held_task, Duration::from_secs(20)).await;
    wait_status(&redis.conn, &orphaned, "ready", Duration::from_secs(20)).await;
    wait_done(&redis.conn, &orphan_task, Duration::from_secs(20)).await;
    let owner = hget(&redis.conn, &SessionKeys::new(&held).state(), "workerId").await;
    assert_eq!(
        owner.as_deref(),
        Some("live-worker"),
        "the live claim stands"
    );
    // Both jobs are done: an agent started for either is in the ledger by now (the taken-over
    // one's is, which shows the ledger works).
    let rooms = ledger.rooms();
    assert!(rooms.contains(&orphaned.to_string()), "{rooms:?}");
    assert!(
        !rooms.contains(&held.to_string()),
        "no agent was started for it: {rooms:?}"
    );
    let owner = hget(
        &redis.conn,
        &SessionKeys::new(&orphaned).state(),
        "workerId",
    )
    .await;
    assert_ne!(
        owner.as_deref(),
        Some("dead-worker"),
        "the dead claim was taken over"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_on_a_sigkilled_replica_runs_again_on_another_within_the_orphan_timeout() {
    let redis = TestRedis::start().await;
    let url = redis.url();
    // Replica A's agent takes 3 s to get ready: A is killed in the middle of the start.
    let slow = format!("{TEST_AGENT},--behaviour,ready,--ready-delay-ms,3000");
    let mut a = WorkerProcess::run(
        &url,
        "ready",
        &[("AGENT_WORKER__AGENT__COMMAND", slow.as_str())],
    );
    let id = sid("killed-mid-start");
    let task = enqueue(&redis.conn, &id, None).await;
    wait_status(&redis.conn, &id, "starting", Duration::from_secs(20)).await;
    let a_id = hget(&redis.conn, &SessionKeys::new(&id).state(), "workerId")
        .await
        .unwrap();
    a.kill();
    // Replica B comes up afterwards and finds the job in A's in-flight set.
    let b = WorkerProcess::run(&url, "ready", &[]);
    wait_status(&redis.conn, &id, "ready", Duration::from_secs(20)).await;
    wait_done(&redis.conn, &task, Duration::from_secs(20)).await;
    let owner = hget(&redis.conn, &SessionKeys::new(&id).state(), "workerId").await;
    assert_ne!(
        owner.as_deref(),
        Some(a_id.as_str()),
        "B took over the start"
    );
    assert_eq!(
        inflight_total(&redis.conn).await,
        0,
        "nothing left in flight"
    );
    b.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_start_in_progress_drains_agents_then_stops_them() {
    let redis = TestRedis::start().await;
    let slow = format!("{TEST_AGENT},--behaviour,ready,--ready-delay-ms,3000");
    let worker = WorkerProcess::run(
        &redis.url(),
        "ready",
        &[
            ("AGENT_WORKER__SHUTDOWN__DRAIN_TIMEOUT", "3s"),
            ("AGENT_WORKER__AGENT__COMMAND", slow.as_str()),
        ],
    );
    let id = sid("drained-1");
    enqueue(&redis.conn, &id, None).await;
    // The start is in progress (the agent has reported its arguments, not its ready line).
    wait_received(&redis.conn, &id).await;
    let output = worker.stop_cleanly().await;
    let events = events(&output.stderr);
    let at = |name: &str| -> chrono::DateTime<chrono::Utc> {
        let event = events
            .iter()
            .find(|e| e["message"] == name)
            .unwrap_or_else(|| panic!("no {name} event"));
        event["timestamp"].as_str().unwrap().parse().unwrap()
    };
    // The start finished after the signal, the agent ran through the drain, then was stopped.
    assert!(at("agent_ready") > at("shutdown_requested"));
    let drained = at("agent_exited") - at("worker_draining");
    assert!(
        drained >= chrono::Duration::milliseconds(2_900),
        "the agent got its drain time: {drained:?}"
    );
    let exit = events
        .iter()
        .find(|e| e["message"] == "agent_exited")
        .unwrap();
    assert_eq!(exit["exit"], "code 0", "stopped with SIGTERM, in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_stops_the_agents_at_once() {
    let redis = TestRedis::start().await;
    let worker = WorkerProcess::run(
        &redis.url(),
        "ready",
        &[("AGENT_WORKER__SHUTDOWN__DRAIN_TIMEOUT", "1h")],
    );
    let id = sid("hurried-1");
    start_ready(&redis.conn, &id).await;
    worker.signal(Signal::SIGTERM);
    worker
        .wait_event("worker_draining", Duration::from_secs(20))
        .await;
    // Draining for up to an hour: the agent runs on until the second signal.
    assert_eq!(status(&redis.conn, &id).await.as_deref(), Some("ready"));
    assert!(worker.events_named("agent_exited").is_empty());
    worker.signal(Signal::SIGTERM);
    worker
        .wait_event("agent_exited", Duration::from_secs(20))
        .await;
    let output = worker.output().await;
    assert!(output.status.success());
    assert_logged(&output.stderr, "immediate_shutdown_requested", &[]);
}

async fn memory(conn: &RedisConn) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// Writes `n` finished jobs the way apalis-redis records them (data, meta, done/dead set).
async fn finished_jobs(conn: &RedisConn, n: usize, dead: bool, done_at: u64) -> Vec<String> {
    let mut pipe = redis::pipe();
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let id = ulid::Ulid::generate().to_string();
        let status = if dead { "Killed" } else { "Done" };
        let payload = format!(r#"{{"session_id":"finished-{i}"}}"#);
        let meta = [
            ("attempts", "1"),
            ("max_attempts", "1"),
            ("status", status),
            ("done_at", &done_at.to_string()),
            ("result", r#"{"Ok":null}"#),
        ];
        stage_job(&mut pipe, &id, payload.as_bytes(), &meta);
        pipe.sadd(if dead { keys().dead() } else { keys().done() }, &id)
            .ignore();
        ids.push(id);
    }
    pipe.query_async::<()>(&mut conn.clone()).await.unwrap();
    ids
}

/// Done jobs kept an hour, dead ones a week or the newest 100.
fn retention(conn: &RedisConn) -> Retention {
    Retention::new(
        conn.clone(),
        keys(),
        Duration::from_secs(3600),
        Duration::from_secs(7 * 86400),
        100,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_memory_flat_and_never_removes_a_job_waiting_for_a_retry() {
    let redis = TestRedis::start().await;
    let retention = retention(&redis.conn);
    // A job waiting for a retry: failed once, rescheduled, with an old done_at.
    let retrying = ulid::Ulid::generate().to_string();
    let mut conn = redis.conn.clone();
    let failed = [
        ("attempts", "1"),
        ("max_attempts", "1"),
        ("status", "Failed"),
        ("done_at", "1"),
    ];
    let mut pipe = redis::pipe();
    stage_job(
        &mut pipe,
        &retrying,
        br#"{"session_id":"retrying"}"#,
        &failed,
    );
    pipe.query_async::<()>(&mut conn).await.unwrap();
    let _: () = conn
        .zadd(keys().scheduled(), &retrying, unix_now() + 60)
        .await
        .unwrap();

    // 50,000 finished jobs in rounds of 5,000, each finished two hours ago; retention after
    // each round. Memory after the last round is what it was after the first.
    let two_hours_ago = unix_now() - 7200;
    let mut after_first = 0;
    for round in 0..10 {
        finished_jobs(&redis.conn, 4_900, false, two_hours_ago).await;
        finished_jobs(&redis.conn, 100, true, two_hours_ago).await;
        let report = retention.run(unix_now()).await.unwrap();
        assert_eq!(report.done_deleted, 4_900, "round {round}");
        if round == 0 {
            after_first = memory(&redis.conn).await;
        }
    }
    let after_last = memory(&redis.conn).await;
    // Without retention the 45,000 later jobs would take about ten times the memory of the
    // first 5,000; allocator and hash-table slack move it by a few percent either way.
    assert!(
        after_last < after_first + after_first / 2,
        "memory grew from {after_first} to {after_last} bytes"
    );
    let data: u64 = conn.hlen(keys().data()).await.unwrap();
    assert_eq!(
        data,
        100 + 1,
        "the 100 newest dead jobs (dead_max) and the retrying one"
    );
    let dead: u64 = conn.scard(keys().dead()).await.unwrap();
    assert_eq!(dead, 100);
    let status: Option<String> = conn.hget(keys().meta(&retrying), "status").await.unwrap();
    assert_eq!(
        status.as_deref(),
        Some("Failed"),
        "the retrying job survived"
    );

    // A dead job apalis-redis gave up on after its 25th attempt is `Failed`, not `Killed`: it is
    // trimmed all the same. A dead job retried after it was indexed is not.
    let gave_up = finished_jobs(&redis.conn, 1, true, 1).await.remove(0);
    let _: () = conn
        .hset(keys().meta(&gave_up), "status", "Failed")
        .await
        .unwrap();
    let retried = finished_jobs(&redis.conn, 1, true, 1).await.remove(0);
    let short = Retention::new(
        redis.conn.clone(),
        keys(),
        Duration::from_secs(3600),
        Duration::from_secs(60),
        1000,
    );
    // Index both while they are too young to trim, then retry one.
    short.run(0).await.unwrap();
    agent_worker::inspect::retry_dead(&redis.conn, &keys(), Some(vec![retried.clone()]))
        .await
        .unwrap();
    short.run(unix_now()).await.unwrap();
    let gone: Option<String> = conn.hget(keys().data(), &gave_up).await.unwrap();
    assert_eq!(gone, None, "the given-up job was trimmed");
    let kept: Option<String> = conn.hget(keys().data(), &retried).await.unwrap();
    assert!(kept.is_some(), "the retried job survived");

    // Recent done jobs are kept until they are old enough.
    let recent = finished_jobs(&redis.conn, 10, false, unix_now()).await;
    retention.run(unix_now()).await.unwrap();
    let kept: Option<String> = conn.hget(keys().data(), &recent[0]).await.unwrap();
    assert!(kept.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_forgets_workers_silent_for_an_hour_and_keeps_the_others() {
    let redis = TestRedis::start().await;
    let retention = retention(&redis.conn);
    let now = unix_now();
    let mut conn = redis.conn.clone();
    // 1,500 processes that died two hours ago (more than one batch), one silent for 59
    // minutes, one alive.
    let dead: Vec<String> = (0..1500).map(|i| format!("host-{i}-dead")).collect();
    for id in &dead {
        let _: () = conn.zadd(WORKERS, id, now - 7200).await.unwrap();
        let _: () = conn.hset(WORKER_AGENTS, id, 3).await.unwrap();
        let _: () = conn.hset(WORKER_INFO, id, "{}").await.unwrap();
    }
    for (id, seen) in [("host-recent", now - 3540), ("host-alive", now)] {
        let _: () = conn.zadd(WORKERS, id, seen).await.unwrap();
        let _: () = conn.hset(WORKER_AGENTS, id, 1).await.unwrap();
        let _: () = conn.hset(WORKER_INFO, id, "{}").await.unwrap();
    }
    let report = retention.run(now).await.unwrap();
    assert_eq!(report.workers_forgotten, 1500);
    let left: Vec<String> = conn.zrange(WORKERS, 0, -1).await.unwrap();
    assert_eq!(left, ["host-recent", "host-alive"]);
    let mut counted: Vec<String> = conn.hkeys(WORKER_AGENTS).await.unwrap();
    counted.sort();
    assert_eq!(counted, ["host-alive", "host-recent"]);
    let mut described: Vec<String> = conn.hkeys(WORKER_INFO).await.unwrap();
    described.sort();
    assert_eq!(described, ["host-alive", "host-recent"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_dead_list_and_retry_from_the_command_line() {
    let redis = TestRedis::start().await;
    let worker = TestWorker::start(redis.settings("ready", &[]));
    let bad = push_raw(&redis.conn, br#"{"session_id":"a:b"}"#).await;
    wait_dead(&redis.conn, &bad).await;
    let id = sid("listed-1");
    write_config(&redis.conn, &id, "Craig", "u").await;
    // A job that went dead for a reason that is fixed afterwards: its config had no voice.
    let _: () = redis
        .conn
        .clone()
        .hdel(SessionKeys::new(&id).config(), "voiceId")
        .await
        .unwrap();
    let task = enqueue(&redis.conn, &id, None).await;
    wait_dead(&redis.conn, &task).await;

    let cli = |args: &[&str]| {
        let output = worker_command(&redis.url(), args, "ready", &[])
            .output()
            .unwrap();
        stdout_of(&format!("agent-worker {args:?}"), &output)
    };
    let listed: serde_json::Value =
        serde_json::from_str(&cli(&["dead", "list", "--json"])).unwrap();
    let rows = listed.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let row = rows.iter().find(|r| r["task_id"] == task.as_str()).unwrap();
    assert_eq!(row["session_id"], "listed-1");
    assert!(
        row["error"]
            .as_str()
            .unwrap()
            .contains("voiceId is missing"),
        "{row}"
    );
    assert!(row["failed_at"].as_u64().is_some());
    let bad_row = rows.iter().find(|r| r["task_id"] == bad.as_str()).unwrap();
    assert!(bad_row["session_id"].is_null());

    let status: serde_json::Value = serde_json::from_str(&cli(&["status", "--json"])).unwrap();
    assert_eq!(status["jobs"]["dead"], 2);
    assert_eq!(status["jobs"]["ready"], 0);
    assert_eq!(status["workers"].as_array().unwrap().len(), 1);
    assert_eq!(status["workers"][0]["alive"], true);

    // Fix the config, retry the job: it runs.
    write_config(&redis.conn, &id, "Craig", "u").await;
    let out = cli(&["dead", "retry", &task]);
    assert!(out.contains(&format!("requeued {task}")), "{out}");
    wait_status(&redis.conn, &id, "ready", Duration::from_secs(20)).await;
    wait_done(&redis.conn, &task, Duration::from_secs(20)).await;
    let dead: Vec<String> = redis.conn.clone().smembers(keys().dead()).await.unwrap();
    assert_eq!(dead, [bad]);
    worker.stop().await;
}
