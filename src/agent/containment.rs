//! Containing each agent's whole process tree: when its session ends, nothing it started
//! survives it, even a grandchild that left its process group with `setsid()`.
//!
//! The process group (SIGTERM, grace, SIGKILL to the group) reaches what stays in the group.
//! Beyond that, one of two mechanisms, chosen at start-up (`agent.containment`):
//! - **cgroup** (cgroup v2, where the worker may create cgroups below its own: a delegated
//!   systemd unit, a container given a writable cgroupfs, root on a host). Each agent runs in a
//!   cgroup of its own, `<worker's cgroup>/aw-<pid>-<rand>/p<n>`: the child is cloned into it
//!   (or moves itself there before it execs; see [`crate::agent::spawn::spawn_into`]), so
//!   everything it starts is born inside, `setsid()` or not. When the session ends, `cgroup.kill` takes the whole cgroup.
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
//!
//! Containment also carries each agent's resource limits ([`crate::agent::limits`]): with
//! cgroups, the agents' cgroups get the memory and pids controllers where the host allows
//! (cgroup v2, else the v1 hierarchies), and the scope reads their OOM kills and usage; without
//! them, the scope reads the agent's tree from `/proc`.
//!
//! The cgroups are made **ahead of the starts that use them**: creating one (and writing its
//! limits) takes cgroupfs's locks, so a pool of ready ones is kept full by a thread of its own,
//! and a start takes one that waits (named `p<n>`; the session is in the marker). With the
//! child cloned straight into its cgroup ([`crate::agent::spawn`]), a start touches cgroupfs
//! only to write itself into v1 hierarchies, where limits need them.
//!
//! This module chooses the mechanism and holds each agent's scope; the mechanisms themselves
//! are [`crate::agent::cgroup`], [`crate::agent::cgroup_v1`] and [`crate::agent::subreaper`]
//! (whose public functions are re-exported here, so the rest of the worker has one door to
//! containment).

use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
};

use agent_jobs::SessionId;
use serde::Deserialize;

pub use super::subreaper::{
    SCOPE_VAR, agent_reaped, agent_started, become_subreaper, is_subreaper, reap_adopted,
};
use super::{
    cgroup::{AgentCgroup, enable_controllers, worker_cgroup},
    cgroup_guard::Guard,
    cgroup_v1::{V1Cgroups, V1Roots},
    limits::{self, Enforcement, Limits, Usage},
    spawn::Placement,
    spawner::PlacedSpawner,
    subreaper::kill_marked,
};

/// Cgroups kept ready for the next starts: a burst of more takes the rest as it comes, made on
/// the spot.
const POOL_TARGET: usize = 4;

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

/// How this worker contains its agents, and holds their limits.
#[derive(Debug)]
pub struct Containment {
    mechanism: Mechanism,
    limits: Limits,
    enforcement: Enforcement,
    /// Agents' `oom_score_adj` (above the worker's).
    oom_score_adj: Option<i32>,
}

/// The mechanism in use.
#[derive(Debug)]
enum Mechanism {
    /// One cgroup per agent below the worker's own, watched by a guard where `agent-worker
    /// run` enabled one; prepared ahead by a pool.
    Cgroup {
        /// The pool of prepared cgroups.
        pool: Arc<Pool>,
        /// The process that removes the worker's cgroups once the worker is gone (held: its
        /// pipe closes when the worker does).
        _guard: Option<Guard>,
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

impl Containment {
    /// The process group alone, no limits: what a launcher has until it is told otherwise.
    pub fn process_group() -> Self {
        Self {
            mechanism: Mechanism::ProcessGroup,
            limits: Limits::default(),
            enforcement: Enforcement::Sampled,
            oom_score_adj: None,
        }
    }

    /// Chooses the mechanism for `setting`; `worker_id` names the worker's own cgroup. Kills the
    /// leftovers of workers that are gone (see the module docs). With cgroups, turns on what
    /// `limits` need and starts the pool of prepared cgroups.
    pub fn start(
        setting: ContainmentSetting,
        worker_id: &str,
        limits: Limits,
    ) -> Result<Self, NoCgroup> {
        let oom_score_adj = limits::agent_oom_score_adj();
        if matches!(
            setting,
            ContainmentSetting::Auto | ContainmentSetting::Cgroup
        ) {
            match worker_cgroup(worker_id) {
                Ok(dir) => {
                    let (enforcement, v1) = controllers(&dir, &limits);
                    let guard = Guard::start(&dir).unwrap_or_else(|error| {
                        // Still contained while the worker lives; a SIGKILL then leaves
                        // escaped processes to the next worker, as without a guard.
                        tracing::warn!(error = %error, "cgroup_guard_failed");
                        None
                    });
                    if let Some(guard) = &guard {
                        tracing::info!(pid = guard.pid(), cgroup = %dir.display(), "cgroup_guard_started");
                    }
                    let pool = Pool::start(dir, v1, limits, enforcement);
                    return Ok(Self {
                        mechanism: Mechanism::Cgroup {
                            pool,
                            _guard: guard,
                        },
                        limits,
                        enforcement,
                        oom_score_adj,
                    });
                }
                Err(error) if setting == ContainmentSetting::Cgroup => {
                    return Err(NoCgroup(error.to_string()));
                }
                Err(error) => tracing::debug!(error = %error, "agent_cgroups_unavailable"),
            }
        }
        let mechanism = if setting != ContainmentSetting::ProcessGroup && is_subreaper() {
            Mechanism::Subreaper
        } else {
            Mechanism::ProcessGroup
        };
        Ok(Self {
            mechanism,
            limits,
            enforcement: Enforcement::Sampled,
            oom_score_adj,
        })
    }

    /// The name of the mechanism, as logged.
    pub fn name(&self) -> &'static str {
        match self.mechanism {
            Mechanism::Cgroup { .. } => "cgroup",
            Mechanism::Subreaper => "subreaper",
            Mechanism::ProcessGroup => "process-group",
        }
    }

    /// How the limits are enforced.
    pub fn enforcement(&self) -> Enforcement {
        self.enforcement
    }

    /// The agents' limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Prepares the scope of one agent before it is spawned: a cgroup (if cgroups are in use:
    /// a prepared one, with its limits) and its marker, named `name` (a session's id, or for a
    /// warm process a name no session id can take: see [`crate::agent::warm_pool`]). A cgroup
    /// that cannot be had is warned about; the agent then runs with its marker only.
    pub fn prepare(&self, worker_id: &str, name: &str) -> AgentScope {
        let marker = format!("{worker_id}/{name}");
        let cgroups = match &self.mechanism {
            Mechanism::Cgroup { pool, .. } => match pool.take() {
                Ok(prepared) => Some(prepared),
                Err(error) => {
                    tracing::warn!(scope = name, error = %error, "agent_cgroup_failed");
                    None
                }
            },
            _ => None,
        };
        AgentScope {
            marker,
            cgroups,
            kernel_memory: self.enforcement.kernel_memory(),
            oom_score_adj: self.oom_score_adj,
        }
    }

    /// Kills whatever is left of an agent's tree once the agent has exited and its process
    /// group was killed; blocking (a few system calls, a short wait for a cgroup to empty).
    pub fn end(&self, scope: AgentScope) {
        if let Some(cgroups) = scope.cgroups {
            cgroups.kill_and_remove();
        } else if matches!(self.mechanism, Mechanism::Subreaper) {
            kill_marked(&scope.marker);
        }
    }

    /// Removes the worker's own (emptied) cgroups at a clean exit, the prepared ones first.
    pub fn close(&self) {
        if let Mechanism::Cgroup { pool, .. } = &self.mechanism {
            pool.close();
        }
    }
}

/// What the limits get on a worker with cgroups: the v2 controllers if they can be turned on,
/// else the v1 hierarchies the host has, else sampling (logged once, with why).
fn controllers(dir: &Path, limits: &Limits) -> (Enforcement, Option<V1Roots>) {
    if !limits.any() {
        return (Enforcement::Sampled, None);
    }
    let v2 = match enable_controllers(dir) {
        Ok(()) => return (Enforcement::CgroupV2, None),
        Err(reason) => reason,
    };
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    match name
        .as_deref()
        .and_then(|name| V1Roots::create(name, limits))
    {
        Some(v1) => {
            let (memory, pids) = v1.in_use();
            tracing::info!(memory, pids, why_not_v2 = %v2, "agent_limits_cgroup_v1");
            (Enforcement::CgroupV1 { memory, pids }, Some(v1))
        }
        None => {
            tracing::warn!(
                why = %v2,
                "agent_limits_sampled: no memory or pids cgroup controller; memory_max is \
                 enforced by sampling, pids_max not at all"
            );
            (Enforcement::Sampled, None)
        }
    }
}

/// One agent's cgroups: its v2 cgroup and, with v1 limits, its v1 ones with the thread that
/// will spawn it inside them ([`PlacedSpawner`]).
#[derive(Debug)]
struct Prepared {
    cgroup: AgentCgroup,
    v1: Option<V1Cgroups>,
    spawner: Option<PlacedSpawner>,
}

impl Prepared {
    fn kill_and_remove(self) {
        // The v2 cgroup holds the whole tree: once it is empty, so are the v1 ones but for the
        // spawner thread, which may end now that its agent is gone (dropping it waits).
        self.cgroup.kill_and_remove();
        drop(self.spawner);
        if let Some(v1) = self.v1 {
            v1.remove();
        }
    }
}

/// Cgroups made ahead of the starts that take them, by a thread of their own.
#[derive(Debug)]
struct Pool {
    dir: PathBuf,
    v1: Option<V1Roots>,
    limits: Limits,
    enforcement: Enforcement,
    state: Mutex<PoolState>,
    wanted: Condvar,
}

#[derive(Debug, Default)]
struct PoolState {
    ready: Vec<Prepared>,
    next: u64,
    closed: bool,
}

impl Pool {
    fn start(
        dir: PathBuf,
        v1: Option<V1Roots>,
        limits: Limits,
        enforcement: Enforcement,
    ) -> Arc<Self> {
        let pool = Arc::new(Self {
            dir,
            v1,
            limits,
            enforcement,
            state: Mutex::new(PoolState::default()),
            wanted: Condvar::new(),
        });
        let filler = pool.clone();
        let spawned = std::thread::Builder::new()
            .name("cgroup-pool".into())
            .spawn(move || filler.fill());
        if let Err(error) = spawned {
            tracing::warn!(error = %error, "cgroup_pool_not_started");
        }
        pool
    }

    /// A prepared cgroup, or one made now if none is ready.
    fn take(&self) -> io::Result<Prepared> {
        let taken = {
            let mut state = self.state.lock().expect("pool lock");
            let taken = state.ready.pop();
            self.wanted.notify_one();
            taken
        };
        match taken {
            Some(prepared) => Ok(prepared),
            None => self.make(),
        }
    }

    /// One cgroup with its limits, named `p<n>`.
    fn make(&self) -> io::Result<Prepared> {
        let name = {
            let mut state = self.state.lock().expect("pool lock");
            state.next += 1;
            format!("p{}", state.next)
        };
        let cgroup = AgentCgroup::create(&self.dir, &name)?;
        if self.enforcement == Enforcement::CgroupV2 {
            cgroup.write_limits(&self.limits)?;
        }
        let v1 = match &self.v1 {
            Some(roots) => Some(roots.agent(&name, &self.limits)?),
            None => None,
        };
        // Without one, the child writes itself into the v1 cgroups at its start.
        let home = self
            .v1
            .as_ref()
            .map(V1Roots::home_tasks)
            .unwrap_or_default();
        let spawner = v1
            .as_ref()
            .and_then(|v1| PlacedSpawner::start(v1.tasks(), home).ok());
        Ok(Prepared {
            cgroup,
            v1,
            spawner,
        })
    }

    /// The filler thread: keeps [`POOL_TARGET`] ready until closed.
    fn fill(&self) {
        loop {
            {
                let mut state = self.state.lock().expect("pool lock");
                while !state.closed && state.ready.len() >= POOL_TARGET {
                    state = self.wanted.wait(state).expect("pool lock");
                }
                if state.closed {
                    return;
                }
            }
            match self.make() {
                Ok(prepared) => {
                    let mut state = self.state.lock().expect("pool lock");
                    if state.closed {
                        drop(state);
                        prepared.kill_and_remove();
                        return;
                    }
                    state.ready.push(prepared);
                }
                Err(error) => {
                    // Starts make their own meanwhile; look again later.
                    tracing::debug!(error = %error, "cgroup_pool_fill_failed");
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
        }
    }

    /// Stops the filler and removes the prepared cgroups and the worker's directories.
    fn close(&self) {
        let ready = {
            let mut state = self.state.lock().expect("pool lock");
            state.closed = true;
            self.wanted.notify_all();
            std::mem::take(&mut state.ready)
        };
        for prepared in ready {
            prepared.kill_and_remove();
        }
        let _ = std::fs::remove_dir(&self.dir);
        if let Some(v1) = &self.v1 {
            v1.close();
        }
    }
}

/// One agent's containment, from before its spawn to after its exit.
#[derive(Debug)]
pub struct AgentScope {
    marker: String,
    cgroups: Option<Prepared>,
    /// Whether its cgroups enforce the memory limits (else it is sampled).
    kernel_memory: bool,
    oom_score_adj: Option<i32>,
}

impl AgentScope {
    /// The marker its environment carries (`AGENT_WORKER_SCOPE`).
    pub fn marker(&self) -> &str {
        &self.marker
    }

    /// Where its process goes before it execs: its cgroups, its OOM score. The v1 cgroups
    /// are left out when its spawner thread is in them already.
    pub fn placement(&self) -> Placement {
        let cgroup = self.cgroups.as_ref().map(|c| &c.cgroup);
        let v1 = self
            .cgroups
            .as_ref()
            .filter(|c| c.spawner.is_none())
            .and_then(|c| c.v1.as_ref());
        Placement {
            cgroup_dir: cgroup.map(AgentCgroup::dir_fd),
            cgroup_procs: cgroup.map(AgentCgroup::procs),
            v1_procs: v1.map_or([None; 2], V1Cgroups::procs),
            oom_score_adj: self.oom_score_adj,
        }
    }

    /// `cgroup.procs` of every cgroup of its (v2 and v1), for a process started elsewhere (a
    /// zygote's child) to write itself into.
    pub fn all_procs(&self) -> Vec<std::os::fd::RawFd> {
        let Some(cgroups) = &self.cgroups else {
            return Vec::new();
        };
        let v1 = cgroups.v1.as_ref().map_or([None; 2], V1Cgroups::procs);
        std::iter::once(cgroups.cgroup.procs())
            .chain(v1.into_iter().flatten())
            .collect()
    }

    /// The thread that spawns it inside its v1 cgroups, if it has one.
    pub(crate) fn spawner(&self) -> Option<&PlacedSpawner> {
        self.cgroups.as_ref()?.spawner.as_ref()
    }

    /// The child could not move into the cgroup: what is left of its tree is found by marker.
    pub fn cgroup_refused(&mut self, error: &io::Error, id: &SessionId) {
        if let Some(cgroups) = self.cgroups.take() {
            tracing::warn!(session_id = %id, error = %error, "agent_cgroup_failed");
            cgroups.kill_and_remove();
        }
    }

    /// Whether the kernel enforces its memory limits (else the owner samples its tree).
    pub fn kernel_memory(&self) -> bool {
        self.kernel_memory && self.cgroups.is_some()
    }

    /// OOM kills in its cgroup so far, and how often it went over `memory.high` (cgroup v2).
    pub fn memory_events(&self) -> (u64, u64) {
        let Some(cgroups) = &self.cgroups else {
            return (0, 0);
        };
        let (v2_kills, high) = cgroups.cgroup.memory_events();
        let v1_kills = cgroups.v1.as_ref().map_or(0, V1Cgroups::oom_kills);
        (v2_kills + v1_kills, high)
    }

    /// What its tree uses now, `previous` carrying the peak: from its cgroups where they
    /// count it (memory with a memory controller, CPU from cgroup v2's `cpu.stat`), the rest
    /// from `/proc` (its processes: its cgroup's, else the tree of `pid`); `precise` asks for
    /// PSS (see [`limits::tree_usage`]). Blocking (file reads).
    pub fn usage(&self, pid: u32, previous: Option<Usage>, precise: bool) -> Usage {
        let cgroups = self.cgroups.as_ref();
        let memory = cgroups.and_then(|c| {
            c.cgroup
                .memory()
                .or_else(|| c.v1.as_ref().and_then(V1Cgroups::memory))
        });
        let cpu = cgroups.and_then(|c| c.cgroup.cpu_seconds());
        let (memory, peak, cpu) = match (memory, cpu) {
            (Some((memory, peak)), Some(cpu)) => (memory, peak, cpu),
            (memory, cpu) => {
                let pids = match cgroups {
                    Some(c) => c.cgroup.pids(),
                    None => limits::tree(pid),
                };
                let (tree_memory, tree_cpu) = limits::tree_usage(&pids, precise);
                let (memory, peak) = memory.unwrap_or((tree_memory, 0));
                (memory, peak, cpu.unwrap_or(tree_cpu))
            }
        };
        Usage::after(previous, memory, peak, cpu)
    }
}
