//! A session's keys as a test writes and reads them: its config, status, agent pid and the
//! agent's shipped output.

use agent_worker::connection::RedisConn;
use std::time::Duration;

use agent_jobs::{SessionConfigInput, SessionId, SessionKeys, keys::EVENTS};
use redis::AsyncCommands;

use super::{enqueue, hget, wait_for};

/// Writes the session's config as the orchestrator does: voice and user name only.
pub async fn write_config(conn: &RedisConn, id: &SessionId, voice: &str, user: &str) {
    write_full_config(conn, id, voice, user, None, None).await
}

/// Writes the session's config with the optional fields too (an hour's TTL).
pub async fn write_full_config(
    conn: &RedisConn,
    id: &SessionId,
    voice: &str,
    user: &str,
    opening_line: Option<&str>,
    system_prompt: Option<&str>,
) {
    let config = SessionConfigInput {
        voice_id: voice.to_owned(),
        user_name: user.to_owned(),
        opening_line: opening_line.map(str::to_owned),
        system_prompt: system_prompt.map(str::to_owned),
    };
    agent_jobs::write_session_config(&mut conn.clone(), id, &config, Duration::from_secs(3600))
        .await
        .expect("write config");
}

/// The session's `status` field, if its state record exists.
pub async fn status(conn: &RedisConn, id: &SessionId) -> Option<String> {
    hget(conn, &SessionKeys::new(id).state(), "status").await
}

/// Waits until the session's status is `want`.
pub async fn wait_status(conn: &RedisConn, id: &SessionId, want: &str, deadline: Duration) {
    let what = format!("session {id} to be {want}");
    wait_for(&what, deadline, || async {
        (status(conn, id).await.as_deref() == Some(want)).then_some(())
    })
    .await
}

/// The output lines of a session's agent shipped to Redis so far (shipped asynchronously:
/// the latest may not have arrived yet).
pub async fn agent_logs(conn: &RedisConn, id: &SessionId) -> Vec<String> {
    conn.clone()
        .lrange(SessionKeys::new(id).agent_logs(), 0, -1)
        .await
        .expect("LRANGE the agent's logs")
}

/// The pid of a session's agent, recorded once it was spawned; panics if there is none.
pub async fn agent_pid(conn: &RedisConn, id: &SessionId) -> u32 {
    let pid: Option<u32> = conn
        .clone()
        .get(SessionKeys::new(id).agent_pid())
        .await
        .expect("GET the agent's pid");
    pid.unwrap_or_else(|| panic!("no agent pid recorded for {id}"))
}

/// The score of `id` in the heartbeat index (unix seconds of its owner's last heartbeat of
/// it), `None` while it is not indexed.
pub async fn heartbeat_score(conn: &RedisConn, id: &SessionId) -> Option<f64> {
    conn.clone()
        .zscore(agent_jobs::keys::SESSION_HEARTBEATS, id.as_str())
        .await
        .expect("ZSCORE the heartbeat index")
}

/// Ends the session as the orchestrator does: deletes its record and its config (the heartbeat
/// index is the worker's, not the orchestrator's to touch).
pub async fn end_as_orchestrator(conn: &RedisConn, id: &SessionId) {
    let keys = SessionKeys::new(id);
    let _: () = conn
        .clone()
        .del(&[keys.state(), keys.config()])
        .await
        .expect("DEL the session's record and config");
}

/// Enqueues a job for `id` and waits (up to 20 s) until its agent is ready; the task id.
pub async fn start_ready(conn: &RedisConn, id: &SessionId) -> String {
    let task = enqueue(conn, id, None).await;
    wait_status(conn, id, "ready", Duration::from_secs(20)).await;
    task
}

/// What the test agent of a session reported receiving (`test-agent received {json}`).
pub async fn received(conn: &RedisConn, id: &SessionId) -> Option<serde_json::Value> {
    let lines = agent_logs(conn, id).await;
    lines.iter().find_map(|line| {
        line.strip_prefix("test-agent received ")
            .and_then(|json| serde_json::from_str(json).ok())
    })
}

/// Waits (up to 10 s) for [`received`].
pub async fn wait_received(conn: &RedisConn, id: &SessionId) -> serde_json::Value {
    wait_for(
        &format!("the agent of {id} to report its arguments"),
        Duration::from_secs(10),
        || received(conn, id),
    )
    .await
}

/// Asserts that the agent of `id` got its room and `voice`, as options (`--room`,
/// `--voice-id`) and in its environment (`SESSION_ID`, `VOICE_ID`): `got` is what it reported
/// ([`received`]).
pub fn assert_agent_of(got: &serde_json::Value, id: &SessionId, voice: &str) {
    assert_eq!(got["contract"]["voice_id"], voice, "argv of {id}");
    assert_eq!(got["contract"]["room"], id.as_str(), "argv of {id}");
    assert_eq!(got["env"]["VOICE_ID"], voice, "environment of {id}");
    assert_eq!(got["env"]["SESSION_ID"], id.as_str(), "environment of {id}");
}

/// The `(status, reason)` of every event of session `id` in `agent-worker:events`, oldest
/// first (`reason` empty where an event has none).
pub async fn event_statuses(conn: &RedisConn, id: &SessionId) -> Vec<(String, String)> {
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(EVENTS)
        .arg("-")
        .arg("+")
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    entries
        .into_iter()
        .map(|(_, fields)| {
            fields
                .into_iter()
                .collect::<std::collections::HashMap<_, _>>()
        })
        .filter(|f| f.get("session_id").map(String::as_str) == Some(id.as_str()))
        .map(|f| {
            (
                f.get("status").cloned().unwrap_or_default(),
                f.get("reason").cloned().unwrap_or_default(),
            )
        })
        .collect()
}
