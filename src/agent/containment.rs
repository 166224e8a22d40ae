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
//!
//! This module chooses the mechanism and holds each agent's scope; the mechanisms themselves
//! are [`crate::agent::cgroup`] and [`crate::agent::subreaper`] (whose public functions are
//! re-exported here, so the rest of the worker has one door to containment).

use std::{io, path::PathBuf};

use agent_jobs::SessionId;
use serde::Deserialize;

pub use super::subreaper::{
    SCOPE_VAR, agent_reaped, agent_started, become_subreaper, is_subreaper, reap_adopted,
};
use super::{
    cgroup::{AgentCgroup, worker_cgroup},
    cgroup_guard::Guard,
    subreaper::kill_marked,
};

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
            let _ = std::fs::remove_dir(dir);
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
        self.cgroup.as_ref().map(AgentCgroup::procs)
    }

    /// The child could not move into the cgroup: what is left of its tree is found by marker.
    pub fn cgroup_refused(&mut self, error: &io::Error, id: &SessionId) {
        if let Some(cgroup) = self.cgroup.take() {
            tracing::warn!(session_id = %id, error = %error, "agent_cgroup_failed");
            cgroup.kill_and_remove();
        }
    }
}
