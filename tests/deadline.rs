//! Starts with a deadline and the tombstone rule (issue 25), with a real redis-server, the real
//! worker and the test agent: a job claimed after its `start_by` starts nothing and is dead with
//! `start_expired` (the session `error`, an `error` event); one within its deadline starts; a
//! job whose config was deleted (missing, job older than `session.config_grace`) starts nothing
//! and recreates nothing; a version 1 payload behaves as it always did. Deadlines are compared on
//! Redis's clock; staleness is made by back-dating (`start_by` in the past, `enqueued_at`
//! rewritten), never by waiting. The Python side (`wait_ready` raising at once):
//! `python/tests/test_wait.py`, run by `tests/python_client.rs`.

mod common;

use agent_worker::connection::RedisConn;
use std::time::Duration;

use agent_jobs::{AgentStart, QueueKeys, SessionId, SessionKeys};
use common::*;
use redis::AsyncCommands;

/// Redis's clock, unix ms.
async fn redis_ms(conn: &RedisConn) -> i64 {
    let (secs, micros): (i64, i64) = redis::cmd("TIME")
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    secs * 1000 + micros / 1000
}

async fn exists(conn: &RedisConn, key: &str) -> bool {
    conn.clone().exists(key).await.unwrap()
}

/// A worker whose agents become ready at once; it starts after the test staged its jobs.
fn worker(redis: &TestRedis) -> TestWorker {
    TestWorker::start(redis.settings("ready", &[]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_claimed_after_its_start_by_is_dead_with_start_expired_and_starts_nothing() {
    let redis = TestRedis::start().await;
    let id = sid("expired-1");
    write_config(&redis.conn, &id, "Craig", "alice").await;
    let job = AgentStart::new(id.clone()).with_start_by(redis_ms(&redis.conn).await - 1);
    let task = producer(&redis.conn).enqueue(&job).await.unwrap().task_id;
    let worker = worker(&redis);

    let result = wait_dead(&redis.conn, &task).await;
    assert!(result.contains("start_expired: claimed "), "{result}");
    assert!(
        result.contains("ms after its start_by deadline"),
        "{result}"
    );
    let state = SessionKeys::new(&id).state();
    assert_eq!(status(&redis.conn, &id).await.as_deref(), Some("error"));
    let error = hget(&redis.conn, &state, "error").await.unwrap();
    assert!(error.starts_with("start_expired: claimed "), "{error}");
    assert!(result.contains(&error), "{result} carries {error}");
    for field in ["agentPid", "startupTime"] {
        assert_eq!(hget(&redis.conn, &state, field).await, None, "{field}");
    }
    assert!(!exists(&redis.conn, &SessionKeys::new(&id).agent_pid()).await);
    assert!(
        agent_logs(&redis.conn, &id).await.is_empty(),
        "no agent ran"
    );
    // One event, `error` with the reason: never `starting`, so a waiter fails at once.
    assert_eq!(
        event_statuses(&redis.conn, &id).await,
        [("error".into(), error)]
    );
    // Not in the starting set, and the session can be enqueued again (the key was released).
    assert!(
        !is_member(
            &redis.conn,
            agent_jobs::keys::SESSIONS_STARTING,
            id.as_str()
        )
        .await
    );
    let again = producer(&redis.conn)
        .enqueue(&AgentStart::new(id.clone()))
        .await
        .unwrap();
    assert!(!again.duplicate);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_within_its_deadline_starts_and_a_young_job_without_config_gets_the_default() {
    let redis = TestRedis::start().await;
    let (with_config, without) = (sid("within-1"), sid("within-2"));
    write_config(&redis.conn, &with_config, "Craig", "alice").await;
    let before = redis_ms(&redis.conn).await;
    let mut tasks = Vec::new();
    for id in [&with_config, &without] {
        let job = AgentStart::new(id.clone()).with_start_within(Duration::from_secs(600));
        tasks.push(producer(&redis.conn).enqueue(&job).await.unwrap().task_id);
    }
    let after = redis_ms(&redis.conn).await;
    // start_by is Redis's TIME + 600 s, read by the producer just before the enqueue.
    let keys = QueueKeys::new(QUEUE).unwrap();
    let stored: Vec<u8> = redis
        .conn
        .clone()
        .hget(keys.data(), &tasks[0])
        .await
        .unwrap();
    let start_by = AgentStart::decode(&stored).unwrap().start_by.unwrap();
    assert!(
        (before + 600_000..=after + 600_000).contains(&start_by),
        "{before} <= {start_by} - 600000 <= {after}"
    );
    let enqueued_at: i64 = hget(&redis.conn, &keys.meta(&tasks[0]), "enqueued_at")
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (before..=after).contains(&enqueued_at),
        "enqueued_at {enqueued_at}"
    );

    let worker = worker(&redis);
    for (id, voice) in [(&with_config, "Craig"), (&without, "Ashley")] {
        wait_status(&redis.conn, id, "ready", Duration::from_secs(20)).await;
        assert_agent_of(&wait_received(&redis.conn, id).await, id, voice);
    }
    worker.stop().await;
}

/// Enqueues a job for `id` (no config) and back-dates its `enqueued_at` by two minutes, past
/// the default `session.config_grace` (60 s).
async fn enqueue_stale(conn: &RedisConn, id: &SessionId) -> String {
    let task = enqueue(conn, id, None).await;
    let meta = QueueKeys::new(QUEUE).unwrap().meta(&task);
    let stale = redis_ms(conn).await - 120_000;
    let _: () = conn
        .clone()
        .hset(&meta, "enqueued_at", stale)
        .await
        .unwrap();
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_config_was_deleted_starts_nothing_and_recreates_nothing() {
    let redis = TestRedis::start().await;
    // Ended by its orchestrator before any worker claimed it: every key deleted.
    let gone = sid("tomb-gone");
    let gone_task = enqueue_stale(&redis.conn, &gone).await;
    // The orchestrator's record is still there (written after the enqueue), its config not.
    let recorded = sid("tomb-recorded");
    let recorded_task = enqueue_stale(&redis.conn, &recorded).await;
    let state = SessionKeys::new(&recorded).state();
    let _: () = redis
        .conn
        .clone()
        .hset_multiple(&state, &[("status", "starting"), ("userName", "bob")])
        .await
        .unwrap();
    let worker = worker(&redis);

    for (id, task) in [(&gone, &gone_task), (&recorded, &recorded_task)] {
        let result = wait_dead(&redis.conn, task).await;
        assert!(result.contains("config_missing: session:"), "{result}");
        assert!(
            result.contains("no agent started with the default voice"),
            "{result}"
        );
        let keys = SessionKeys::new(id);
        assert!(
            !exists(&redis.conn, &keys.config()).await,
            "no default config"
        );
        assert!(!exists(&redis.conn, &keys.agent_pid()).await, "no agent");
        assert!(agent_logs(&redis.conn, id).await.is_empty(), "no agent ran");
        let events = event_statuses(&redis.conn, id).await;
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].0, "error");
        assert!(result.contains(&events[0].1), "{result} carries {events:?}");
    }
    assert!(
        !exists(&redis.conn, &SessionKeys::new(&gone).state()).await,
        "not recreated"
    );
    assert_eq!(
        status(&redis.conn, &recorded).await.as_deref(),
        Some("error")
    );
    let error = hget(&redis.conn, &state, "error").await.unwrap();
    assert!(error.starts_with("config_missing: "), "{error}");
    assert_eq!(
        hget(&redis.conn, &state, "userName").await.as_deref(),
        Some("bob")
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_job_without_enqueued_at_or_start_by_behaves_as_before() {
    let redis = TestRedis::start().await;
    // What a version 1 producer wrote: no start_by, no enqueued_at, no config.
    let id = sid("v1-old");
    let task = push_raw(&redis.conn, br#"{"session_id":"v1-old","user_id":"u"}"#).await;
    // A malformed trace context is ignored, not fatal: the start goes on with a root trace.
    let traced = sid("v1-bad-trace");
    push_raw(
        &redis.conn,
        br#"{"session_id":"v1-bad-trace","traceparent":"00-nope","tracestate":"x=1"}"#,
    )
    .await;
    let worker = worker(&redis);
    for id in [&id, &traced] {
        wait_status(&redis.conn, id, "ready", Duration::from_secs(20)).await;
        assert_agent_of(&wait_received(&redis.conn, id).await, id, "Ashley");
    }
    wait_done(&redis.conn, &task, Duration::from_secs(20)).await;
    let statuses: Vec<String> = event_statuses(&redis.conn, &id)
        .await
        .into_iter()
        .map(|(status, _)| status)
        .collect();
    assert_eq!(statuses, ["starting", "ready"]);
    worker.stop().await;
}
