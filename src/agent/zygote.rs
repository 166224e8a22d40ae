//! The zygote: one fork server per replica (`agent.zygote_command`) that has imported the
//! agent's modules once and forks each session's agent from itself. Every start is then a fork,
//! and the imports stay in pages the agents share copy-on-write.
//!
//! The protocol, version 1, is written down for agent authors in `docs/zygote.md`; in short:
//! - The worker starts the command as any agent (no shell, its own process group and
//!   containment scope, the death signal, output read), with `AGENT_WORKER_PID` set and fd 0 one
//!   end of a `SOCK_SEQPACKET` socketpair. It prints a line with `AGENT_WORKER_ZYGOTE` and sends
//!   `{"v":1,"ready":true,"pid":…}`, or sends `{"v":1,"refused":"…"}` and exits.
//! - Per session, one packet `{"v":1,"id":…,"args":[…],"env":{…},"cgroups":n}` (the warm
//!   handoff's `args` and `env`) with, attached (`SCM_RIGHTS`), the write ends of the agent's
//!   stdout and stderr pipes and `n` fds of `cgroup.procs` files of its containment scope.
//! - The zygote double-forks: the agent leads its own group, writes itself into the cgroups and
//!   is re-parented to the worker (a child subreaper) before the reply `{"v":1,"id":…,"pid":…}`.
//!
//! The worker then owns the pid as any child ([`crate::agent::process`]: a pidfd from
//! `pidfd_open`, its pipes' read ends) and waits for it to be ready
//! ([`crate::agent::startup`]), with the deadlines counted from the request. Anything that
//! gives no agent is one of `ForkError`'s cases, and the zygote launcher
//! ([`crate::agent::zygote_launcher`]) starts that session cold.

use std::{
    io,
    os::fd::{AsRawFd, RawFd},
    time::{Duration, Instant},
};

use agent_jobs::SessionId;
use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use serde::Deserialize;
use tokio::sync::Mutex as AsyncMutex;
use tokio_util::sync::CancellationToken;

use super::{
    command::LaunchSpec,
    containment::SCOPE_VAR,
    exit::AgentExit,
    launcher::{AgentHandle, LaunchError, RunningAgent, StartMode},
    phase::Readiness,
    process::{AgentProcesses, Program},
    spawn::{Child, Stdin, pipe_cloexec},
    startup::await_start,
};

mod socket;

use socket::PacketSocket;

/// The version of every message (`"v"`).
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request the protocol allows.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// The zygote's stdout line that says it has preloaded.
pub const READY_LINE: &str = "AGENT_WORKER_ZYGOTE";
/// A request without its reply by then means the zygote hangs: it is replaced, and the
/// session starts cold.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// The variable that tells the zygote the worker's pid (its agents wait to be its children).
const WORKER_PID_VAR: &str = "AGENT_WORKER_PID";
/// The variable with the agent's `oom_score_adj`, which the forked agent writes for itself.
const OOM_SCORE_ADJ_VAR: &str = "AGENT_WORKER_OOM_SCORE_ADJ";

/// How the zygote is started and judged ready (from `[agent]`).
#[derive(Debug, Clone)]
pub struct ZygoteCommand {
    /// Program and arguments (`agent.zygote_command`).
    pub command: Vec<String>,
    /// Time allowed from its spawn to its ready message (`agent.zygote_timeout`).
    pub timeout: Duration,
}

/// Why a request gave no agent: in each case the session starts cold.
#[derive(Debug)]
pub(crate) enum ForkError {
    /// The zygote cannot serve any more (gone, hanging, or its replies make no sense): it must
    /// be replaced.
    Broken(String),
    /// This request got no agent, and the zygote serves on (it said why, or the request could
    /// not be made).
    Refused(String),
    /// The forked agent failed its start-up, as a cold one can.
    Failed(LaunchError),
}

/// A running zygote that has sent its ready message. Dropping it does not stop it: see
/// [`Self::retire`].
pub(crate) struct Zygote {
    /// Its pid.
    pub(crate) pid: u32,
    /// When it became ready.
    pub(crate) ready_at: Instant,
    handle: AgentHandle,
    exit: Shared<BoxFuture<'static, Option<AgentExit>>>,
    /// The worker's end of the socket; held for a whole request and its reply (the zygote
    /// serves one at a time, in order).
    socket: AsyncMutex<PacketSocket>,
    /// Cancelled once a request found it broken, with why.
    broken: CancellationToken,
    broken_reason: std::sync::Mutex<Option<String>>,
}

impl Zygote {
    /// Starts a zygote labelled `label` through `processes` and waits for its ready message;
    /// the reason, if it refused or failed.
    pub(crate) async fn start(
        processes: &AgentProcesses,
        label: SessionId,
        command: &ZygoteCommand,
    ) -> Result<Self, String> {
        let (program, args) = command
            .command
            .split_first()
            .expect("agent.zygote_command is checked non-empty");
        let (socket, theirs) = PacketSocket::pair().map_err(|e| format!("socketpair: {e}"))?;
        let readiness = Readiness::ready_only(vec![READY_LINE.into()], command.timeout);
        let env = [(WORKER_PID_VAR.to_owned(), std::process::id().to_string())];
        let spawned = processes
            .spawn(
                Program {
                    label: label.clone(),
                    // `~` is outside the session ids' alphabet: no session's scope is this one.
                    scope: label.as_str().replace('-', "~"),
                    program,
                    args,
                    env: &env,
                    stdin: Stdin::Fd(theirs.as_raw_fd()),
                },
                readiness.clone(),
                false,
                None,
            )
            .map_err(|e| e.to_string())?;
        drop(theirs);
        let agent = match await_start(spawned.into_started(), &readiness).await {
            Ok(agent) => agent,
            // A refusal is a message, then the exit: say what it said.
            Err(error) => return Err(refusal(&socket).unwrap_or_else(|| error.to_string())),
        };
        let exited = agent.exited;
        let zygote = Self {
            pid: agent.pid,
            ready_at: Instant::now(),
            handle: agent.handle,
            exit: async move { exited.await.ok() }.boxed().shared(),
            socket: AsyncMutex::new(socket),
            broken: CancellationToken::new(),
            broken_reason: std::sync::Mutex::new(None),
        };
        let socket = zygote.socket.lock().await;
        match tokio::time::timeout(command.timeout, socket.recv()).await {
            Ok(Ok(packet)) => match serde_json::from_slice::<Ready>(&packet) {
                Ok(Ready { ready: true, .. }) => {}
                Ok(Ready {
                    refused: Some(reason),
                    ..
                }) => return Err(zygote.stopped(format!("refused: {reason}"))),
                _ => return Err(zygote.stopped(format!("unexpected message {}", show(&packet)))),
            },
            Ok(Err(error)) => return Err(zygote.stopped(format!("no ready message: {error}"))),
            Err(_) => return Err(zygote.stopped("no ready message in time".into())),
        }
        drop(socket);
        Ok(zygote)
    }

    /// Stops it at once and returns `reason` (for a start that did not work out).
    fn stopped(&self, reason: String) -> String {
        self.handle.stop(Duration::ZERO);
        reason
    }

    /// Resolves when the process has exited (with how, if known).
    pub(crate) fn exited(&self) -> impl Future<Output = Option<AgentExit>> + Send + 'static {
        self.exit.clone()
    }

    /// Resolves once a request found it broken, with why.
    pub(crate) async fn broken(&self) -> String {
        self.broken.cancelled().await;
        self.broken_reason
            .lock()
            .expect("reason lock")
            .clone()
            .unwrap_or_default()
    }

    /// Marks it broken (the first reason is kept) and stops it.
    pub(crate) fn mark_broken(&self, reason: &str) {
        self.broken_reason
            .lock()
            .expect("reason lock")
            .get_or_insert_with(|| reason.to_owned());
        self.broken.cancel();
        self.retire();
    }

    /// Stops it (SIGTERM, SIGKILL a second later). Its agents are not its children, nor in its
    /// process group or cgroup: they go on.
    pub(crate) fn retire(&self) {
        self.handle.stop(Duration::from_secs(1));
    }

    /// Its resident memory now, in bytes, if it can be read.
    pub(crate) fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// Asks it for the agent of `spec` and waits for that agent to be ready, as a cold one is
    /// waited for; the agent is owned through `processes` (its scope, log file and owner task).
    pub(crate) async fn fork(
        &self,
        processes: &AgentProcesses,
        readiness: &Readiness,
        spec: &LaunchSpec,
    ) -> Result<RunningAgent, ForkError> {
        let scope = processes.prepare_scope(spec.session_id.as_str());
        let procs = scope.all_procs();
        let request = request(
            spec,
            scope.marker(),
            scope.placement().oom_score_adj,
            procs.len(),
        )
        .map_err(ForkError::Refused)?;
        let pipes = (pipe_cloexec(), pipe_cloexec());
        let ((out_read, out_write), (err_read, err_write)) = match pipes {
            (Ok(out), Ok(err)) => (out, err),
            (Err(e), _) | (_, Err(e)) => return Err(ForkError::Refused(format!("pipe: {e}"))),
        };
        let log_file = processes.open_log_file(spec).await;
        let fds: Vec<RawFd> = [out_write.as_raw_fd(), err_write.as_raw_fd()]
            .into_iter()
            .chain(procs)
            .collect();
        let (sent_at, reply) = self.exchange(&request, &fds, &spec.session_id).await?;
        // The agent holds its own copies now: ours must close, or its output never ends.
        drop((out_write, err_write));
        let pid = match reply {
            Reply {
                pid: Some(pid),
                error: None,
                cgroup_error: None,
                ..
            } => pid,
            Reply {
                pid,
                error,
                cgroup_error,
                ..
            } => {
                // A process that will not be the session's agent: ours to end (the subreaper
                // reaps it).
                if let Some(pid) = pid {
                    kill_group(pid);
                }
                let reason = error.or(cgroup_error.map(|e| format!("cgroup: {e}")));
                return Err(ForkError::Refused(
                    reason.unwrap_or_else(|| "no pid".into()),
                ));
            }
        };
        let child = Child::adopt(pid, out_read, err_read).map_err(|e| {
            kill_group(pid);
            ForkError::Refused(format!("agent {pid} could not be owned: {e}"))
        })?;
        tracing::info!(session_id = %spec.session_id, pid, zygote_pid = self.pid, "agent_forked");
        let started = processes.adopt(
            child,
            scope,
            spec.session_id.clone(),
            readiness.clone(),
            log_file,
            sent_at,
        );
        match await_start(started, readiness).await {
            Ok(mut agent) => {
                agent.start = StartMode::Forked;
                Ok(agent)
            }
            // Nothing printed at all: the fork is what failed, not the session's agent (the
            // warm pool judges a handoff the same way).
            Err(LaunchError::ExitedBeforeReady {
                exit,
                last_line: None,
            }) => Err(ForkError::Broken(format!(
                "its agent {pid} exited with {exit} before printing anything"
            ))),
            Err(error) => Err(ForkError::Failed(error)),
        }
    }

    /// Sends `request` with `fds` and reads its reply, holding the socket for both; when it
    /// was sent, and the reply.
    async fn exchange(
        &self,
        request: &[u8],
        fds: &[RawFd],
        id: &SessionId,
    ) -> Result<(tokio::time::Instant, Reply), ForkError> {
        let socket = tokio::select! {
            socket = self.socket.lock() => socket,
            _ = self.broken.cancelled() => return Err(ForkError::Broken("replaced".into())),
        };
        let sent_at = tokio::time::Instant::now();
        match socket.send(request, fds).await {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                return Err(ForkError::Refused(format!(
                    "the request ({} bytes) is larger than the socket takes: {e}",
                    request.len()
                )));
            }
            Err(e) => return Err(ForkError::Broken(format!("sending a request: {e}"))),
        }
        match tokio::time::timeout(REPLY_TIMEOUT, reply_for(&socket, id)).await {
            Ok(Ok(reply)) => Ok((sent_at, reply)),
            Ok(Err(e)) => Err(ForkError::Broken(format!("reading its reply: {e}"))),
            Err(_) => Err(ForkError::Broken(format!(
                "no reply within {REPLY_TIMEOUT:?}"
            ))),
        }
    }
}

/// The ready (or refused) message.
#[derive(Debug, Deserialize)]
struct Ready {
    v: u32,
    #[serde(default)]
    ready: bool,
    #[serde(default)]
    refused: Option<String>,
}

/// A reply to a request.
#[derive(Debug, Deserialize)]
struct Reply {
    v: u32,
    id: Option<String>,
    #[serde(default)]
    pid: Option<u32>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    cgroup_error: Option<String>,
}

/// The request packet for `spec`: the warm handoff's `args` and `env`, plus the scope's
/// marker and OOM score for the agent to take; the reason when it is too long.
fn request(
    spec: &LaunchSpec,
    marker: &str,
    oom_score_adj: Option<i32>,
    cgroups: usize,
) -> Result<Vec<u8>, String> {
    let mut env: serde_json::Map<String, serde_json::Value> = spec
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().into()))
        .collect();
    // Inherited by what the agent starts: how its escaped descendants are found.
    env.insert(SCOPE_VAR.into(), marker.into());
    if let Some(adj) = oom_score_adj {
        env.insert(OOM_SCORE_ADJ_VAR.into(), adj.to_string().into());
    }
    let packet = serde_json::to_vec(&serde_json::json!({
        "v": PROTOCOL_VERSION,
        "id": spec.session_id.as_str(),
        "args": spec.session_args(),
        "env": env,
        "cgroups": cgroups,
    }))
    .expect("a JSON value serializes");
    if packet.len() > MAX_REQUEST_BYTES {
        return Err(format!(
            "the request is {} bytes, more than the protocol's {MAX_REQUEST_BYTES}",
            packet.len()
        ));
    }
    Ok(packet)
}

/// The reply to the request of `id`. A reply to an earlier request whose launch was dropped
/// before its reply came is skipped, its agent killed: nobody supervises it.
async fn reply_for(socket: &PacketSocket, id: &SessionId) -> io::Result<Reply> {
    loop {
        let packet = socket.recv().await?;
        let reply: Reply = serde_json::from_slice(&packet).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{e}: {}", show(&packet)),
            )
        })?;
        if reply.v != PROTOCOL_VERSION {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("protocol version {}", reply.v),
            ));
        }
        match reply.id.as_deref() {
            // `null`: the request could not be read, and requests are served in order.
            Some(other) if other != id.as_str() => {
                if let Some(pid) = reply.pid {
                    kill_group(pid);
                }
                tracing::warn!(session_id = %id, stale = other, "zygote_stale_reply");
            }
            _ => return Ok(reply),
        }
    }
}

/// What a zygote that exited before its ready line said, if it sent its refusal.
fn refusal(socket: &PacketSocket) -> Option<String> {
    let packet = socket.try_recv()?;
    let ready: Ready = serde_json::from_slice(&packet).ok()?;
    (ready.v == PROTOCOL_VERSION)
        .then_some(ready.refused)
        .flatten()
        .map(|reason| format!("refused: {reason}"))
}

/// A packet, for a log line: at most 200 characters of it.
fn show(packet: &[u8]) -> String {
    String::from_utf8_lossy(&packet[..packet.len().min(200)]).into_owned()
}

/// SIGKILLs the process group `pid` leads, and `pid` itself.
fn kill_group(pid: u32) {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(opening: &str) -> LaunchSpec {
        LaunchSpec {
            session_id: SessionId::parse("s-1").unwrap(),
            program: "python3".into(),
            args: vec![
                "agent.py".into(),
                "--room=s-1".into(),
                format!("--opening-line={opening}"),
            ],
            leading_args: 1,
            env: vec![("SESSION_ID".into(), "s-1".into())],
            log_file: None,
        }
    }

    #[test]
    fn a_request_carries_the_session_args_env_scope_and_cgroup_count() {
        let packet = request(&spec("hi"), "w/s-1", Some(500), 2).unwrap();
        let parsed: serde_json::Value = serde_json::from_slice(&packet).unwrap();
        assert_eq!(parsed["v"], 1);
        assert_eq!(parsed["id"], "s-1");
        assert_eq!(
            parsed["args"],
            serde_json::json!(["--room=s-1", "--opening-line=hi"])
        );
        assert_eq!(parsed["env"]["SESSION_ID"], "s-1");
        assert_eq!(parsed["env"][SCOPE_VAR], "w/s-1");
        assert_eq!(parsed["env"][OOM_SCORE_ADJ_VAR], "500");
        assert_eq!(parsed["cgroups"], 2);
    }

    #[test]
    fn a_request_over_the_protocols_limit_is_refused_before_it_is_sent() {
        let long = "x".repeat(MAX_REQUEST_BYTES);
        let error = request(&spec(&long), "w/s-1", None, 0).unwrap_err();
        assert!(error.contains("more than the protocol's"), "{error}");
    }
}
