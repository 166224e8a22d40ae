//! Everything about one agent process, from its command line to its reaped exit.
//!
//! - [`command`]: the agent's command line and environment for a session (contract §4).
//! - [`launcher`]: the [`launcher::Launcher`] interface and the real process launcher (no
//!   shell, own process group, death signal, two-phase readiness).
//! - [`output`]: reading its stdout and stderr, never blocking; start-up phases from its lines.
//! - [`log_list`]: shipping its output to `agent:<id>:logs`, batched and bounded.
//! - [`log_files`]: its per-session log file (`agent.log_dir`).
//! - [`containment`]: its whole process tree ends with its session (cgroup v2, or a subreaper).
//! - [`cgroup_guard`]: a process that removes the worker's agent cgroups once the worker is
//!   gone, however it died.
//! - [`spawn`]: starting it without forking the worker, waited for on a pidfd.
//! - [`supervisor`]: the agents of this process: launch with retries, one per session, exit.
//! - [`capacity`]: `agent.max_agents`: a full replica fetches no jobs.
//! - [`warm`]: a warm process (imports done, no session yet) and the handoff protocol.
//! - [`warm_pool`]: `agent.warm_pool`: idle warm processes per replica, refilled with back-off.

pub mod capacity;
pub mod cgroup_guard;
pub mod command;
pub mod containment;
pub mod launcher;
pub mod log_files;
pub mod log_list;
pub mod output;
pub mod spawn;
pub mod supervisor;
pub mod warm;
pub mod warm_pool;
