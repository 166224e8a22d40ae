//! The Python warm-pool shim (`python3 -m agent_worker.warm -- SCRIPT ...`): a script run
//! through it sees what it sees under a cold `python3 SCRIPT ...`, and a Python agent through
//! the worker's pool starts warm with its session's values.

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use agent_jobs::{SessionKeys, keys::WORKER_WARM};
use common::*;
use redis::AsyncCommands;
use serde_json::Value;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn probe() -> PathBuf {
    repo().join("tests/agents/warm_probe/probe.py")
}

/// `PYTHONPATH` with the project's Python package first.
fn python_path() -> String {
    let ours = repo().join("python").display().to_string();
    match std::env::var("PYTHONPATH") {
        Ok(rest) if !rest.is_empty() => format!("{ours}:{rest}"),
        _ => ours,
    }
}

/// The probe's report (`probe report {json}`) among `lines`.
fn report(lines: &[String]) -> Value {
    let line = lines
        .iter()
        .find_map(|l| l.strip_prefix("probe report "))
        .unwrap_or_else(|| panic!("no probe report in {lines:?}"));
    serde_json::from_str(line).unwrap()
}

const SESSION_ARGS: [&str; 5] = [
    "--room=shim-1",
    "--voice-id=-r oops",
    "--opening-line=line one\nline two $(id) `x` \"q\" Grüße",
    "--system-prompt=-u nice",
    "--exit-after-ready",
];
const SESSION_ENV: [(&str, &str); 3] = [
    ("SESSION_ID", "shim-1"),
    ("VOICE_ID", "-r oops"),
    ("SESSION_CONFIG", "{\"voiceId\":\"-r oops\"}"),
];

/// `python3 SCRIPT --leading=x SESSION_ARGS` with the session's environment, in `cwd`.
fn cold(script: &str, cwd: &Path) -> Vec<String> {
    let output = Command::new("python3")
        .arg(script)
        .arg("--leading=x")
        .args(SESSION_ARGS)
        .envs(SESSION_ENV)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .expect("python3");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
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
    let env: serde_json::Map<String, Value> = SESSION_ENV
        .iter()
        .map(|(k, v)| (k.to_string(), Value::from(*v)))
        .collect();
    let line = serde_json::json!({"v": 1, "args": SESSION_ARGS, "env": env});
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{line}").unwrap();
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
        let (cold, warm) = (cold(script, cwd), warm(script, cwd));
        let (mut cold_report, mut warm_report) = (report(&cold), report(&warm));
        // The one difference there must be: the preloaded module is already imported.
        assert_eq!(cold_report["preloaded_email"], false);
        assert_eq!(warm_report["preloaded_email"], true);
        for report in [&mut cold_report, &mut warm_report] {
            report.as_object_mut().unwrap().remove("preloaded_email");
        }
        assert_eq!(warm_report, cold_report, "{script} from {}", cwd.display());
        assert_eq!(cold_report["args"]["voice_id"], "-r oops");
        assert_eq!(cold_report["args"]["room"], "shim-1");
        assert_eq!(cold_report["name"], "__main__");
        assert_eq!(cold_report["main_is_this"], true);
        assert_eq!(cold_report["stdin"], "");
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
        let logs: Vec<String> = redis
            .conn
            .clone()
            .lrange(SessionKeys::new(&id).agent_logs(), 0, -1)
            .await
            .unwrap();
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
