//! The Python client package (`python/agent_worker`) and the FastAPI example
//! (`examples/fastapi_orchestrator`) against a real redis-server, the real worker and the test
//! agent: each test starts them like the other integration tests, then runs one unittest module
//! of `python/tests/` with the package on `PYTHONPATH` and asserts on its exit status and its
//! report (every test ran, none failed or was skipped).
//!
//! They need `python3` with redis-py (and FastAPI, uvicorn and httpx for the example);
//! `cargo xtask test` installs them. Missing, the tests fail rather than skip.

mod common;

use common::*;

/// How long the test agent of the wait tests takes to print its ready line: long enough for
/// the tests to act while a session is still starting.
const READY_DELAY_MS: &str = "2000";
/// The queue of a second worker whose agents always fail to start.
const FAILING_QUEUE: &str = "agent-start-failing";

fn redis_env(redis: &TestRedis) -> Vec<(&'static str, String)> {
    vec![
        ("AGENT_WORKER_TEST_REDIS_URL", redis.url()),
        ("AGENT_WORKER_TEST_QUEUE", QUEUE.to_owned()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sync_and_async_clients_offer_the_same_operations() {
    require_python(&["redis"]).await;
    // No Redis: the twins' method sets and signatures (python/tests/test_api.py).
    unittest("test_api", 2, &[], &[]).await;
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
    unittest("test_wait", 12, &env, &[]).await;
    failing.stop().await;
    ready.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_session_stops_the_agent_of_a_worker_in_another_process() {
    require_python(&["redis"]).await;
    let redis = TestRedis::start().await;
    // The real binary, `agent-worker run`: its own process, heartbeating every second.
    let worker = WorkerProcess::run(&redis.url(), "ready", &[]);
    unittest("test_end", 4, &redis_env(&redis), &[]).await;
    worker.stop_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fastapi_example_runs_the_seed_scenario() {
    require_python(&["redis", "fastapi", "uvicorn", "httpx"]).await;
    let redis = TestRedis::start().await;
    let worker = TestWorker::start(redis.settings("ready", &[]));
    unittest("test_fastapi", 1, &redis_env(&redis), &[]).await;
    worker.stop().await;
}
