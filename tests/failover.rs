//! A Redis failover costs no call: behind one endpoint (a managed service's primary endpoint)
//! and under Sentinel.
//!
//! Real `redis-server` processes: a primary and its replica, promoted and demoted the way the
//! services do it (see `common/failover.rs`), with `agent-worker run` and its agents running
//! through it. After each failover: no call stopped, a call enqueued on the new primary
//! starts, the running calls' heartbeats land on the new primary, and every connection of the
//! worker (its own, apalis-redis's, the wake-up subscriber's) left the old one.

mod common;

use std::time::Duration;

use agent_jobs::{SessionId, SessionKeys};
use agent_worker::{
    clock::unix_now,
    connection::{self, RedisConn},
};
use common::*;
use redis::AsyncCommands;

/// The shipped `worker.heartbeat_interval`: a call enqueued on the new primary must start
/// within it plus a few seconds.
const WORKER_HEARTBEAT: &str = "5s";
/// How soon after the failover the new call must be ready: one worker heartbeat plus 5 s.
const NEW_CALL_WITHIN: Duration = Duration::from_secs(10);
/// `session.heartbeat_interval` in these tests, and how soon heartbeats must reach the new
/// primary: two of them plus 5 s.
const SESSION_HEARTBEAT: &str = "2s";
const HEARTBEATS_WITHIN: Duration = Duration::from_secs(9);

/// A connection of the test's own to the server at `url`.
async fn connect(url: &str) -> RedisConn {
    connection::connect(&settings(url, &[]).redis)
        .await
        .expect("connect")
}

/// The worker, as it runs in production apart from faster session heartbeats.
fn worker(url: &str, extra: &[(&str, &str)]) -> WorkerProcess {
    let mut env = vec![
        ("AGENT_WORKER__WORKER__HEARTBEAT_INTERVAL", WORKER_HEARTBEAT),
        ("AGENT_WORKER__WORKER__ORPHAN_TIMEOUT", "15s"),
        (
            "AGENT_WORKER__SESSION__HEARTBEAT_INTERVAL",
            SESSION_HEARTBEAT,
        ),
        ("AGENT_WORKER__SESSION__STALE_AFTER", "120s"),
    ];
    env.extend_from_slice(extra);
    WorkerProcess::run(url, "ready", &env)
}

/// Waits until every call in `ids` has been heartbeated on `conn` after `since` (unix s).
async fn wait_heartbeats(conn: &RedisConn, ids: &[SessionId], since: u64) {
    for id in ids {
        wait_for(
            &format!("a heartbeat of {id} on the new primary"),
            HEARTBEATS_WITHIN,
            || async {
                let score = heartbeat_score(conn, id).await?;
                (score as u64 > since).then_some(())
            },
        )
        .await;
    }
}

/// Enqueues `id` on `conn` (the new primary) and waits for its agent, within the deadline.
async fn new_call_starts(conn: &RedisConn, id: &SessionId) {
    enqueue(conn, id, None).await;
    wait_status(conn, id, "ready", NEW_CALL_WITHIN).await;
}

/// Every agent in `pids` still runs, and the worker stopped none.
fn no_call_stopped(worker: &WorkerProcess, pids: &[u32]) {
    for pid in pids {
        assert!(alive(*pid), "agent {pid} survived the failover");
    }
    let stopped = worker.events_named("agent_stopped");
    assert!(stopped.is_empty(), "no agent stopped: {stopped:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_behind_one_endpoint_costs_no_call() {
    let redis = ReplicatedRedis::start().await;
    let a = connect(&redis.a.url()).await;
    let worker = worker(&redis.endpoint.url(), &[]);
    worker
        .wait_event("worker_started", Duration::from_secs(20))
        .await;
    let replicated = [sid("endpoint-call-1"), sid("endpoint-call-2")];
    for id in &replicated {
        start_ready(&a, id).await;
    }

    // The replica is promoted; a call starts on the old primary in the seconds before it is
    // demoted, so the new primary never sees its records: the dataset went back a little.
    redis.promote_b().await;
    let b = connect(&redis.b.url()).await;
    let lost = sid("endpoint-call-in-the-gap");
    start_ready(&a, &lost).await;
    // Meanwhile its agent wrote on the new primary (as the real one writes
    // conversationStartTime): never overwritten by what the worker writes again.
    let _: () = b
        .clone()
        .hset(
            SessionKeys::new(&lost).state(),
            "conversationStartTime",
            "1765000000",
        )
        .await
        .unwrap();
    let calls: Vec<SessionId> = replicated.iter().chain([&lost]).cloned().collect();
    let mut pids = Vec::new();
    for id in &calls {
        pids.push(agent_pid(&a, id).await);
    }
    let failover_at = unix_now();
    redis.demote_a().await;

    // A call enqueued on the new primary starts; heartbeats of every running call land there.
    new_call_starts(&b, &sid("endpoint-call-after")).await;
    wait_heartbeats(&b, &calls, failover_at).await;
    // The lost record is written again, around what the agent wrote.
    let record = SessionKeys::new(&lost).state();
    wait_status(&b, &lost, "ready", HEARTBEATS_WITHIN).await;
    assert_eq!(
        hget(&b, &record, "conversationStartTime").await.as_deref(),
        Some("1765000000")
    );
    assert!(hget(&b, &record, "workerId").await.is_some());
    no_call_stopped(&worker, &pids);

    // Logged once, counted; every connection left the old primary (the worker's own and
    // apalis-redis's share one; the wake-up subscriber has its own) and serves the new one.
    let failover = worker
        .wait_event("redis_failover", Duration::from_secs(1))
        .await;
    assert_eq!(failover["reason"], "readonly", "{failover}");
    assert_eq!(worker.events_named("redis_failover").len(), 1);
    drop(a);
    wait_for(
        "no connection of the worker left on the old primary",
        Duration::from_secs(10),
        || async {
            (clients(&redis.a, "normal").await == 0 && clients(&redis.a, "pubsub").await == 0)
                .then_some(())
        },
    )
    .await;
    let subscribers: Vec<(String, u64)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg("agent-start:wake")
        .query_async(&mut b.clone())
        .await
        .unwrap();
    assert_eq!(
        subscribers[0].1, 1,
        "the wake-up subscriber is on the new primary"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_costs_no_call() {
    let redis = SentinelRedis::start().await;
    let first = redis.primary_port().await;
    let url = |port: u16| format!("redis://127.0.0.1:{port}/");
    let before = connect(&url(first)).await;
    // redis.url's host and port are not used under Sentinel: this one answers nothing.
    let sentinels = redis.addrs();
    let sentinel_env = [
        ("AGENT_WORKER__REDIS__SENTINELS", sentinels.as_str()),
        (
            "AGENT_WORKER__REDIS__SENTINEL_MASTER",
            redis.master.as_str(),
        ),
    ];
    let worker = worker("redis://127.0.0.1:9/", &sentinel_env);
    worker
        .wait_event("worker_started", Duration::from_secs(20))
        .await;
    let calls = [sid("sentinel-call-1"), sid("sentinel-call-2")];
    let mut pids = Vec::new();
    for id in &calls {
        start_ready(&before, id).await;
        pids.push(agent_pid(&before, id).await);
    }
    // An agent under Sentinel is told the primary of its launch, and the sentinels.
    let environ = std::fs::read(format!("/proc/{}/environ", pids[0])).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        environ
            .split('\0')
            .any(|v| v == format!("REDIS_URL={}", url(first))),
        "{environ}"
    );
    assert!(
        environ
            .split('\0')
            .any(|v| v == format!("REDIS_SENTINELS={sentinels}"))
    );

    let failover_at = unix_now();
    let second = redis.fail_over().await;
    assert_ne!(first, second);
    let after = connect(&url(second)).await;
    new_call_starts(&after, &sid("sentinel-call-after")).await;
    wait_heartbeats(&after, &calls, failover_at).await;
    no_call_stopped(&worker, &pids);
    let failover = worker
        .wait_event("redis_failover", Duration::from_secs(1))
        .await;
    assert!(
        failover["to"]
            .as_str()
            .unwrap()
            .starts_with(&format!("127.0.0.1:{second} ")),
        "{failover}"
    );
    assert_eq!(worker.events_named("redis_failover").len(), 1);
    drop(before);
    let old = redis.servers.iter().find(|s| s.port() == first).unwrap();
    wait_for(
        "no connection of the worker left on the old primary",
        Duration::from_secs(10),
        || async {
            (clients(old, "normal").await == 0 && clients(old, "pubsub").await == 0).then_some(())
        },
    )
    .await;

    // The CLI asks the sentinels too.
    let status = worker_command(
        "redis://127.0.0.1:9/",
        &["status", "--json"],
        "ready",
        &sentinel_env,
    )
    .output()
    .expect("agent-worker status");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["sessions"]["ready"], 3, "{status}");

    // The orchestrator's Python client through redis-py's Sentinel: enqueue and wait there.
    require_python(&["redis"]).await;
    let hosts = redis
        .sentinels
        .iter()
        .map(|s| format!("(\"127.0.0.1\", {})", s.addr().rsplit_once(':').unwrap().1))
        .collect::<Vec<_>>()
        .join(", ");
    let script = format!(
        r#"
import asyncio, agent_worker, redis.sentinel, redis.asyncio.sentinel
sentinel = redis.sentinel.Sentinel([{hosts}], socket_timeout=5)
client = sentinel.master_for("{master}", redis_class=agent_worker.Client, socket_timeout=10)
client.enqueue_agent_start("sentinel-call-from-python", user_id="py")
print(client.wait_ready("sentinel-call-from-python", timeout=20).status)

async def main():
    sentinel = redis.asyncio.sentinel.Sentinel([{hosts}], socket_timeout=5)
    client = sentinel.master_for("{master}", redis_class=agent_worker.AsyncClient, socket_timeout=10)
    await client.enqueue_agent_start("sentinel-call-from-asyncio", user_id="py")
    print((await client.wait_ready("sentinel-call-from-asyncio", timeout=20)).status)
    await client.aclose()
asyncio.run(main())
"#,
        master = redis.master,
    );
    let out = python()
        .arg("-c")
        .arg(&script)
        .output()
        .await
        .expect("python3");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ready\nready");
}
