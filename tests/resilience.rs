//! The defects of apalis-redis 1.0 we work around, each shown against a real Redis: large
//! backlogs, Redis outages, idle pick-up, unreadable jobs, the scheduled-set crash.

mod common;

use agent_worker::connection::RedisConn;
use std::time::Duration;

use agent_jobs::{AgentStart, QueueKeys};
use agent_worker::queue::QueueOps;
use common::*;
use redis::AsyncCommands;

fn keys() -> QueueKeys {
    QueueKeys::new(QUEUE).unwrap()
}

/// The job worker is in its first or second run: never in a crash loop.
async fn assert_no_crash_loop(conn: &RedisConn) {
    let names = workers(conn).await;
    assert!(
        names.len() == 1 && (names[0].ends_with("-0") || names[0].ends_with("-1")),
        "no crash loop: {names:?}"
    );
}

async fn workers(conn: &RedisConn) -> Vec<String> {
    conn.clone().zrange(keys().workers(), 0, -1).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_jobs_enqueued_before_the_worker_starts_are_all_processed() {
    let redis = TestRedis::start().await;
    let jobs: Vec<_> = (0..10_000)
        .map(|i| AgentStart::new(sid(&format!("burst-{i}"))))
        .collect();
    for chunk in jobs.chunks(2_000) {
        producer(&redis.conn).enqueue_many(chunk).await.unwrap();
    }
    let worker = TestWorker::start(redis.settings(
        "exit-after-ready",
        &[
            ("AGENT_WORKER__WORKER__BATCH_SIZE", "64"),
            ("AGENT_WORKER__WORKER__CONCURRENCY", "64"),
            ("AGENT_WORKER__AGENT__MAX_AGENTS", "64"),
        ],
    ));
    wait_for("10,000 jobs done", Duration::from_secs(300), || async {
        (done_count(&redis.conn).await == 10_000).then_some(())
    })
    .await;
    let dead: usize = redis.conn.clone().scard(keys().dead()).await.unwrap();
    assert_eq!(dead, 0);
    // No crash loop: the fetch never failed on the backlog. (One restart is tolerated: on a
    // loaded 2-core machine a heartbeat can miss the response timeout while 64 agents spawn;
    // a fetch that failed on the backlog would fail on every run.)
    assert_no_crash_loop(&redis.conn).await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_for_three_seconds_the_same_worker_carries_on() {
    let mut redis = TestRedis::start().await;
    let worker = TestWorker::start(redis.settings("ready", &[]));
    let before = sid("before-outage");
    enqueue(&redis.conn, &before, None).await;
    wait_status(&redis.conn, &before, "ready", Duration::from_secs(20)).await;

    redis.redis.stop();
    // The outage itself: Redis is away for three seconds on purpose.
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.redis.restart().await.unwrap();

    // The restarted Redis is empty (no persistence): a new session, on defaults.
    let after = sid("after-outage");
    enqueue_when_up(&redis.conn, &after, Duration::from_secs(20)).await;
    wait_status(&redis.conn, &after, "ready", Duration::from_secs(30)).await;
    assert_eq!(
        wait_received(&redis.conn, &after).await["contract"]["voice_id"],
        "Ashley"
    );
    // The same process restarted its job worker under a new name and went on.
    let runs = worker_runs(&redis.conn).await;
    assert!(
        runs.len() == 1 && !runs[0].ends_with("-0"),
        "a later run of the same worker: {runs:?}"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_is_woken_by_a_push_not_by_its_heartbeat_or_poll() {
    let redis = TestRedis::start().await;
    // No fallback poll, and the next heartbeat (which also triggers a fetch) 60 s away: only
    // the wake-up can make this worker fetch within the deadline below.
    let worker = TestWorker::start_woken_only(&redis).await;
    let id = sid("wake-1");
    let task = enqueue(&redis.conn, &id, None).await;
    wait_done(&redis.conn, &task, Duration::from_secs(10)).await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_job_that_crashes_the_fetch_is_quarantined_and_the_rest_run() {
    let redis = TestRedis::start().await;
    let mut conn = redis.conn.clone();
    // An id on the ready list with no data and no meta, as a broken producer or a manual
    // cleanup could leave: apalis-redis's fetch fails on it and the worker dies.
    let orphan = ulid::Ulid::generate().to_string();
    let _: () = conn.rpush(keys().active(), &orphan).await.unwrap();
    let goods: Vec<_> = (0..3).map(|i| sid(&format!("after-orphan-{i}"))).collect();
    let mut tasks = Vec::new();
    for id in &goods {
        tasks.push(enqueue(&redis.conn, id, None).await);
    }
    let worker = TestWorker::start(redis.settings("ready", &[]));
    let result = wait_dead(&redis.conn, &orphan).await;
    assert!(result.contains("job data is missing"), "{result}");
    for task in &tasks {
        wait_done(&redis.conn, task, Duration::from_secs(20)).await;
    }
    // The fetch did crash once: the second run is the one that finished the jobs.
    let runs = worker_runs(&redis.conn).await;
    assert!(runs.len() == 1 && runs[0].ends_with("-1"), "{runs:?}");
    // The dead run is deregistered completely: apalis-redis's registration hash of each run
    // would otherwise stay behind forever, one per restart.
    let first_run = format!("{}-0", runs[0].strip_suffix("-1").unwrap());
    let dead_run: bool = conn
        .exists(keys().worker_metadata(&first_run))
        .await
        .unwrap();
    let live_run: bool = conn.exists(keys().worker_metadata(&runs[0])).await.unwrap();
    assert!(
        !dead_run && live_run,
        "metadata of {first_run} gone, of {} kept",
        runs[0]
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nine_thousand_due_jobs_in_the_scheduled_set_do_not_crash_the_fetch() {
    let redis = TestRedis::start().await;
    // What apalis-redis's own push does: every job goes through the scheduled set. Past
    // ~8,000 due ids its fetch fails with "too many results to unpack".
    let mut pipe = redis::pipe();
    let now = agent_worker::clock::unix_now();
    let mut ids = Vec::new();
    for i in 0..9_000 {
        let id = ulid::Ulid::generate().to_string();
        let payload = format!(r#"{{"session_id":"sched-{i}"}}"#);
        stage_job(&mut pipe, &id, payload.as_bytes(), &PENDING);
        pipe.zadd(keys().scheduled(), &id, now).ignore();
        ids.push(id);
    }
    pipe.query_async::<()>(&mut redis.conn.clone())
        .await
        .unwrap();
    let worker = TestWorker::start(redis.settings(
        "exit-after-ready",
        &[
            ("AGENT_WORKER__WORKER__BATCH_SIZE", "64"),
            ("AGENT_WORKER__WORKER__CONCURRENCY", "64"),
            ("AGENT_WORKER__AGENT__MAX_AGENTS", "64"),
        ],
    ));
    wait_for(
        "9,000 scheduled jobs done",
        Duration::from_secs(300),
        || async { (done_count(&redis.conn).await == 9_000).then_some(()) },
    )
    .await;
    assert_no_crash_loop(&redis.conn).await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_due_moves_only_due_ids_in_bounded_chunks() {
    let redis = TestRedis::start().await;
    let ops = QueueOps::new(redis.conn.clone(), keys());
    let now = agent_worker::clock::unix_now();
    let mut pipe = redis::pipe();
    for i in 0..2_500u64 {
        pipe.zadd(keys().scheduled(), format!("due-{i}"), now - 1)
            .ignore();
    }
    pipe.zadd(keys().scheduled(), "later", now + 3_600).ignore();
    pipe.query_async::<()>(&mut redis.conn.clone())
        .await
        .unwrap();
    assert_eq!(ops.promote_due().await.unwrap(), 2_500);
    let active: usize = redis.conn.clone().llen(keys().active()).await.unwrap();
    assert_eq!(active, 2_500);
    let left: Vec<String> = redis
        .conn
        .clone()
        .zrange(keys().scheduled(), 0, -1)
        .await
        .unwrap();
    assert_eq!(left, ["later"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_inflight_requeues_readable_jobs_at_the_head_and_quarantines_the_rest() {
    let redis = TestRedis::start().await;
    let ops = QueueOps::new(redis.conn.clone(), keys());
    let mut conn = redis.conn.clone();
    let good: Vec<String> = (0..2).map(|_| ulid::Ulid::generate().to_string()).collect();
    let mut pipe = redis::pipe();
    for id in &good {
        let running = [
            ("attempts", "0"),
            ("max_attempts", "1"),
            ("status", "Running"),
        ];
        stage_job(&mut pipe, id, br#"{"session_id":"x"}"#, &running);
    }
    pipe.query_async::<()>(&mut conn).await.unwrap();
    let no_data = "01NODATA0000000000000000000";
    let bad_meta = "01BADMETA000000000000000000";
    let _: () = conn.hset(keys().data(), bad_meta, "{}").await.unwrap();
    let _: () = conn
        .hset(keys().meta(bad_meta), "status", "Weird")
        .await
        .unwrap();
    let inflight = keys().inflight("w-dead");
    let _: () = conn.sadd(&inflight, &good).await.unwrap();
    let _: () = conn.sadd(&inflight, &[no_data, bad_meta]).await.unwrap();
    let _: () = conn.zadd(keys().workers(), "w-dead", 1).await.unwrap();
    let _: () = conn.rpush(keys().active(), "already-queued").await.unwrap();

    let recovered = ops.recover_inflight("w-dead").await.unwrap();
    assert_eq!((recovered.requeued, recovered.quarantined), (2, 2));
    let active: Vec<String> = conn.lrange(keys().active(), 0, -1).await.unwrap();
    assert_eq!(active.len(), 3);
    assert_eq!(active[2], "already-queued", "recovered jobs go to the head");
    assert!(good.iter().all(|id| active.contains(id)));
    let dead: Vec<String> = conn.smembers(keys().dead()).await.unwrap();
    assert_eq!(dead.len(), 2);
    let result = hget(&redis.conn, &keys().meta(bad_meta), "result")
        .await
        .unwrap();
    assert!(result.contains("no numeric attempts"), "{result}");
    let exists: bool = conn.exists(&inflight).await.unwrap();
    assert!(!exists);
    assert!(workers(&redis.conn).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_busy_for_longer_than_apalis_default_timeout_does_not_fail_the_worker() {
    let redis = TestRedis::start().await;
    let worker = TestWorker::start(redis.settings("ready", &[]));
    let first = sid("before-busy");
    enqueue(&redis.conn, &first, None).await;
    wait_status(&redis.conn, &first, "ready", Duration::from_secs(20)).await;
    // A script that keeps Redis busy for 1.5 s: every command of the worker (its heartbeat
    // runs every second here) waits longer than apalis-redis's 500 ms default timeout.
    let busy = redis::Script::new(
        r"
        local start = redis.call('TIME')
        while true do
            local now = redis.call('TIME')
            if (now[1] - start[1]) * 1000000 + (now[2] - start[2]) > 1500000 then break end
        end
        return 1",
    );
    let mut other = agent_worker::connection::connect(&redis.settings("ready", &[]).redis)
        .await
        .unwrap();
    let _: i64 = busy.invoke_async(&mut other).await.unwrap();
    let second = sid("after-busy");
    enqueue(&redis.conn, &second, None).await;
    wait_status(&redis.conn, &second, "ready", Duration::from_secs(20)).await;
    assert_first_run(&redis.conn, "after a slow command").await;
    worker.stop().await;
}
