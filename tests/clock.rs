//! The stores write their timestamps on the clock they are built with (`clock::Clock`), not on
//! a process-wide setting: what a claim, a heartbeat and a promotion write can be checked
//! against a clock the test sets.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use agent_jobs::{QueueKeys, SessionKeys};
use agent_worker::{
    clock::Clock,
    queue::QueueOps,
    session::{ClaimAttempt, SessionStore},
};
use common::*;
use redis::AsyncCommands;

/// A clock at `start`, moved by the test.
fn settable(start: u64) -> (Clock, Arc<AtomicU64>) {
    let now = Arc::new(AtomicU64::new(start));
    let read = now.clone();
    (Clock::from_fn(move || read.load(Ordering::Relaxed)), now)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_and_a_heartbeat_are_stamped_with_the_stores_clock() {
    let redis = TestRedis::start().await;
    // Far from the real time, so a store that read another clock could not pass.
    let (clock, now) = settable(1_000_000_000);
    let store = SessionStore::new(redis.conn.clone(), Duration::from_secs(3600), "Ashley", 100)
        .clock(clock);
    let id = sid("clock-claim");
    store
        .claim(&id, None, "t", "w", ClaimAttempt::default())
        .await
        .unwrap();
    let state = SessionKeys::new(&id).state();
    assert_eq!(
        hget(&redis.conn, &state, "createdAt").await.as_deref(),
        Some("1000000000")
    );
    let indexed = heartbeat_score(&redis.conn, &id).await;
    assert_eq!(indexed, Some(1_000_000_000.0));
    // The heartbeat's time is the caller's (it passes `now`), as it always was.
    now.store(1_000_000_060, Ordering::Relaxed);
    store
        .heartbeat("w", &[(id.clone(), None)], 1_000_000_060, 0)
        .await
        .unwrap();
    assert_eq!(
        hget(&redis.conn, &state, "lastActive").await.as_deref(),
        Some("1000000060")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_jobs_are_due_by_the_queues_clock() {
    let redis = TestRedis::start().await;
    let keys = QueueKeys::new("clock-queue").unwrap();
    let (clock, now) = settable(1_000_000_000);
    let ops = QueueOps::new(redis.conn.clone(), keys.clone()).clock(clock);
    let _: () = redis
        .conn
        .clone()
        .zadd(keys.scheduled(), "task-1", 1_000_000_030)
        .await
        .unwrap();
    assert_eq!(ops.promote_due().await.unwrap(), 0, "not due yet");
    now.store(1_000_000_030, Ordering::Relaxed);
    assert_eq!(ops.promote_due().await.unwrap(), 1);
    let ready: Vec<String> = redis
        .conn
        .clone()
        .lrange(keys.active(), 0, -1)
        .await
        .unwrap();
    assert_eq!(ready, ["task-1"]);
}
