//! The Python warm-pool shim (`python3 -m agent_worker.warm -- SCRIPT ...`): a script run
//! through it sees what it sees under a cold `python3 SCRIPT ...`, and a Python agent through
//! the worker's pool starts warm with its session's values.

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use agent_jobs::{SessionKeys, keys::WORKER_WARM};
use common::*;
use redis::AsyncCommands;
use serde_json::Value;

/// The shim reads its stdin 64 KiB at a time.
const SHIM_READ: usize = 64 * 1024;

/// The handoff line of `args` and [`PROBE_SESSION_ENV`], as the worker writes it.
fn handoff_line(args: &[String]) -> String {
    format!(
        "{}\n",
        serde_json::json!({"v": 1, "args": args, "env": probe_session_env()})
    )
}

/// The session's arguments ([`probe_args`]), so that the handoff line spans several of the
/// shim's reads. Its first read of a full pipe returns 64 KiB: the prompt is shifted so that
/// this cut falls inside a character, which the shim must not decode alone.
fn session_args() -> Vec<String> {
    (0..8)
        .map(|shift| probe_args(&"!".repeat(shift)))
        .find(|args| !handoff_line(args).is_char_boundary(SHIM_READ))
        .expect("a shift of under 8 bytes cuts a character")
}

/// The same through the shim: warm line first, then the handoff line on stdin.
fn warm(script: &str, cwd: &Path) -> Vec<String> {
    let mut child = Command::new("python3")
        .args([
            "-m",
            "agent_worker.warm",
            "--preload",
            "email.mime.text",
            "--",
        ])
        .arg(script)
        .arg("--leading=x")
        .env("PYTHONPATH", python_path())
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(
        first.starts_with("AGENT_WORKER_WARM"),
        "warm line: {first:?}"
    );
    let line = handoff_line(&session_args());
    assert!(line.len() > SHIM_READ, "{} bytes", line.len());
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(line.as_bytes()).unwrap();
    drop(stdin);
    let lines: Vec<String> = stdout.lines().map(Result::unwrap).collect();
    assert!(child.wait().unwrap().success());
    lines
}

#[test]
fn a_script_run_through_the_shim_sees_what_a_cold_start_shows_it() {
    let dir = probe().parent().unwrap().to_owned();
    let absolute = probe().display().to_string();
    for (script, cwd) in [
        (absolute.as_str(), repo()),
        ("tests/agents/warm_probe/probe.py", repo()),
        ("probe.py", dir.as_path()),
    ] {
        let (cold, warm) = (cold_probe(script, &session_args(), cwd), warm(script, cwd));
        assert_probe_saw_cold(
            "warm",
            &probe_report(&warm),
            &probe_report(&cold),
            &session_args(),
            &format!("{script} from {}", cwd.display()),
        );
        assert!(warm.iter().any(|l| l == "Room joined shim-1"), "{warm:?}");
    }
}

#[test]
fn a_broken_handoff_line_is_refused_with_a_reason() {
    for (input, reason) in [
        ("", "stdin ended before a whole handoff line"),
        ("{\"v\":2,\"args\":[]}\n", "not a version 1 handoff line"),
        ("{\"v\":1,\"args\":[1]}\n", "args must be a list of strings"),
        ("not json\n", "the handoff line is not JSON"),
    ] {
        let mut child = Command::new("python3")
            .args(["-m", "agent_worker.warm", "--"])
            .arg(probe())
            .env("PYTHONPATH", python_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(!output.status.success(), "{input:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(reason), "{input:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_agent_starts_warm_through_the_pool_with_its_sessions_values() {
    let redis = TestRedis::start().await;
    let probe = probe().display().to_string();
    let cold = format!("python3,{probe}");
    let path = format!("PYTHONPATH={}", python_path());
    let warm =
        format!("env,{path},python3,-m,agent_worker.warm,--preload,email.mime.text,--,{probe}");
    let worker = TestWorker::start(redis.settings(
        "ready",
        &[
            ("AGENT_WORKER__AGENT__COMMAND", cold.as_str()),
            ("AGENT_WORKER__AGENT__WARM_COMMAND", warm.as_str()),
            ("AGENT_WORKER__AGENT__WARM_POOL", "1"),
            ("AGENT_WORKER__AGENT__STARTUP_TIMEOUT", "20s"),
        ],
    ));
    wait_for("a warm Python process", Duration::from_secs(30), || async {
        let idle: Option<u64> = redis
            .conn
            .clone()
            .hvals::<_, Vec<u64>>(WORKER_WARM)
            .await
            .ok()
            .and_then(|v| v.first().copied());
        (idle == Some(1)).then_some(())
    })
    .await;
    let id = sid("shim-through-worker");
    write_full_config(
        &redis.conn,
        &id,
        "-r oops",
        "user",
        Some("Hello -u nice\nsecond line"),
        None,
    )
    .await;
    enqueue(&redis.conn, &id, Some("user")).await;
    wait_status(&redis.conn, &id, "ready", Duration::from_secs(30)).await;
    let state = SessionKeys::new(&id).state();
    assert_eq!(
        hget(&redis.conn, &state, "warm").await.as_deref(),
        Some("1")
    );
    let got = wait_for("the probe's report", Duration::from_secs(10), || async {
        let logs = agent_logs(&redis.conn, &id).await;
        logs.iter()
            .find_map(|l| l.strip_prefix("probe report "))
            .map(|json| serde_json::from_str::<Value>(json).unwrap())
    })
    .await;
    assert_eq!(got["args"]["room"], id.as_str(), "{got}");
    assert_eq!(got["args"]["voice_id"], "-r oops");
    assert_eq!(got["args"]["opening_line"], "Hello -u nice\nsecond line");
    assert_eq!(got["env"]["SESSION_ID"], id.as_str());
    assert_eq!(got["file"], probe.as_str());
    assert_eq!(got["argv"][0], probe.as_str());
    assert_eq!(got["preloaded_email"], true);
    worker.stop().await;
}
