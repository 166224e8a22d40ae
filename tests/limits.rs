//! One agent's leak or fork storm costs only its own call: per-agent memory and process limits
//! over the whole tree (`agent.memory_max`, `agent.memory_high`, `agent.pids_max`).
//!
//! Real processes: `agent-worker run` and the test agent, whose sessions choose their
//! behaviour in their config (`testBehaviour`): a helper that leaks, a tree that grows, a fork
//! storm. This machine mounts the memory and pids controllers as cgroup v1 beside a cgroup v2
//! without controllers: the kernel enforces the limits through the v1 hierarchies, and the
//! sampled enforcement is tested with `containment = subreaper`.

mod common;

use std::{net::SocketAddr, time::Duration};

use agent_jobs::{SessionId, SessionKeys};
use agent_worker::connection::RedisConn;
use common::*;
use redis::AsyncCommands;

/// How fast a limit must show, in these tests (readings every 200 ms).
const WITHIN: Duration = Duration::from_secs(20);

/// The worker with `limits` (settings) and readings every 200 ms.
fn worker(url: &str, limits: &[(&str, &str)]) -> WorkerProcess {
    let mut env = vec![("AGENT_WORKER__AGENT__LIMITS_INTERVAL", "200ms")];
    env.extend_from_slice(limits);
    WorkerProcess::run(url, "ready", &env)
}

/// Starts session `id` whose agent behaves as `behaviour` (with `options`, `name=value`
/// separated by spaces), through its config.
async fn start_as(conn: &RedisConn, id: &SessionId, behaviour: &str, options: &str) {
    let _: () = conn
        .clone()
        .hset_multiple(
            SessionKeys::new(id).config(),
            &[
                ("voiceId", "Craig"),
                ("testBehaviour", behaviour),
                ("testOptions", options),
            ],
        )
        .await
        .unwrap();
    enqueue(conn, id, None).await;
}

/// The worker's HTTP address (`http_listening`).
async fn http_addr(worker: &WorkerProcess) -> SocketAddr {
    worker
        .wait_event("http_listening", Duration::from_secs(20))
        .await["addr"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("http_listening names the address")
}

/// A sample line of `/metrics`, e.g. `agent_worker_agent_stops_total{reason="memory_limit"}`.
async fn metric(addr: SocketAddr, series: &str) -> Option<f64> {
    let text = get(addr, "/metrics").await.1;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// Session `id` ended `error` by its memory limit, enforced as `by` says.
async fn assert_ended_by_memory_limit(conn: &RedisConn, id: &SessionId, by: &str) {
    wait_status(conn, id, "error", WITHIN).await;
    let record = SessionKeys::new(id).state();
    assert_eq!(
        hget(conn, &record, "stopReason").await.as_deref(),
        Some("memory_limit")
    );
    assert_eq!(
        hget(conn, &record, "error").await.as_deref(),
        Some(format!("memory limit 64 MiB reached ({by})").as_str())
    );
    let events = event_statuses(conn, id).await;
    assert!(
        events.contains(&("stopped".to_owned(), "memory_limit".to_owned())),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_helper_leaking_past_memory_max_ends_its_session_alone() {
    let redis = TestRedis::start().await;
    let conn = &redis.conn;
    let worker = worker(
        &redis.url(),
        &[
            ("AGENT_WORKER__AGENT__CONTAINMENT", "cgroup"),
            ("AGENT_WORKER__AGENT__MEMORY_MAX", "64MiB"),
        ],
    );
    let addr = http_addr(&worker).await;
    let neighbour = sid("limits-neighbour");
    start_ready(conn, &neighbour).await;
    let neighbour_pid = agent_pid(conn, &neighbour).await;

    let leaker = sid("limits-leaker");
    start_as(conn, &leaker, "leak-helper", "").await;
    assert_ended_by_memory_limit(conn, &leaker, "oom_kill").await;

    // The neighbour and the worker are untouched.
    assert!(alive(neighbour_pid));
    assert!(alive(worker.pid()));
    assert_eq!(status(conn, &neighbour).await.as_deref(), Some("ready"));
    assert_eq!(
        metric(
            addr,
            r#"agent_worker_agent_stops_total{reason="memory_limit"}"#
        )
        .await,
        Some(1.0)
    );
    let started = worker
        .wait_event("worker_started", Duration::from_secs(1))
        .await;
    // The kernel enforced it: cgroup v2, or memory and pids through v1 (hybrid hosts).
    assert!(
        matches!(started["limits"].as_str(), Some("cgroup-v2" | "cgroup-v1")),
        "{started}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_helper_killed_inside_a_running_agent_is_reported_and_the_call_goes_on() {
    let redis = TestRedis::start().await;
    let conn = &redis.conn;
    let worker = worker(
        &redis.url(),
        &[
            ("AGENT_WORKER__AGENT__CONTAINMENT", "cgroup"),
            ("AGENT_WORKER__AGENT__MEMORY_MAX", "64MiB"),
        ],
    );
    let addr = http_addr(&worker).await;
    let id = sid("limits-helper-dies");
    start_as(conn, &id, "leak-helper", "on-helper-death=continue").await;
    wait_status(conn, &id, "ready", WITHIN).await;
    let killed = worker.wait_event("agent_helper_oom_killed", WITHIN).await;
    assert_eq!(killed["session_id"], id.as_str(), "{killed}");
    assert_eq!(
        metric(addr, "agent_worker_agent_helper_oom_kills_total").await,
        Some(1.0)
    );
    // Its agent saw its helper go, and runs on: the call is not ended for it.
    wait_for("the agent to see its helper end", WITHIN, || async {
        agent_logs(conn, &id)
            .await
            .iter()
            .any(|l| l.starts_with("helper ended"))
            .then_some(())
    })
    .await;
    assert!(alive(agent_pid(conn, &id).await));
    assert_eq!(status(conn, &id).await.as_deref(), Some("ready"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_high_warns_once() {
    let redis = TestRedis::start().await;
    let conn = &redis.conn;
    let worker = worker(
        &redis.url(),
        &[
            ("AGENT_WORKER__AGENT__CONTAINMENT", "cgroup"),
            ("AGENT_WORKER__AGENT__MEMORY_HIGH", "48MiB"),
            ("AGENT_WORKER__AGENT__MEMORY_MAX", "256MiB"),
        ],
    );
    let id = sid("limits-over-high");
    start_as(conn, &id, "grow", "grow-mib=80").await;
    wait_status(conn, &id, "ready", WITHIN).await;
    let warning = worker.wait_event("agent_memory_high", WITHIN).await;
    assert_eq!(warning["session_id"], id.as_str(), "{warning}");
    // Readings go on (the health hash's usage is written at every session heartbeat, each
    // after several readings): three more heartbeats, and still one warning.
    let health = SessionKeys::new(&id).agent_health();
    for _ in 0..3 {
        let before = hget(conn, &health, "last_check").await;
        wait_for("another heartbeat", WITHIN, || async {
            (hget(conn, &health, "last_check").await != before).then_some(())
        })
        .await;
    }
    assert_eq!(worker.events_named("agent_memory_high").len(), 1);
    assert_eq!(status(conn, &id).await.as_deref(), Some("ready"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_storm_stays_inside_pids_max() {
    let redis = TestRedis::start().await;
    let conn = &redis.conn;
    let worker = worker(
        &redis.url(),
        &[
            ("AGENT_WORKER__AGENT__CONTAINMENT", "cgroup"),
            ("AGENT_WORKER__AGENT__PIDS_MAX", "32"),
        ],
    );
    let id = sid("limits-fork-storm");
    start_as(conn, &id, "fork-storm", "forks=100").await;
    wait_status(conn, &id, "ready", WITHIN).await;
    let line = wait_for("the storm's tally", WITHIN, || async {
        agent_logs(conn, &id)
            .await
            .into_iter()
            .find(|l| l.starts_with("forks ok="))
    })
    .await;
    let count = |name: &str| -> usize {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.parse().ok())
            .unwrap()
    };
    let (ok, failed) = (count("ok="), count("failed="));
    assert!(failed > 0, "forks failed inside the agent: {line}");
    assert!(ok < 32, "{line}");
    // The agent and what it started: bounded by pids_max.
    let agent = agent_pid(conn, &id).await;
    let tree = agent_worker::agent::limits::tree(agent);
    assert!(tree.len() <= 32, "{} processes in the tree", tree.len());
    assert_eq!(
        tree.len(),
        ok + 1,
        "the agent and its lingering children: {tree:?}"
    );

    // A clean stop leaves no cgroup behind, in any hierarchy.
    let guard = worker
        .wait_event("cgroup_guard_started", Duration::from_secs(1))
        .await;
    let name = guard["cgroup"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    worker.stop_cleanly().await;
    let left = cgroups_named(std::path::Path::new("/sys/fs/cgroup"), &name, 4);
    assert!(left.is_empty(), "{left:?}");
}

/// Directories named `name` below `dir`, `depth` levels down at most.
fn cgroups_named(dir: &std::path::Path, name: &str, depth: usize) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if entry.file_name().to_string_lossy() == name {
            found.push(path);
        } else if depth > 0 {
            found.extend(cgroups_named(&path, name, depth - 1));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_cgroup_memory_max_is_enforced_by_sampling() {
    let redis = TestRedis::start().await;
    let conn = &redis.conn;
    let worker = worker(
        &redis.url(),
        &[
            ("AGENT_WORKER__AGENT__CONTAINMENT", "subreaper"),
            ("AGENT_WORKER__AGENT__MEMORY_MAX", "64MiB"),
        ],
    );
    let started = worker
        .wait_event("worker_started", Duration::from_secs(20))
        .await;
    assert_eq!(started["limits"], "sampled", "{started}");
    let neighbour = sid("sampled-neighbour");
    start_ready(conn, &neighbour).await;
    let leaker = sid("sampled-leaker");
    start_as(conn, &leaker, "leak-helper", "on-helper-death=continue").await;
    assert_ended_by_memory_limit(conn, &leaker, "sampled").await;
    assert_eq!(status(conn, &neighbour).await.as_deref(), Some("ready"));
    assert!(alive(worker.pid()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_lose_to_the_oom_killer_before_the_worker_and_their_usage_is_shown() {
    let redis = TestRedis::start().await;
    let conn = &redis.conn;
    let worker = worker(&redis.url(), &[]);
    let addr = http_addr(&worker).await;
    let id = sid("limits-usage");
    start_as(conn, &id, "grow", "grow-mib=40").await;
    wait_status(conn, &id, "ready", WITHIN).await;
    let agent = agent_pid(conn, &id).await;
    let score = |pid: u32| -> i32 {
        std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    assert!(
        score(agent) > score(worker.pid()),
        "{} vs {}",
        score(agent),
        score(worker.pid())
    );

    // Its memory, in its health hash, `status --json` and on the console.
    let health = SessionKeys::new(&id).agent_health();
    let memory: u64 = wait_for("the agent's memory in its health hash", WITHIN, || async {
        hget(conn, &health, "memory_bytes").await?.parse().ok()
    })
    .await;
    assert!(memory >= 40 << 20, "{memory}");
    let usage = wait_for("the agent's memory in status --json", WITHIN, || async {
        let out = worker_command(&redis.url(), &["status", "--json"], "ready", &[])
            .output()
            .unwrap();
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        status["workers"][0]["info"]["agents"]
            .as_array()?
            .iter()
            .find(|a| a["session_id"] == id.as_str())
            .cloned()
    })
    .await;
    assert!(
        usage["memory_bytes"].as_u64().unwrap() >= 40 << 20,
        "{usage}"
    );
    let page = get(addr, &format!("/sessions/{id}")).await.1;
    assert!(
        page.contains("Memory ") && page.contains(" MiB (peak "),
        "{page}"
    );
}
