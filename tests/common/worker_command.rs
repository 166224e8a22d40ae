//! The `agent-worker` binary as a `Command`, and helpers for a bare `Child` of it (most tests
//! use [`super::WorkerProcess`] instead).

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

/// Sends `signal` to a child process.
pub fn signal(child: &std::process::Child, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal)
        .expect("signal the child");
}

/// Waits for a child to exit (off the async runtime) and returns its output.
pub async fn output_of(child: std::process::Child) -> std::process::Output {
    tokio::task::spawn_blocking(move || child.wait_with_output().expect("wait for the child"))
        .await
        .expect("the waiting task")
}

/// The JSON events of a worker's stderr.
pub fn events(stderr: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Kills the processes it tracks when dropped, so a failing test leaves no worker behind.
#[derive(Default)]
pub struct KillOnDrop(std::sync::Mutex<Vec<u32>>);

impl KillOnDrop {
    /// Tracks `child` and returns it.
    pub fn track(&self, child: std::process::Child) -> std::process::Child {
        self.0.lock().unwrap().push(child.id());
        child
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in self.0.lock().unwrap().iter() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
