//! `agent-worker demo`: the seed scenario, end to end, on this machine.
//!
//! User `test_concurrent_user` starts two sessions at the same moment, one with voice `Craig`
//! and one with `Olivia`. Under the old per-user config key both agents got the same voice.
//! The demo writes both configs as the orchestrator does, runs an in-process worker whose
//! agent is the stand-in built into this binary (`agent-worker test-agent`, so a fresh clone
//! has nothing else to build), enqueues both sessions in one atomic call, waits until both
//! agents are ready, prints the voice each agent actually received (read from the agent's own
//! output in `agent:<id>:logs`), then stops the worker gracefully (its agents get SIGTERM and
//! exit) and, as the orchestrator's end-of-session handler does, reads each session's record
//! and deletes its keys.
//!
//! Its own output is a few lines and the table; the worker's logs are shown with `--verbose`
//! or `RUST_LOG` (warnings always).

use crate::connection::RedisConn;
use std::time::Duration;

use agent_jobs::{
    AgentStart, Producer, QueueKeys, SessionConfigInput, SessionId, SessionKeys,
    keys::{SESSIONS_READY, SESSIONS_STARTING},
    session_state::fields,
};
use anyhow::{Context, bail};
use redis::AsyncCommands;
use tokio::time::Instant;

use super::{local_redis::LocalRedis, test_agent};
use crate::{connection, settings::Settings, shutdown::Shutdown, worker};

/// The user of the seed scenario.
pub const DEMO_USER: &str = "test_concurrent_user";
/// The voices of its two sessions.
pub const DEMO_VOICES: [&str; 2] = ["Craig", "Olivia"];
/// Queue used by the demo, so it never takes jobs of a real deployment on the same Redis.
pub const DEMO_QUEUE: &str = "agent-worker-demo";

const READY_DEADLINE: Duration = Duration::from_secs(30);

/// Runs the demo.
pub async fn run(mut settings: Settings) -> anyhow::Result<()> {
    println!(
        "agent-worker demo: user {DEMO_USER} starts two sessions at the same moment, voices {} and {}.",
        DEMO_VOICES[0], DEMO_VOICES[1]
    );
    let _private_redis = ensure_redis(&mut settings).await?;
    settings.agent.command = demo_agent_command()?;
    settings.redis.queue = DEMO_QUEUE.to_owned();
    settings.agent.stop_grace = Duration::from_secs(5);
    // Its own metrics port (whatever is free): a deployment on this host may hold the usual.
    settings.http.addr = ([127, 0, 0, 1], 0).into();
    // No drain: the demo's agents never end on their own.
    settings.shutdown.drain_timeout = Duration::ZERO;

    let mut conn = connection::connect(&settings.redis).await?;
    let sessions = demo_sessions();
    for (id, voice) in &sessions {
        let config = SessionConfigInput {
            voice_id: voice.to_string(),
            user_name: DEMO_USER.to_owned(),
            opening_line: Some(format!("Hi, this is {voice}.")),
            system_prompt: None,
        };
        agent_jobs::write_session_config(&mut conn, id, &config, settings.session.ttl).await?;
    }
    let (rows, enqueued) = start_both(&settings, &mut conn, &sessions).await?;
    end_sessions(&mut conn, &rows).await?;
    forget_jobs(&mut conn, &enqueued, &sessions).await?;
    if rows.iter().any(|r| r.requested != r.received) {
        bail!("an agent received another session's voice");
    }
    println!(
        "\nEach agent received its own session's voice.\n`after`: the status the worker left for the \
         orchestrator; the demo then deleted the keys, as its end-of-session handler does.\n\
         Worker logs: `agent-worker demo --verbose`."
    );
    Ok(())
}

/// The two sessions of this run (ids unique to it), with their voices.
fn demo_sessions() -> Vec<(SessionId, &'static str)> {
    let run_tag = ulid::Ulid::generate().to_string()[20..].to_lowercase();
    DEMO_VOICES
        .iter()
        .map(|voice| {
            let id = SessionId::parse(format!("demo-{run_tag}-{}", voice.to_lowercase()))
                .expect("demo ids are valid");
            (id, *voice)
        })
        .collect()
}

/// Runs an in-process worker, enqueues both sessions in one atomic call, waits until both
/// agents are ready, then stops the worker gracefully (its agents get SIGTERM and exit).
async fn start_both(
    settings: &Settings,
    conn: &mut RedisConn,
    sessions: &[(SessionId, &str)],
) -> anyhow::Result<(Vec<Row>, Vec<agent_jobs::Enqueued>)> {
    let shutdown = Shutdown::new();
    let mut worker = tokio::spawn(worker::run(
        settings.clone(),
        worker::process_launcher(&settings.agent),
        shutdown.clone(),
    ));

    // Both sessions in one atomic enqueue: they start at the same moment.
    let producer = Producer::new(conn.clone(), QueueKeys::new(DEMO_QUEUE)?);
    let jobs: Vec<AgentStart> = sessions
        .iter()
        .map(|(id, _)| AgentStart::new(id.clone()).with_user(DEMO_USER))
        .collect();
    let enqueued = producer.enqueue_many(&jobs).await?;
    println!(
        "Wrote both session configs and enqueued both jobs in one atomic call; waiting for the agents..."
    );

    // A worker that ends before both agents are ready refused to start: say why.
    let outcome = tokio::select! {
        outcome = report(conn, sessions) => outcome,
        ended = &mut worker => {
            ended.context("the demo worker panicked")??;
            bail!("the demo worker stopped before the agents were ready");
        }
    };
    if let Ok(rows) = &outcome {
        let startups: Vec<String> = rows.iter().map(|r| r.startup.clone()).collect();
        println!(
            "Both agents ready (start-up {}); stopping the worker and its agents.",
            startups.join(", ")
        );
    }
    shutdown.graceful.cancel();
    worker.await.context("the demo worker panicked")??;
    Ok((outcome?, enqueued))
}

/// Prints the table, and for each session does what the orchestrator's end-of-session handler
/// does: reads the record the agent left, then deletes the keys.
async fn end_sessions(conn: &mut RedisConn, rows: &[Row]) -> anyhow::Result<()> {
    println!();
    println!(
        "{:<26} {:<10} {:<15} {:>8} {:>9}  after",
        "session", "requested", "agent received", "pid", "start-up"
    );
    for row in rows {
        let keys = SessionKeys::new(&row.session);
        let status: Option<String> = conn.hget(keys.state(), fields::STATUS).await?;
        redis::pipe()
            .del(&keys.all())
            .ignore()
            .srem(SESSIONS_STARTING, row.session.as_str())
            .ignore()
            .srem(SESSIONS_READY, row.session.as_str())
            .ignore()
            .query_async::<()>(conn)
            .await?;
        println!(
            "{:<26} {:<10} {:<15} {:>8} {:>9}  {}",
            row.session.as_str(),
            row.requested,
            row.received,
            row.pid,
            row.startup,
            status.unwrap_or_else(|| "gone".into())
        );
    }
    Ok(())
}

struct Row {
    session: SessionId,
    requested: String,
    received: String,
    pid: String,
    startup: String,
}

/// Waits for both agents to be ready and reads the voice each received from its output.
async fn report(conn: &mut RedisConn, sessions: &[(SessionId, &str)]) -> anyhow::Result<Vec<Row>> {
    let deadline = Instant::now() + READY_DEADLINE;
    let mut rows = Vec::new();
    for (id, voice) in sessions {
        let keys = SessionKeys::new(id);
        let received = loop {
            let (status, error): (Option<String>, Option<String>) = redis::cmd("HMGET")
                .arg(keys.state())
                .arg(fields::STATUS)
                .arg(fields::ERROR)
                .query_async(conn)
                .await?;
            if status.as_deref() == Some("error") {
                bail!(
                    "session {id} failed to start: {}",
                    error.unwrap_or_default()
                );
            }
            if status.as_deref() == Some("ready") {
                let lines: Vec<String> = conn.lrange(keys.agent_logs(), 0, -1).await?;
                if let Some(received) = lines.iter().find_map(|l| received_voice(l)) {
                    break received;
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "session {id} was not ready within {READY_DEADLINE:?} (see the worker's \
                     logs with `agent-worker demo --verbose`)"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (pid, startup): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(keys.state())
            .arg(fields::AGENT_PID)
            .arg(fields::STARTUP_TIME)
            .query_async(conn)
            .await?;
        let startup = startup.and_then(|s| s.parse::<f64>().ok()).map_or_else(
            || "-".to_owned(),
            |s| format!("{} ms", (s * 1000.0).round()),
        );
        rows.push(Row {
            session: id.clone(),
            requested: voice.to_string(),
            received,
            pid: pid.unwrap_or_default(),
            startup,
        });
    }
    Ok(rows)
}

/// Removes what the demo's two jobs left in its queue (a shared Redis keeps nothing of a
/// demo run): their data, meta, finished-index entries and idempotency keys.
async fn forget_jobs(
    conn: &mut RedisConn,
    enqueued: &[agent_jobs::Enqueued],
    sessions: &[(SessionId, &str)],
) -> anyhow::Result<()> {
    let keys = QueueKeys::new(DEMO_QUEUE)?;
    let mut pipe = redis::pipe();
    for job in enqueued {
        pipe.hdel(keys.data(), &job.task_id)
            .ignore()
            .del(keys.meta(&job.task_id))
            .ignore()
            .srem(keys.done(), &job.task_id)
            .ignore()
            .zrem(keys.done_at(), &job.task_id)
            .ignore();
    }
    for (id, _) in sessions {
        let job = AgentStart::new(id.clone());
        pipe.del(keys.idempotency(&agent_jobs::producer::idempotency_key(&job)))
            .ignore();
    }
    pipe.query_async::<()>(conn).await?;
    Ok(())
}

/// The `--voice-id` a test agent reported in its `test-agent received {json}` line.
pub fn received_voice(line: &str) -> Option<String> {
    let json = line.strip_prefix("test-agent received ")?;
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    value["contract"]["voice_id"].as_str().map(str::to_owned)
}

/// Makes sure a Redis answers: the configured one, or a private one started for the demo.
async fn ensure_redis(settings: &mut Settings) -> anyhow::Result<Option<LocalRedis>> {
    let probe =
        tokio::time::timeout(Duration::from_secs(3), connection::connect(&settings.redis)).await;
    match probe {
        Ok(Ok(_)) => {
            println!(
                "Redis: {} (the demo uses its own queue, {DEMO_QUEUE}).",
                settings.redis.url
            );
            return Ok(None);
        }
        // A Redis that is there but refuses us (credentials, TLS) is a mistake to report, not
        // to work around.
        Ok(Err(error)) if error.is_permanent() => return Err(error.into()),
        _ => {}
    }
    if !LocalRedis::available() {
        bail!(
            "no Redis answers at {} and redis-server is not on PATH. Install Redis \
             (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis) or set \
             REDIS_URL to a reachable server, then run the demo again.",
            settings.redis.url
        );
    }
    let local = LocalRedis::start()
        .await
        .context("starting a private redis-server")?;
    println!(
        "Redis: none answered at {}, so a private redis-server runs on port {} for this demo.",
        settings.redis.url,
        local.port()
    );
    settings.redis.url = crate::settings::RedisUrl::new(local.url());
    Ok(Some(local))
}

/// The agent of the demo: this very binary's hidden `test-agent` subcommand, so there is no
/// second binary to build or to forget.
fn demo_agent_command() -> anyhow::Result<Vec<String>> {
    let exe = std::env::current_exe().context("locating the agent-worker binary")?;
    Ok(vec![
        exe.display().to_string(),
        test_agent::SUBCOMMAND.to_owned(),
    ])
}
