//! The Python client package (`python/agent_worker`) and the FastAPI example
//! (`examples/fastapi_orchestrator`) against a real redis-server, the real worker and the test
//! agent: each test starts them like the other integration tests, then runs one unittest module
//! of `python/tests/` with the package on `PYTHONPATH` and asserts on its exit status and its
//! report (every test ran, none failed or was skipped).
//!
//! They need `python3` with redis-py (and FastAPI, uvicorn and httpx for the example);
//! `cargo xtask test` installs them. Missing, the tests fail rather than skip.

mod common;

use std::time::Duration;

use common::*;
use tokio::process::Command;

const PYTHON_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python");
/// How long the test agent of the wait tests takes to print its ready line: long enough for
/// the tests to act while a session is still starting.
const READY_DELAY_MS: &str = "2000";
/// The queue of a second worker whose agents always fail to start.
const FAILING_QUEUE: &str = "agent-start-failing";

/// Runs `python3 -m unittest -v tests.<module>` in `python/` with `env`; panics with its
/// output unless exactly `tests` tests ran and all passed.
async fn unittest(module: &str, tests: usize, env: &[(&str, String)]) {
    let path = std::env::var("PYTHONPATH").unwrap_or_default();
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        Command::new("python3")
            .args(["-m", "unittest", "-v", &format!("tests.{module}")])
            .current_dir(PYTHON_DIR)
            .env("PYTHONPATH", format!("{PYTHON_DIR}:{path}"))
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the Python tests finish within 5 minutes")
    .expect("run python3");
    let report = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Shown with --nocapture: the measured latencies are in it.
    eprintln!("{report}{stdout}");
    assert!(
        out.status.success(),
        "tests.{module} failed:\n{report}{stdout}"
    );
    let ran = format!("Ran {tests} test");
    assert!(report.contains(&ran), "expected {ran}s:\n{report}");
    let last = report.lines().rev().find(|l| !l.trim().is_empty());
    assert_eq!(last, Some("OK"), "no failures and no skips:\n{report}");
}

/// Fails the test, with what to install, unless `python3` can import `modules`.
async fn require_python(modules: &[&str]) {
    let code = format!("import {}", modules.join(", "));
    let out = Command::new("python3")
        .args(["-c", &code])
        .output()
        .await
        .expect("these tests need python3");
    assert!(
        out.status.success(),
        "these tests need python3 with {modules:?} (cargo xtask test installs them):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn redis_env(redis: &TestRedis) -> Vec<(&'static str, String)> {
    vec![
        ("AGENT_WORKER_TEST_REDIS_URL", redis.url()),
        ("AGENT_WORKER_TEST_QUEUE", QUEUE.to_owned()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_ready_sync_and_async_with_the_real_worker() {
    require_python(&["redis"]).await;
    let redis = TestRedis::start().await;
    // The agents of earlier test cases keep running: room for all of them.
    let room = ("AGENT_WORKER__AGENT__MAX_AGENTS", "64");
    let ready = TestWorker::start(
        redis.settings(&format!("ready,--ready-delay-ms,{READY_DELAY_MS}"), &[room]),
    );
    let failing = TestWorker::start(redis.settings(
        "exit-before-ready",
        &[("AGENT_WORKER__REDIS__QUEUE", FAILING_QUEUE), room],
    ));
    let mut env = redis_env(&redis);
    env.push(("AGENT_WORKER_TEST_FAILING_QUEUE", FAILING_QUEUE.to_owned()));
    env.push((
        "AGENT_WORKER_TEST_READY_DELAY_MS",
        READY_DELAY_MS.to_owned(),
    ));
    unittest("test_wait", 10, &env).await;
    failing.stop().await;
    ready.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_session_stops_the_agent_of_a_worker_in_another_process() {
    require_python(&["redis"]).await;
    let redis = TestRedis::start().await;
    let procs = KillOnDrop::default();
    // The real binary, `agent-worker run`: its own process, heartbeating every second.
    let worker = procs.track(
        worker_command(&redis.url(), &["run"], "ready", &[])
            .spawn()
            .expect("start agent-worker run"),
    );
    unittest("test_end", 4, &redis_env(&redis)).await;
    signal(&worker, nix::sys::signal::Signal::SIGTERM);
    let out = output_of(worker).await;
    assert!(out.status.success(), "the worker stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fastapi_example_runs_the_seed_scenario() {
    require_python(&["redis", "fastapi", "uvicorn", "httpx"]).await;
    let redis = TestRedis::start().await;
    let worker = TestWorker::start(redis.settings("ready", &[]));
    unittest("test_fastapi", 1, &redis_env(&redis)).await;
    worker.stop().await;
}
