//! The session event stream `agent-worker:events` (jobs/README.md, "Session events"): every
//! status change of the worker's scripts appends one event in the same call, with the
//! documented fields, in order; the stream stays within `events.max_len`.

mod common;

use agent_worker::connection::RedisConn;
use std::{collections::HashMap, time::Duration};

use agent_jobs::{SessionId, SessionKeys, keys::EVENTS, keys::SESSION_HEARTBEATS};
use agent_worker::{
    clock::unix_now,
    session::{ClaimAttempt, EndRecord, Removal, SessionEnd, SessionStore},
};
use common::*;
use futures::StreamExt;
use redis::AsyncCommands;

type Event = HashMap<String, String>;

/// Entries of `XRANGE`/`XREVRANGE` (`args` after the key) as (id, fields).
async fn range(conn: &RedisConn, command: &str, args: &[&str]) -> Vec<(String, Event)> {
    let entries: Vec<(String, Vec<String>)> = redis::cmd(command)
        .arg(EVENTS)
        .arg(args)
        .query_async(&mut conn.clone())
        .await
        .expect("stream range");
    entries
        .into_iter()
        .map(|(id, flat)| {
            let fields = flat
                .chunks_exact(2)
                .map(|pair| (pair[0].clone(), pair[1].clone()))
                .collect();
            (id, fields)
        })
        .collect()
}

/// Every event in the stream, oldest first.
async fn all_events(conn: &RedisConn) -> Vec<(String, Event)> {
    range(conn, "XRANGE", &["-", "+"]).await
}

/// The events of one session, oldest first.
async fn events_of(conn: &RedisConn, id: &SessionId) -> Vec<Event> {
    all_events(conn)
        .await
        .into_iter()
        .map(|(_, e)| e)
        .filter(|e| e.get("session_id").map(String::as_str) == Some(id.as_str()))
        .collect()
}

/// Waits until the session's events have the statuses `want`, and returns them.
async fn wait_events(conn: &RedisConn, id: &SessionId, want: &[&str]) -> Vec<Event> {
    wait_for(
        &format!("events {want:?} of {id}"),
        Duration::from_secs(20),
        || async {
            let events = events_of(conn, id).await;
            let statuses: Vec<&str> = events.iter().map(|e| e["status"].as_str()).collect();
            (statuses == want).then_some(events)
        },
    )
    .await
}

/// Checks the fields every event has: the documented names and nothing else, the owner, a
/// millisecond Redis timestamp of now, and `reason` exactly when expected.
fn check_fields(event: &Event, id: &SessionId, worker: Option<&str>, reason: Option<&str>) {
    // A claim of a job whose producer recorded its enqueue: the queue wait's start, before it.
    let mut event = event.clone();
    if let Some(enqueued) = event.remove("enqueued_ms") {
        assert_eq!(event["status"], "starting", "{event:?}");
        let (enqueued, ts): (u64, u64) = (enqueued.parse().unwrap(), event["ts"].parse().unwrap());
        assert!(enqueued <= ts, "{event:?}");
    }
    let event = &event;
    let mut names: Vec<&str> = event.keys().map(String::as_str).collect();
    names.sort_unstable();
    let mut expected = vec!["session_id", "status", "ts", "worker_id"];
    if reason.is_some() {
        expected.push("reason");
        expected.sort_unstable();
    }
    assert_eq!(names, expected, "{event:?}");
    assert_eq!(event["session_id"], id.as_str());
    if let Some(worker) = worker {
        assert_eq!(event["worker_id"], worker, "{event:?}");
    } else {
        assert!(!event["worker_id"].is_empty(), "{event:?}");
    }
    let ts: u64 = event["ts"].parse().expect("ts is decimal milliseconds");
    let now_ms = unix_now() * 1000;
    assert!(ts.abs_diff(now_ms) < 60_000, "ts {ts} is now ({now_ms})");
    assert_eq!(event.get("reason").map(String::as_str), reason, "{event:?}");
}

/// Checks the phase times a `ready` event of a start carries (`start`, then `claimed_ms` ≤
/// `spawned_ms` ≤ `alive_ms` ≤ `ready_ms` ≤ `ts`, on Redis's clock; no `enqueued_ms` from a
/// producer that records no enqueue time) and returns the event without them.
fn without_phases(event: &Event, start: &str) -> Event {
    assert_eq!(event["status"], "ready");
    assert_eq!(
        event.get("start").map(String::as_str),
        Some(start),
        "{event:?}"
    );
    let at = |name: &str| -> u64 {
        event
            .get(name)
            .unwrap_or_else(|| panic!("{name} in {event:?}"))
            .parse()
            .expect("decimal milliseconds")
    };
    let times = ["claimed_ms", "spawned_ms", "alive_ms", "ready_ms"].map(at);
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "in order: {event:?}"
    );
    // The ready line comes before its record; both on Redis's clock, give or take its skew.
    assert!(times[3] <= at("ts") + 1_000, "{event:?}");
    let mut rest = event.clone();
    rest.retain(|name, _| !name.ends_with("_ms") && name != "start");
    rest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_exits_cleanly_appends_starting_ready_completed() {
    let redis = TestRedis::start().await;
    let worker = TestWorker::start(redis.settings("exit-after-ready", &[]));
    let id = sid("ev-completed");
    write_config(&redis.conn, &id, "Craig", "u").await;
    enqueue(&redis.conn, &id, Some("u")).await;
    let events = wait_events(&redis.conn, &id, &["starting", "ready", "completed"]).await;
    let owner = hget(&redis.conn, &SessionKeys::new(&id).state(), "workerId")
        .await
        .expect("the record names its worker");
    let ready = without_phases(&events[1], "cold");
    for event in [&events[0], &ready, &events[2]] {
        check_fields(event, &id, Some(&owner), None);
    }
    let ts: Vec<u64> = events.iter().map(|e| e["ts"].parse().unwrap()).collect();
    assert!(ts.windows(2).all(|w| w[0] <= w[1]), "in order: {ts:?}");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_fails_for_good_appends_one_starting_and_the_error_with_its_reason() {
    let redis = TestRedis::start().await;
    let worker = TestWorker::start(redis.settings("exit-before-ready", &[]));
    let id = sid("ev-error");
    let task = enqueue(&redis.conn, &id, None).await;
    wait_dead(&redis.conn, &task).await;
    // Three attempts, each a claim: only the first changes the status.
    let events = wait_events(&redis.conn, &id, &["starting", "error"]).await;
    let error = hget(&redis.conn, &SessionKeys::new(&id).state(), "error")
        .await
        .expect("the record has the error");
    check_fields(&events[0], &id, None, None);
    check_fields(&events[1], &id, Some(&events[0]["worker_id"]), Some(&error));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_and_deleted_sessions_append_what_the_worker_saw_and_that_it_stopped_the_agent()
{
    let redis = TestRedis::start().await;
    let worker = TestWorker::start(redis.settings("ready", &[HEARTBEAT_EVERY_SECOND]));
    let (credit, ended) = (sid("ev-terminated"), sid("ev-deleted"));
    for id in [&credit, &ended] {
        enqueue(&redis.conn, id, None).await;
        wait_events(&redis.conn, id, &["starting", "ready"]).await;
    }
    let owner = hget(&redis.conn, &SessionKeys::new(&credit).state(), "workerId")
        .await
        .unwrap();
    // The orchestrator's credit stop, and its end-of-session deletion.
    let _: () = redis
        .conn
        .clone()
        .hset_multiple(
            SessionKeys::new(&credit).state(),
            &[
                ("status", "terminated"),
                ("terminationReason", "out of credit"),
            ],
        )
        .await
        .unwrap();
    let _: () = redis
        .conn
        .clone()
        .del(SessionKeys::new(&ended).all().to_vec())
        .await
        .unwrap();

    let stopped = wait_events(&redis.conn, &ended, &["starting", "ready", "stopped"]).await;
    check_fields(&stopped[2], &ended, Some(&owner), Some("session_ended"));
    // The heartbeat reports `terminated` while the agent still runs (at least once), then the
    // end is recorded as a stop.
    let events = wait_for(
        "the terminated session's stop",
        Duration::from_secs(20),
        || async {
            let events = events_of(&redis.conn, &credit).await;
            (events.last()?["status"] == "stopped").then_some(events)
        },
    )
    .await;
    let statuses: Vec<&str> = events.iter().map(|e| e["status"].as_str()).collect();
    assert_eq!(&statuses[..3], ["starting", "ready", "terminated"]);
    assert!(
        statuses[2..statuses.len() - 1]
            .iter()
            .all(|s| *s == "terminated"),
        "{statuses:?}"
    );
    check_fields(&events[2], &credit, Some(&owner), Some("out of credit"));
    check_fields(
        events.last().unwrap(),
        &credit,
        Some(&owner),
        Some("terminated"),
    );
    // The record keeps the orchestrator's status.
    assert_eq!(
        status(&redis.conn, &credit).await.as_deref(),
        Some("terminated")
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_appends_swept_with_the_reason_and_the_dead_owner() {
    let redis = TestRedis::start().await;
    let store = SessionStore::new(redis.conn.clone(), Duration::from_secs(3600), "Ashley", 100);
    let (stuck, fresh) = (sid("ev-stuck"), sid("ev-fresh"));
    for id in [&stuck, &fresh] {
        store
            .claim(id, None, "t", "dead-worker", ClaimAttempt::default())
            .await
            .unwrap();
    }
    let _: () = redis
        .conn
        .clone()
        .zadd(SESSION_HEARTBEATS, stuck.as_str(), unix_now() - 600)
        .await
        .unwrap();
    let removal = Removal::Stale {
        cutoff: unix_now() - 60,
        ended_cutoff: unix_now() - 3600,
        job_meta_prefix: None,
    };
    // A dry run decides and appends nothing.
    let ids = [stuck.clone(), fresh.clone()];
    assert_eq!(store.remove(&removal, &ids, true).await.unwrap().len(), 1);
    assert_eq!(events_of(&redis.conn, &stuck).await.len(), 1);
    let removed = store.remove(&removal, &ids, false).await.unwrap();
    assert_eq!(removed, [(stuck.clone(), "stuck_starting".to_owned())]);
    let events = events_of(&redis.conn, &stuck).await;
    assert_eq!(events.len(), 2, "{events:?}");
    check_fields(&events[0], &stuck, Some("dead-worker"), None);
    assert_eq!(events[1]["status"], "swept");
    check_fields(
        &events[1],
        &stuck,
        Some("dead-worker"),
        Some("stuck_starting"),
    );
    let fresh_events = events_of(&redis.conn, &fresh).await;
    assert_eq!(fresh_events.len(), 1, "the fresh session was not swept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_stays_within_its_bound_after_twenty_thousand_sessions() {
    const SESSIONS: usize = 20_000;
    let redis = TestRedis::start().await;
    // The shipped default, through the settings the worker builds its store from.
    let settings = redis.settings("ready", &[]);
    let bound = settings.events.max_len;
    assert_eq!(bound, 10_000);
    let store = SessionStore::from_settings(redis.conn.clone(), &settings);
    let started = std::time::Instant::now();
    // Each session through the worker's real scripts: its claim (`starting`) and its end.
    let ends: Vec<EndRecord> = futures::stream::iter(0..SESSIONS)
        .map(|n| {
            let store = store.clone();
            async move {
                let id = sid(&format!("bound-{n}"));
                store
                    .claim(&id, None, "t", "w", ClaimAttempt::default())
                    .await
                    .unwrap();
                store.end(&id, "w", &SessionEnd::default()).await.unwrap()
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    assert!(ends.iter().all(|e| matches!(e, EndRecord::Kept(_))));
    let length: u64 = redis::cmd("XLEN")
        .arg(EVENTS)
        .query_async(&mut redis.conn.clone())
        .await
        .unwrap();
    eprintln!(
        "{} events from {SESSIONS} sessions in {:?}; stream length {length} (bound {bound})",
        2 * SESSIONS,
        started.elapsed()
    );
    // `MAXLEN ~` never trims below the bound and trims whole nodes (100 entries) above it.
    assert!(
        (bound..=bound + 100).contains(&length),
        "length {length} is within one node of {bound}"
    );
    // The newest events are kept: the last one is an end.
    let newest = range(&redis.conn, "XREVRANGE", &["+", "-", "COUNT", "1"]).await;
    let last = &newest[0].1["status"];
    assert_eq!(last, "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_that_turns_starting_into_ready_and_a_restored_record_append_ready() {
    let redis = TestRedis::start().await;
    let store = SessionStore::new(redis.conn.clone(), Duration::from_secs(3600), "Ashley", 100);
    let id = sid("ev-heartbeat");
    store
        .claim(&id, None, "t", "w", ClaimAttempt::default())
        .await
        .unwrap();
    // No ready record yet (say it failed to be written): the heartbeat makes it ready.
    store
        .heartbeat("w", &[(id.clone(), None)], unix_now(), 0)
        .await
        .unwrap();
    // A second heartbeat changes nothing and appends nothing.
    store
        .heartbeat("w", &[(id.clone(), None)], unix_now(), 0)
        .await
        .unwrap();
    let events = wait_events(&redis.conn, &id, &["starting", "ready"]).await;
    check_fields(&events[1], &id, Some("w"), None);

    // Redis loses the record and the index entry: the worker writes it again, as ready.
    let _: () = redis
        .conn
        .clone()
        .del(SessionKeys::new(&id).state())
        .await
        .unwrap();
    let _: () = redis
        .conn
        .clone()
        .zrem(SESSION_HEARTBEATS, id.as_str())
        .await
        .unwrap();
    let report = store
        .heartbeat("w", &[(id.clone(), None)], unix_now(), 0)
        .await
        .unwrap();
    assert_eq!(report.vanished, std::slice::from_ref(&id));
    let record = agent_worker::session::AgentRecord {
        session_id: id.clone(),
        user_id: None,
        task_id: "t".into(),
        voice_id: "Ashley".into(),
        created_at: unix_now(),
        pid: 1,
        pgid: 1,
        startup: Duration::from_millis(5),
        log_file: None,
        warm: 1,
    };
    assert_eq!(store.restore("w", &[record], unix_now()).await.unwrap(), 1);
    // What the worker held is written back, the warm-pool flag with it.
    let warm: Option<String> = redis
        .conn
        .clone()
        .hget(SessionKeys::new(&id).state(), "warm")
        .await
        .unwrap();
    assert_eq!(warm.as_deref(), Some("1"));
    let events = wait_events(&redis.conn, &id, &["starting", "ready", "ready"]).await;
    check_fields(&events[2], &id, Some("w"), None);
}
