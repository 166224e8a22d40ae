//! No escaped processes: whatever an agent starts, even outside its process group, ends with
//! its session. This machine offers both mechanisms (a writable cgroup v2 and a subreaper), so
//! both are tested, and the cgroup's guarantee after a SIGKILLed worker too: its guard kills
//! what escaped at once, and without the guard the next worker does.

mod common;

use std::time::Duration;

use agent_jobs::{SessionId, SessionKeys};
use common::*;
use nix::sys::signal::Signal;
use redis::AsyncCommands;

/// The tests of this file one at a time: a worker starting in cgroup mode kills what dead
/// workers left in the same cgroup, which is what the second test leaves on purpose for a
/// moment.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn worker(url: &str, containment: &str) -> WorkerProcess {
    WorkerProcess::spawn(worker_command(
        url,
        &["run"],
        "escape",
        &[("AGENT_WORKER__AGENT__CONTAINMENT", containment)],
    ))
}

/// The pid of the process the agent of `id` started outside its group.
async fn escapee(redis: &TestRedis, id: &SessionId) -> u32 {
    wait_for("the escapee's pid", Duration::from_secs(10), || async {
        let lines = agent_logs(&redis.conn, id).await;
        lines
            .iter()
            .find_map(|l| l.strip_prefix("escapee ")?.parse().ok())
    })
    .await
}

/// Ends the session as the orchestrator does; returns once its agent is gone.
async fn end_session(redis: &TestRedis, id: &SessionId) {
    let agent: u32 = hget(&redis.conn, &SessionKeys::new(id).state(), "agentPid")
        .await
        .unwrap()
        .parse()
        .unwrap();
    let _: () = redis
        .conn
        .clone()
        .del(&SessionKeys::new(id).all())
        .await
        .unwrap();
    wait_gone("the agent to stop", Duration::from_secs(10), agent).await;
}

/// Stops the worker; the mechanism it said it used (in `worker_started`).
async fn mechanism(worker: WorkerProcess) -> String {
    let out = worker.stop().await;
    events(&out.stderr)
        .into_iter()
        .find(|e| e["message"] == "worker_started")
        .and_then(|e| e["containment"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escaped_process_ends_with_its_session_in_a_cgroup_and_under_the_subreaper() {
    let _alone = ONE_AT_A_TIME.lock().await;
    for containment in ["cgroup", "subreaper"] {
        let redis = TestRedis::start().await;
        let worker = worker(&redis.url(), containment);
        let id = sid(&format!("escaping-{containment}"));
        enqueue(&redis.conn, &id, None).await;
        wait_status(&redis.conn, &id, "ready", Duration::from_secs(20)).await;
        let escaped = escapee(&redis, &id).await;
        assert!(alive(escaped));
        end_session(&redis, &id).await;
        wait_for(
            &format!("the escaped process to be gone ({containment})"),
            Duration::from_secs(10),
            || async { (!alive(escaped)).then_some(()) },
        )
        .await;
        assert_eq!(mechanism(worker).await, containment);
    }
}

/// The cgroup guard `agent-worker run` started (a child of `worker` running `cgroup-guard`).
async fn guard_of(worker: &WorkerProcess) -> u32 {
    let parent = worker.pid().to_string();
    wait_for(
        "the worker's cgroup guard",
        Duration::from_secs(10),
        || async {
            std::fs::read_dir("/proc")
                .ok()?
                .flatten()
                .find_map(|entry| {
                    let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
                    let status = std::fs::read_to_string(entry.path().join("status")).ok()?;
                    let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:"))?.trim();
                    let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
                    let guard = cmdline.split(|b| *b == 0).any(|arg| arg == b"cgroup-guard");
                    (ppid == parent && guard).then_some(pid)
                })
        },
    )
    .await
}

/// A worker in a cgroup with one ready session whose agent left an escaped process; returns
/// the worker, its agent's pid and the escapee's.
async fn worker_with_an_escapee(redis: &TestRedis, name: &str) -> (WorkerProcess, u32, u32) {
    let worker = worker(&redis.url(), "cgroup");
    let id = sid(name);
    enqueue(&redis.conn, &id, None).await;
    wait_status(&redis.conn, &id, "ready", Duration::from_secs(20)).await;
    let escaped = escapee(redis, &id).await;
    let agent: u32 = hget(&redis.conn, &SessionKeys::new(&id).state(), "agentPid")
        .await
        .unwrap()
        .parse()
        .unwrap();
    (worker, agent, escaped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_workers_escaped_processes_die_with_it_and_without_its_guard_by_the_next_worker()
 {
    let _alone = ONE_AT_A_TIME.lock().await;
    let redis = TestRedis::start().await;
    // The guard sees the worker go and removes its cgroups: the escapee dies at once.
    let (mut first, agent, escaped) = worker_with_an_escapee(&redis, "orphaned-escapee").await;
    let guard = guard_of(&first).await;
    first.kill();
    wait_gone(
        "the agent to die with its worker",
        Duration::from_secs(5),
        agent,
    )
    .await;
    wait_gone(
        "the escaped process to be killed by the guard",
        Duration::from_secs(10),
        escaped,
    )
    .await;
    wait_gone("the guard to exit", Duration::from_secs(10), guard).await;

    // Guard and worker both killed: out of the group, no one's child, the escapee lives on...
    let (mut second, agent, escaped) = worker_with_an_escapee(&redis, "orphaned-twice").await;
    let guard = guard_of(&second).await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(guard as i32), Signal::SIGKILL).unwrap();
    second.kill();
    wait_gone(
        "the agent to die with its worker",
        Duration::from_secs(5),
        agent,
    )
    .await;
    assert!(alive(escaped));
    // ...until a worker starts in the same cgroup and kills what dead workers left.
    let third = worker(&redis.url(), "cgroup");
    wait_gone(
        "the escaped process to be gone",
        Duration::from_secs(10),
        escaped,
    )
    .await;
    assert_eq!(mechanism(third).await, "cgroup");
}
