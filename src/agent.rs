//! Everything about one agent process, from its command line to its reaped exit.
//!
//! Listed bottom-up: each module uses only those above it in this list (and, outside it, the
//! session store and config, settings and metrics), so the graph has no cycle and can be read
//! from the top. The leaves hold the types several modules share, each named for what it is,
//! so that no two modules above them need each other for a type.
//!
//! Leaves:
//! - [`limits`]: per-agent resource limits, what an agent uses, the tree read from `/proc`.
//! - [`exit`]: how an agent process ended ([`exit::AgentExit`]), its memory limit included.
//! - [`phase`]: the start-up phases and what they are judged by ([`phase::Readiness`]).
//! - [`spawn`]: starting a process without forking the worker, waited for on a pidfd.
//! - [`spawner`]: a thread placed in an agent's cgroup v1 hierarchies ahead of its start.
//! - [`cgroup`]: cgroup v2 directories: the worker's, each agent's, their controllers and
//!   limits, killing and removing them.
//! - [`cgroup_v1`]: the v1 memory and pids hierarchies, for limits on hosts that still mount
//!   them.
//! - [`subreaper`]: the marker scan of re-parented descendants, and reaping adopted orphans.
//! - [`streak`]: a failure streak with back-off, for what the worker keeps running beside its
//!   agents (warm processes, the zygote).
//!
//! What an agent needs before and around its process:
//! - [`command`]: the agent's command line and environment for a session (contract §4).
//! - [`log_files`]: its per-session log file (`agent.log_dir`).
//! - [`log_list`]: shipping its output to `agent:<id>:logs`, batched and bounded.
//! - [`output`]: reading its stdout and stderr, never blocking; the phases from its lines.
//! - [`cgroup_guard`]: a process that removes the worker's agent cgroups once the worker is
//!   gone, however it died.
//! - [`containment`]: its whole process tree ends with its session (cgroup v2, or a subreaper).
//!
//! Launching: the three layers every start mode is built from, then the modes. A new mode (a
//! zygote's fork server) is one more module beside `cold` and `warm` that hands [`process`] its
//! child and [`startup`] what that returns, touching neither mode (see [`process`]).
//! - [`launcher`]: the [`launcher::Launcher`] interface the supervisor sees.
//! - [`startup`]: the readiness wait, two phases with their deadlines, for any start mode.
//! - [`process`]: the per-agent process owner: spawn or adopt a child, read its output, reap
//!   it, stop its group, end its containment.
//! - [`cold`]: the cold start mode, [`cold::ProcessLauncher`]: a new process per session.
//! - [`warm`]: a warm process (imports done, no session yet) and the handoff protocol.
//! - [`capacity`]: `agent.max_agents`: a full replica fetches no jobs.
//! - [`warm_pool`]: `agent.warm_pool`: idle warm processes per replica, refilled with back-off;
//!   the warm start mode, falling back to cold.
//! - [`zygote`]: the fork server (`agent.zygote_command`) and its protocol: one agent forked
//!   per request, handed to [`process`] as any child.
//! - [`zygote_launcher`]: the forked start mode: one zygote per replica, restarted with
//!   back-off and recycled, falling back to cold.
//!
//! Supervising:
//! - [`supervisor`]: the agents of this process: launch with retries, one per session, exit.

pub mod cgroup;
pub mod cgroup_v1;
pub mod exit;
pub mod limits;
pub mod phase;
pub mod spawn;
pub mod spawner;
pub mod streak;
pub mod subreaper;

pub mod cgroup_guard;
pub mod command;
pub mod containment;
pub mod log_files;
pub mod log_list;
pub mod output;

pub mod capacity;
pub mod cold;
pub mod launcher;
pub mod process;
pub mod startup;
pub mod warm;
pub mod warm_pool;
pub mod zygote;
pub mod zygote_launcher;

pub mod supervisor;
