//! The job queue as a test drives and observes it: enqueueing (also raw payloads), the done
//! and dead sets, and the registered job-worker runs.

use agent_worker::connection::RedisConn;
use std::time::Duration;

use agent_jobs::{AgentStart, Producer, QueueKeys, SessionId};
use redis::AsyncCommands;

use super::{QUEUE, command_calls, hget, is_member, wait_for};

/// A producer for [`QUEUE`] on `conn`.
pub fn producer(conn: &RedisConn) -> Producer<RedisConn> {
    Producer::new(conn.clone(), QueueKeys::new(QUEUE).unwrap())
}

/// Enqueues an agent start for `id` (for `user`, if any); the task id.
pub async fn enqueue(conn: &RedisConn, id: &SessionId, user: Option<&str>) -> String {
    let mut job = AgentStart::new(id.clone());
    job.user_id = user.map(str::to_owned);
    producer(conn).enqueue(&job).await.expect("enqueue").task_id
}

/// Enqueues an agent start for `id` as soon as Redis takes it (it may be restarting), trying
/// until `deadline`; the task id.
pub async fn enqueue_when_up(conn: &RedisConn, id: &SessionId, deadline: Duration) -> String {
    let what = format!("an enqueue of {id} once Redis is up");
    wait_for(&what, deadline, || async {
        let job = AgentStart::new(id.clone());
        producer(conn).enqueue(&job).await.ok().map(|e| e.task_id)
    })
    .await
}

/// The task ids in the ready list (`<queue>:active`), first to be fetched first.
pub async fn active_jobs(conn: &RedisConn) -> Vec<String> {
    conn.clone()
        .lrange(QueueKeys::new(QUEUE).unwrap().active(), 0, -1)
        .await
        .expect("LRANGE the ready list")
}

/// Adds to `pipe` a job as apalis-redis records it: `payload` under `id` in `<queue>:data`, and
/// its meta hash with the `meta` fields. Where its id is listed (the ready list, the scheduled,
/// done or dead set) is the caller's part.
pub fn stage_job(pipe: &mut redis::Pipeline, id: &str, payload: &[u8], meta: &[(&str, &str)]) {
    let keys = QueueKeys::new(QUEUE).unwrap();
    pipe.hset(keys.data(), id, payload)
        .ignore()
        .hset_multiple(keys.meta(id), meta)
        .ignore();
}

/// The meta of a job not tried yet, with one attempt allowed.
pub const PENDING: [(&str, &str); 3] = [
    ("attempts", "0"),
    ("max_attempts", "1"),
    ("status", "Pending"),
];

/// Writes a job with arbitrary payload bytes in the wire format, as a foreign producer could.
pub async fn push_raw(conn: &RedisConn, payload: &[u8]) -> String {
    let keys = QueueKeys::new(QUEUE).unwrap();
    let id = ulid::Ulid::generate().to_string();
    let mut c = conn.clone();
    let mut pipe = redis::pipe();
    stage_job(&mut pipe, &id, payload, &PENDING);
    pipe.rpush(keys.active(), &id)
        .ignore()
        .publish(keys.wake_channel(), 1)
        .ignore()
        .query_async::<()>(&mut c)
        .await
        .expect("push raw job");
    id
}

/// Waits until task `task_id` is in the dead set and returns its stored result.
pub async fn wait_dead(conn: &RedisConn, task_id: &str) -> String {
    let keys = QueueKeys::new(QUEUE).unwrap();
    wait_for(
        &format!("task {task_id} in the dead set"),
        Duration::from_secs(20),
        || async { is_member(conn, &keys.dead(), task_id).await.then_some(()) },
    )
    .await;
    hget(conn, &keys.meta(task_id), "result")
        .await
        .unwrap_or_default()
}

/// True once the task finished well: in the done set, or already moved from it into the
/// retention index.
pub async fn is_done(conn: &RedisConn, task_id: &str) -> bool {
    let keys = QueueKeys::new(QUEUE).unwrap();
    let indexed: Option<f64> = conn
        .clone()
        .zscore(keys.done_at(), task_id)
        .await
        .expect("ZSCORE");
    indexed.is_some() || is_member(conn, &keys.done(), task_id).await
}

/// Finished-well jobs: the done set plus the retention index.
pub async fn done_count(conn: &RedisConn) -> u64 {
    let keys = QueueKeys::new(QUEUE).unwrap();
    let (inbox, indexed): (u64, u64) = redis::pipe()
        .scard(keys.done())
        .zcard(keys.done_at())
        .query_async(&mut conn.clone())
        .await
        .expect("counts");
    inbox + indexed
}

/// Waits (up to `deadline`) until task `task_id` is done ([`is_done`]).
pub async fn wait_done(conn: &RedisConn, task_id: &str, deadline: Duration) {
    wait_for(&format!("task {task_id} to be done"), deadline, || async {
        is_done(conn, task_id).await.then_some(())
    })
    .await
}

/// Names of the registered apalis worker runs (`<worker id>-<run>`).
pub async fn worker_runs(conn: &RedisConn) -> Vec<String> {
    conn.clone()
        .zrange(QueueKeys::new(QUEUE).unwrap().workers(), 0, -1)
        .await
        .expect("ZRANGE")
}

/// Waits (up to 10 s) until the one worker on this Redis is idle: registered, subscribed to
/// the wake channel, and its first (empty) fetch done (the fetch script is the only caller of
/// LRANGE).
pub async fn wait_idle(conn: &RedisConn) {
    let keys = QueueKeys::new(QUEUE).unwrap();
    wait_for("the worker to be idle", Duration::from_secs(10), || async {
        let subscribed: Vec<(String, u64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(keys.wake_channel())
            .query_async(&mut conn.clone())
            .await
            .expect("PUBSUB NUMSUB");
        let fetched = command_calls(conn)
            .await
            .get("lrange")
            .is_some_and(|calls| *calls >= 1);
        (subscribed[0].1 == 1 && fetched && worker_runs(conn).await.len() == 1).then_some(())
    })
    .await
}

/// Asserts that the job worker is still in its first run: nothing made it crash and restart.
pub async fn assert_first_run(conn: &RedisConn, context: &str) {
    let runs = worker_runs(conn).await;
    assert!(
        runs.len() == 1 && runs[0].ends_with("-0"),
        "{context}: the first run of the job worker is still the only one: {runs:?}"
    );
}
