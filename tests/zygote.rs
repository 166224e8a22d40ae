//! The forked start mode (`agent.zygote_command`, docs/zygote.md) with the real binary, the
//! real Python fork server (`python3 -m agent_worker.zygote`) and the Python stand-in of the
//! real agent (`tests/agents/voice_assistant.py`, which parses its arguments as Pipecat's does
//! and reports what it received): each session's agent is forked, first-class (its own pid,
//! process group and cgroup), and a zygote that dies or refuses costs latency, never a start.
//!
//! These tests need `python3` with redis-py (`cargo xtask test` installs it).

mod common;

use std::{collections::HashSet, time::Duration};

use agent_jobs::{AgentStart, SessionId, SessionKeys};
use agent_worker::connection::RedisConn;
use common::*;
use nix::sys::signal::Signal;

const AGENT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/agents/voice_assistant.py"
);
/// A module that starts a thread at import (a preload the zygote must refuse).
const THREAD_MODULE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/tests/zygote_agents");

/// `agent-worker run` whose agents are forked by a zygote that preloaded `preload` (modules
/// separated by `:`, as the list setting splits at commas; cold: the
/// same script with `python3`), with `extra` overrides.
fn worker(redis: &TestRedis, preload: &str, extra: &[(&str, &str)]) -> WorkerProcess {
    let cold = format!("python3,{AGENT}");
    let zygote = format!("python3,-m,agent_worker.zygote,--preload,{preload},--,{AGENT}");
    let mut env = vec![
        ("AGENT_WORKER__AGENT__COMMAND", cold.as_str()),
        ("AGENT_WORKER__AGENT__ZYGOTE_COMMAND", zygote.as_str()),
        ("AGENT_WORKER__AGENT__STARTUP_TIMEOUT", "30s"),
        ("AGENT_WORKER__AGENT__MAX_AGENTS", "40"),
        ("AGENT_WORKER__WORKER__CONCURRENCY", "40"),
        ("AGENT_WORKER__SESSION__STALE_AFTER", "60s"),
        ("PYTHONDONTWRITEBYTECODE", "1"),
    ];
    env.extend_from_slice(extra);
    let mut command = worker_command(&redis.url(), &["run"], "ready", &env);
    let path = format!("{}:{THREAD_MODULE_DIR}", python_path());
    command
        .env("REDIS_URL", redis.url())
        .env("PYTHONPATH", path);
    WorkerProcess::spawn(command)
}

/// The pid of the zygote the worker last reported ready.
async fn zygote_ready(worker: &WorkerProcess, n: usize) -> u32 {
    let events = worker
        .wait_events("zygote_ready", n, Duration::from_secs(60))
        .await;
    events[n - 1]["pid"].as_u64().expect("a pid") as u32
}

/// Writes the configs of `n` sessions named `<prefix>-<i>` (voice `Voice<i>`) and enqueues
/// them all at once.
async fn burst(conn: &RedisConn, prefix: &str, n: usize) -> Vec<(SessionId, String)> {
    let sessions: Vec<_> = (0..n)
        .map(|i| (sid(&format!("{prefix}-{i}")), format!("Voice{i:02}")))
        .collect();
    for (id, voice) in &sessions {
        write_config(conn, id, voice, "test_concurrent_user").await;
    }
    // Every job carries a trace context of its own, which its forked agent must receive.
    let jobs: Vec<_> = sessions
        .iter()
        .enumerate()
        .map(|(i, (id, _))| {
            AgentStart::new(id.clone())
                .with_user("test_concurrent_user")
                .with_traceparent(traceparent(i))
                .expect("a valid traceparent")
        })
        .collect();
    producer(conn).enqueue_many(&jobs).await.unwrap();
    sessions
}

/// The W3C trace context of the `i`th job of a burst.
fn traceparent(i: usize) -> String {
    format!("00-{:032x}-{:016x}-01", 0xa11ce + i, 0xb0b + i)
}

/// What the Python agent of `id` reported receiving (`voice-agent received {json}`).
async fn report(conn: &RedisConn, id: &SessionId) -> serde_json::Value {
    wait_for(
        &format!("the agent of {id} to report"),
        Duration::from_secs(30),
        || async {
            agent_logs(conn, id).await.iter().find_map(|l| {
                l.strip_prefix("voice-agent received ")
                    .and_then(|json| serde_json::from_str(json).ok())
            })
        },
    )
    .await
}

/// How the agent of `id` started (`warm` of `session:<id>`: 0 cold, 2 forked).
async fn start_mode(conn: &RedisConn, id: &SessionId) -> String {
    hget(conn, &SessionKeys::new(id).state(), "warm")
        .await
        .unwrap_or_default()
}

/// The cgroup lines of a process (`/proc/<pid>/cgroup`), without the hierarchies every
/// process shares with its parent (those that containment does not place it in).
fn cgroups(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default()
}

/// The zygote's state as `status --json` shows it once `check` of it holds.
async fn zygote_status(
    redis: &TestRedis,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_for(
        "status --json to show the zygote",
        Duration::from_secs(20),
        || async {
            let out = worker_command(&redis.url(), &["status", "--json"], "ready", &[])
                .output()
                .expect("agent-worker status");
            let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let zygote = status["workers"].as_array()?.first()?["info"]["zygote"].clone();
            check(&zygote).then_some(zygote)
        },
    )
    .await
}

/// The process group of `pid`.
fn pgid(pid: u32) -> u32 {
    nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid as i32)))
        .map(|p| p.as_raw() as u32)
        .unwrap_or(0)
}

/// The parent of `pid`.
fn ppid(pid: u32) -> u32 {
    proc_state(pid).map(|(_, ppid)| ppid).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_sessions_at_once_each_get_a_forked_agent_of_their_own() {
    require_python(&["redis"]).await;
    let redis = TestRedis::start().await;
    let worker = worker(&redis, "argparse:json:redis", &[]);
    let zygote = zygote_ready(&worker, 1).await;
    let sessions = burst(&redis.conn, "zyg-burst", 30).await;

    let (mut pids, mut groups, mut cgroup_sets) = (HashSet::new(), HashSet::new(), HashSet::new());
    for (i, (id, voice)) in sessions.iter().enumerate() {
        wait_status(&redis.conn, id, "ready", Duration::from_secs(60)).await;
        let got = report(&redis.conn, id).await;
        assert_eq!(got["voice_id"], voice.as_str(), "voice of {id}");
        // The job's trace continues in the agent (traces are off: the job's own context).
        let tp = got["traceparent"].as_str().unwrap_or_default();
        assert_eq!(&tp[..36], &traceparent(i)[..36], "trace of {id}: {got}");
        assert_eq!(got["room"], id.as_str(), "room of {id}");
        assert_eq!(start_mode(&redis.conn, id).await, "2", "{id} was forked");
        let pid = agent_pid(&redis.conn, id).await;
        assert!(pids.insert(pid), "pid {pid} serves two sessions");
        assert_eq!(pgid(pid), pid, "{id}'s agent leads its own group");
        assert!(groups.insert(pgid(pid)));
        assert_eq!(
            ppid(pid),
            worker.pid(),
            "{id}'s agent is the worker's child"
        );
        assert_ne!(pid, zygote);
        let lines = cgroups(pid);
        assert_ne!(lines, cgroups(zygote), "{id} is in its own cgroups");
        assert!(cgroup_sets.insert(lines), "{id} shares a cgroup");
    }

    // Ending one session stops its agent only.
    let (first, _) = &sessions[0];
    let first_pid = agent_pid(&redis.conn, first).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first_pid as i32),
        Signal::SIGUSR1,
    )
    .unwrap();
    wait_status(&redis.conn, first, "completed", Duration::from_secs(20)).await;
    wait_gone("the hung-up agent", Duration::from_secs(10), first_pid).await;
    for (id, _) in &sessions[1..] {
        assert!(alive(agent_pid(&redis.conn, id).await), "{id} still runs");
    }
    assert!(alive(zygote), "the zygote still serves");
    let shown = zygote_status(&redis, |z| z["forked"].as_u64() >= Some(30)).await;
    assert_eq!(shown["state"], "ready", "{shown}");
    assert_eq!(shown["pid"].as_u64(), Some(u64::from(zygote)), "{shown}");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_zygote_is_replaced_and_the_session_waiting_on_it_starts_cold() {
    require_python(&["redis"]).await;
    let redis = TestRedis::start().await;
    let worker = worker(&redis, "argparse:json:redis", &[]);
    let zygote = zygote_ready(&worker, 1).await;
    // Stopped, it neither answers nor dies.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(zygote as i32), Signal::SIGSTOP).unwrap();
    let sessions = burst(&redis.conn, "zyg-hung", 1).await;
    let (id, voice) = &sessions[0];
    wait_status(&redis.conn, id, "ready", Duration::from_secs(30)).await;
    assert_eq!(report(&redis.conn, id).await["voice_id"], voice.as_str());
    assert_eq!(start_mode(&redis.conn, id).await, "0", "started cold");
    let broken = worker
        .wait_event("zygote_broken", Duration::from_secs(5))
        .await;
    assert!(
        broken["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("no reply"),
        "{broken}"
    );
    wait_gone("the hung zygote", Duration::from_secs(10), zygote).await;
    let second = zygote_ready(&worker, 2).await;
    assert_ne!(second, zygote);
    let shown = zygote_status(&redis, |z| z["pid"].as_u64() == Some(u64::from(second))).await;
    assert_eq!(shown["state"], "ready", "{shown}");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zygote_killed_mid_burst_costs_latency_never_a_start() {
    require_python(&["redis"]).await;
    let redis = TestRedis::start().await;
    let worker = worker(&redis, "argparse:json:redis", &[]);
    let zygote = zygote_ready(&worker, 1).await;
    let sessions = burst(&redis.conn, "zyg-killed", 20).await;
    wait_status(
        &redis.conn,
        &sessions[0].0,
        "ready",
        Duration::from_secs(60),
    )
    .await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(zygote as i32), Signal::SIGKILL).unwrap();

    let mut modes = Vec::new();
    for (id, voice) in &sessions {
        wait_status(&redis.conn, id, "ready", Duration::from_secs(90)).await;
        assert_eq!(report(&redis.conn, id).await["voice_id"], voice.as_str());
        modes.push(start_mode(&redis.conn, id).await);
    }
    eprintln!("start modes after the kill: {modes:?}");
    assert_eq!(modes[0], "2");
    // A new zygote comes up after the back-off, and forks again.
    let second = zygote_ready(&worker, 2).await;
    assert_ne!(second, zygote);
    let after = burst(&redis.conn, "zyg-after", 1).await;
    wait_status(&redis.conn, &after[0].0, "ready", Duration::from_secs(30)).await;
    assert_eq!(start_mode(&redis.conn, &after[0].0).await, "2");
    // Every agent forked by the killed zygote lives on.
    for (id, _) in &sessions {
        assert!(alive(agent_pid(&redis.conn, id).await), "{id} still runs");
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preload_that_starts_a_thread_is_refused_by_name_and_sessions_start_cold() {
    require_python(&["redis"]).await;
    let redis = TestRedis::start().await;
    let worker = worker(&redis, "json:starts_thread", &[]);
    let down = worker
        .wait_event(
            "zygote_down; retrying with back-off, sessions start cold meanwhile",
            Duration::from_secs(30),
        )
        .await;
    let reason = down["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("sleeper-at-import"), "{down}");
    assert!(reason.contains("starts_thread"), "{down}");
    let sessions = burst(&redis.conn, "zyg-refused", 2).await;
    for (id, voice) in &sessions {
        wait_status(&redis.conn, id, "ready", Duration::from_secs(30)).await;
        assert_eq!(report(&redis.conn, id).await["voice_id"], voice.as_str());
        assert_eq!(start_mode(&redis.conn, id).await, "0", "{id} started cold");
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_worker_leaves_no_zygote_and_no_agent_behind() {
    require_python(&["redis"]).await;
    let redis = TestRedis::start().await;
    let mut worker = worker(&redis, "argparse:json:redis", &[]);
    let zygote = zygote_ready(&worker, 1).await;
    let sessions = burst(&redis.conn, "zyg-orphans", 3).await;
    let mut pids = vec![zygote];
    for (id, _) in &sessions {
        wait_status(&redis.conn, id, "ready", Duration::from_secs(60)).await;
        assert_eq!(start_mode(&redis.conn, id).await, "2");
        pids.push(agent_pid(&redis.conn, id).await);
    }
    worker.kill();
    for pid in pids {
        wait_gone(
            "a process of the killed worker",
            Duration::from_secs(10),
            pid,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_zygote_is_recycled_new_one_first_and_its_agents_live_on() {
    require_python(&["redis"]).await;
    let redis = TestRedis::start().await;
    let worker = worker(
        &redis,
        "argparse:json:redis",
        &[("AGENT_WORKER__AGENT__WARM_MAX_IDLE", "3s")],
    );
    let first = zygote_ready(&worker, 1).await;
    let before = burst(&redis.conn, "zyg-old", 1).await;
    wait_status(&redis.conn, &before[0].0, "ready", Duration::from_secs(30)).await;
    let agent = agent_pid(&redis.conn, &before[0].0).await;

    let second = zygote_ready(&worker, 2).await;
    assert_ne!(second, first);
    let recycled = worker
        .wait_event("zygote_recycled", Duration::from_secs(10))
        .await;
    assert_eq!(
        recycled["pid"].as_u64(),
        Some(u64::from(first)),
        "{recycled}"
    );
    wait_gone("the recycled zygote", Duration::from_secs(10), first).await;
    assert!(alive(agent), "the agent the old zygote forked lives on");
    assert!(worker.events_named("zygote_broken").is_empty());

    let after = burst(&redis.conn, "zyg-new", 1).await;
    wait_status(&redis.conn, &after[0].0, "ready", Duration::from_secs(30)).await;
    assert_eq!(start_mode(&redis.conn, &after[0].0).await, "2");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zygote_over_its_memory_limit_is_recycled() {
    require_python(&["redis"]).await;
    let redis = TestRedis::start().await;
    let worker = worker(
        &redis,
        "json",
        &[("AGENT_WORKER__AGENT__ZYGOTE_MEMORY_MAX", "1MiB")],
    );
    let first = zygote_ready(&worker, 1).await;
    let recycled = worker
        .wait_event("zygote_recycled", Duration::from_secs(20))
        .await;
    assert_eq!(
        recycled["pid"].as_u64(),
        Some(u64::from(first)),
        "{recycled}"
    );
    assert!(
        recycled["why"].as_str().unwrap_or_default().contains("RSS"),
        "{recycled}"
    );
    worker.stop().await;
}
