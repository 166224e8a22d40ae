//! The Python producer (the `agent_worker` package in `python/`, its sync and async clients, its
//! CLI, and `jobs/python/agent_jobs.py`, a re-export of it) and the JSON Schema
//! (`jobs/schema/agent-start.schema.json`) against the Rust contract: a real worker runs what
//! Python enqueues, both producers write the same bytes, and the schema agrees with the
//! decoder. That the package is built from the repository's scripts and key names:
//! `tests/python_package.rs`.
//!
//! These tests need `python3` with the `redis` and `jsonschema` packages; when they are missing
//! the tests fail (CI installs them) rather than skip.

mod common;

use agent_worker::connection::RedisConn;
use std::{
    collections::BTreeMap,
    process::{Output, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use agent_jobs::{AgentStart, QueueKeys, SessionConfigInput, SessionId, SessionKeys};
use common::*;
use redis::AsyncCommands;
use tokio::{io::AsyncWriteExt, process::Command};

/// The old one-file producer's module, now a re-export of `agent_worker.agent_jobs`.
const COMPAT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/jobs/python/agent_jobs.py");
const SCHEMA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/jobs/schema/agent-start.schema.json"
);
/// The session TTL both producers use by default (4 h).
const TTL: u64 = 4 * 3600;

/// Runs python3 with `args`, feeding `stdin`.
async fn run_python(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = python()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    child.wait_with_output().await.unwrap()
}

/// Runs the Python `script` of `args` (`python3 -c script arg...`) with `input` as JSON on
/// stdin; it must succeed, and print JSON, which is returned.
async fn run_driver<T: serde::de::DeserializeOwned>(args: &[&str], input: &serde_json::Value) -> T {
    let mut all = vec!["-c"];
    all.extend_from_slice(args);
    let out = run_python(&all, &serde_json::to_vec(input).unwrap()).await;
    printed_json("the driver", &out)
}

/// `python -m agent_worker enqueue --redis-url <url> <args>`.
async fn cli(url: &str, args: &[&str]) -> Output {
    let mut all = vec!["-m", "agent_worker", "enqueue", "--redis-url", url];
    all.extend_from_slice(args);
    run_python(&all, b"").await
}

/// [`cli`], which must succeed; returns the printed task id.
async fn cli_ok(url: &str, args: &[&str]) -> String {
    let what = format!("python -m agent_worker enqueue {args:?}");
    stdout_of(&what, &cli(url, args).await).trim().to_owned()
}

/// One session's input, as the orchestrator would pass it.
#[derive(serde::Serialize)]
struct Input {
    session_id: &'static str,
    user_id: Option<String>,
    voice_id: &'static str,
    opening_line: Option<&'static str>,
    system_prompt: Option<&'static str>,
    /// Contract version 2's fields (the compatibility module passes none: its old API).
    traceparent: Option<&'static str>,
    tracestate: Option<&'static str>,
    start_by: Option<i64>,
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Which Python API writes: the package's sync `Client`, its `AsyncClient`, or the old
/// one-file producer's functions (`redis.Redis` first) through `jobs/python/agent_jobs.py`.
#[derive(Clone, Copy, Debug)]
enum Api {
    Sync,
    Async,
    Compat,
}

/// Calls a Python API (not the CLI: argv cannot carry a NUL byte): write_session_config,
/// then enqueue_agent_start. Returns (task id, duplicate).
async fn python_api(api: Api, url: &str, input: &Input) -> (String, bool) {
    const DRIVER: &str = r#"
import asyncio, json, sys
a = json.load(sys.stdin)
user_name = a["user_id"] or ""
if sys.argv[1] == "Compat":
    sys.path.insert(0, sys.argv[2])
    import agent_jobs, redis
    import agent_worker.agent_jobs as package
    # A re-export: every name is the package's own object, nothing is implemented twice.
    exported = [n for n in vars(agent_jobs) if not n.startswith("_") and n not in ("sys", "Path", "agent_worker")]
    assert sorted(exported) == sorted(package.__all__), exported
    assert all(getattr(agent_jobs, n) is getattr(package, n) for n in package.__all__)
    r = redis.Redis.from_url(a["url"])
    agent_jobs.write_session_config(r, a["session_id"], a["voice_id"], user_name,
                                    a["opening_line"], a["system_prompt"])
    job = agent_jobs.enqueue_agent_start(r, a["session_id"], a["user_id"])
elif sys.argv[1] == "Sync":
    import agent_worker
    client = agent_worker.Client.from_url(a["url"])
    client.write_session_config(a["session_id"], a["voice_id"], user_name,
                                opening_line=a["opening_line"], system_prompt=a["system_prompt"])
    job = client.enqueue_agent_start(a["session_id"], a["user_id"], start_by=a["start_by"],
                                     start_within=None, traceparent=a["traceparent"],
                                     tracestate=a["tracestate"])
else:
    import agent_worker
    async def main():
        client = agent_worker.AsyncClient.from_url(a["url"])
        await client.write_session_config(a["session_id"], a["voice_id"], user_name,
                                          opening_line=a["opening_line"],
                                          system_prompt=a["system_prompt"])
        job = await client.enqueue_agent_start(a["session_id"], a["user_id"],
                                               start_by=a["start_by"], start_within=None,
                                               traceparent=a["traceparent"],
                                               tracestate=a["tracestate"])
        await client.aclose()
        return job
    job = asyncio.run(main())
print(json.dumps([job.task_id, job.duplicate]))
"#;
    let mut request = serde_json::to_value(input).unwrap();
    request["url"] = url.into();
    let compat_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/jobs/python");
    run_driver(&[DRIVER, &format!("{api:?}"), compat_dir], &request).await
}

/// The same through the Rust crate: `write_session_config`, then `Producer::enqueue`.
async fn rust_api(conn: &RedisConn, input: &Input) -> String {
    let id = sid(input.session_id);
    let config = SessionConfigInput {
        voice_id: input.voice_id.to_owned(),
        user_name: input.user_id.clone().unwrap_or_default(),
        opening_line: input.opening_line.map(str::to_owned),
        system_prompt: input.system_prompt.map(str::to_owned),
    };
    agent_jobs::write_session_config(&mut conn.clone(), &id, &config, Duration::from_secs(TTL))
        .await
        .unwrap();
    let job = AgentStart {
        user_id: input.user_id.clone(),
        traceparent: input.traceparent.map(str::to_owned),
        tracestate: input.tracestate.map(str::to_owned),
        start_by: input.start_by,
        ..AgentStart::new(id)
    };
    let enqueued = producer(conn).enqueue(&job).await.unwrap();
    assert!(!enqueued.duplicate);
    enqueued.task_id
}

/// Every key of a (private, test-only) Redis: name → (type, TTL class, value), with the task
/// ids replaced by `<task N>` (ids are random) and `updatedAt` by `<now>` once checked.
async fn dump(conn: &RedisConn, task_ids: &[String]) -> BTreeMap<String, String> {
    let normalize = |text: &str| {
        task_ids
            .iter()
            .enumerate()
            .fold(text.to_owned(), |t, (n, id)| {
                t.replace(id, &format!("<task {n}>"))
            })
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut c = conn.clone();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut c)
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut c)
            .await
            .unwrap();
        let ttl: i64 = c.ttl(&key).await.unwrap();
        let ttl = match ttl {
            -1 => "no ttl".to_owned(),
            t if t > (TTL - 60) as i64 && t <= TTL as i64 => "ttl 4h".to_owned(),
            t => format!("ttl {t}"),
        };
        let value = match kind.as_str() {
            "string" => format!("{:?}", c.get::<_, String>(&key).await.unwrap()),
            "list" => format!(
                "{:?}",
                c.lrange::<_, Vec<String>>(&key, 0, -1).await.unwrap()
            ),
            "hash" => {
                // Field names normalized before they are ordered: task ids made in the same
                // millisecond (one bulk call) sort at random.
                let raw: Vec<(String, String)> = c.hgetall(&key).await.unwrap();
                let mut hash: BTreeMap<String, String> = raw
                    .into_iter()
                    .map(|(field, value)| (normalize(&field), value))
                    .collect();
                if let Some(at) = hash.get_mut("updatedAt") {
                    let secs: u64 = at.parse().expect("updatedAt is decimal unix seconds");
                    assert!(secs.abs_diff(now) < 60, "updatedAt {secs} is now ({now})");
                    *at = "<now>".into();
                }
                if let Some(at) = hash.get_mut("enqueued_at") {
                    let ms: u64 = at.parse().expect("enqueued_at is decimal unix ms");
                    assert!(
                        (ms / 1000).abs_diff(now) < 60,
                        "enqueued_at {ms} is now ({now})"
                    );
                    *at = "<now ms>".into();
                }
                format!("{hash:?}")
            }
            other => panic!("unexpected {other} key {key}"),
        };
        out.insert(
            normalize(&key),
            normalize(&format!("{kind}, {ttl}: {value}")),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_enqueued_seed_scenario_starts_both_agents_with_their_own_voices() {
    require_python(&["redis"]).await;
    let redis = TestRedis::start().await;
    // No poll and no heartbeat fetch within the deadlines below: the agents can only start if
    // the Python producer pushed to the ready list and published the wake-up.
    let worker = TestWorker::start_woken_only(&redis).await;
    let user = "test_concurrent_user";
    let sessions = [
        (sid("py-seed-craig"), "Craig"),
        (sid("py-seed-olivia"), "Olivia"),
    ];
    for (id, voice) in &sessions {
        let task = cli_ok(
            &redis.url(),
            &[
                "--session-id",
                id.as_str(),
                "--user-id",
                user,
                "--voice-id",
                voice,
            ],
        )
        .await;
        assert_eq!(task.len(), 26, "a ULID task id: {task:?}");
    }
    for (id, voice) in &sessions {
        wait_status(&redis.conn, id, "ready", Duration::from_secs(20)).await;
        let got = wait_received(&redis.conn, id).await;
        assert_agent_of(&got, id, voice);
        let state = SessionKeys::new(id).state();
        assert_eq!(hget(&redis.conn, &state, "userId").await.unwrap(), user);
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sync_client_and_the_rust_producer_write_byte_identical_records() {
    byte_identical_records(Api::Sync).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_async_client_and_the_rust_producer_write_byte_identical_records() {
    byte_identical_records(Api::Async).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compatibility_module_and_the_rust_producer_write_byte_identical_records() {
    byte_identical_records(Api::Compat).await
}

/// `text` followed by every control character and DEL.
fn tricky(text: &str) -> String {
    text.chars()
        .chain((0u8..0x20).map(char::from))
        .chain(['\u{7f}'])
        .collect()
}

/// Both producers' Redis ran the same writes and reads inside the scripts (one PUBLISH on the
/// wake channel per enqueue that pushed something included).
async fn assert_same_writes(py: &RedisConn, rs: &RedisConn) {
    for command in ["del", "hset", "expire", "set", "get", "rpush", "publish"] {
        assert_eq!(
            command_count(py, command).await,
            command_count(rs, command).await,
            "{command} calls"
        );
    }
}

/// `api` and the Rust crate, each on its own Redis, given the same inputs (plus one through
/// the CLI), leave the same keys, values and TTLs and ran the same commands.
async fn byte_identical_records(api: Api) {
    require_python(&["redis"]).await;
    // The old API of the compatibility module knows no version 2 fields.
    let v2 = !matches!(api, Api::Compat);
    let (py, rs) = (TestRedis::start().await, TestRedis::start().await);
    // Every control character, quotes, backslash, '/', DEL, U+2028 and non-ASCII: the JSON
    // escaping of json.dumps and serde_json must agree on all of them.
    let tricky_user = tricky("Zoë ✓ 🎧 \"q\" \\ / \u{2028} ");
    let prompt = "You are \"Ava\".\nNever run $(rm -rf /) or `id`; 'single' \\ back\r\n\ttab";
    let inputs = [
        Input {
            session_id: "same-1",
            user_id: Some(tricky_user),
            voice_id: "Craig",
            opening_line: Some("Hi $(whoami) — hello"),
            system_prompt: Some(prompt),
            traceparent: v2.then_some(TRACEPARENT),
            tracestate: v2.then_some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
            start_by: v2.then_some(1_767_225_600_123),
        },
        Input {
            session_id: "same-2",
            user_id: None,
            voice_id: "Olivia",
            opening_line: None,
            system_prompt: None,
            traceparent: None,
            tracestate: None,
            start_by: v2.then_some(0),
        },
    ];
    let mut py_tasks = Vec::new();
    let mut rs_tasks = Vec::new();
    for input in &inputs {
        let (task, duplicate) = python_api(api, &py.url(), input).await;
        assert!(!duplicate);
        py_tasks.push(task);
        rs_tasks.push(rust_api(&rs.conn, input).await);
    }
    // The same through the CLI (no NUL in argv), with an opening line but no voice: "Ashley".
    py_tasks.push(
        cli_ok(
            &py.url(),
            &[
                "--session-id",
                "same-3",
                "--user-id",
                "Zoë\n\"x\"",
                "--opening-line",
                "Hey",
            ],
        )
        .await,
    );
    let cli_input = Input {
        session_id: "same-3",
        user_id: Some("Zoë\n\"x\"".into()),
        voice_id: "Ashley",
        opening_line: Some("Hey"),
        system_prompt: None,
        traceparent: None,
        tracestate: None,
        start_by: None,
    };
    rs_tasks.push(rust_api(&rs.conn, &cli_input).await);

    for task in &py_tasks {
        let ulid = ulid::Ulid::from_string(task).expect("the Python task id is a ULID");
        let age = SystemTime::now().duration_since(ulid.datetime()).unwrap();
        assert!(age < Duration::from_secs(60), "ULID time is now: {task}");
    }
    let (py_dump, rs_dump) = (
        dump(&py.conn, &py_tasks).await,
        dump(&rs.conn, &rs_tasks).await,
    );
    assert_eq!(py_dump, rs_dump, "Python and Rust records differ");

    // What was compared, spelled out for one job, so an empty or partial dump cannot pass.
    let keys = QueueKeys::new(QUEUE).unwrap();
    let (job, task) = (&inputs[0], &py_tasks[0]);
    let wire = AgentStart {
        user_id: job.user_id.clone(),
        traceparent: job.traceparent.map(str::to_owned),
        tracestate: job.tracestate.map(str::to_owned),
        start_by: job.start_by,
        ..AgentStart::new(sid(job.session_id))
    }
    .to_wire();
    if v2 {
        let text = String::from_utf8(wire.clone()).unwrap();
        assert!(
            text.ends_with(&format!(
                r#""traceparent":"{TRACEPARENT}","tracestate":"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE","start_by":1767225600123}}"#
            )),
            "{text}"
        );
    }
    let stored: Vec<u8> = py.conn.clone().hget(keys.data(), task).await.unwrap();
    assert_eq!(stored, wire, "payload bytes are AgentStart::to_wire()");
    let meta: BTreeMap<String, String> = py.conn.clone().hgetall(keys.meta(task)).await.unwrap();
    let mut meta = meta;
    let enqueued_at = meta.remove("enqueued_at").expect("enqueued_at in the meta");
    assert!(enqueued_at.parse::<u64>().is_ok(), "{enqueued_at}");
    let expected_meta = [
        ("attempts", "0"),
        ("idempotency_key", "session:same-1"),
        ("max_attempts", "1"),
        ("status", "Pending"),
    ];
    assert_eq!(
        meta,
        BTreeMap::from(expected_meta.map(|(k, v)| (k.to_owned(), v.to_owned())))
    );
    let idem = format!("{}:session:same-1", keys.idempotency_prefix());
    assert_eq!(py_dump[&idem], "string, ttl 4h: \"<task 0>\"");
    let config = SessionKeys::new(&sid("same-1")).config();
    assert!(py_dump[&config].starts_with("hash, ttl 4h: "));
    assert!(py_dump[&config].contains("\"systemPrompt\": "));
    assert_eq!(
        py_dump[&keys.active()],
        "list, no ttl: [\"<task 0>\", \"<task 1>\", \"<task 2>\"]"
    );
    assert_eq!(
        py_dump.len(),
        2 + 3 * 3,
        "data, active, and per job meta/idem/config"
    );
    // The same commands ran inside the scripts, including one PUBLISH on the wake channel
    // per enqueue.
    assert_same_writes(&py.conn, &rs.conn).await;
    assert_eq!(command_count(&py.conn, "publish").await, 3);
}

/// One job of a bulk enqueue: a session id alone (Python gets the bare string) or with a user.
type BulkJob = (&'static str, Option<String>);

/// Calls `enqueue_agent_starts` of the sync or async client once per batch, on one client.
/// Per batch: `[[task id, duplicate], ...]`, or the `ValueError`'s message as a string.
async fn python_bulk(api: Api, url: &str, batches: &[Vec<BulkJob>]) -> Vec<serde_json::Value> {
    const DRIVER: &str = r#"
import asyncio, json, sys
import agent_worker
a = json.load(sys.stdin)
# A bare session id where there is no user id: both forms the method accepts.
batches = [[j[0] if j[1] is None else (j[0], j[1]) for j in b] for b in a["batches"]]
def shown(jobs):
    return [[j.task_id, j.duplicate] for j in jobs]
if sys.argv[1] == "Sync":
    client = agent_worker.Client.from_url(a["url"])
    results = []
    for batch in batches:
        try:
            results.append(shown(client.enqueue_agent_starts(batch, **a["options"])))
        except ValueError as e:
            results.append(str(e))
    client.close()
else:
    async def main():
        client = agent_worker.AsyncClient.from_url(a["url"])
        results = []
        for batch in batches:
            try:
                results.append(shown(await client.enqueue_agent_starts(batch, **a["options"])))
            except ValueError as e:
                results.append(str(e))
        await client.aclose()
        return results
    results = asyncio.run(main())
print(json.dumps(results))
"#;
    // The version 2 options, the same for every job (as the Rust side sets them).
    let options = serde_json::json!({
        "start_within": null,
        "start_by": 1_767_225_600_000_i64,
        "traceparent": TRACEPARENT,
    });
    let request = serde_json::json!({ "url": url, "batches": batches, "options": options });
    run_driver(&[DRIVER, &format!("{api:?}")], &request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sync_bulk_form_and_enqueue_many_write_byte_identical_records() {
    byte_identical_bulk(Api::Sync).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_async_bulk_form_and_enqueue_many_write_byte_identical_records() {
    byte_identical_bulk(Api::Async).await
}

/// `enqueue_agent_starts` of `api` and `Producer::enqueue_many`, each on its own Redis, given
/// the same batches: the same results (new or duplicate, and which task a duplicate names),
/// keys, values, TTLs and commands. The batches hold a duplicate within one batch and one of
/// an earlier batch, so both of the script's answers are compared.
async fn byte_identical_bulk(api: Api) {
    require_python(&["redis"]).await;
    let (py, rs) = (TestRedis::start().await, TestRedis::start().await);
    let tricky_user = tricky("Zoë 🎧 \"q\" \\ / \u{2028} ");
    let batches: Vec<Vec<BulkJob>> = vec![
        vec![
            ("bulk-1", Some(tricky_user)),
            ("bulk-2", None),
            ("bulk-3", Some(String::new())),
            ("bulk-1", Some("someone else".into())),
        ],
        vec![
            ("bulk-2", Some("again".into())),
            ("bulk-4", Some("u4".into())),
        ],
    ];
    let py_results = python_bulk(api, &py.url(), &batches).await;
    let mut rs_results = Vec::new();
    for batch in &batches {
        let jobs: Vec<AgentStart> = batch
            .iter()
            .map(|(id, user)| AgentStart {
                user_id: user.clone(),
                traceparent: Some(TRACEPARENT.into()),
                start_by: Some(1_767_225_600_000),
                ..AgentStart::new(sid(id))
            })
            .collect();
        let enqueued = producer(&rs.conn).enqueue_many(&jobs).await.unwrap();
        rs_results.push(
            enqueued
                .into_iter()
                .map(|e| (e.task_id, e.duplicate))
                .collect::<Vec<_>>(),
        );
    }
    let py_results: Vec<Vec<(String, bool)>> = py_results
        .into_iter()
        .map(|batch| serde_json::from_value(batch).expect("no batch was refused"))
        .collect();

    // Task ids are random: compare each result as (duplicate, index of its task among the
    // new ones), which also checks that a duplicate names the first job's task.
    let shape = |results: &[Vec<(String, bool)>]| {
        let fresh: Vec<String> = results
            .iter()
            .flatten()
            .filter(|(_, duplicate)| !duplicate)
            .map(|(task, _)| task.clone())
            .collect();
        let shaped: Vec<Vec<(bool, Option<usize>)>> = results
            .iter()
            .map(|batch| {
                batch
                    .iter()
                    .map(|(task, duplicate)| (*duplicate, fresh.iter().position(|t| t == task)))
                    .collect()
            })
            .collect();
        (fresh, shaped)
    };
    let (py_tasks, py_shape) = shape(&py_results);
    let (rs_tasks, rs_shape) = shape(&rs_results);
    assert_eq!(py_shape, rs_shape, "Python and Rust bulk results differ");
    assert_eq!(
        rs_shape,
        [
            vec![
                (false, Some(0)),
                (false, Some(1)),
                (false, Some(2)),
                (true, Some(0))
            ],
            vec![(true, Some(1)), (false, Some(3))],
        ],
        "the duplicate of the same batch and the one of an earlier batch"
    );
    for task in &py_tasks {
        ulid::Ulid::from_string(task).expect("the Python task id is a ULID");
    }
    let (py_dump, rs_dump) = (
        dump(&py.conn, &py_tasks).await,
        dump(&rs.conn, &rs_tasks).await,
    );
    assert_eq!(py_dump, rs_dump, "Python and Rust records differ");
    // What was compared: data, active, and meta + idempotency key of the 4 jobs stored.
    let keys = QueueKeys::new(QUEUE).unwrap();
    assert_eq!(py_dump.len(), 2 + 2 * 4, "{py_dump:#?}");
    assert_eq!(
        py_dump[&keys.active()],
        "list, no ttl: [\"<task 0>\", \"<task 1>\", \"<task 2>\", \"<task 3>\"]"
    );
    let stored: Vec<u8> = py
        .conn
        .clone()
        .hget(keys.data(), &py_tasks[0])
        .await
        .unwrap();
    let first = &batches[0][0];
    let wire = AgentStart {
        user_id: first.1.clone(),
        traceparent: Some(TRACEPARENT.into()),
        start_by: Some(1_767_225_600_000),
        ..AgentStart::new(sid(first.0))
    }
    .to_wire();
    assert_eq!(stored, wire, "payload bytes are AgentStart::to_wire()");
    assert_same_writes(&py.conn, &rs.conn).await;
    // One wake-up per batch that pushed something.
    assert_eq!(command_count(&py.conn, "publish").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_enqueue_with_one_invalid_session_id_writes_nothing() {
    require_python(&["redis"]).await;
    let redis = TestRedis::start().await;
    let valid = |id: &'static str| (id, Some("u".to_owned()));
    let batches = vec![
        // The invalid id last: everything before it must not have been sent either.
        vec![valid("good-1"), valid("good-2"), ("bad:id", None)],
        vec![("bad:id", Some("u".into())), valid("good-3")],
        vec![valid("good-4"), ("good-5", Some("é".repeat(129)))],
    ];
    for api in [Api::Sync, Api::Async] {
        let results = python_bulk(api, &redis.url(), &batches).await;
        let expected = ["':'", "':'", "258 bytes"];
        assert_eq!(results.len(), expected.len());
        for (result, expected) in results.iter().zip(expected) {
            let message = result
                .as_str()
                .unwrap_or_else(|| panic!("{api:?}: a ValueError, not {result}"));
            assert!(message.contains(expected), "{api:?}: {message}");
        }
    }
    // The Rust producer cannot even build such a job: the id is refused by SessionId.
    assert!(SessionId::parse("bad:id").is_err());
    let mut c = redis.conn.clone();
    let size: u64 = redis::cmd("DBSIZE").query_async(&mut c).await.unwrap();
    assert_eq!(size, 0, "nothing was written");
    // Nor was any script sent, or loaded, or any write run.
    for command in [
        "eval",
        "evalsha",
        "script|load",
        "hset",
        "set",
        "rpush",
        "publish",
    ] {
        assert_eq!(command_count(&redis.conn, command).await, 0, "{command}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_enqueue_of_the_same_session_twice_returns_the_first_task_and_pushes_once() {
    require_python(&["redis"]).await;
    let redis = TestRedis::start().await;
    let url = redis.url();
    let first = cli_ok(&url, &["--session-id", "dup-1", "--user-id", "u"]).await;
    let again = cli(&url, &["--session-id", "dup-1", "--voice-id", "Craig"]).await;
    assert!(again.status.success());
    assert_eq!(String::from_utf8(again.stdout).unwrap().trim(), first);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("already enqueued"), "{stderr}");
    // The Rust producer shares the idempotency key.
    let rust = producer(&redis.conn)
        .enqueue(&AgentStart::new(sid("dup-1")))
        .await
        .unwrap();
    assert!(rust.duplicate);
    assert_eq!(rust.task_id, first);

    let keys = QueueKeys::new(QUEUE).unwrap();
    let mut c = redis.conn.clone();
    let active: Vec<String> = c.lrange(keys.active(), 0, -1).await.unwrap();
    let data: BTreeMap<String, String> = c.hgetall(keys.data()).await.unwrap();
    assert_eq!(data.keys().collect::<Vec<_>>(), [&first]);
    assert_eq!(active, [first]);
    assert_eq!(command_count(&redis.conn, "publish").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_rejects_invalid_input_before_writing_anything() {
    require_python(&["redis"]).await;
    let redis = TestRedis::start().await;
    let long_id = "x".repeat(129);
    let long_user = "é".repeat(129); // 258 bytes, 129 characters
    let cases: [(&[&str], &str); 6] = [
        (&["--session-id", "a:b"], "':'"),
        (&["--session-id", ""], "empty"),
        (&["--session-id", &long_id], "129 characters"),
        (&["--session-id", "é"], "position 0"),
        (
            &["--session-id", "ok", "--user-id", &long_user],
            "258 bytes",
        ),
        (&["--session-id", "ok", "--queue", "q*"], "queue name"),
    ];
    for (args, expected) in cases {
        let out = cli(&redis.url(), &[args, &["--voice-id", "Craig"]].concat()).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    let size: u64 = redis::cmd("DBSIZE")
        .query_async(&mut redis.conn.clone())
        .await
        .unwrap();
    assert_eq!(size, 0, "nothing was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compatibility_modules_cli_still_enqueues_without_the_package_installed() {
    require_python(&["redis"]).await;
    let redis = TestRedis::start().await;
    // Without the package on PYTHONPATH: the module finds the repository's python/ itself
    // (and the package, run from there, the repository's jobs/lua/).
    let mut cmd = Command::new("python3");
    cmd.env("PYTHONDONTWRITEBYTECODE", "1");
    let args = [
        "enqueue",
        "--redis-url",
        &redis.url(),
        "--session-id",
        "compat-1",
    ];
    let out = cmd.arg(COMPAT).args(args).output().await.unwrap();
    let task = stdout_of("the compatibility module", &out)
        .trim()
        .to_owned();
    assert_eq!(active_jobs(&redis.conn).await, [task]);
}

/// Validates JSON texts against the schema with the `jsonschema` package (after checking the
/// schema itself against the 2020-12 meta-schema); one verdict per text.
async fn schema_accepts(texts: &[String]) -> Vec<bool> {
    const VALIDATE: &str = r#"
import json, sys
from jsonschema import Draft202012Validator
schema = json.load(open(sys.argv[1], encoding="utf-8"))
Draft202012Validator.check_schema(schema)
validator = Draft202012Validator(schema)
print(json.dumps([validator.is_valid(json.loads(t)) for t in json.load(sys.stdin)]))
"#;
    let out = run_python(
        &["-c", VALIDATE, SCHEMA],
        &serde_json::to_vec(texts).unwrap(),
    )
    .await;
    printed_json("the jsonschema validation", &out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_schema_agrees_with_the_rust_payloads_and_decoder() {
    require_python(&["jsonschema"]).await;
    let job = |id: &str, user: Option<&str>| AgentStart {
        user_id: user.map(str::to_owned),
        ..AgentStart::new(SessionId::parse(id).unwrap())
    };
    let control_user: String = "Zoë 🎧 \""
        .chars()
        .chain((0u8..0x20).map(char::from))
        .collect();
    let mut good: Vec<String> = [
        job("abc-123", Some("test_concurrent_user")),
        job("a", None),
        job("A.b_c-9", Some("")),
        job(&"x".repeat(128), Some(&"u".repeat(256))),
        job("s.1", Some(&control_user)),
        job("v2", Some("u"))
            .with_traceparent(TRACEPARENT)
            .unwrap()
            .with_tracestate("k=v")
            .unwrap()
            .with_start_by(1_767_225_600_000),
        job("v2-max", None).with_start_by(1 << 53),
    ]
    .iter()
    .map(|j| String::from_utf8(j.to_wire()).unwrap())
    .collect();
    // What other producers may send and the worker accepts: null user, unknown fields.
    good.push(r#"{"user_id":null,"session_id":"s1","extra":[1]}"#.into());
    // A malformed trace context is ignored by the worker (a warning), not a bad job: the
    // schema describes it but does not reject the payload for it.
    good.push(r#"{"session_id":"s1","traceparent":"00-bad","tracestate":7}"#.into());
    good.push(r#"{"session_id":"s1","start_by":null}"#.into());
    let bad: Vec<String> = [
        "{}",
        r#"{"session_id":"a:b"}"#,
        r#"{"session_id":5}"#,
        r#"{"session_id":""}"#,
        r#"{"session_id":"ab\n"}"#,
        r#"{"session_id":"é"}"#,
        &format!(r#"{{"session_id":"{}"}}"#, "x".repeat(129)),
        r#"{"session_id":"a","user_id":7}"#,
        r#"["session_id"]"#,
        r#"{"session_id":"a","start_by":"1"}"#,
        r#"{"session_id":"a","start_by":1.5}"#,
        r#"{"session_id":"a","start_by":-1}"#,
        r#"{"session_id":"a","start_by":9007199254740993}"#,
    ]
    .map(str::to_owned)
    .into();
    for text in &good {
        assert!(AgentStart::decode(text.as_bytes()).is_ok(), "{text}");
    }
    for text in &bad {
        assert!(AgentStart::decode(text.as_bytes()).is_err(), "{text}");
    }
    let verdicts = schema_accepts(&[good.clone(), bad.clone()].concat()).await;
    let (good_verdicts, bad_verdicts) = verdicts.split_at(good.len());
    for (text, ok) in good.iter().zip(good_verdicts) {
        assert!(ok, "the schema rejects a valid payload: {text}");
    }
    for (text, ok) in bad.iter().zip(bad_verdicts) {
        assert!(!ok, "the schema accepts an invalid payload: {text}");
    }
}
