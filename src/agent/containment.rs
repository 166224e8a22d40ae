//! Containing each agent's whole process tree: when its session ends, nothing it started
//! survives it, even a grandchild that left its process group with `setsid()`.
//!
//! The process group (SIGTERM, grace, SIGKILL to the group) reaches what stays in the group.
//! Beyond that, one of two mechanisms, chosen at start-up (`agent.containment`):
//! - **cgroup** (cgroup v2, where the worker may create cgroups below its own: a delegated
//!   systemd unit, a container given a writable cgroupfs, root on a host). Each agent runs in a
//!   cgroup of its own, `<worker's cgroup>/aw-<pid>-<rand>/<session>`: the child moves itself
//!   there before it execs (see [`crate::agent::spawn::spawn_into`]), so everything it starts is born
//!   inside, `setsid()` or not. When the session ends, `cgroup.kill` takes the whole cgroup.
//!   A worker that was SIGKILLed cannot do that: its agents die by their death signal, and
//!   whatever escaped is killed by the worker's guard ([`crate::agent::cgroup_guard`], a
//!   process `agent-worker run` starts that outlives it). Should the guard be killed too, the
//!   next worker that starts in the same cgroup kills the cgroups of workers that are gone, or
//!   they go with the service's cgroup.
//! - **subreaper** (`PR_SET_CHILD_SUBREAPER`, which `agent-worker run` sets on itself): an
//!   orphan in an agent's tree is re-parented to the worker instead of to init. Each agent gets
//!   `AGENT_WORKER_SCOPE=<worker id>/<session id>` in its environment, which its descendants
//!   inherit; when the session ends, the worker kills its re-parented children carrying that
//!   marker (round after round, as their own children are re-parented in turn), and reaps
//!   them. A worker that dies cannot do this: then escaped processes die only with the
//!   container (in a container with tini as PID 1, when the worker dies, tini exits and the
//!   container with it).
//! - **process-group**: only the process group (what the worker did before).

use std::{
    collections::HashSet,
    fs, io,
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{LazyLock, Mutex},
    time::Duration,
};

use agent_jobs::SessionId;
use nix::{
    sys::{
        signal::Signal,
        wait::{WaitPidFlag, waitpid},
    },
    unistd::Pid,
};
use serde::Deserialize;

use super::cgroup_guard::Guard;

/// The environment variable that marks an agent's descendants as its own.
pub const SCOPE_VAR: &str = "AGENT_WORKER_SCOPE";

/// How long an ended agent's cgroup may take to empty after `cgroup.kill`.
const CGROUP_EMPTY_WAIT: Duration = Duration::from_secs(2);

/// Rounds of killing re-parented descendants (each round reaches one more generation).
const SUBREAPER_ROUNDS: usize = 20;

/// `agent.containment`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContainmentSetting {
    /// cgroup v2 where the worker may create cgroups, else subreaper where the process is
    /// one, else the process group alone.
    Auto,
    /// cgroup v2, or refuse to start.
    Cgroup,
    /// The subreaper marker scan (or the process group where the process is no subreaper).
    Subreaper,
    /// The process group alone.
    ProcessGroup,
}

/// The mechanism in use.
#[derive(Debug)]
pub enum Containment {
    /// One cgroup per agent below `dir` (the worker's own, created for it), watched by a
    /// guard where `agent-worker run` enabled one.
    Cgroup {
        /// The worker's cgroup directory.
        dir: PathBuf,
        /// The process that removes `dir`'s cgroups once the worker is gone.
        guard: Option<Guard>,
    },
    /// Re-parented descendants carrying the session's marker are killed.
    Subreaper,
    /// Only the process group.
    ProcessGroup,
}

/// Why `agent.containment = "cgroup"` cannot be had.
#[derive(Debug, thiserror::Error)]
#[error(
    "agent.containment is \"cgroup\" but no cgroup v2 can be created below this process's own \
     ({0}); give the worker a delegated cgroup (systemd: Delegate=yes; containers: a writable \
     cgroup namespace) or use \"auto\""
)]
pub struct NoCgroup(String);

/// Pids of the agents the worker started itself: reaped by their own owner tasks, never by
/// [`reap_adopted`].
static AGENTS: LazyLock<Mutex<HashSet<u32>>> = LazyLock::new(|| Mutex::new(HashSet::new()));

/// Makes this process the subreaper of everything it starts (for `agent-worker run`; a
/// process that also has children of its own to wait for, like a test runner, must not).
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// True when this process is the subreaper of what it starts: then it must reap the orphans
/// re-parented to it ([`reap_adopted`]).
pub fn is_subreaper() -> bool {
    nix::sys::prctl::get_child_subreaper().unwrap_or(false)
}

impl Containment {
    /// Chooses the mechanism for `setting`; `worker_id` names the worker's own cgroup. Kills the
    /// leftovers of workers that are gone (see the module docs).
    pub fn start(setting: ContainmentSetting, worker_id: &str) -> Result<Self, NoCgroup> {
        if matches!(
            setting,
            ContainmentSetting::Auto | ContainmentSetting::Cgroup
        ) {
            match worker_cgroup(worker_id) {
                Ok(dir) => {
                    let guard = Guard::start(&dir).unwrap_or_else(|error| {
                        // Still contained while the worker lives; a SIGKILL then leaves
                        // escaped processes to the next worker, as without a guard.
                        tracing::warn!(error = %error, "cgroup_guard_failed");
                        None
                    });
                    if let Some(guard) = &guard {
                        tracing::info!(pid = guard.pid(), cgroup = %dir.display(), "cgroup_guard_started");
                    }
                    return Ok(Self::Cgroup { dir, guard });
                }
                Err(error) if setting == ContainmentSetting::Cgroup => {
                    return Err(NoCgroup(error.to_string()));
                }
                Err(error) => tracing::debug!(error = %error, "agent_cgroups_unavailable"),
            }
        }
        if setting != ContainmentSetting::ProcessGroup && is_subreaper() {
            return Ok(Self::Subreaper);
        }
        Ok(Self::ProcessGroup)
    }

    /// The name of the mechanism, as logged.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Cgroup { .. } => "cgroup",
            Self::Subreaper => "subreaper",
            Self::ProcessGroup => "process-group",
        }
    }

    /// Prepares the scope of one agent before it is spawned: its cgroup (if cgroups are in
    /// use) and its marker, both named `name` (a session's id, or for a warm process a name no
    /// session id can take: see [`crate::agent::warm_pool`]). A cgroup that cannot be created
    /// is warned about; the agent then runs with its marker only.
    pub fn prepare(&self, worker_id: &str, name: &str) -> AgentScope {
        let marker = format!("{worker_id}/{name}");
        let cgroup = match self {
            Self::Cgroup { dir: root, .. } => match AgentCgroup::create(root, name) {
                Ok(cgroup) => Some(cgroup),
                Err(error) => {
                    tracing::warn!(scope = name, error = %error, "agent_cgroup_failed");
                    None
                }
            },
            _ => None,
        };
        AgentScope { marker, cgroup }
    }

    /// Kills whatever is left of an agent's tree once the agent has exited and its process
    /// group was killed; blocking (a few system calls, a short wait for a cgroup to empty).
    pub fn end(&self, scope: AgentScope) {
        if let Some(cgroup) = scope.cgroup {
            cgroup.kill_and_remove();
        } else if matches!(self, Self::Subreaper) {
            kill_marked(&scope.marker);
        }
    }

    /// Removes the worker's own (empty) cgroup at a clean exit.
    pub fn close(&self) {
        if let Self::Cgroup { dir, .. } = self {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// One agent's containment, from before its spawn to after its exit.
#[derive(Debug)]
pub struct AgentScope {
    marker: String,
    cgroup: Option<AgentCgroup>,
}

impl AgentScope {
    /// The marker its environment carries (`AGENT_WORKER_SCOPE`).
    pub fn marker(&self) -> &str {
        &self.marker
    }

    /// `cgroup.procs` of its cgroup, for the child to move itself into.
    pub fn cgroup_procs(&self) -> Option<std::os::fd::RawFd> {
        self.cgroup.as_ref().map(|c| c.procs.as_raw_fd())
    }

    /// The child could not move into the cgroup: what is left of its tree is found by marker.
    pub fn cgroup_refused(&mut self, error: &io::Error, id: &SessionId) {
        if let Some(cgroup) = self.cgroup.take() {
            tracing::warn!(session_id = %id, error = %error, "agent_cgroup_failed");
            cgroup.kill_and_remove();
        }
    }
}

#[derive(Debug)]
struct AgentCgroup {
    dir: PathBuf,
    procs: OwnedFd,
}

impl AgentCgroup {
    fn create(root: &Path, name: &str) -> io::Result<Self> {
        let dir = root.join(name);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            // A previous agent of the session on this worker (a retry) left it: reuse it.
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(error),
        }
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))?;
        Ok(Self {
            dir,
            procs: procs.into(),
        })
    }

    /// Kills what is in it; dropping it then removes it.
    fn kill_and_remove(self) {
        kill_cgroup(&self.dir);
    }
}

impl Drop for AgentCgroup {
    fn drop(&mut self) {
        // Only an empty cgroup can be removed: after `kill_and_remove`, or when its agent never
        // started.
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Kills every process in the cgroup at `dir` and waits (briefly) until it is empty.
fn kill_cgroup(dir: &Path) {
    // cgroup.kill (Linux 5.14) kills the whole subtree at once; before that, one by one.
    if fs::write(dir.join("cgroup.kill"), "1").is_err() {
        for pid in cgroup_pids(dir) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
    let deadline = std::time::Instant::now() + CGROUP_EMPTY_WAIT;
    while !cgroup_pids(dir).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn cgroup_pids(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Creates this worker's cgroup below the process's own, after killing the leftovers of
/// workers that are gone (`aw-<pid>-<rand>` whose pid is no longer alive).
fn worker_cgroup(worker_id: &str) -> io::Result<PathBuf> {
    let own = own_cgroup_dir()?;
    for entry in fs::read_dir(&own)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("aw-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        let gone = nix::sys::signal::kill(Pid::from_raw(pid), None).is_err();
        if gone && entry.path().is_dir() {
            let killed = remove_worker_cgroup(&entry.path());
            tracing::info!(cgroup = %name, processes = killed, "stale_agent_cgroups_removed");
        }
    }
    let suffix = worker_id.rsplit('-').next().unwrap_or("0");
    let dir = own.join(format!("aw-{}-{suffix}", std::process::id()));
    fs::create_dir(&dir)?;
    // A child cgroup we may create but not move processes into is no use: check it can hold one.
    let probe = dir.join("cgroup.procs");
    fs::OpenOptions::new()
        .write(true)
        .open(&probe)
        .inspect_err(|_| {
            let _ = fs::remove_dir(&dir);
        })?;
    Ok(dir)
}

/// Kills the agents' cgroups below a worker's cgroup `dir` and removes them and `dir`;
/// returns how many processes were in them. Used for the cgroups of workers that are gone:
/// by the next worker, and by a worker's guard.
pub(crate) fn remove_worker_cgroup(dir: &Path) -> usize {
    let mut killed = 0;
    for agent in fs::read_dir(dir).into_iter().flatten().flatten() {
        if agent.path().is_dir() {
            killed += cgroup_pids(&agent.path()).len();
            kill_cgroup(&agent.path());
            let _ = fs::remove_dir(agent.path());
        }
    }
    let _ = fs::remove_dir(dir);
    killed
}

/// The directory of this process's cgroup v2 (from `/proc/self/cgroup` and the cgroup2 mount).
fn own_cgroup_dir() -> io::Result<PathBuf> {
    let cgroups = fs::read_to_string("/proc/self/cgroup")?;
    let path = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| io::Error::other("no cgroup v2 membership in /proc/self/cgroup"))?;
    let mounts = fs::read_to_string("/proc/self/mountinfo")?;
    // mountinfo: id parent major:minor root mount-point options... - fstype source options
    let mount = mounts
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(str::to_owned))?
        })
        .ok_or_else(|| io::Error::other("no cgroup2 file system is mounted"))?;
    let dir = Path::new(&mount).join(path.trim_start_matches('/'));
    if !dir.is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    Ok(dir)
}

/// Registers the pid of an agent the worker started (its owner task reaps it).
pub fn agent_started(pid: u32) {
    AGENTS.lock().expect("agents lock").insert(pid);
}

/// The agent `pid` was reaped by its owner task.
pub fn agent_reaped(pid: u32) {
    AGENTS.lock().expect("agents lock").remove(&pid);
}

/// Children of this process (re-parented to it, as its subreaper) other than its agents,
/// with whether each is a zombie.
fn adopted() -> Vec<(u32, bool)> {
    let me = std::process::id();
    let agents = AGENTS.lock().expect("agents lock").clone();
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if agents.contains(&pid) {
            continue;
        }
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name is in parentheses and may contain anything: parse after the last ')'.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let (Some(state), Some(ppid)) = (fields.next(), fields.next()) else {
            continue;
        };
        if ppid.parse::<u32>().ok() == Some(me) {
            found.push((pid, state == "Z"));
        }
    }
    found
}

/// Kills the re-parented descendants carrying `marker`, generation after generation, and
/// reaps them.
fn kill_marked(marker: &str) {
    let needle = format!("{SCOPE_VAR}={marker}\0");
    for _ in 0..SUBREAPER_ROUNDS {
        let marked: Vec<u32> = adopted()
            .into_iter()
            .filter(|(pid, zombie)| {
                !zombie
                    && fs::read(format!("/proc/{pid}/environ"))
                        .is_ok_and(|env| contains(&env, needle.as_bytes()))
            })
            .map(|(pid, _)| pid)
            .collect();
        if marked.is_empty() {
            return;
        }
        for pid in &marked {
            let _ = nix::sys::signal::kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
        for pid in marked {
            // A child of ours (re-parented to us) that we just killed.
            let _ = waitpid(Pid::from_raw(pid as i32), None);
        }
        tracing::info!(marker, "escaped_agent_processes_killed");
    }
}

/// Reaps adopted children that exited on their own (as a subreaper, their parent is now this
/// process, and nobody else will). Never an agent: each is reaped by its owner task.
pub fn reap_adopted() {
    for (pid, zombie) in adopted() {
        if zombie {
            // A zombie child of ours that is not one of our agents.
            let _ = waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG));
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    // The environment starts with a variable, or follows a NUL.
    haystack.starts_with(needle)
        || haystack
            .windows(needle.len() + 1)
            .any(|w| w[0] == 0 && &w[1..] == needle)
}
