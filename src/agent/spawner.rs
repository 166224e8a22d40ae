//! A thread placed in an agent's cgroup v1 hierarchies ahead of its start, so that the agent
//! is born in them without a write to `cgroup.procs` at start time.
//!
//! A process joins a v1 cgroup by writing to its `cgroup.procs`, which takes a global lock
//! whose writers wait for an RCU grace period: on this project's test machine (v1 memory and
//! pids, cgroup v2 without controllers) that was ~12 ms of the p99 of a start. v1, unlike v2,
//! lets a single thread join a cgroup (`tasks`), and a child is born in the cgroups of the
//! thread that clones it. So the pool of prepared cgroups ([`crate::agent::containment`])
//! prepares, with each agent's cgroups, a thread already in them; the start hands that thread
//! the spawn ([`spawn_raw`]), and the write happened long before.
//!
//! The thread lives as long as its agent: the death signal (`PR_SET_PDEATHSIG`) follows the
//! thread that cloned the agent, and must fire only with the worker. Dropping the spawner
//! (once the agent has been reaped) ends the thread. Right after the spawn it leaves the
//! agent's memory cgroup for the worker's own: a thread of the worker inside an agent's memory
//! cgroup would make the worker a candidate of that cgroup's OOM killer. It stays in the pids
//! cgroup (one of `pids.max`): every write to a cgroup's `tasks` or `cgroup.procs` stalls
//! every fork on the host for a moment (see above), so it makes as few as it can.

use std::{io, path::PathBuf, sync::mpsc, thread};

use super::spawn::{Placement, RawChild, Stdin, spawn_raw};

/// What a spawn needs, owned (it crosses to the spawner's thread).
pub(crate) struct SpawnJob {
    /// The program.
    pub(crate) program: String,
    /// Its arguments.
    pub(crate) args: Vec<String>,
    /// Environment additions.
    pub(crate) env: Vec<(String, String)>,
    /// Its cgroup v2 placement and OOM score (the v1 cgroups are the thread's).
    pub(crate) placement: Placement,
    /// What it reads.
    pub(crate) stdin: Stdin,
}

type Job = (SpawnJob, mpsc::SyncSender<io::Result<RawChild>>);

/// A thread in an agent's v1 cgroups, waiting to spawn it (see the module docs).
#[derive(Debug)]
pub(crate) struct PlacedSpawner {
    /// `None` once dropped (see `Drop`).
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl PlacedSpawner {
    /// Starts a thread and moves it into the cgroups whose `tasks` files are `tasks` (it
    /// writes its own thread id there), to go back to `home` (the worker's own cgroups' `tasks`)
    /// once it has spawned; fails if it cannot.
    pub(crate) fn start(tasks: Vec<PathBuf>, home: Vec<PathBuf>) -> io::Result<Self> {
        let (jobs, incoming) = mpsc::channel::<Job>();
        let (placed_tx, placed_rx) = mpsc::sync_channel(1);
        let thread = thread::Builder::new()
            .name("agent-spawner".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let tid = nix::unistd::gettid().to_string();
                let placed = tasks
                    .iter()
                    .try_for_each(|file| std::fs::write(file, &tid));
                let ok = placed.is_ok();
                let _ = placed_tx.send(placed);
                if !ok {
                    return;
                }
                // Serves the one spawn, then waits (blocked, no CPU) until its agent is gone.
                for (job, reply) in incoming {
                    let spawned = spawn_raw(
                        &job.program,
                        &job.args,
                        &job.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>(),
                        &job.placement,
                        job.stdin,
                    );
                    let _ = reply.send(spawned);
                    for file in &home {
                        if let Err(error) = std::fs::write(file, &tid) {
                            tracing::warn!(error = %error, file = %file.display(), "agent_spawner_not_home");
                        }
                    }
                }
            })?;
        placed_rx
            .recv()
            .map_err(|_| io::Error::other("the spawner thread ended"))??;
        Ok(Self {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Spawns `job` on the thread; blocks the caller for the spawn (a clone and exec, as an
    /// inline spawn would).
    pub(crate) fn spawn(&self, job: SpawnJob) -> io::Result<RawChild> {
        let (reply, result) = mpsc::sync_channel(1);
        self.jobs
            .as_ref()
            .expect("not dropped")
            .send((job, reply))
            .map_err(|_| io::Error::other("the spawner thread ended"))?;
        result
            .recv()
            .map_err(|_| io::Error::other("the spawner thread ended"))?
    }
}

impl Drop for PlacedSpawner {
    /// Ends the thread and waits for it: only then has it left its cgroups, which can then
    /// be removed. Call only once its agent is gone (its death signal follows the thread).
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
