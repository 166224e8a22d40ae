//! Bad payloads and failing agents: the job goes to the dead set with a message, the worker
//! keeps going, the good jobs around it still run, and no process is left behind.

mod common;

use std::time::Duration;

use agent_jobs::{QueueKeys, SessionKeys};
use common::*;
use redis::AsyncCommands;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_payload_goes_dead_and_the_next_good_job_still_runs() {
    let redis = TestRedis::start().await;
    let worker = TestWorker::start(redis.settings("ready", &[]));
    let long = format!(r#"{{"session_id":"{}"}}"#, "a".repeat(200));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "non-JSON bytes",
            b"\xff\xfe\x00garbage".to_vec(),
            "not valid JSON",
        ),
        ("empty object", b"{}".to_vec(), "no session_id"),
        (
            "empty id",
            br#"{"session_id":""}"#.to_vec(),
            "session_id is empty",
        ),
        ("glob id", br#"{"session_id":"*"}"#.to_vec(), "'*'"),
        ("colon id", br#"{"session_id":"a:b"}"#.to_vec(), "':'"),
        ("space id", br#"{"session_id":"a b"}"#.to_vec(), "' '"),
        ("200 chars", long.into_bytes(), "200 characters"),
        (
            "number id",
            br#"{"session_id":12345}"#.to_vec(),
            "must be a string, found a number",
        ),
    ];
    for (i, (name, payload, expected)) in cases.into_iter().enumerate() {
        let bad = push_raw(&redis.conn, &payload).await;
        let good_id = sid(&format!("good-after-{i}"));
        let good = enqueue(&redis.conn, &good_id, None).await;
        let result = wait_dead(&redis.conn, &bad).await;
        assert!(
            result.contains("invalid agent-start payload") && result.contains(expected),
            "{name}: the dead job says what was wrong: {result}"
        );
        wait_done(&redis.conn, &good, Duration::from_secs(20)).await;
        assert_eq!(
            status(&redis.conn, &good_id).await.as_deref(),
            Some("ready"),
            "{name}"
        );
        assert_first_run(&redis.conn, name).await;
    }
    // Nothing was retried through the scheduled set and nothing is stuck in flight.
    let keys = QueueKeys::new(QUEUE).unwrap();
    let scheduled: usize = redis.conn.clone().zcard(keys.scheduled()).await.unwrap();
    assert_eq!(scheduled, 0);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_payload_fetched_in_one_batch_with_good_ones_does_not_hold_them_back() {
    let redis = TestRedis::start().await;
    // Everything is queued before the worker starts, so one fetch takes the whole batch.
    let goods: Vec<_> = (0..3).map(|i| sid(&format!("batch-good-{i}"))).collect();
    let mut good_tasks = vec![enqueue(&redis.conn, &goods[0], None).await];
    let bad = push_raw(&redis.conn, b"not json at all").await;
    for id in &goods[1..] {
        good_tasks.push(enqueue(&redis.conn, id, None).await);
    }
    let worker =
        TestWorker::start(redis.settings("ready", &[("AGENT_WORKER__WORKER__BATCH_SIZE", "8")]));
    wait_dead(&redis.conn, &bad).await;
    for task in &good_tasks {
        wait_done(&redis.conn, task, Duration::from_secs(20)).await;
    }
    worker.stop().await;
}

/// Asserts the launch of `behaviour` fails every attempt with `expected` in the error, ends
/// dead, and leaves no zombie.
async fn launch_fails(behaviour: &str, command: Option<&str>, expected: &str) {
    let redis = TestRedis::start().await;
    // Each test agent writes the ledger as it starts, before the worker can see it fail.
    let ledger = Ledger::new();
    let agent = ledger.command(behaviour);
    let overrides = [
        ("AGENT_WORKER__AGENT__STARTUP_TIMEOUT", "1s"),
        ("AGENT_WORKER__AGENT__COMMAND", command.unwrap_or(&agent)),
    ];
    let worker = TestWorker::start(redis.settings(behaviour, &overrides));
    let id = sid(&format!("fails-{behaviour}"));
    let task = enqueue(&redis.conn, &id, None).await;
    let result = wait_dead(&redis.conn, &task).await;
    assert!(
        result.contains("after 3 attempt(s)") && result.contains(expected),
        "{behaviour}: {result}"
    );
    let state = SessionKeys::new(&id).state();
    assert_eq!(status(&redis.conn, &id).await.as_deref(), Some("error"));
    let error = hget(&redis.conn, &state, "error").await.unwrap_or_default();
    assert!(
        error.contains(expected),
        "{behaviour}: session error {error:?}"
    );
    let starting: bool = redis
        .conn
        .clone()
        .sismember("session:starting", id.as_str())
        .await
        .unwrap();
    assert!(!starting, "a failed session leaves session:starting");
    if command.is_none() {
        let attempts = ledger.sessions();
        assert_eq!(
            attempts.len(),
            3,
            "{behaviour}: three launches: {attempts:?}"
        );
        assert!(attempts.iter().all(|(room, _)| *room == id.as_str()));
    }
    assert_first_run(&redis.conn, behaviour).await;
    // The dead job released the session's idempotency key: it can be started again at once.
    let again = enqueue(&redis.conn, &id, None).await;
    assert_ne!(again, task, "{behaviour}: a new job, not the dead one");
    worker.stop().await;
    wait_for("no zombie children", Duration::from_secs(5), || async {
        zombie_children().is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_exits_before_ready_is_retried_then_dead() {
    launch_fails(
        "exit-before-ready",
        None,
        "exited with code 3 before it was ready",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_never_prints_ready_is_killed_retried_then_dead() {
    launch_fails("never-ready", None, "no ready line within 1s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_agent_program_is_retried_then_dead() {
    launch_fails(
        "ready",
        Some("/nonexistent/voice-agent,--flag"),
        "could not be executed: No such file or directory",
    )
    .await;
}

/// Runs one start of the shell `script` as the agent (one attempt; a 1 s start-up timeout),
/// waits for its job to be dead, and then for the process whose pid the script printed after
/// `marker` to be gone. Returns the job's stored result.
async fn failed_start_leaves_nothing(id: &str, script: &str, marker: &str) -> String {
    let redis = TestRedis::start().await;
    let command = format!("/bin/sh,-c,{script},agent");
    let worker = TestWorker::start(redis.settings(
        "ready",
        &[
            ("AGENT_WORKER__AGENT__COMMAND", &command),
            ("AGENT_WORKER__AGENT__STARTUP_TIMEOUT", "1s"),
            ONE_ATTEMPT,
        ],
    ));
    let id = sid(id);
    let task = enqueue(&redis.conn, &id, None).await;
    let result = wait_dead(&redis.conn, &task).await;
    let pid = logged_pid(&redis.conn, &id, marker).await;
    wait_gone(
        &format!("the process after {marker} to be killed"),
        Duration::from_secs(5),
        pid,
    )
    .await;
    worker.stop().await;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_never_ready_agent_is_killed_with_its_whole_process_group() {
    // A shell as the agent, only to give it a child: both must be gone after the timeout.
    let result =
        failed_start_leaves_nothing("group-kill-1", "sleep 300 & echo child=$!; wait", "child=")
            .await;
    assert!(result.contains("no ready line within 1s"), "{result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_closes_its_output_and_hangs_times_out_and_is_killed() {
    let result = failed_start_leaves_nothing(
        "silent-hang-1",
        "echo pid=$$; exec >/dev/null 2>&1; sleep 300",
        "pid=",
    )
    .await;
    assert!(result.contains("no ready line within 1s"), "{result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_left_by_an_agent_that_exited_are_killed() {
    let result =
        failed_start_leaves_nothing("straggler-1", "sleep 300 & echo child=$!; exit 3", "child=")
            .await;
    assert!(result.contains("exited with code 3"), "{result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_a_failing_start_makes_no_further_attempts() {
    let redis = TestRedis::start().await;
    // Each test agent writes the ledger as it starts: unlike its shipped output, it cannot
    // lag behind a second attempt.
    let ledger = Ledger::new();
    let worker = TestWorker::start(ledger.worker_settings(
        &redis,
        "never-ready",
        &[
            ("AGENT_WORKER__AGENT__STARTUP_TIMEOUT", "2s"),
            ("AGENT_WORKER__AGENT__START_ATTEMPTS", "3"),
        ],
    ));
    let id = sid("stop-while-starting");
    enqueue(&redis.conn, &id, None).await;
    // The first attempt is under way once the agent reported its arguments.
    wait_received(&redis.conn, &id).await;
    worker.stop().await;
    let attempts = ledger.sessions();
    assert_eq!(
        attempts.len(),
        1,
        "no retry here after the shutdown began: {attempts:?}"
    );
    // The attempts left are another replica's: the session stays `starting` and the job is
    // retryable, not dead.
    assert_eq!(status(&redis.conn, &id).await.as_deref(), Some("starting"));
    let dead: usize = redis
        .conn
        .clone()
        .scard(QueueKeys::new(QUEUE).unwrap().dead())
        .await
        .unwrap();
    assert_eq!(dead, 0);
}

/// A pid the agent printed as `<prefix><pid>` (the shell agents of these tests report theirs),
/// once its output has been shipped.
async fn logged_pid(
    conn: &agent_worker::connection::RedisConn,
    id: &agent_jobs::SessionId,
    prefix: &str,
) -> u32 {
    wait_for(
        &format!("the agent's {prefix} line"),
        Duration::from_secs(10),
        || async {
            agent_logs(conn, id)
                .await
                .iter()
                .find_map(|l| l.strip_prefix(prefix).and_then(|p| p.parse().ok()))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_typed_idempotency_key_fails_the_enqueue_by_name_and_writes_nothing() {
    let redis = TestRedis::start().await;
    let mut conn = redis.conn.clone();
    let producer = producer(&redis.conn);
    let jobs: Vec<_> = ["idem-ok-1", "idem-bad", "idem-ok-2"]
        .iter()
        .map(|name| agent_jobs::AgentStart::new(sid(name)))
        .collect();
    let idem_key = |job: &agent_jobs::AgentStart| {
        format!(
            "{}:{}",
            producer.keys().idempotency_prefix(),
            agent_jobs::producer::idempotency_key(job)
        )
    };
    // Something other than a task id where the second job's claim would go.
    let bad = idem_key(&jobs[1]);
    let _: () = conn.hset(&bad, "not", "a task id").await.unwrap();

    for batch in [&jobs[..], &jobs[1..2]] {
        let err = producer.enqueue_many(batch).await.unwrap_err().to_string();
        assert!(err.contains(&bad) && err.contains("hash"), "{err}");
    }
    // The first job's claim was released, and no job was written.
    let claimed: bool = conn.exists(idem_key(&jobs[0])).await.unwrap();
    assert!(!claimed, "a claim of the failed batch was left behind");
    let keys = producer.keys();
    let (data, active): (usize, usize) = redis::pipe()
        .hlen(keys.data())
        .llen(keys.active())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!((data, active), (0, 0));
    let metas: Vec<String> = conn
        .keys(format!("{}:*", keys.meta_prefix()))
        .await
        .unwrap();
    assert!(metas.is_empty(), "{metas:?}");

    // The other sessions enqueue normally.
    let good = [jobs[0].clone(), jobs[2].clone()];
    let enqueued = producer.enqueue_many(&good).await.unwrap();
    assert!(enqueued.iter().all(|e| !e.duplicate));
    let active: usize = conn.llen(keys.active()).await.unwrap();
    assert_eq!(active, 2);
}
