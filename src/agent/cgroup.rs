//! cgroup v2 directories, as containment uses them: the worker's own cgroup below the
//! process's (`aw-<pid>-<rand>`), one cgroup per agent below that, and killing and removing
//! them (`cgroup.kill`, or one process at a time before Linux 5.14).
//!
//! A leaf: plain file-system operations on cgroupfs, with nothing of the agent's. Containment
//! ([`crate::agent::containment`]) uses it while the worker lives, and the cgroup guard
//! ([`crate::agent::cgroup_guard`]) once it is gone. Per-agent resource limits (`memory.max`,
//! `memory.swap.max`, `memory.high`, `pids.max`) are files of an `AgentCgroup`'s directory,
//! written before its agent starts, once the worker's cgroup passes the memory and pids
//! controllers down (`enable_controllers`); the OOM kills and the usage are read from the
//! same directory.

use std::{
    fs, io,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    time::Duration,
};

use nix::{sys::signal::Signal, unistd::Pid};

use super::limits::Limits;

/// How long an ended agent's cgroup may take to empty after `cgroup.kill`.
const CGROUP_EMPTY_WAIT: Duration = Duration::from_secs(2);

/// One agent's cgroup, from before its spawn to after its exit. Dropping it removes the
/// directory, which only works once it is empty.
#[derive(Debug)]
pub(crate) struct AgentCgroup {
    dir: PathBuf,
    procs: OwnedFd,
    /// The directory itself, for `clone3(CLONE_INTO_CGROUP)`.
    dir_fd: OwnedFd,
}

impl AgentCgroup {
    /// Creates (or reuses) the cgroup `name` below the worker's cgroup `root`, and opens its
    /// `cgroup.procs` for the child to move itself in.
    pub(crate) fn create(root: &Path, name: &str) -> io::Result<Self> {
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
        let dir_fd = fs::File::open(&dir)?;
        Ok(Self {
            dir,
            procs: procs.into(),
            dir_fd: dir_fd.into(),
        })
    }

    /// `cgroup.procs`, open for writing: writing `0` there moves the writer in.
    pub(crate) fn procs(&self) -> RawFd {
        self.procs.as_raw_fd()
    }

    /// The cgroup's directory, open: a child cloned with `CLONE_INTO_CGROUP` starts inside.
    pub(crate) fn dir_fd(&self) -> RawFd {
        self.dir_fd.as_raw_fd()
    }

    /// Writes `limits` (the controllers must be on: [`enable_controllers`]). Swap is turned
    /// off with the memory limit, or the tree would dodge it into swap; a host without swap
    /// accounting has no `memory.swap.max`, which is fine.
    pub(crate) fn write_limits(&self, limits: &Limits) -> io::Result<()> {
        if let Some(max) = limits.memory_max {
            fs::write(self.dir.join("memory.max"), max.to_string())?;
            match fs::write(self.dir.join("memory.swap.max"), "0") {
                Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
                _ => {}
            }
        }
        if let Some(high) = limits.memory_high {
            fs::write(self.dir.join("memory.high"), high.to_string())?;
        }
        if let Some(pids) = limits.pids_max {
            fs::write(self.dir.join("pids.max"), pids.to_string())?;
        }
        Ok(())
    }

    /// `oom_kill` and `high` of `memory.events`: processes the OOM killer killed in it, and
    /// how often it went over `memory.high`.
    pub(crate) fn memory_events(&self) -> (u64, u64) {
        let events = fs::read_to_string(self.dir.join("memory.events")).unwrap_or_default();
        (field(&events, "oom_kill"), field(&events, "high"))
    }

    /// Memory now and at its peak (`memory.peak`, Linux 5.19; else none), with the memory
    /// controller on.
    pub(crate) fn memory(&self) -> Option<(u64, u64)> {
        let read = |file: &str| fs::read_to_string(self.dir.join(file)).ok();
        let current = read("memory.current")?.trim().parse().ok()?;
        let peak = read("memory.peak")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0);
        Some((current, peak))
    }

    /// CPU seconds of everything that ran in it (`cpu.stat`'s `usage_usec`, there without the
    /// cpu controller too), if readable.
    pub(crate) fn cpu_seconds(&self) -> Option<f64> {
        let stat = fs::read_to_string(self.dir.join("cpu.stat")).ok()?;
        stat.contains("usage_usec")
            .then(|| field(&stat, "usage_usec") as f64 / 1e6)
    }

    /// The processes in it: the agent's whole tree, escaped ones included.
    pub(crate) fn pids(&self) -> Vec<u32> {
        cgroup_pids(&self.dir)
    }

    /// Kills what is in it; dropping it then removes it.
    pub(crate) fn kill_and_remove(self) {
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

/// The value of `name` in a flat-keyed cgroup file (`name value` lines); 0 when absent.
pub(crate) fn field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

/// The controllers per-agent limits need.
const LIMIT_CONTROLLERS: [&str; 2] = ["memory", "pids"];

/// Turns the memory and pids controllers on for the agents' cgroups below the worker's
/// cgroup `dir`, or says why that cannot be.
///
/// cgroup v2 passes a controller down only through every `cgroup.subtree_control` on the way,
/// and a cgroup with processes in it cannot pass any down (the no-internal-process rule). The
/// worker's cgroup has no processes of its own; the cgroup it was started in has the worker.
/// When that one does not pass them down yet, and the worker is alone in it (a systemd unit
/// with `Delegate=yes`), the worker moves itself into a leaf (`aw-self-<pid>`) and turns them
/// on there, as systemd asks delegated services to do. With other processes beside it (a
/// container's init), it does not move them: the caller falls back.
pub(crate) fn enable_controllers(dir: &Path) -> Result<(), String> {
    let wanted = || format!("+{}", LIMIT_CONTROLLERS.join(" +"));
    let has = |dir: &Path, file: &str| {
        let listed = fs::read_to_string(dir.join(file)).unwrap_or_default();
        let listed: Vec<&str> = listed.split_whitespace().collect();
        LIMIT_CONTROLLERS.iter().all(|c| listed.contains(c))
    };
    if !has(dir, "cgroup.controllers") {
        let own = dir.parent().ok_or("the worker's cgroup has no parent")?;
        if !has(own, "cgroup.controllers") {
            return Err(format!(
                "the cgroup {} has no memory and pids controllers (they are not delegated, or the \
                 host mounts them as cgroup v1)",
                own.display()
            ));
        }
        if fs::write(own.join("cgroup.subtree_control"), wanted()).is_err() {
            move_self_to_leaf(own)?;
            fs::write(own.join("cgroup.subtree_control"), wanted())
                .map_err(|e| format!("{}: cgroup.subtree_control: {e}", own.display()))?;
        }
    }
    fs::write(dir.join("cgroup.subtree_control"), wanted())
        .map_err(|e| format!("{}: cgroup.subtree_control: {e}", dir.display()))
}

/// Moves this process into a leaf below `own`, when it is the only process there.
fn move_self_to_leaf(own: &Path) -> Result<(), String> {
    let me = std::process::id();
    let others: Vec<u32> = cgroup_pids(own)
        .into_iter()
        .filter(|pid| *pid != me)
        .collect();
    if !others.is_empty() {
        return Err(format!(
            "other processes share the worker's cgroup {} ({others:?}), so it cannot pass the \
             memory and pids controllers down",
            own.display()
        ));
    }
    let leaf = own.join(format!("aw-self-{me}"));
    match fs::create_dir(&leaf) {
        Err(error) if error.kind() != io::ErrorKind::AlreadyExists => {
            return Err(format!("{}: {error}", leaf.display()));
        }
        _ => {}
    }
    fs::write(leaf.join("cgroup.procs"), me.to_string())
        .map_err(|e| format!("{}: {e}", leaf.display()))
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
pub(crate) fn worker_cgroup(worker_id: &str) -> io::Result<PathBuf> {
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
