//! The `agent-worker` binary as a child process of a test: killed and reaped when dropped, so a
//! failing assertion leaves no worker (and, through the worker's death signal, no agent)
//! running; its stderr (JSON log events) followed as it is written, so that a test waits for
//! an event with a deadline instead of reading the log once the worker has exited.

use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, ChildStderr, Command, ExitStatus, Output},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use tokio::sync::watch;

/// How long [`WorkerProcess::stop`] and [`WorkerProcess::output`] wait for the exit: beyond
/// any drain or stop grace the tests configure.
const EXIT_DEADLINE: Duration = Duration::from_secs(60);
/// How long the worker's stdout and stderr may stay open after it exited.
const PIPES_DEADLINE: Duration = Duration::from_secs(10);

/// A running `agent-worker` child process (see the module docs).
pub struct WorkerProcess {
    /// `None` once reaped.
    child: Option<Child>,
    /// The exit status, once reaped.
    status: Option<ExitStatus>,
    log: Arc<Log>,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<()>>,
}

/// The stderr lines read so far; `changed` ticks on every line and at end of file.
struct Log {
    state: Mutex<LogState>,
    changed: watch::Sender<()>,
}

#[derive(Default)]
struct LogState {
    raw: Vec<u8>,
    lines: Vec<String>,
    closed: bool,
}

impl WorkerProcess {
    /// `agent-worker run` ([`super::worker_command`]) on `url` with the test agent in
    /// `behaviour` and the `env` overrides.
    pub fn run(url: &str, behaviour: &str, env: &[(&str, &str)]) -> Self {
        Self::spawn(super::worker_command(url, &["run"], behaviour, env))
    }

    /// Starts `command`, normally from [`super::worker_command`]. Piped stdout is collected,
    /// piped stderr followed; either may be redirected elsewhere instead (then there is nothing
    /// to follow or collect).
    pub fn spawn(command: Command) -> Self {
        Self::start(command, true).0
    }

    /// [`Self::spawn`], but the worker's piped stderr is the caller's to read (at its own
    /// pace), not followed: the events are then not available here.
    pub fn spawn_reading_stderr(command: Command) -> (Self, ChildStderr) {
        let (worker, stderr) = Self::start(command, false);
        (worker, stderr.expect("the worker's stderr is piped"))
    }

    fn start(mut command: Command, follow: bool) -> (Self, Option<ChildStderr>) {
        let mut child = command.spawn().expect("start the agent-worker binary");
        let unfollowed = if follow { None } else { child.stderr.take() };
        let log = Arc::new(Log {
            state: Mutex::new(LogState::default()),
            changed: watch::Sender::new(()),
        });
        let stdout = child.stdout.take().map(|mut out| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = out.read_to_end(&mut bytes);
                bytes
            })
        });
        let stderr = child.stderr.take().map(|err| {
            let log = log.clone();
            std::thread::spawn(move || log.follow(err))
        });
        if stderr.is_none() {
            log.close();
        }
        let worker = Self {
            child: Some(child),
            status: None,
            log,
            stdout,
            stderr,
        };
        (worker, unfollowed)
    }

    /// The worker's pid.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("the worker is not reaped yet")
    }

    /// Sends `signal` to the worker (which must not have been reaped).
    pub fn signal(&self, signal: Signal) {
        // Not reaped yet, so its pid cannot have been reused.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), signal)
            .expect("signal the worker");
    }

    /// SIGKILL, and waits for the exit (the worker's agents die with it).
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let status = child.wait().expect("reap the worker");
            self.reaped(status);
        }
        self.status.expect("reaped")
    }

    /// The exit status if the worker has exited (it is then reaped), `None` while it runs.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait().expect("poll the worker")
        {
            self.reaped(status);
        }
        self.status
    }

    /// Waits (up to `deadline`) for the worker to exit by itself; panics if it does not.
    pub async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let until = Instant::now() + deadline;
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            if Instant::now() > until {
                panic!("the worker did not exit within {deadline:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then (up to a minute) for the exit; its status and everything it wrote.
    pub async fn stop(self) -> Output {
        self.signal(Signal::SIGTERM);
        self.output().await
    }

    /// [`Self::stop`], which must end in a clean exit (the failure shows its log otherwise).
    pub async fn stop_cleanly(self) -> Output {
        let out = self.stop().await;
        assert!(
            out.status.success(),
            "the worker exits cleanly ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Waits (up to a minute) for the worker to exit by itself; its status and everything it
    /// wrote.
    pub async fn output(mut self) -> Output {
        let status = self.wait_exit(EXIT_DEADLINE).await;
        // The pipes end with the worker (its agents' output is piped to it, not inherited);
        // one still open after that means some process inherited it.
        let (stdout, stderr) = (self.stdout.take(), self.stderr.take());
        let readers = tokio::task::spawn_blocking(move || {
            if let Some(reader) = stderr {
                let _ = reader.join();
            }
            stdout.map_or_else(Vec::new, |reader| reader.join().unwrap_or_default())
        });
        let stdout = tokio::time::timeout(PIPES_DEADLINE, readers)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the worker exited ({status}) but its output stayed open for {PIPES_DEADLINE:?}"
                )
            })
            .expect("the reader threads");
        Output {
            status,
            stdout,
            stderr: self.log.state.lock().unwrap().raw.clone(),
        }
    }

    /// The stderr lines read so far.
    pub fn lines(&self) -> Vec<String> {
        self.log.state.lock().unwrap().lines.clone()
    }

    /// The JSON events among the stderr lines read so far.
    pub fn events(&self) -> Vec<serde_json::Value> {
        parse_events(&self.lines())
    }

    /// The events named `message` read so far.
    pub fn events_named(&self, message: &str) -> Vec<serde_json::Value> {
        named(&self.lines(), message)
    }

    /// Waits (up to `deadline`) until the worker has logged an event named `message`, and
    /// returns the first; panics with the log if the deadline passes or stderr ends first.
    pub async fn wait_event(&self, message: &str, deadline: Duration) -> serde_json::Value {
        self.wait_events(message, 1, deadline).await.remove(0)
    }

    /// Waits (up to `deadline`) until the worker has logged `n` events named `message`, and
    /// returns those read so far (at least `n`); panics as [`Self::wait_event`] does.
    pub async fn wait_events(
        &self,
        message: &str,
        n: usize,
        deadline: Duration,
    ) -> Vec<serde_json::Value> {
        let what = format!("{n} {message} event(s)");
        self.wait_log(&what, deadline, |lines| {
            let found = named(lines, message);
            (found.len() >= n).then_some(found)
        })
        .await
    }

    /// Waits (up to `deadline`) until `check` of the stderr lines read so far gives `Some`;
    /// panics with `what` and the log if the deadline passes or stderr ends first.
    pub async fn wait_log<T>(
        &self,
        what: &str,
        deadline: Duration,
        mut check: impl FnMut(&[String]) -> Option<T>,
    ) -> T {
        let mut changed = self.log.changed.subscribe();
        let until = tokio::time::Instant::now() + deadline;
        loop {
            // Marked seen before reading, so a line that arrives meanwhile wakes us again.
            changed.borrow_and_update();
            let (lines, closed) = {
                let state = self.log.state.lock().unwrap();
                (state.lines.clone(), state.closed)
            };
            if let Some(value) = check(&lines) {
                return value;
            }
            let why = if closed {
                "its stderr ended".to_owned()
            } else if tokio::time::timeout_at(until, changed.changed())
                .await
                .is_err()
            {
                format!("{deadline:?} passed")
            } else {
                continue;
            };
            panic!(
                "waited for {what} from the worker until {why}; its log:\n{}",
                lines.join("\n")
            );
        }
    }

    fn reaped(&mut self, status: ExitStatus) {
        self.child = None;
        self.status = Some(status);
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Log {
    /// Reads `stderr` line by line until it ends (raw bytes kept: a panic message or a
    /// non-UTF-8 line is not lost).
    fn follow(&self, stderr: impl Read) {
        let mut reader = BufReader::new(stderr);
        let mut line = Vec::new();
        while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
            {
                let mut state = self.state.lock().unwrap();
                state.raw.extend_from_slice(&line);
                let text = String::from_utf8_lossy(&line);
                state
                    .lines
                    .push(text.trim_end_matches(['\n', '\r']).to_owned());
            }
            line.clear();
            self.changed.send_replace(());
        }
        self.close();
    }

    fn close(&self) {
        self.state.lock().unwrap().closed = true;
        self.changed.send_replace(());
    }
}

fn parse_events(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

fn named(lines: &[String], message: &str) -> Vec<serde_json::Value> {
    parse_events(lines)
        .into_iter()
        .filter(|event| event["message"] == message)
        .collect()
}
