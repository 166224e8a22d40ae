//! Per-session configuration: every agent gets its own session's voice, never the user's.

mod common;

use std::time::Duration;

use agent_jobs::{QueueKeys, SessionKeys};
use agent_worker::connection::RedisConn;
use common::*;
use redis::AsyncCommands;

/// Asserts that `key` expires within the session TTL (4 h, the default `session.ttl`).
async fn assert_expires_with_the_session(conn: &RedisConn, key: &str) {
    let ttl = ttl_of(conn, key).await;
    assert!(ttl > 0 && ttl <= 4 * 3600, "{key}: TTL {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_sessions_of_one_user_each_get_their_own_voice() {
    let redis = TestRedis::start().await;
    let user = "test_concurrent_user";
    let sessions: Vec<_> = (0..100)
        .map(|i| (sid(&format!("concurrent-{i}")), format!("Voice{i:03}")))
        .collect();
    for (id, voice) in &sessions {
        write_config(&redis.conn, id, voice, user).await;
    }
    let worker =
        TestWorker::start(redis.settings("ready", &[("AGENT_WORKER__AGENT__MAX_AGENTS", "100")]));
    // One atomic enqueue: all 100 arrive at the same moment.
    let jobs: Vec<_> = sessions
        .iter()
        .map(|(id, _)| agent_jobs::AgentStart::new(id.clone()).with_user(user))
        .collect();
    producer(&redis.conn).enqueue_many(&jobs).await.unwrap();

    for (id, voice) in &sessions {
        wait_status(&redis.conn, id, "ready", Duration::from_secs(60)).await;
        let got = wait_received(&redis.conn, id).await;
        assert_agent_of(&got, id, voice);
        let state = SessionKeys::new(id).state();
        assert_eq!(hget(&redis.conn, &state, "voiceId").await.unwrap(), *voice);
        assert_eq!(hget(&redis.conn, &state, "userId").await.unwrap(), user);
    }
    let ready: usize = redis.conn.clone().scard("session:ready").await.unwrap();
    assert_eq!(ready, 100);
    worker.stop().await;
    // Each agent was stopped at once with its worker (SIGTERM and SIGKILL, no grace): its
    // session ended with that exit, and its record stays for the orchestrator's
    // end-of-session handler, out of the live sets.
    for (id, _) in &sessions {
        let state = SessionKeys::new(id).state();
        let ended = (
            status(&redis.conn, id).await,
            hget(&redis.conn, &state, "exitCode").await,
            hget(&redis.conn, &state, "exitSignal").await,
        );
        let clean = (Some("completed".into()), Some("0".into()), None);
        let killed = (Some("error".into()), None, Some("9".into()));
        assert!(ended == clean || ended == killed, "{id}: {ended:?}");
        assert_eq!(
            hget(&redis.conn, &state, "stopReason").await.as_deref(),
            Some("worker_shutdown")
        );
        assert!(hget(&redis.conn, &state, "endedAt").await.is_some());
        let pid: bool = redis
            .conn
            .clone()
            .exists(SessionKeys::new(id).agent_pid())
            .await
            .unwrap();
        assert!(!pid, "the pid of an exited agent goes");
    }
    let ready: usize = redis.conn.clone().scard("session:ready").await.unwrap();
    assert_eq!(ready, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_scoped_config_is_ignored_for_configured_and_unconfigured_sessions() {
    let redis = TestRedis::start().await;
    let mut conn = redis.conn.clone();
    // The old, user-scoped key, with a voice nobody asked for this session.
    let _: () = conn
        .hset_multiple(
            "user:alice:config",
            &[("voiceId", "UserVoice"), ("userName", "alice")],
        )
        .await
        .unwrap();
    let configured = sid("configured-1");
    let unconfigured = sid("unconfigured-1");
    write_config(&redis.conn, &configured, "Craig", "alice").await;
    let worker = TestWorker::start(redis.settings("ready", &[]));
    enqueue(&redis.conn, &configured, Some("alice")).await;
    enqueue(&redis.conn, &unconfigured, Some("alice")).await;

    wait_status(&redis.conn, &configured, "ready", Duration::from_secs(20)).await;
    wait_status(&redis.conn, &unconfigured, "ready", Duration::from_secs(20)).await;
    assert_eq!(
        wait_received(&redis.conn, &configured).await["contract"]["voice_id"],
        "Craig"
    );
    assert_eq!(
        wait_received(&redis.conn, &unconfigured).await["contract"]["voice_id"],
        "Ashley",
        "an unconfigured session gets the default voice, not the user's"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_config_gets_the_default_voice_written_back_with_a_ttl() {
    let redis = TestRedis::start().await;
    let id = sid("no-config-1");
    let worker = TestWorker::start(
        redis.settings("ready", &[("AGENT_WORKER__AGENT__DEFAULT_VOICE", "Brian")]),
    );
    enqueue(&redis.conn, &id, Some("bob")).await;
    wait_status(&redis.conn, &id, "ready", Duration::from_secs(20)).await;
    assert_eq!(
        wait_received(&redis.conn, &id).await["contract"]["voice_id"],
        "Brian"
    );
    let key = SessionKeys::new(&id).config();
    let expected = [("voiceId", "Brian"), ("userName", "bob")];
    assert_fields(&redis.conn, &key, &expected).await;
    // The default config's TTL is the session's.
    assert_expires_with_the_session(&redis.conn, &key).await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_of_the_wrong_type_sends_the_job_to_the_dead_set_naming_the_key() {
    let redis = TestRedis::start().await;
    let bad = sid("wrong-type-1");
    let good = sid("after-wrong-type-1");
    let key = SessionKeys::new(&bad).config();
    let _: () = redis.conn.clone().set(&key, "Craig").await.unwrap();
    let worker = TestWorker::start(redis.settings("ready", &[]));
    let task = enqueue(&redis.conn, &bad, None).await;
    let result = wait_dead(&redis.conn, &task).await;
    assert!(
        result.contains(&key) && result.contains("string, not a hash"),
        "the error names the key and the problem: {result}"
    );
    // Permanent: no agent was launched and nothing was retried.
    assert_eq!(status(&redis.conn, &bad).await, None);
    // The string the orchestrator wrote is left alone.
    let value: String = redis.conn.clone().get(&key).await.unwrap();
    assert_eq!(value, "Craig");
    enqueue(&redis.conn, &good, None).await;
    wait_status(&redis.conn, &good, "ready", Duration::from_secs(20)).await;
    assert_first_run(&redis.conn, "after a wrong-type config").await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_config_sends_the_job_dead_and_marks_the_session_error_with_the_reason() {
    let redis = TestRedis::start().await;
    let bad = sid("no-voice-1");
    let key = SessionKeys::new(&bad).config();
    let _: () = redis
        .conn
        .clone()
        .hset_multiple(&key, &[("userName", "zoe"), ("voiceId", "  ")])
        .await
        .unwrap();
    let ledger = Ledger::new();
    let worker = TestWorker::start(ledger.worker_settings(&redis, "ready", &[]));
    let task = enqueue(&redis.conn, &bad, None).await;
    let result = wait_dead(&redis.conn, &task).await;
    assert!(
        result.contains(&key) && result.contains("voiceId is empty"),
        "the error names the key and the problem: {result}"
    );
    // Config is read and the session claimed in one step; a config that cannot be used
    // leaves the session in `error` with the reason, out of `session:starting`.
    let state = SessionKeys::new(&bad).state();
    assert_eq!(status(&redis.conn, &bad).await.as_deref(), Some("error"));
    let error = hget(&redis.conn, &state, "error").await.unwrap_or_default();
    assert!(error.contains("voiceId is empty"), "{error}");
    assert!(!is_member(&redis.conn, "session:starting", bad.as_str()).await);
    worker.stop().await;
    assert!(ledger.rooms().is_empty(), "no agent was launched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_logs_list_keeps_the_last_hundred_output_lines_with_the_session_ttl() {
    let redis = TestRedis::start().await;
    let worker = TestWorker::start(redis.settings("chatty", &[]));
    let id = sid("chatty-1");
    enqueue(&redis.conn, &id, None).await;
    let key = SessionKeys::new(&id).agent_logs();
    // 252 lines in all: the arguments report, the ready line, then `chatty line 0..=249`.
    let logs: Vec<String> = wait_for(
        "the last output line in the logs list",
        Duration::from_secs(20),
        || async {
            let logs = agent_logs(&redis.conn, &id).await;
            (logs.last().map(String::as_str) == Some("chatty line 249")).then_some(logs)
        },
    )
    .await;
    let expected: Vec<String> = (150..250).map(|i| format!("chatty line {i}")).collect();
    assert_eq!(logs, expected, "exactly the last 100 lines, in order");
    // The logs expire with the session.
    assert_expires_with_the_session(&redis.conn, &key).await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_metacharacters_reach_the_agent_verbatim_and_nothing_is_executed() {
    let redis = TestRedis::start().await;
    let marker =
        std::env::temp_dir().join(format!("agent-worker-pwned-{}", ulid::Ulid::generate()));
    let m = marker.display();
    let voice = format!("$(touch {m})");
    let opening = format!("`touch {m}`; echo hi && touch {m} | cat > {m} 'quoted' \"double\"");
    let prompt = format!(
        "line one\nline two; rm -rf / --no-preserve-root $HOME ${{IFS}} * ? [a] {{b,c}} \\ {m}"
    );
    let id = sid("metachar-1");
    write_full_config(
        &redis.conn,
        &id,
        &voice,
        "eve",
        Some(&opening),
        Some(&prompt),
    )
    .await;
    let worker = TestWorker::start(redis.settings("ready", &[]));
    start_ready(&redis.conn, &id).await;
    let got = wait_received(&redis.conn, &id).await;
    assert_eq!(got["contract"]["voice_id"], voice.as_str());
    assert_eq!(got["contract"]["opening_line"], opening.as_str());
    assert_eq!(got["contract"]["system_prompt"], prompt.as_str());
    let argv: Vec<String> = serde_json::from_value(got["argv"].clone()).unwrap();
    assert_eq!(
        argv,
        [
            "--behaviour",
            "ready",
            "--room=metachar-1",
            &format!("--voice-id={voice}"),
            &format!("--opening-line={opening}"),
            &format!("--system-prompt={prompt}"),
        ]
    );
    let config: serde_json::Value =
        serde_json::from_str(got["env"]["SESSION_CONFIG"].as_str().unwrap()).unwrap();
    assert_eq!(config["voiceId"], voice.as_str());
    // Carried once, as an option.
    assert!(config.get("systemPrompt").is_none(), "{config}");
    assert!(!marker.exists(), "a shell ran: {m} was created");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_120_kb_prompt_of_quote_characters_starts_and_arrives_whole() {
    let redis = TestRedis::start().await;
    // JSON would double it (each quote escaped): past one argument if it travelled twice.
    let prompt = "\"".repeat(120 * 1024);
    let id = sid("big-prompt-1");
    write_full_config(&redis.conn, &id, "Craig", "u", None, Some(&prompt)).await;
    // The agent's report line carries the prompt: keep it whole.
    let worker = TestWorker::start(redis.settings(
        "ready",
        &[("AGENT_WORKER__AGENT__MAX_LINE_BYTES", "1048576")],
    ));
    start_ready(&redis.conn, &id).await;
    let got = wait_received(&redis.conn, &id).await;
    assert_eq!(got["contract"]["system_prompt"], prompt.as_str());
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_session_enqueued_twice_starts_one_agent() {
    let redis = TestRedis::start().await;
    let id = sid("twice-1");
    write_config(&redis.conn, &id, "Craig", "u").await;
    let first = enqueue(&redis.conn, &id, None).await;
    let second = enqueue(&redis.conn, &id, None).await;
    assert_eq!(
        first, second,
        "the second enqueue returns the first task id"
    );
    let keys = QueueKeys::new(QUEUE).unwrap();
    let queued: usize = redis.conn.clone().llen(keys.active()).await.unwrap();
    assert_eq!(queued, 1);

    // The ledger is written by each agent as it starts: unlike the shipped logs, it cannot
    // lag behind a second agent.
    let ledger = Ledger::new();
    let worker = TestWorker::start(ledger.worker_settings(&redis, "ready", &[]));
    wait_done(&redis.conn, &first, Duration::from_secs(20)).await;
    let pid = agent_pid(&redis.conn, &id).await;
    // A second delivery of the same job (as after a crash) finds the running agent.
    let again = push_raw(
        &redis.conn,
        format!(r#"{{"session_id":"{id}"}}"#).as_bytes(),
    )
    .await;
    wait_done(&redis.conn, &again, Duration::from_secs(20)).await;
    let pid_after = agent_pid(&redis.conn, &id).await;
    assert_eq!(pid, pid_after, "no second agent was started");
    worker.stop().await;
    assert_eq!(
        ledger.sessions(),
        [(id.to_string(), pid)],
        "one agent process for the session"
    );
}
