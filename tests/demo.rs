//! `agent-worker demo`, run as a newcomer runs it: the binary alone (its agent is built in),
//! no Redis at the configured URL (so it starts a private one), default logging.

mod common;

use std::process::{Command, Stdio};

use common::*;

/// A URL nothing listens on: port 1 on loopback refuses at once.
const NO_REDIS: &str = "redis://127.0.0.1:1";

fn demo(args: &[&str]) -> Command {
    let mut command = worker_bin();
    command
        .arg("demo")
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("AGENT_WORKER__REDIS__URL")
        .env("REDIS_URL", NO_REDIS)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// The table rows: (session, requested, received, after).
fn rows(stdout: &str) -> Vec<(String, String, String, String)> {
    stdout
        .lines()
        .filter(|l| l.starts_with("demo-"))
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (
                cols[0].to_owned(),
                cols[1].to_owned(),
                cols[2].to_owned(),
                cols.last().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn the_demo_alone_prints_both_voices_quietly_with_a_private_redis() {
    let out = WorkerProcess::spawn(demo(&[])).output().await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("a private redis-server runs on port"),
        "{stdout}"
    );
    let rows = rows(&stdout);
    let voices: Vec<(&str, &str)> = rows
        .iter()
        .map(|(_, requested, received, _)| (requested.as_str(), received.as_str()))
        .collect();
    assert_eq!(
        voices,
        [("Craig", "Craig"), ("Olivia", "Olivia")],
        "{stdout}"
    );
    assert!(rows[0].0.ends_with("-craig") && rows[1].0.ends_with("-olivia"));
    // Both records were left for the orchestrator, as the agents exited cleanly.
    assert!(rows.iter().all(|row| row.3 == "completed"), "{stdout}");
    // A newcomer reads the table and a few lines, not the worker's logs.
    assert!(stdout.lines().count() <= 14, "{stdout}");
    assert!(
        stderr.trim().is_empty(),
        "no log lines by default: {stderr}"
    );
}

#[tokio::test]
async fn the_verbose_demo_logs_each_agent_stop_once() {
    let mut command = demo(&["--verbose"]);
    command.env("AGENT_WORKER__TELEMETRY__FORMAT", "json");
    let out = WorkerProcess::spawn(command).output().await;
    stdout_of("agent-worker demo --verbose", &out);
    let events = events(&out.stderr);
    let stopped: Vec<&str> = events
        .iter()
        .filter(|e| e["message"] == "agent_stopped")
        .filter_map(|e| e["session_id"].as_str())
        .collect();
    let mut sessions = stopped.clone();
    sessions.sort();
    sessions.dedup();
    assert_eq!(sessions.len(), 2, "both agents were stopped: {stopped:?}");
    assert_eq!(stopped.len(), 2, "one agent_stopped per agent: {stopped:?}");
    assert!(events.iter().any(|e| e["message"] == "agent_ready"));
}
