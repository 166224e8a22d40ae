//! Redis data loss is not an end signal: live agents survive an empty-Redis restart and
//! eviction, their records are written again; a Redis that may evict is refused unless allowed.

mod common;

use agent_worker::connection::RedisConn;
use std::time::{Duration, Instant};

use agent_jobs::{SessionId, SessionKeys, keys::SESSION_HEARTBEATS};
use common::*;
use redis::AsyncCommands;

fn worker(url: &str, behaviour: &str, extra: &[(&str, &str)]) -> WorkerProcess {
    let mut env = vec![("AGENT_WORKER__SWEEP__INTERVAL", "1h")];
    env.extend_from_slice(extra);
    WorkerProcess::spawn(worker_command(url, &["run"], behaviour, &env))
}

/// The worker of `out` stopped its agents only at its own shutdown, never as "ended by the
/// orchestrator".
fn assert_only_stopped_by_the_shutdown(out: &std::process::Output) {
    let ended = events(&out.stderr)
        .into_iter()
        .filter(|e| e["message"] == "agent_stopped" && e["reason"] != "worker_shutdown")
        .count();
    assert_eq!(ended, 0, "{}", String::from_utf8_lossy(&out.stderr));
}

/// The record of a live agent, as a fresh worker would have written it.
async fn record_is_back(conn: &RedisConn, id: &SessionId, pid: u32) -> Option<()> {
    let keys = SessionKeys::new(id);
    let mut conn = conn.clone();
    let (status, owner): (Option<String>, Option<String>) = redis::cmd("HMGET")
        .arg(keys.state())
        .arg("status")
        .arg("workerId")
        .query_async(&mut conn)
        .await
        .ok()?;
    let (agent_pid, health, indexed, ready): (Option<String>, Option<String>, Option<f64>, bool) =
        redis::pipe()
            .get(keys.agent_pid())
            .hget(keys.agent_health(), "status")
            .zscore(SESSION_HEARTBEATS, id.as_str())
            .sismember("session:ready", id.as_str())
            .query_async(&mut conn)
            .await
            .ok()?;
    (status.as_deref() == Some("ready")
        && owner.is_some()
        && agent_pid == Some(pid.to_string())
        && health.as_deref() == Some("alive")
        && indexed.is_some()
        && ready)
        .then_some(())
}

/// `session.heartbeat_interval` of [`worker`] (set by `worker_command`).
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Time for the worker's connection to notice the old one broke and connect again (its first
/// heartbeat after the loss may be the one that fails).
const RECONNECT_MARGIN: Duration = Duration::from_secs(2);

/// Waits until every record of `ids` is back, at most one heartbeat (plus
/// [`RECONNECT_MARGIN`]) after `since`, with its agent still running.
async fn within_one_heartbeat(conn: &RedisConn, ids: &[SessionId], pids: &[u32], since: Instant) {
    let deadline = (since + HEARTBEAT + RECONNECT_MARGIN).saturating_duration_since(Instant::now());
    wait_for(
        "every record back within one heartbeat",
        deadline,
        || async {
            for (id, pid) in ids.iter().zip(pids) {
                record_is_back(conn, id, *pid).await?;
            }
            Some(())
        },
    )
    .await;
    for (id, pid) in ids.iter().zip(pids) {
        assert!(alive(*pid), "the agent of {id} is still running");
    }
}

/// `/metrics` counts the loss (it is counted right after the records are written: a moment
/// may pass).
async fn assert_dataset_loss_counted(http: std::net::SocketAddr) {
    let lost = |body: &str| -> Option<f64> {
        body.lines()
            .find_map(|l| l.strip_prefix("agent_worker_redis_dataset_lost_total "))?
            .trim()
            .parse()
            .ok()
    };
    wait_for(
        "agent_worker_redis_dataset_lost_total >= 1 on /metrics",
        Duration::from_secs(5),
        || async {
            let (code, body) = http_get(http, "/metrics").await?;
            (code == 200 && lost(&body)? >= 1.0).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_agents_survive_an_empty_redis_restart_and_their_records_come_back() {
    let mut redis = TestRedis::start().await;
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let worker = worker(
        &redis.url(),
        "ready",
        &[("AGENT_WORKER__HTTP__ADDR", &http.to_string())],
    );
    let ids: Vec<SessionId> = (0..3).map(|i| sid(&format!("kept-{i}"))).collect();
    let mut pids = Vec::new();
    for id in &ids {
        write_config(&redis.conn, id, "Craig", "u").await;
        enqueue(&redis.conn, id, None).await;
        wait_status(&redis.conn, id, "ready", Duration::from_secs(20)).await;
        pids.push(agent_pid(&redis.conn, id).await);
    }
    // Persistence is off: the server comes back empty.
    redis.redis.stop();
    redis.redis.restart().await.unwrap();
    let back = Instant::now();
    let keys: Vec<String> = redis.conn.clone().keys("*").await.unwrap_or_default();
    assert!(keys.is_empty() || !keys.iter().any(|k| k.starts_with("session:")));
    within_one_heartbeat(&redis.conn, &ids, &pids, back).await;
    assert_dataset_loss_counted(http).await;
    let out = worker.stop().await;
    let events = events(&out.stderr);
    let lost: Vec<_> = events
        .iter()
        .filter(|e| e["message"] == "redis_dataset_lost")
        .collect();
    assert!(!lost.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    let restored: u64 = lost.iter().map(|e| e["restored"].as_u64().unwrap()).sum();
    assert_eq!(restored, 3);
    assert_only_stopped_by_the_shutdown(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_redis_is_refused_unless_allowed() {
    let redis = TestRedis::start_with(&["--maxmemory-policy", "allkeys-lru"]).await;
    let refused = worker(&redis.url(), "ready", &[]).output().await;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("maxmemory-policy allkeys-lru"), "{stderr}");
    assert!(stderr.contains("redis.allow_eviction"), "{stderr}");

    let http = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let allowed = worker(
        &redis.url(),
        "ready",
        &[
            ("AGENT_WORKER__REDIS__ALLOW_EVICTION", "true"),
            ("AGENT_WORKER__HTTP__ADDR", &http.to_string()),
        ],
    );
    let metrics = wait_for("/metrics", Duration::from_secs(10), || async {
        http_get(http, "/metrics")
            .await
            .filter(|(_, body)| body.contains("agent_worker_redis_evicting 1"))
    })
    .await;
    assert_eq!(metrics.0, 200);
    let status = WorkerProcess::spawn(worker_command(&redis.url(), &["status"], "ready", &[]))
        .output()
        .await;
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("maxmemory-policy allkeys-lru  (evicts keys"),
        "{text}"
    );
    let out = allowed.stop_cleanly().await;
    let warned = events(&out.stderr)
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("redis_eviction_allowed"))
        })
        .count();
    assert_eq!(warned, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_evicted_under_memory_pressure_are_written_again_not_ended() {
    let redis = TestRedis::start().await;
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let worker = worker(
        &redis.url(),
        "ready",
        &[
            ("AGENT_WORKER__REDIS__ALLOW_EVICTION", "true"),
            ("AGENT_WORKER__HTTP__ADDR", &http.to_string()),
        ],
    );
    let ids: Vec<SessionId> = (0..5).map(|i| sid(&format!("evicted-{i}"))).collect();
    let mut pids = Vec::new();
    for id in &ids {
        enqueue(&redis.conn, id, None).await;
        wait_status(&redis.conn, id, "ready", Duration::from_secs(20)).await;
        pids.push(agent_pid(&redis.conn, id).await);
    }
    // volatile-ttl evicts keys with the shortest TTL first: the session records (4 h), before
    // the filler (10 h); keys without a TTL (the queue, our index) stay.
    let mut conn = redis.conn.clone();
    let used: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await
        .unwrap();
    let used: u64 = used
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("volatile-ttl")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(used + 2 * 1024 * 1024)
        .query_async(&mut conn)
        .await
        .unwrap();
    let filler = "x".repeat(16 * 1024);
    for i in 0.. {
        let _: Result<(), _> = redis::pipe()
            .set_ex(format!("filler-{i}"), &filler, 36_000)
            .query_async(&mut conn)
            .await;
        let evicted: usize = redis::pipe()
            .exists(
                ids.iter()
                    .map(|id| SessionKeys::new(id).state())
                    .collect::<Vec<_>>(),
            )
            .query_async::<(usize,)>(&mut conn)
            .await
            .map(|(n,)| ids.len() - n)
            .unwrap();
        if evicted > 0 {
            break;
        }
        assert!(i < 5_000, "nothing of ours was evicted");
    }
    // Pressure off again; the records must come back, the agents never stop.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(0)
        .query_async(&mut conn)
        .await
        .unwrap();
    within_one_heartbeat(&redis.conn, &ids, &pids, Instant::now()).await;
    assert_dataset_loss_counted(http).await;
    let out = worker.stop().await;
    assert_logged(&out.stderr, "redis_dataset_lost", &[("cause", "evicted")]);
    assert_only_stopped_by_the_shutdown(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_still_starting_when_redis_loses_its_data_gets_its_record_back() {
    let redis = TestRedis::start().await;
    // The agent takes 2 s to be ready: time to lose the dataset while its session is starting.
    let worker = worker(&redis.url(), "ready,--ready-delay-ms,2000", &[]);
    let id = sid("starting-lost-1");
    write_config(&redis.conn, &id, "Craig", "u").await;
    let task_id = enqueue(&redis.conn, &id, Some("u")).await;
    wait_status(&redis.conn, &id, "starting", Duration::from_secs(20)).await;
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut redis.conn.clone())
        .await
        .unwrap();
    // Ready, with the record the claim wrote: not stopped as if the orchestrator had ended it.
    let pid = wait_for("the agent's pid", Duration::from_secs(10), || async {
        let pid: Option<String> = redis
            .conn
            .clone()
            .get(SessionKeys::new(&id).agent_pid())
            .await
            .unwrap();
        pid?.parse::<u32>().ok()
    })
    .await;
    wait_for(
        &format!("the record of {id} to be back"),
        Duration::from_secs(10),
        || record_is_back(&redis.conn, &id, pid),
    )
    .await;
    let state = SessionKeys::new(&id).state();
    assert_eq!(hget(&redis.conn, &state, "taskId").await, Some(task_id));
    assert_fields(
        &redis.conn,
        &state,
        &[("voiceId", "Craig"), ("userId", "u")],
    )
    .await;
    assert!(hget(&redis.conn, &state, "createdAt").await.is_some());
    let ttl = ttl_of(&redis.conn, &state).await;
    assert!(ttl > 0, "the record written again expires: TTL {ttl}");
    assert!(alive(pid), "the agent still runs");
    let out = worker.stop().await;
    assert_logged(
        &out.stderr,
        "redis_dataset_lost",
        &[("session_id", id.as_str())],
    );
    assert_only_stopped_by_the_shutdown(&out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_the_orchestrator_ends_while_it_is_starting_is_still_stopped() {
    let redis = TestRedis::start().await;
    let worker = worker(&redis.url(), "ready,--ready-delay-ms,2000", &[]);
    let id = sid("starting-ended-1");
    enqueue(&redis.conn, &id, None).await;
    wait_status(&redis.conn, &id, "starting", Duration::from_secs(20)).await;
    let pid = wait_for("the agent to run", Duration::from_secs(10), || async {
        live_agents(&[worker.pid()])
            .get(id.as_str())?
            .first()
            .copied()
    })
    .await;
    // The orchestrator's end: the session's keys go; our heartbeat index is not its to touch.
    end_as_orchestrator(&redis.conn, &id).await;
    wait_gone("the agent to be stopped", Duration::from_secs(20), pid).await;
    let out = worker.stop().await;
    assert_logged(&out.stderr, "agent_stopped", &[("reason", "session_ended")]);
    let events = events(&out.stderr);
    assert!(!events.iter().any(|e| e["message"] == "redis_dataset_lost"));
}

/// Whether any worker's inflight set holds `task_id`.
async fn inflight_anywhere(conn: &RedisConn, task_id: &str) -> bool {
    let keys = agent_jobs::QueueKeys::new(QUEUE).unwrap();
    let sets: Vec<String> = conn
        .clone()
        .keys(format!("{}:*", keys.inflight_prefix()))
        .await
        .unwrap();
    for set in sets {
        if is_member(conn, &set, task_id).await {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_jobs_whose_data_vanished_go_dead_with_the_reason_and_the_rest_run() {
    let redis = TestRedis::start().await;
    let keys = agent_jobs::QueueKeys::new(QUEUE).unwrap();
    let mut lost = Vec::new();
    for i in 0..10 {
        lost.push(enqueue(&redis.conn, &sid(&format!("data-lost-{i}")), None).await);
    }
    // The whole hash evicted, or lost in a failover, while they waited: their meta and their
    // places in the queue are there, their arguments are not.
    let _: () = redis.conn.clone().del(keys.data()).await.unwrap();
    let kept = sid("data-kept-1");
    enqueue(&redis.conn, &kept, None).await;
    let worker = worker(&redis.url(), "ready", &[]);
    for task in &lost {
        let result = wait_dead(&redis.conn, task).await;
        assert!(result.contains("job data is missing"), "{result}");
        assert!(!inflight_anywhere(&redis.conn, task).await);
    }
    wait_status(&redis.conn, &kept, "ready", Duration::from_secs(20)).await;
    for i in 0..10 {
        let id = sid(&format!("data-lost-{i}"));
        assert_eq!(status(&redis.conn, &id).await, None, "no agent for {id}");
    }
    let out = worker.stop().await;
    // The first one fetched ends a run of the job worker; the recovery takes the others out
    // of the ready list with it, rather than each ending one more run (with a longer back-off
    // each time, the good job waiting behind them).
    let restarts = events(&out.stderr)
        .iter()
        .filter(|e| e["message"] == "worker_restarted")
        .count();
    assert!(
        restarts <= 2,
        "{restarts} restarts:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_whose_data_vanished_still_ends() {
    let redis = TestRedis::start().await;
    let keys = agent_jobs::QueueKeys::new(QUEUE).unwrap();
    let worker = worker(&redis.url(), "ready,--ready-delay-ms,1500", &[]);
    let id = sid("data-lost-running-1");
    let task = enqueue(&redis.conn, &id, None).await;
    wait_status(&redis.conn, &id, "starting", Duration::from_secs(20)).await;
    assert!(inflight_anywhere(&redis.conn, &task).await);
    let _: () = redis.conn.clone().hdel(keys.data(), &task).await.unwrap();
    wait_status(&redis.conn, &id, "ready", Duration::from_secs(20)).await;
    // Acknowledged like any other: done, not left inflight.
    wait_done(&redis.conn, &task, Duration::from_secs(20)).await;
    assert!(!inflight_anywhere(&redis.conn, &task).await);
    worker.stop().await;
}
