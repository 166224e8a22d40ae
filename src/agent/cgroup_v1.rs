//! The cgroup v1 memory and pids hierarchies: per-agent limits on hosts that still mount them
//! (a "hybrid" layout, where cgroup v2 has no controllers of its own).
//!
//! Containment itself stays on cgroup v2 (one cgroup per agent, `cgroup.kill`): these
//! hierarchies only carry the limits. Each agent gets a cgroup in each hierarchy the host has,
//! `<hierarchy>/<the worker's own path>/aw-<pid>-<rand>/<agent>`, with
//! `memory.limit_in_bytes` and `memory.memsw.limit_in_bytes` (so the limit is not dodged into
//! swap, where swap is accounted) and `pids.max`; the child writes itself into each before it
//! execs (v1 has no `CLONE_INTO_CGROUP`). v1 has no `memory.high`: that limit is watched by
//! sampling `memory.usage_in_bytes`. OOM kills are counted in `memory.oom_control`
//! (`oom_kill`, Linux 4.13).
//!
//! A leaf, like [`super::cgroup`]: file-system operations on cgroupfs only.

use std::{
    fs, io,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
};

use nix::{sys::signal::Signal, unistd::Pid};

use super::{cgroup::field, limits::Limits};

/// The worker's own directories in the v1 hierarchies it may use.
#[derive(Debug)]
pub(crate) struct V1Roots {
    memory: Option<PathBuf>,
    pids: Option<PathBuf>,
}

impl V1Roots {
    /// Creates the worker's directory `name` (`aw-<pid>-<rand>`) in the memory and pids
    /// hierarchies that `limits` need, where this process may (after removing those of workers
    /// that are gone); `None` when none can be had.
    pub(crate) fn create(name: &str, limits: &Limits) -> Option<Self> {
        let memory = limits.memory_max.is_some() || limits.memory_high.is_some();
        let roots = Self {
            memory: memory.then(|| worker_dir("memory", name)).flatten(),
            pids: limits
                .pids_max
                .is_some()
                .then(|| worker_dir("pids", name))
                .flatten(),
        };
        (roots.memory.is_some() || roots.pids.is_some()).then_some(roots)
    }

    /// The `tasks` file of the worker's own memory cgroup (the parent of its directory),
    /// where a spawner thread goes back to: a thread of the worker in an agent's memory cgroup
    /// would make the worker a candidate of its OOM killer. (In an agent's pids cgroup it only
    /// counts one of `pids.max`, and leaving would cost another write: it stays.)
    pub(crate) fn home_tasks(&self) -> Vec<PathBuf> {
        self.memory
            .iter()
            .filter_map(|dir| Some(dir.parent()?.join("tasks")))
            .collect()
    }

    /// Which hierarchies are in use: (memory, pids).
    pub(crate) fn in_use(&self) -> (bool, bool) {
        (self.memory.is_some(), self.pids.is_some())
    }

    /// The cgroups of one agent, `name`, with `limits` written.
    pub(crate) fn agent(&self, name: &str, limits: &Limits) -> io::Result<V1Cgroups> {
        let memory = match &self.memory {
            Some(root) => {
                let cgroup = V1Cgroup::create(root, name)?;
                if let Some(max) = limits.memory_max {
                    fs::write(cgroup.dir.join("memory.limit_in_bytes"), max.to_string())?;
                    // After the memory limit (memsw must not be below it); absent without
                    // swap accounting.
                    match fs::write(
                        cgroup.dir.join("memory.memsw.limit_in_bytes"),
                        max.to_string(),
                    ) {
                        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
                        _ => {}
                    }
                }
                Some(cgroup)
            }
            None => None,
        };
        let pids = match (&self.pids, limits.pids_max) {
            (Some(root), Some(max)) => {
                let cgroup = V1Cgroup::create(root, name)?;
                fs::write(cgroup.dir.join("pids.max"), max.to_string())?;
                Some(cgroup)
            }
            _ => None,
        };
        Ok(V1Cgroups { memory, pids })
    }

    /// Removes the worker's (empty) directories at a clean exit.
    pub(crate) fn close(&self) {
        for dir in [&self.memory, &self.pids].into_iter().flatten() {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// One agent's cgroups in the v1 hierarchies.
#[derive(Debug)]
pub(crate) struct V1Cgroups {
    memory: Option<V1Cgroup>,
    pids: Option<V1Cgroup>,
}

impl V1Cgroups {
    /// `cgroup.procs` of each, open for writing, for the child to write itself into.
    pub(crate) fn procs(&self) -> [Option<RawFd>; 2] {
        [&self.memory, &self.pids].map(|c| c.as_ref().map(|c| c.procs.as_raw_fd()))
    }

    /// The `tasks` file of each (a thread joins a v1 cgroup on its own through it).
    pub(crate) fn tasks(&self) -> Vec<PathBuf> {
        [&self.memory, &self.pids]
            .into_iter()
            .flatten()
            .map(|c| c.dir.join("tasks"))
            .collect()
    }

    /// Processes the OOM killer killed in the memory cgroup.
    pub(crate) fn oom_kills(&self) -> u64 {
        self.memory.as_ref().map_or(0, |c| {
            field(
                &fs::read_to_string(c.dir.join("memory.oom_control")).unwrap_or_default(),
                "oom_kill",
            )
        })
    }

    /// Memory now and at its peak, if there is a memory cgroup.
    pub(crate) fn memory(&self) -> Option<(u64, u64)> {
        let dir = &self.memory.as_ref()?.dir;
        let read = |file: &str| -> Option<u64> {
            fs::read_to_string(dir.join(file)).ok()?.trim().parse().ok()
        };
        Some((
            read("memory.usage_in_bytes")?,
            read("memory.max_usage_in_bytes").unwrap_or(0),
        ))
    }

    /// Kills what is left in them and removes them (their processes are normally gone with
    /// the agent's v2 cgroup already).
    pub(crate) fn remove(self) {
        for cgroup in [self.memory, self.pids].into_iter().flatten() {
            kill_all(&cgroup.dir);
            let _ = fs::remove_dir(&cgroup.dir);
        }
    }
}

#[derive(Debug)]
struct V1Cgroup {
    dir: PathBuf,
    procs: OwnedFd,
}

impl V1Cgroup {
    fn create(root: &Path, name: &str) -> io::Result<Self> {
        let dir = root.join(name);
        match fs::create_dir(&dir) {
            Err(error) if error.kind() != io::ErrorKind::AlreadyExists => return Err(error),
            _ => {}
        }
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))?;
        Ok(Self {
            dir,
            procs: procs.into(),
        })
    }
}

/// The worker's directory `name` in the v1 hierarchy of `controller`, if this process may
/// create one there and move processes into it.
fn worker_dir(controller: &str, name: &str) -> Option<PathBuf> {
    let own = own_dir(controller)?;
    remove_stale(&own);
    let dir = own.join(name);
    fs::create_dir(&dir).ok()?;
    let writable = fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))
        .is_ok();
    if !writable {
        let _ = fs::remove_dir(&dir);
        return None;
    }
    Some(dir)
}

/// This process's cgroup directory in the v1 hierarchy of `controller`: its mount point
/// (from `/proc/self/mountinfo`) joined with the path `/proc/self/cgroup` gives (relative to
/// the mount's root, which is not `/` in a container).
fn own_dir(controller: &str) -> Option<PathBuf> {
    let cgroups = fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroups.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == controller)
            .then_some(path)
    })?;
    let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let (root, mount_point) = mounts.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut right = right.split_whitespace();
        let (fstype, _source, options) = (right.next()?, right.next()?, right.next()?);
        if fstype != "cgroup" || !options.split(',').any(|o| o == controller) {
            return None;
        }
        let mut left = left.split_whitespace();
        let root = left.nth(3)?.to_owned();
        Some((root, left.next()?.to_owned()))
    })?;
    let relative = path
        .strip_prefix(root.trim_end_matches('/'))
        .unwrap_or(path);
    let dir = Path::new(&mount_point).join(relative.trim_start_matches('/'));
    dir.is_dir().then_some(dir)
}

/// Removes the directories of workers that are gone (`aw-<pid>-<rand>` whose pid is not
/// alive): what a SIGKILLed worker left (its guard kills their processes through cgroup v2).
fn remove_stale(own: &Path) {
    for entry in fs::read_dir(own).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("aw-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        if nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok() || !entry.path().is_dir() {
            continue;
        }
        for agent in fs::read_dir(entry.path()).into_iter().flatten().flatten() {
            kill_all(&agent.path());
            let _ = fs::remove_dir(agent.path());
        }
        let _ = fs::remove_dir(entry.path());
    }
}

/// SIGKILLs every process in the cgroup at `dir`, never the worker (whose spawner thread may
/// still be there: `cgroup.procs` lists the process of every thread).
fn kill_all(dir: &Path) {
    let me = std::process::id() as i32;
    let pids = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in pids
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .filter(|pid| *pid != me)
    {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}
