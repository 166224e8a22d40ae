//! The per-agent process owner: every agent process of this worker, from its spawn (or its
//! adoption) to its reaped exit, whatever start mode launched it.
//!
//! `AgentProcesses::spawn` starts one:
//! - No shell: program and arguments go to `execve` as separate strings, verbatim. (As with
//!   `execvp`, an executable file without `#!` is run by `/bin/sh` as a script, with the same
//!   argv; no value is ever parsed by a shell.)
//! - The agent leads its own process group, so stopping it reaches everything it started:
//!   SIGTERM to the group, a grace period, then SIGKILL.
//! - It cannot outlive the worker: `PR_SET_PDEATHSIG` asks the kernel to SIGKILL it when the
//!   worker dies, even by SIGKILL, and a check right after closes the race where the worker
//!   died during the spawn. The worker is not forked for this: see [`crate::agent::spawn`].
//! - It runs in a containment scope of its own ([`crate::agent::containment`]): its cgroup, or
//!   its marker, so what escapes its group ends with it too.
//!
//! `AgentProcesses::own` is where every child ends up, spawned here or not:
//! - stdout and stderr are read continuously, line by line ([`crate::agent::output`]), so a
//!   chatty agent never blocks on a full pipe;
//! - one owner task per agent waits on the child, so it is always reaped (no zombies), serves
//!   stop requests ([`AgentHandle`]), kills the group once the agent is gone and ends its
//!   containment scope.
//!
//! `own` takes a [`Child`], not a spawn: a child started elsewhere is owned the same way once
//! it is one. That is the seam for a zygote start mode, whose fork server hands the worker (a
//! subreaper) an already-forked agent: the worker prepares the scope
//! ([`Containment::prepare`]), makes the stdio pipes and passes the child's ends over, builds
//! the [`Child`] from the pid, a pidfd and its own pipe ends ([`Child::from_fds`]) and calls
//! `own`; the readiness wait ([`crate::agent::startup`]) takes the `Started` it returns. Per
//! agent resource limits belong to the same two places: written into the scope's cgroup before
//! the start, or sampled by the owner task where there is no cgroup.

use std::{sync::Arc, time::Duration};

use agent_jobs::SessionId;
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{
    net::unix::pipe,
    sync::{mpsc, oneshot, watch},
};
use tokio_util::task::TaskTracker;

use crate::{metrics as observability, settings::ByteSize};

use super::{
    command::LaunchSpec,
    containment::{self, AgentScope, Containment},
    exit::AgentExit,
    launcher::{AgentHandle, LaunchError, UsageCell},
    limits::{self, LimitedBy, Limits, MemoryLimitHit},
    log_files::{LogFile, LogFiles},
    log_list::OutputSink,
    output::{Binding, OutputLimits, OutputReader},
    phase::{Phase, Readiness},
    spawn::{Child, Stdin},
    spawner::SpawnJob,
    startup::Started,
};

/// What [`AgentProcesses::spawn`] starts.
pub(crate) struct Program<'a> {
    /// The session id in logs (a warm process's own label).
    pub(crate) label: SessionId,
    /// The name of its containment scope (cgroup, marker): the session id, or for a warm
    /// process a name outside the session ids' alphabet, so no session can share its cgroup.
    pub(crate) scope: String,
    /// The program to execute.
    pub(crate) program: &'a str,
    /// Its arguments.
    pub(crate) args: &'a [String],
    /// Environment additions.
    pub(crate) env: &'a [(String, String)],
    /// What it reads.
    pub(crate) stdin: Stdin,
}

/// A process now owned: what the readiness wait needs, and what only its start mode keeps.
pub(crate) struct Spawned {
    /// For [`crate::agent::startup::await_start`].
    pub(crate) started: Started,
    /// Its output readers (to rebind a warm process's output to its session).
    pub(crate) reader: OutputReader,
    /// Its stdin, when piped.
    pub(crate) stdin: Option<pipe::Sender>,
}

impl Spawned {
    /// What the readiness wait needs, the rest dropped: only the output tasks may keep the
    /// readers, so the phase channel closes when they reach end-of-file, which is how an exit
    /// before the ready line is told without waiting out the reader drain.
    pub(crate) fn into_started(self) -> Started {
        let Self {
            started,
            reader,
            stdin,
        } = self;
        drop((reader, stdin));
        started
    }
}

/// The agent processes of this worker: how they are contained, where their output goes, and
/// the owner task of each. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct AgentProcesses {
    limits: OutputLimits,
    output: OutputSink,
    log_files: LogFiles,
    containment: Arc<Containment>,
    worker_id: String,
    /// The owner task of every agent (see [`own`]).
    owners: TaskTracker,
}

impl AgentProcesses {
    /// Processes kept within `limits`, their lines for Redis going to `output`; contained
    /// by their process group alone until [`Self::contain`].
    pub(crate) fn new(limits: OutputLimits, output: OutputSink) -> Self {
        Self {
            limits,
            output,
            log_files: LogFiles::start(limits.log_file_max_bytes),
            containment: Arc::new(Containment::process_group()),
            worker_id: "worker".into(),
            owners: TaskTracker::new(),
        }
    }

    /// Contains each process's whole tree with `containment`, marking its processes as the
    /// agents of `worker_id`.
    pub(crate) fn contain(&mut self, containment: Arc<Containment>, worker_id: String) {
        self.containment = containment;
        self.worker_id = worker_id;
    }

    /// Opens the session's log file, when `spec` names one.
    pub(crate) async fn open_log_file(
        &self,
        spec: &LaunchSpec,
    ) -> Option<(LogFiles, Arc<LogFile>)> {
        let path = spec.log_file.as_ref()?;
        let file = self.log_files.open(&spec.session_id, path).await?;
        Some((self.log_files.clone(), file))
    }

    /// Spawns `program` in a containment scope of its own (see the module docs for how), and
    /// owns it: its output judged by `readiness`, bound to its session as `to_session` says,
    /// also written to `log_file`.
    pub(crate) fn spawn(
        &self,
        program: Program<'_>,
        readiness: Readiness,
        to_session: bool,
        log_file: Option<(LogFiles, Arc<LogFile>)>,
    ) -> Result<Spawned, LaunchError> {
        let spawned_at = tokio::time::Instant::now();
        let label = program.label.clone();
        let mut scope = self.containment.prepare(&self.worker_id, &program.scope);
        let mut child = spawn(&program, &scope).map_err(|e| LaunchError::Spawn {
            program: program.program.to_owned(),
            reason: e.to_string(),
        })?;
        if let Some(error) = child.cgroup_error.take() {
            scope.cgroup_refused(&error, &label);
        }
        // The agent leads a new group named after its pid (see `spawn`).
        let (pid, pgid) = (child.id(), child.id());
        tracing::info!(session_id = %label, pid, pgid, "agent_process_spawned");
        let (binding, phase) = Binding::new(label, to_session, readiness, log_file);
        Ok(self.own(child, scope, binding, phase, spawned_at))
    }

    /// A containment scope named `name` for a child started elsewhere (a zygote's), which
    /// places itself in it: see [`AgentScope::all_procs`].
    pub(crate) fn prepare_scope(&self, name: &str) -> AgentScope {
        self.containment.prepare(&self.worker_id, name)
    }

    /// [`Self::own`] for a child started elsewhere for the session `label`: its output bound
    /// to the session and judged by `readiness`, also written to `log_file`.
    pub(crate) fn adopt(
        &self,
        child: Child,
        scope: AgentScope,
        label: SessionId,
        readiness: Readiness,
        log_file: Option<(LogFiles, Arc<LogFile>)>,
        spawned_at: tokio::time::Instant,
    ) -> Started {
        let (binding, phase) = Binding::new(label, true, readiness, log_file);
        self.own(child, scope, binding, phase, spawned_at)
            .into_started()
    }

    /// Takes `child` over, however it was started: reads its output as `binding` says and
    /// hands it to an owner task of its own, which reaps it, serves stop requests and, once it
    /// is gone, kills its group and ends `scope`. `phase` is `binding`'s receiving end;
    /// `spawned_at` is where its start-up deadlines count from. The child must lead its own
    /// process group.
    pub(crate) fn own(
        &self,
        mut child: Child,
        scope: AgentScope,
        binding: Binding,
        phase: watch::Receiver<Phase>,
        spawned_at: tokio::time::Instant,
    ) -> Spawned {
        let pid = child.id();
        let label = binding.label.clone();
        // Its owner task reaps it: the subreaper's reaping of orphans must leave it alone.
        containment::agent_started(pid);
        let last_line = binding.last_line.clone();
        let reader = OutputReader::new(binding, &self.limits, self.output.clone());
        reader.read_both(child.stdout.take(), child.stderr.take());
        let stdin = child.stdin.take();

        let (stop_tx, stop_rx) = mpsc::unbounded_channel();
        let (exit_tx, exit_rx) = oneshot::channel();
        let usage = UsageCell::default();
        let watch = LimitWatch::new(label, &self.containment, usage.clone());
        self.owners.spawn(own(
            child,
            stop_rx,
            exit_tx,
            (self.containment.clone(), scope),
            watch,
        ));
        Spawned {
            started: Started {
                pid,
                spawned_at,
                phase,
                exited: exit_rx,
                handle: AgentHandle::with_usage(stop_tx, usage),
                last_line,
            },
            reader,
            stdin,
        }
    }

    /// Resolves once every process owned so far has exited and its group was killed; owners
    /// started after this call (not after the first poll) are not waited for.
    pub(crate) fn wait_for_exits(&self) -> impl Future<Output = ()> + Send + '_ {
        // An abandoned launch's agent has no supervisor watching it; its owner task is what
        // kills the rest of its group, which the death signal does not reach.
        self.owners.close();
        self.owners.wait()
    }
}

/// The spawn itself: the environment every agent gets, its scope's marker and cgroups; on the
/// scope's placed spawner thread where it has one.
fn spawn(spec: &Program<'_>, scope: &AgentScope) -> std::io::Result<Child> {
    let mut env: Vec<(&str, &str)> = spec
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    // Python writes stdout to a pipe in 8 KiB blocks; its ready line would sit in the buffer
    // until the start-up timeout. Agents in other languages ignore this.
    env.push(("PYTHONUNBUFFERED", "1"));
    // Inherited by everything the agent starts: how escaped descendants are found.
    env.push((containment::SCOPE_VAR, scope.marker()));
    let placement = scope.placement();
    if let Some(spawner) = scope.spawner() {
        let job = SpawnJob {
            program: spec.program.to_owned(),
            args: spec.args.to_vec(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            placement,
            stdin: spec.stdin,
        };
        return spawner.spawn(job)?.into_child();
    }
    // Agents are launched from the runtime's worker threads, which live as long as the
    // process: the death signal, which follows the spawning thread, fires only with the worker.
    crate::agent::spawn::spawn_into(spec.program, spec.args, &env, &placement, spec.stdin)
}

/// Waits on the child (reaping it) and serves stop requests: SIGTERM to the group at once,
/// SIGKILL when the shortest requested grace runs out. Every `agent.limits_interval` it reads
/// what the tree uses and watches its limits (see [`LimitWatch`]).
async fn own(
    child: Child,
    mut stop_rx: mpsc::UnboundedReceiver<Duration>,
    exit_tx: oneshot::Sender<AgentExit>,
    (containment, scope): (Arc<Containment>, AgentScope),
    mut watch: LimitWatch,
) {
    // It leads its own group: the group id is its pid.
    let pid = child.id();
    let group = Pid::from_raw(pid as i32);
    let scope = Arc::new(scope);
    let mut kill_at: Option<tokio::time::Instant> = None;
    let mut readings =
        tokio::time::interval_at(tokio::time::Instant::now() + watch.every, watch.every);
    readings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let status = loop {
        let deadline = kill_at;
        tokio::select! {
            status = child.wait() => break status,
            Some(grace) = stop_rx.recv() => {
                signal_group(group, Signal::SIGTERM);
                let at = tokio::time::Instant::now() + grace;
                kill_at = Some(kill_at.map_or(at, |current| current.min(at)));
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                signal_group(group, Signal::SIGKILL);
                kill_at = None;
            }
            _ = readings.tick() => watch.read(&scope, pid).await,
        }
    };
    // Processes the agent started live on in its group after it exits (the death signal is not
    // inherited by them). The group id cannot be reused while any of them exists, and a new
    // group taking the same id in the microseconds since the reap would need the pid space to
    // wrap around: killing the group now is safe, and leaves nothing behind.
    signal_group(group, Signal::SIGKILL);
    containment::agent_reaped(pid);
    let exit = match status {
        Ok(status) => AgentExit::from(status),
        // wait() only fails if the child was already reaped elsewhere, which we never do.
        Err(_) => AgentExit::Code(-1),
    };
    // Read before its cgroup goes.
    let exit = watch.classify(exit, &scope);
    // And what left the group (setsid): its cgroup, or its marked re-parented descendants.
    // The readings are over, so the scope is the owner's alone again.
    if let Ok(scope) = Arc::try_unwrap(scope) {
        let _ = tokio::task::spawn_blocking(move || containment.end(scope)).await;
    }
    let _ = exit_tx.send(exit);
}

/// What the owner task watches of its agent's resources: reads its usage for the heartbeat,
/// notices OOM kills and `memory.high`, and, where no cgroup enforces `agent.memory_max`,
/// enforces it by killing the tree.
pub(crate) struct LimitWatch {
    /// The session (or warm process) in logs.
    label: SessionId,
    limits: Limits,
    every: Duration,
    usage: UsageCell,
    /// OOM kills seen so far.
    oom_kills: u64,
    warned_high: bool,
    /// Set when the worker killed the tree over its limit.
    killed: Option<MemoryLimitHit>,
}

impl LimitWatch {
    fn new(label: SessionId, containment: &Containment, usage: UsageCell) -> Self {
        let limits = *containment.limits();
        Self {
            label,
            every: limits.interval,
            limits,
            usage,
            oom_kills: 0,
            warned_high: false,
            killed: None,
        }
    }

    /// One reading (blocking reads of cgroupfs and /proc, off the runtime's threads).
    async fn read(&mut self, scope: &Arc<AgentScope>, pid: u32) {
        let (scope_, previous) = (scope.clone(), *self.usage.lock().expect("usage lock"));
        // PSS (precise, costly) only where this reading is what enforces the limit.
        let precise = self.limits.memory_max.is_some() && !scope.kernel_memory();
        let reading = tokio::task::spawn_blocking(move || {
            (scope_.usage(pid, previous, precise), scope_.memory_events())
        })
        .await;
        let Ok((usage, (oom_kills, high_events))) = reading else {
            return;
        };
        *self.usage.lock().expect("usage lock") = Some(usage);
        if oom_kills > self.oom_kills {
            // The agent is alive: the kernel killed a helper of its. Its business whether the
            // session goes on; ours to say so.
            let killed = oom_kills - self.oom_kills;
            observability::helper_oom_killed(killed);
            tracing::warn!(
                session_id = %self.label,
                killed,
                limit = %self.limits.memory_max.map_or("-".into(), |b| ByteSize(b).to_string()),
                "agent_helper_oom_killed"
            );
            self.oom_kills = oom_kills;
        }
        let over_high = self
            .limits
            .memory_high
            .is_some_and(|high| high_events > 0 || usage.memory_bytes >= high);
        if over_high && !self.warned_high {
            self.warned_high = true;
            observability::memory_high();
            tracing::warn!(
                session_id = %self.label,
                memory = %ByteSize(usage.memory_bytes),
                high = %ByteSize(self.limits.memory_high.unwrap_or(0)),
                "agent_memory_high"
            );
        }
        if let Some(max) = self.limits.memory_max
            && !scope.kernel_memory()
            && usage.memory_bytes > max
            && self.killed.is_none()
        {
            tracing::warn!(
                session_id = %self.label,
                memory = %ByteSize(usage.memory_bytes),
                limit = %ByteSize(max),
                "agent_memory_limit_killed"
            );
            self.killed = Some(MemoryLimitHit {
                limit: max,
                by: LimitedBy::Sampled,
            });
            let _ = tokio::task::spawn_blocking(move || kill_tree(pid)).await;
        }
    }

    /// `exit`, marked as the memory limit's doing where it was: the worker killed the tree,
    /// or the kernel's OOM killer killed in its cgroup and the agent did not end cleanly.
    /// Records the peak memory of the ended agent.
    fn classify(&self, exit: AgentExit, scope: &AgentScope) -> AgentExit {
        if let Some(usage) = *self.usage.lock().expect("usage lock") {
            observability::agent_memory_peak(usage.peak_bytes);
        }
        if let Some(hit) = self.killed {
            return exit.limited_by(hit);
        }
        let (oom_kills, _) = scope.memory_events();
        match self.limits.memory_max {
            Some(limit) if oom_kills > 0 && !exit.is_clean() => exit.limited_by(MemoryLimitHit {
                limit,
                by: LimitedBy::OomKill,
            }),
            _ => exit,
        }
    }
}

/// SIGKILLs the agent `root` and its tree (its group, its descendants).
fn kill_tree(root: u32) {
    signal_group(Pid::from_raw(root as i32), Signal::SIGKILL);
    for pid in limits::tree_now(root) {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

fn signal_group(group: Pid, signal: Signal) {
    // ESRCH means the group is already gone, which is what we wanted.
    let _ = nix::sys::signal::killpg(group, signal);
}
