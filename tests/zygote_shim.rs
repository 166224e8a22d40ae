//! The Python fork server (`python3 -m agent_worker.zygote -- SCRIPT ...`, docs/zygote.md): a
//! script forked by it sees what it sees under a cold `python3 SCRIPT ...` (the probe the warm
//! shim is held to), and the protocol's Python tests (`python/tests/test_zygote.py`: the
//! stronger context comparison, process groups and cgroups, bursts, fork-safety refusals,
//! end of file, killed zygotes and workers, bad requests, latency) pass.
//!
//! The zygote is driven by `python/tests/_zygote.py`, which plays the worker's part of the
//! protocol (a child subreaper passing the agent's pipes over the socket). No Redis.

mod common;

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
};

use common::*;
use serde_json::json;

/// The probe, forked by a zygote that preloaded `email.mime.text`, in `cwd`: its stdout lines.
fn zygote(script: &str, args: &[String], cwd: &Path) -> Vec<String> {
    let mut driver = Command::new("python3")
        .arg(Path::new(PYTHON_DIR).join("tests/_zygote.py"))
        .args(["--preload", "email.mime.text", "--", script, "--leading=x"])
        .env("PYTHONPATH", python_path())
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let session = json!({"args": args, "env": probe_session_env()});
    driver
        .stdin
        .take()
        .unwrap()
        .write_all(session.to_string().as_bytes())
        .unwrap();
    stdout_lines(driver.wait_with_output().unwrap())
}

#[test]
fn a_script_forked_by_the_zygote_sees_what_a_cold_start_shows_it() {
    let dir = probe().parent().unwrap().to_owned();
    let absolute = probe().display().to_string();
    let args = probe_args("");
    for (script, cwd) in [
        (absolute.as_str(), repo()),
        ("tests/agents/warm_probe/probe.py", repo()),
        ("probe.py", dir.as_path()),
    ] {
        let (cold, forked) = (cold_probe(script, &args, cwd), zygote(script, &args, cwd));
        assert_probe_saw_cold(
            "zygote",
            &probe_report(&forked),
            &probe_report(&cold),
            &args,
            &format!("{script} from {}", cwd.display()),
        );
        assert!(
            forked.iter().any(|l| l == "Room joined shim-1"),
            "{forked:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zygote_protocol_tests_pass() {
    unittest("test_zygote", 15, &[], &[]).await;
}
