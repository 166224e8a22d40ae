//! The `agent-worker` binary as a `Command` (started as a [`super::WorkerProcess`]), and the
//! events of its log.

use std::process::{Command, Stdio};

use super::{TEST_AGENT, WORKER_BIN};

/// The `agent-worker` binary, killed (SIGKILL) when the thread that started it ends: a test
/// that fails half-way leaves no worker behind, whatever it was doing.
pub fn worker_bin() -> Command {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(WORKER_BIN);
    // SAFETY: runs in the forked child before exec and only calls prctl, which is
    // async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

/// The `agent-worker` binary ([`worker_bin`]) with `args`, pointed at `url`, running the test
/// agent with `behaviour`, JSON logs, no drain; `env` overrides. stdout and stderr are piped.
pub fn worker_command(url: &str, args: &[&str], behaviour: &str, env: &[(&str, &str)]) -> Command {
    let mut command = worker_bin();
    command
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("REDIS_URL")
        .env("AGENT_WORKER__REDIS__URL", url)
        // Several workers per test machine: no fixed metrics port.
        .env("AGENT_WORKER__HTTP__ADDR", "127.0.0.1:0")
        .env(
            "AGENT_WORKER__AGENT__COMMAND",
            format!("{TEST_AGENT},--behaviour,{behaviour}"),
        )
        .env("AGENT_WORKER__AGENT__STARTUP_TIMEOUT", "5s")
        .env("AGENT_WORKER__AGENT__STOP_GRACE", "2s")
        .env("AGENT_WORKER__WORKER__HEARTBEAT_INTERVAL", "1s")
        .env("AGENT_WORKER__WORKER__ORPHAN_TIMEOUT", "3s")
        .env("AGENT_WORKER__SESSION__HEARTBEAT_INTERVAL", "1s")
        .env("AGENT_WORKER__SESSION__STALE_AFTER", "6s")
        .env("AGENT_WORKER__SHUTDOWN__DRAIN_TIMEOUT", "0s")
        .env("AGENT_WORKER__TELEMETRY__FORMAT", "json")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// The JSON events of a worker's stderr.
pub fn events(stderr: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Asserts that the JSON log `stderr` holds an event `message` with each `(field, value)` of
/// `fields` (the whole log shown otherwise).
pub fn assert_logged(stderr: &[u8], message: &str, fields: &[(&str, &str)]) {
    let found = events(stderr).iter().any(|event| {
        event["message"] == message && fields.iter().all(|(field, value)| event[*field] == *value)
    });
    assert!(
        found,
        "no {message} {fields:?} in the log: {}",
        String::from_utf8_lossy(stderr)
    );
}
