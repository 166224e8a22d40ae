//! Drop-in compatibility with the original system: our worker between a replay of the real
//! orchestrator's Redis operations (in their original order) and a Python agent that parses
//! its arguments and writes its billing fields as the real Pipecat agent does
//! (`tests/agents/voice_assistant.py`). Every worker here is the real binary in its own
//! process, with the environment a deployment gives it (`REDIS_URL`, which the agent uses).
//!
//! These tests need `python3` with redis-py (`cargo xtask test` installs it).

mod common;

use agent_worker::connection::RedisConn;
use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use agent_jobs::{AgentStart, SessionId, SessionKeys, keys::legacy_metrics};
use common::*;
use nix::sys::signal::Signal;
use redis::AsyncCommands;

const AGENT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/agents/voice_assistant.py"
);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `agent-worker run` with the Python agent, as a deployment runs it: the agent's Redis comes
/// from the worker's own `REDIS_URL`.
fn worker(redis: &TestRedis, extra: &[(&str, &str)]) -> WorkerProcess {
    let command = format!("python3,{AGENT}");
    let mut env = vec![
        ("AGENT_WORKER__AGENT__COMMAND", command.as_str()),
        ("AGENT_WORKER__AGENT__STARTUP_TIMEOUT", "20s"),
        ("AGENT_WORKER__SESSION__STALE_AFTER", "30s"),
        ("PYTHONDONTWRITEBYTECODE", "1"),
    ];
    env.extend_from_slice(extra);
    let mut command = worker_command(&redis.url(), &["run"], "ready", &env);
    command.env("REDIS_URL", redis.url());
    WorkerProcess::spawn(command)
}

/// The orchestrator's `POST /session/start`, after its credit check: the config hash (TTL
/// 4 h), the job, then its own write of `session:<id>` right after enqueueing.
async fn orchestrator_start(
    conn: &RedisConn,
    id: &SessionId,
    user: &str,
    voice: &str,
    opening_line: Option<&str>,
    extra_config: &[(&str, &str)],
) -> String {
    let keys = SessionKeys::new(id);
    let mut config: Vec<(String, String)> = vec![
        ("voiceId".into(), voice.into()),
        ("userName".into(), user.into()),
        ("updatedAt".into(), now().to_string()),
    ];
    if let Some(line) = opening_line {
        config.push(("openingLine".into(), line.into()));
    }
    config.extend(
        extra_config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let _: () = redis::pipe()
        .hset_multiple(keys.config(), &config)
        .ignore()
        .expire(keys.config(), 14400)
        .ignore()
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    let task_id = producer(conn)
        .enqueue(&AgentStart::new(id.clone()).with_user(user))
        .await
        .unwrap()
        .task_id;
    let _: () = redis::pipe()
        .hset_multiple(
            keys.state(),
            &[
                ("userName", user),
                ("voiceId", voice),
                ("openingLine", opening_line.unwrap_or("")),
                ("systemPrompt", ""),
                ("celeryTaskId", task_id.as_str()),
                ("status", "starting"),
                ("startTime", now().to_string().as_str()),
            ],
        )
        .ignore()
        .expire(keys.state(), 14400)
        .ignore()
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    task_id
}

/// The orchestrator's end-of-session handler (`POST /session/end`, the LiveKit webhook):
/// 404 (`None`) without `session:<id>`; otherwise the record it bills from, after deleting
/// the session's keys and set entries itself.
async fn orchestrator_end(conn: &RedisConn, id: &SessionId) -> Option<HashMap<String, String>> {
    let keys = SessionKeys::new(id);
    let record: HashMap<String, String> = conn.clone().hgetall(keys.state()).await.unwrap();
    if record.is_empty() {
        return None;
    }
    let _: () = redis::pipe()
        .del(&[
            keys.state(),
            keys.config(),
            keys.agent_pid(),
            keys.agent_logs(),
            keys.agent_health(),
        ])
        .ignore()
        .srem("session:starting", id.as_str())
        .ignore()
        .srem("session:ready", id.as_str())
        .ignore()
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    Some(record)
}

/// What the Python agent reported receiving (`voice-agent received {json}`).
async fn agent_report(conn: &RedisConn, id: &SessionId) -> Option<serde_json::Value> {
    let lines = agent_logs(conn, id).await;
    lines.iter().find_map(|l| {
        l.strip_prefix("voice-agent received ")
            .and_then(|json| serde_json::from_str(json).ok())
    })
}

async fn wait_report(conn: &RedisConn, id: &SessionId) -> serde_json::Value {
    wait_for(
        &format!("the agent of {id} to report"),
        Duration::from_secs(20),
        || agent_report(conn, id),
    )
    .await
}

async fn wait_field(conn: &RedisConn, id: &SessionId, field: &str) -> String {
    let state = SessionKeys::new(id).state();
    wait_for(
        &format!("{field} in session:{id}"),
        Duration::from_secs(20),
        || hget(conn, &state, field),
    )
    .await
}

/// Every key of the keyspace that names the session, by SCAN (test Redis: small).
async fn keys_naming(conn: &RedisConn, id: &SessionId) -> Vec<String> {
    let mut c = conn.clone();
    let mut cursor = 0u64;
    let mut found = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut c)
            .await
            .unwrap();
        found.extend(keys.into_iter().filter(|k| k.contains(id.as_str())));
        cursor = next;
        if cursor == 0 {
            return found;
        }
    }
}

/// Nothing of the session anywhere: no key naming it, not in the state sets, not indexed.
/// Except the queue's idempotency key of its job, which is the job's, not the session's: it
/// keeps a duplicate enqueue from starting an agent for the ended session until it expires
/// (`session.ttl`).
async fn nothing_left(conn: &RedisConn, id: &SessionId) -> Result<(), String> {
    let idempotency = format!("{QUEUE}:idempotency:session:{id}");
    let keys: Vec<String> = keys_naming(conn, id)
        .await
        .into_iter()
        .filter(|k| *k != idempotency)
        .collect();
    let indexed = heartbeat_score(conn, id).await;
    let in_sets = is_member(conn, "session:starting", id.as_str()).await
        || is_member(conn, "session:ready", id.as_str()).await;
    if keys.is_empty() && indexed.is_none() && !in_sets {
        Ok(())
    } else {
        Err(format!(
            "left of {id}: keys {keys:?}, indexed {indexed:?}, in a state set {in_sets}"
        ))
    }
}

async fn stop(worker: WorkerProcess) -> String {
    let out = worker.stop().await;
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Waits until the owner of the live session `id` has heartbeated it `n` more times (its score
/// in the heartbeat index, unix seconds, advanced `n` times).
async fn wait_heartbeats(conn: &RedisConn, id: &SessionId, n: usize) {
    let mut last = heartbeat_score(conn, id).await.expect("a live session");
    for _ in 0..n {
        last = wait_for(
            &format!("a heartbeat of {id} after {last}"),
            Duration::from_secs(10),
            || async { heartbeat_score(conn, id).await.filter(|t| *t > last) },
        )
        .await;
    }
}

/// The value of the counter `name{label}` on the worker's `/metrics` at `http`, if served.
async fn counter(http: SocketAddr, name: &str, label: &str) -> Option<f64> {
    let (code, body) = http_get(http, "/metrics").await?;
    if code != 200 {
        return None;
    }
    body.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') && rest.contains(label))
        })
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_scenario_through_the_orchestrators_steps_each_agent_gets_its_own_voice() {
    let redis = TestRedis::start().await;
    let worker = worker(&redis, &[]);
    let user = "test_concurrent_user";
    let sessions = [(sid("seed-craig"), "Craig"), (sid("seed-olivia"), "Olivia")];
    for (id, voice) in &sessions {
        orchestrator_start(&redis.conn, id, user, voice, Some("Hello there"), &[]).await;
    }
    for (id, voice) in &sessions {
        wait_status(&redis.conn, id, "ready", Duration::from_secs(30)).await;
        let report = wait_report(&redis.conn, id).await;
        assert_eq!(report["voice_id"], *voice, "{report}");
        assert_eq!(report["room"], id.as_str());
        assert_eq!(report["pipecat_room"], id.as_str());
        let state = SessionKeys::new(id).state();
        // The orchestrator's own fields stand beside ours.
        assert!(hget(&redis.conn, &state, "celeryTaskId").await.is_some());
        assert!(hget(&redis.conn, &state, "startTime").await.is_some());
        // The agent's own write, when its first participant joined.
        wait_field(&redis.conn, id, "conversationStartTime").await;
    }
    // A late `status=starting` of the orchestrator (it writes after enqueueing) over a ready
    // session: the heartbeat makes it ready again.
    let (late, _) = &sessions[0];
    let _: () = redis
        .conn
        .clone()
        .hset(SessionKeys::new(late).state(), "status", "starting")
        .await
        .unwrap();
    wait_status(&redis.conn, late, "ready", Duration::from_secs(5)).await;
    stop(worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_end_leaves_the_billing_record_for_the_orchestrator_then_nothing() {
    let redis = TestRedis::start().await;
    let worker = worker(&redis, &[]);
    let id = sid("billed-1");
    orchestrator_start(&redis.conn, &id, "u", "Craig", None, &[]).await;
    wait_status(&redis.conn, &id, "ready", Duration::from_secs(30)).await;
    let pid = agent_pid(&redis.conn, &id).await;
    wait_field(&redis.conn, &id, "conversationStartTime").await;
    // The participant hangs up: the agent writes its billing fields and exits 0.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGUSR1).unwrap();
    wait_field(&redis.conn, &id, "endedAt").await;
    assert!(!alive(pid));

    // The orchestrator's end handler, after the agent has gone, finds what it bills from.
    let record = orchestrator_end(&redis.conn, &id)
        .await
        .expect("session:<id> is still there: /session/end would answer 404");
    assert_eq!(record["status"], "completed", "{record:?}");
    let duration: u64 = record["conversationDuration"].parse().unwrap();
    assert_eq!(
        record["conversationDurationMinutes"],
        duration.div_ceil(60).to_string()
    );
    assert_eq!(record["exitCode"], "0");
    assert!(!record.contains_key("error"), "{record:?}");

    // After the next sweep nothing of the session is left, our indexes included.
    let out = WorkerProcess::spawn(worker_command(&redis.url(), &["sweep"], "ready", &[]))
        .output()
        .await;
    stdout_of("agent-worker sweep", &out);
    // Once the worker has stopped, its log shipper is drained: late lines of the agent must
    // not have recreated its log key, nor a heartbeat anything else.
    stop(worker).await;
    nothing_left(&redis.conn, &id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credit_stop_stops_the_agent_on_another_process_and_keeps_terminated() {
    let redis = TestRedis::start().await;
    let (heartbeat, stop_grace) = (Duration::from_secs(1), Duration::from_secs(2));
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (heartbeat_text, grace_text, http_text) = (
        format!("{}s", heartbeat.as_secs()),
        format!("{}s", stop_grace.as_secs()),
        http.to_string(),
    );
    let worker = worker(
        &redis,
        &[
            ("AGENT_WORKER__SESSION__HEARTBEAT_INTERVAL", &heartbeat_text),
            ("AGENT_WORKER__AGENT__STOP_GRACE", &grace_text),
            ("AGENT_WORKER__HTTP__ADDR", &http_text),
        ],
    );
    let id = sid("out-of-credit");
    orchestrator_start(&redis.conn, &id, "u", "Olivia", None, &[]).await;
    wait_status(&redis.conn, &id, "ready", Duration::from_secs(30)).await;
    let pid = agent_pid(&redis.conn, &id).await;
    // The orchestrator's terminate_session_insufficient_credits, from this (another) process.
    let state = SessionKeys::new(&id).state();
    let written = Instant::now();
    let _: () = redis
        .conn
        .clone()
        .hset_multiple(
            &state,
            &[
                ("status", "terminated"),
                ("terminationReason", "insufficient_credits"),
                ("terminatedAt", now().to_string().as_str()),
            ],
        )
        .await
        .unwrap();
    // Within one heartbeat plus the agent's stop (SIGTERM, at worst the grace, SIGKILL), and
    // a second of slack for the reaping and this poll, counted from the write.
    let budget = heartbeat + stop_grace + Duration::from_secs(1);
    wait_for(
        &format!("the agent to be stopped within {budget:?} of the terminated write"),
        budget.saturating_sub(written.elapsed()),
        || async { (!alive(pid)).then_some(()) },
    )
    .await;
    wait_field(&redis.conn, &id, "endedAt").await;
    assert_eq!(
        status(&redis.conn, &id).await.as_deref(),
        Some("terminated")
    );
    // The stop is counted by its reason.
    let (series, label) = ("agent_worker_agent_stops_total", "reason=\"terminated\"");
    let stops = wait_for(
        &format!("{series}{{{label}}} on /metrics"),
        Duration::from_secs(10),
        || counter(http, series, label),
    )
    .await;
    assert!(stops >= 1.0, "{stops}");
    assert_eq!(
        hget(&redis.conn, &state, "terminationReason")
            .await
            .as_deref(),
        Some("insufficient_credits")
    );
    assert_eq!(
        hget(&redis.conn, &state, "stopReason").await.as_deref(),
        Some("terminated")
    );
    let stderr = stop(worker).await;
    assert_logged(
        stderr.as_bytes(),
        "agent_stopped",
        &[("reason", "terminated")],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_first_end_stops_the_agent_and_recreates_nothing() {
    let redis = TestRedis::start().await;
    let worker = worker(&redis, &[HEARTBEAT_EVERY_SECOND]);
    // A second session keeps running: its heartbeats show the worker's heartbeats go on.
    let (id, running) = (sid("ended-first"), sid("still-running"));
    for session in [&id, &running] {
        orchestrator_start(&redis.conn, session, "u", "Craig", None, &[]).await;
    }
    for session in [&id, &running] {
        wait_status(&redis.conn, session, "ready", Duration::from_secs(30)).await;
    }
    let pid = agent_pid(&redis.conn, &id).await;
    assert!(orchestrator_end(&redis.conn, &id).await.is_some());
    wait_gone("the agent to be stopped", Duration::from_secs(5), pid).await;
    // The worker recorded that it stopped the agent because the session ended...
    wait_for(
        &format!("the stopped event of {id}"),
        Duration::from_secs(10),
        || async {
            let events = event_statuses(&redis.conn, &id).await;
            events
                .iter()
                .any(|(status, reason)| status == "stopped" && reason == "session_ended")
                .then_some(())
        },
    )
    .await;
    // ... then heartbeated on (twice, with the ended session no longer among them): none of
    // those heartbeats may bring a key back.
    wait_heartbeats(&redis.conn, &running, 2).await;
    nothing_left(&redis.conn, &id).await.unwrap();
    // Nor the agent's last lines: a stopped worker has drained its log shipper.
    stop(worker).await;
    nothing_left(&redis.conn, &id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_that_look_like_options_reach_the_agent_verbatim_and_empty_ones_are_left_out() {
    let redis = TestRedis::start().await;
    // The agent's report line carries the 100 KB prompt: keep it whole.
    let worker = worker(
        &redis,
        &[("AGENT_WORKER__AGENT__MAX_LINE_BYTES", "1048576")],
    );
    // (opening line, system prompt) per session.
    let big = "A long prompt line. ".repeat(5_000);
    let cases: Vec<(&str, String, String)> = vec![
        ("dash", "-Hello".into(), "-Hello".into()),
        ("short-room", "-r oops".into(), "-r oops".into()),
        ("short-url", "-u nice".into(), "-u nice".into()),
        ("long-room", "--room=x".into(), "--room=x".into()),
        ("empty", String::new(), String::new()),
        (
            "multi-line",
            "first line\nsecond line\n-r third".into(),
            "-u a\n--room b".into(),
        ),
        ("hundred-kb", "-Hi".into(), big),
    ];
    let mut started = Vec::new();
    for (name, opening, prompt) in &cases {
        let id = sid(&format!("argv-{name}"));
        let config = [
            ("voiceId", "Craig".to_owned()),
            ("userName", "u".to_owned()),
            ("updatedAt", now().to_string()),
            ("openingLine", opening.clone()),
            ("systemPrompt", prompt.clone()),
        ];
        let _: () = redis
            .conn
            .clone()
            .hset_multiple(SessionKeys::new(&id).config(), &config)
            .await
            .unwrap();
        enqueue(&redis.conn, &id, Some("u")).await;
        started.push((id, opening.clone(), prompt.clone()));
    }
    for (id, opening, prompt) in &started {
        wait_status(&redis.conn, id, "ready", Duration::from_secs(60)).await;
        let report = wait_report(&redis.conn, id).await;
        assert_eq!(report["room"], id.as_str(), "{id}");
        assert_eq!(report["pipecat_room"], id.as_str(), "{id}: Pipecat's room");
        assert!(report["pipecat_url"].is_null(), "{id}: Pipecat's url");
        let argv: Vec<String> = serde_json::from_value(report["argv"].clone()).unwrap();
        if opening.is_empty() {
            assert!(report["opening_line"].is_null(), "{id}: {report}");
            assert!(report["system_prompt"].is_null(), "{id}: {report}");
            assert!(
                !argv
                    .iter()
                    .any(|a| a.starts_with("--opening-line") || a.starts_with("--system-prompt")),
                "{id}: empty options are left out: {argv:?}"
            );
        } else {
            assert_eq!(report["opening_line"], opening.as_str(), "{id}");
            assert_eq!(report["system_prompt"], prompt.as_str(), "{id}");
        }
    }
    stop(worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_separate_arg_style_of_the_original_breaks_on_a_leading_dash() {
    // Why `equals` is the default: the original's `--opening-line -Hello` fails every start.
    let redis = TestRedis::start().await;
    let worker = worker(
        &redis,
        &[("AGENT_WORKER__AGENT__ARG_STYLE", "separate"), ONE_ATTEMPT],
    );
    let id = sid("separate-dash");
    orchestrator_start(&redis.conn, &id, "u", "Craig", Some("-Hello"), &[]).await;
    let task = hget(&redis.conn, &SessionKeys::new(&id).state(), "celeryTaskId")
        .await
        .unwrap();
    let result = wait_dead(&redis.conn, &task).await;
    assert!(result.contains("exited with code 2"), "{result}");
    stop(worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_stuck_in_its_imports_fails_after_the_alive_timeout() {
    let redis = TestRedis::start().await;
    let worker = worker(
        &redis,
        &[
            ("AGENT_WORKER__AGENT__ALIVE_TIMEOUT", "2s"),
            ("AGENT_WORKER__AGENT__STARTUP_TIMEOUT", "25s"),
            ONE_ATTEMPT,
        ],
    );
    let (hung, crashed) = (sid("hung-imports"), sid("crashed-imports"));
    let started = std::time::Instant::now();
    let hung_task = orchestrator_start(
        &redis.conn,
        &hung,
        "u",
        "Craig",
        None,
        &[("testBehaviour", "hang-before-alive")],
    )
    .await;
    let crashed_task = orchestrator_start(
        &redis.conn,
        &crashed,
        "u",
        "Craig",
        None,
        &[("testBehaviour", "crash-on-import")],
    )
    .await;
    let hung_result = wait_dead(&redis.conn, &hung_task).await;
    assert!(
        hung_result.contains("no alive line within 2s"),
        "{hung_result}"
    );
    // Decided by the alive phase, not by the 25 s start-up timeout.
    assert!(started.elapsed() < Duration::from_secs(20));
    let crashed_result = wait_dead(&redis.conn, &crashed_task).await;
    assert!(
        crashed_result.contains("exited with code 1 before it was ready"),
        "{crashed_result}"
    );
    assert!(crashed_result.contains("ImportError"), "{crashed_result}");
    for id in [&hung, &crashed] {
        assert_eq!(status(&redis.conn, id).await.as_deref(), Some("error"));
    }
    stop(worker).await;
}

/// The alive phase is on only when `alive_timeout` < `startup_timeout`: with it on, starts
/// that work still work, whether the agent prints an alive line or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_alive_phase_on_agents_with_and_without_an_alive_line_become_ready() {
    let alive_phase = [
        ("AGENT_WORKER__AGENT__ALIVE_TIMEOUT", "2s"),
        ("AGENT_WORKER__AGENT__STARTUP_TIMEOUT", "20s"),
    ];
    // The Python agent: `AGENT_ALIVE`, then `Connected to <room>`.
    let python = TestRedis::start().await;
    let python_worker = worker(&python, &alive_phase);
    // The test agent's default behaviour: a ready line only (alive implied).
    let plain = TestRedis::start().await;
    let plain_worker = WorkerProcess::spawn(worker_command(
        &plain.url(),
        &["run"],
        "ready",
        &[
            alive_phase[0],
            alive_phase[1],
            // Longer than the start-up timeout, as `worker` has it.
            ("AGENT_WORKER__SESSION__STALE_AFTER", "30s"),
        ],
    ));
    let (alive_first, implied) = (sid("alive-then-connected"), sid("alive-implied"));
    orchestrator_start(&python.conn, &alive_first, "u", "Craig", None, &[]).await;
    write_config(&plain.conn, &implied, "Craig", "u").await;
    let plain_task = enqueue(&plain.conn, &implied, None).await;

    wait_status(&python.conn, &alive_first, "ready", Duration::from_secs(30)).await;
    let lines = agent_logs(&python.conn, &alive_first).await;
    let position = |prefix: &str| lines.iter().position(|l| l.starts_with(prefix));
    let (alive, connected) = (position("AGENT_ALIVE"), position("Connected to"));
    assert!(
        alive.is_some() && connected.is_some() && alive < connected,
        "an alive line, then the connected line: {lines:?}"
    );

    wait_status(&plain.conn, &implied, "ready", Duration::from_secs(30)).await;
    wait_done(&plain.conn, &plain_task, Duration::from_secs(10)).await;
    let report = wait_received(&plain.conn, &implied).await;
    assert_eq!(report["contract"]["room"], implied.as_str(), "{report}");
    let lines = agent_logs(&plain.conn, &implied).await;
    assert!(
        !lines.iter().any(|l| l.contains("AGENT_ALIVE")),
        "no alive line was printed: {lines:?}"
    );
    stop(python_worker).await;
    stop(plain_worker).await;
}

/// An agent that printed its alive line is past the alive phase: without a ready line it
/// fails at the start-up timeout, not at the (shorter) alive timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alive_agent_that_never_gets_ready_fails_after_the_startup_timeout() {
    let redis = TestRedis::start().await;
    let worker = WorkerProcess::spawn(worker_command(
        &redis.url(),
        &["run"],
        "alive-never-ready",
        &[
            ("AGENT_WORKER__AGENT__ALIVE_TIMEOUT", "2s"),
            ("AGENT_WORKER__AGENT__STARTUP_TIMEOUT", "4s"),
            ONE_ATTEMPT,
        ],
    ));
    let id = sid("alive-never-ready");
    write_config(&redis.conn, &id, "Craig", "u").await;
    let enqueued = Instant::now();
    let task = enqueue(&redis.conn, &id, None).await;
    let result = wait_dead(&redis.conn, &task).await;
    assert!(
        result.contains("no ready line within 4s"),
        "the start-up timeout decided: {result}"
    );
    assert!(!result.contains("no alive line"), "{result}");
    assert!(result.contains("AGENT_ALIVE"), "its last line: {result}");
    // Not before the start-up timeout (a lower bound: it cannot be reached early by load).
    assert!(enqueued.elapsed() >= Duration::from_secs(4));
    assert_eq!(status(&redis.conn, &id).await.as_deref(), Some("error"));
    stop(worker).await;
}

/// A ready agent that crashes on its own (exit 3): the record says so and is kept for the
/// orchestrator with a TTL of at most `session.ended_ttl`, with its config, logs and health.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_agent_that_crashes_leaves_an_error_record_with_the_ended_ttl() {
    const ENDED_TTL: i64 = 600;
    let redis = TestRedis::start().await;
    let worker = WorkerProcess::spawn(worker_command(
        &redis.url(),
        &["run"],
        "crash-after-ready",
        &[("AGENT_WORKER__SESSION__ENDED_TTL", "600s")],
    ));
    let id = sid("crashed-call");
    let keys = SessionKeys::new(&id);
    // The config is the orchestrator's, with its own (longer) TTL.
    write_config(&redis.conn, &id, "Craig", "u").await;
    let task = enqueue(&redis.conn, &id, None).await;
    wait_field(&redis.conn, &id, "endedAt").await;
    // It was ready: the job is done, not retried.
    wait_done(&redis.conn, &task, Duration::from_secs(10)).await;
    // A stopped worker has drained its log shipper: the TTLs below are final.
    stop(worker).await;

    let record: HashMap<String, String> = redis.conn.clone().hgetall(keys.state()).await.unwrap();
    assert_eq!(record["status"], "error", "{record:?}");
    assert!(record["error"].contains("code 3"), "{record:?}");
    assert_eq!(record["exitCode"], "3", "{record:?}");
    assert!(record["endedAt"].parse::<u64>().is_ok(), "{record:?}");
    assert!(
        record.contains_key("startupTime"),
        "it was ready: {record:?}"
    );
    let events = event_statuses(&redis.conn, &id).await;
    let statuses: Vec<&str> = events.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(statuses, ["starting", "ready", "error"], "{events:?}");
    for key in [
        keys.state(),
        keys.config(),
        keys.agent_logs(),
        keys.agent_health(),
    ] {
        let ttl = ttl_of(&redis.conn, &key).await;
        assert!(
            0 < ttl && ttl <= ENDED_TTL,
            "{key}: TTL {ttl} within session.ended_ttl ({ENDED_TTL} s)"
        );
    }
    let pid: Option<String> = redis.conn.clone().get(keys.agent_pid()).await.unwrap();
    assert_eq!(pid, None, "agent:<id>:pid is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_metrics_match_what_the_original_worker_wrote() {
    let redis = TestRedis::start().await;
    let state_dir = std::env::temp_dir().join(format!("compat-state-{}", ulid::Ulid::generate()));
    std::fs::create_dir_all(&state_dir).unwrap();
    let state_dir_s = state_dir.display().to_string();
    let worker = worker(
        &redis,
        &[
            // Long enough for a Python start on a busy machine; only timeout-once hangs.
            ("AGENT_WORKER__AGENT__STARTUP_TIMEOUT", "8s"),
            ("AGENT_WORKER__AGENT__RETRY_BACKOFF", "50ms"),
            ("AGENT_WORKER__AGENT__MAX_AGENTS", "10"),
            // Inherited by the agents: where timeout-once counts its runs.
            ("TEST_AGENT_STATE_DIR", state_dir_s.as_str()),
        ],
    );
    // Three starts that work, one whose first attempt times out (alive, never connected).
    let ids = [sid("m-1"), sid("m-2"), sid("m-3"), sid("m-timeout")];
    for id in &ids[..3] {
        orchestrator_start(&redis.conn, id, "u", "Craig", None, &[]).await;
    }
    orchestrator_start(
        &redis.conn,
        &ids[3],
        "u",
        "Craig",
        None,
        &[("testBehaviour", "timeout-once")],
    )
    .await;
    for id in &ids {
        wait_status(&redis.conn, id, "ready", Duration::from_secs(40)).await;
    }
    let mut startups = Vec::new();
    for id in &ids {
        let s = hget(&redis.conn, &SessionKeys::new(id).state(), "startupTime")
            .await
            .unwrap();
        startups.push(s.parse::<f64>().unwrap());
    }
    // What the original worker's AgentMetrics would hold after these starts.
    let mut expected: HashMap<String, String> = HashMap::new();
    for bucket in legacy_metrics::BUCKETS {
        let n = startups.iter().filter(|s| **s <= bucket as f64).count();
        if n > 0 {
            expected.insert(format!("le_{bucket}"), n.to_string());
        }
    }
    expected.insert("le_inf".into(), startups.len().to_string());
    let histogram: HashMap<String, String> = redis
        .conn
        .clone()
        .hgetall(legacy_metrics::STARTUP_HISTOGRAM)
        .await
        .unwrap();
    assert_eq!(histogram, expected);
    let duration: HashMap<String, String> = redis
        .conn
        .clone()
        .hgetall(legacy_metrics::STARTUP_DURATION)
        .await
        .unwrap();
    assert_eq!(duration["count"], "4");
    let sum: f64 = duration["sum"].parse().unwrap();
    assert!(
        (sum - startups.iter().sum::<f64>()).abs() < 1e-6,
        "{sum} {startups:?}"
    );
    let counters: Vec<Option<u64>> = redis
        .conn
        .clone()
        .mget(&[
            legacy_metrics::STARTUP_TIMEOUTS,
            legacy_metrics::RETRIES,
            legacy_metrics::COLD_STARTS,
        ])
        .await
        .unwrap();
    assert_eq!(counters, [Some(1), Some(1), Some(1)]);
    stop(worker).await;
    let _ = std::fs::remove_dir_all(&state_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_legacy_metrics_no_metrics_key_is_written() {
    let redis = TestRedis::start().await;
    let worker = TestWorker::start(redis.settings(
        "exit-before-ready",
        &[
            ("AGENT_WORKER__COMPAT__LEGACY_METRICS", "false"),
            ("AGENT_WORKER__AGENT__START_ATTEMPTS", "2"),
        ],
    ));
    let ok_worker = TestWorker::start(TestRedis::settings(
        &redis,
        "ready",
        &[
            ("AGENT_WORKER__COMPAT__LEGACY_METRICS", "false"),
            ("AGENT_WORKER__REDIS__QUEUE", "other-queue"),
        ],
    ));
    // A failing start (a retry, then dead) and, on another queue, one that works.
    let failing = sid("no-metrics-fail");
    let task = enqueue(&redis.conn, &failing, None).await;
    wait_dead(&redis.conn, &task).await;
    let working = sid("no-metrics-ok");
    agent_jobs::Producer::new(
        redis.conn.clone(),
        agent_jobs::QueueKeys::new("other-queue").unwrap(),
    )
    .enqueue(&AgentStart::new(working.clone()))
    .await
    .unwrap();
    wait_status(&redis.conn, &working, "ready", Duration::from_secs(20)).await;
    let metrics: Vec<String> = redis.conn.clone().keys("metrics:*").await.unwrap();
    assert!(metrics.is_empty(), "{metrics:?}");
    worker.stop().await;
    ok_worker.stop().await;
}
