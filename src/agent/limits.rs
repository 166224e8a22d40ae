//! Per-agent resource limits over the agent's whole process tree (`agent.memory_max`,
//! `agent.memory_high`, `agent.pids_max`), and what an agent uses.
//!
//! Where the agent has a cgroup with the memory and pids controllers, the kernel enforces the
//! limits at once: cgroup v2 (`memory.max` with `memory.swap.max = 0` so the limit is not
//! dodged into swap, `memory.high`, `pids.max`) or, on hosts that still mount them as v1
//! hierarchies, v1's `memory.limit_in_bytes` (with `memory.memsw.limit_in_bytes`) and
//! `pids.max` ([`crate::agent::cgroup`], [`crate::agent::cgroup_v1`]). The process owner reads
//! the cgroup's OOM kills: one that killed the agent (or after which it failed) ends its
//! session with the limit as the reason ([`super::exit::AgentExit::MemoryLimit`]); one that
//! killed only a helper, while the agent goes on, is logged and counted.
//!
//! Without such a cgroup, the owner samples the tree every `agent.limits_interval` (the
//! agent and every descendant, and what is left in its process group: PSS where
//! `smaps_rollup` is readable, else RSS) and SIGKILLs the tree over `memory_max`. `pids_max`
//! has no such fallback: only a pids controller can make a fork fail.
//!
//! Either way, the same reading gives the agent's current memory and CPU time
//! ([`Usage`]), which the heartbeat writes to `agent:<id>:health` and the console shows.

use std::{collections::HashMap, fs, time::Duration};

use crate::settings::{AgentSettings, ByteSize};

/// The limits of each agent, from `[agent]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Hard memory limit of the tree, in bytes.
    pub memory_max: Option<u64>,
    /// Soft memory limit (reclaim pressure, one warning), in bytes.
    pub memory_high: Option<u64>,
    /// Processes and threads of the tree at once.
    pub pids_max: Option<u64>,
    /// How often the agent's usage is read (and, without a cgroup, the limit enforced).
    pub interval: Duration,
}

impl Default for Limits {
    /// No limits; usage read every second (the default `agent.limits_interval`).
    fn default() -> Self {
        Self {
            memory_max: None,
            memory_high: None,
            pids_max: None,
            interval: Duration::from_secs(1),
        }
    }
}

impl Limits {
    /// From `[agent]` settings.
    pub fn from_settings(agent: &AgentSettings) -> Self {
        Self {
            memory_max: agent.memory_max.map(|size| size.0),
            memory_high: agent.memory_high.map(|size| size.0),
            pids_max: (agent.pids_max > 0).then_some(agent.pids_max),
            interval: agent.limits_interval,
        }
    }

    /// Whether any limit is set (cgroups then need their controllers).
    pub fn any(&self) -> bool {
        self.memory_max.is_some() || self.memory_high.is_some() || self.pids_max.is_some()
    }
}

/// How the limits are enforced on this worker, as `worker_started` logs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// The agents' cgroup v2, with the memory and pids controllers: the kernel.
    CgroupV2,
    /// The v1 memory and pids hierarchies (whichever the host has): the kernel.
    CgroupV1 {
        /// The memory hierarchy is used.
        memory: bool,
        /// The pids hierarchy is used.
        pids: bool,
    },
    /// No controller: memory sampled, pids not limited.
    Sampled,
}

impl Enforcement {
    /// How it is named in logs and `status`.
    pub fn name(self) -> &'static str {
        match self {
            Self::CgroupV2 => "cgroup-v2",
            Self::CgroupV1 {
                memory: true,
                pids: true,
            } => "cgroup-v1",
            Self::CgroupV1 { memory: true, .. } => "cgroup-v1-memory",
            Self::CgroupV1 { pids: true, .. } => "cgroup-v1-pids",
            Self::CgroupV1 { .. } | Self::Sampled => "sampled",
        }
    }

    /// Whether the kernel enforces the memory limits.
    pub fn kernel_memory(self) -> bool {
        matches!(self, Self::CgroupV2 | Self::CgroupV1 { memory: true, .. })
    }

    /// Whether the kernel enforces `pids_max`.
    pub fn kernel_pids(self) -> bool {
        matches!(self, Self::CgroupV2 | Self::CgroupV1 { pids: true, .. })
    }
}

/// What an agent's tree uses, at one reading.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Usage {
    /// Memory now, in bytes (the cgroup's charge, or the tree's PSS / RSS).
    pub memory_bytes: u64,
    /// The most it has used so far, in bytes.
    pub peak_bytes: u64,
    /// CPU time so far (user + system), in seconds.
    pub cpu_seconds: f64,
}

impl Usage {
    /// `memory` now and `cpu_seconds`, with the peak carried over from `previous`.
    pub fn after(previous: Option<Usage>, memory_bytes: u64, peak: u64, cpu_seconds: f64) -> Self {
        let before = previous.map_or(0, |usage| usage.peak_bytes);
        Self {
            memory_bytes,
            peak_bytes: before.max(peak).max(memory_bytes),
            cpu_seconds,
        }
    }
}

/// A limit that ended an agent, as its exit says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLimitHit {
    /// The limit, in bytes.
    pub limit: u64,
    /// How it was enforced: the kernel's OOM killer, or the worker's sampling.
    pub by: LimitedBy,
}

/// Who enforced a memory limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitedBy {
    /// The kernel's OOM killer in the agent's cgroup (`oom_kill`).
    OomKill,
    /// The worker's sampling: the tree was over the limit, and SIGKILLed.
    Sampled,
}

impl std::fmt::Display for MemoryLimitHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let by = match self.by {
            LimitedBy::OomKill => "oom_kill",
            LimitedBy::Sampled => "sampled",
        };
        write!(f, "memory limit {} reached ({by})", ByteSize(self.limit))
    }
}

/// The processes of an agent's tree, read from `/proc`: `root` and every descendant, and
/// whatever else is in the process group `root` leads.
///
/// Without `/proc/<pid>/task/<tid>/children` (a kernel option many hosts lack) the tree is
/// found from every process's parent, which means reading all of `/proc`. That table is
/// shared: one scan serves every agent's reading for half a second, so a replica with many
/// agents scans `/proc` about twice a second, not once per agent. (With cgroups the cgroup
/// lists the tree, and no scan is made.)
pub fn tree(root: u32) -> Vec<u32> {
    tree_in(&process_table(false), root)
}

/// [`tree`] from a scan made now (to kill a tree: no process forked since may be missed).
pub fn tree_now(root: u32) -> Vec<u32> {
    tree_in(&process_table(true), root)
}

fn tree_in(table: &HashMap<u32, (u32, u32)>, root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut in_group = Vec::new();
    for (&pid, &(ppid, pgrp)) in table.iter() {
        children.entry(ppid).or_default().push(pid);
        if pgrp == root && pid != root {
            in_group.push(pid);
        }
    }
    let mut tree = vec![root];
    let mut next = 0;
    while next < tree.len() {
        if let Some(kids) = children.get(&tree[next]) {
            tree.extend(kids.iter().copied().filter(|pid| *pid != root));
        }
        next += 1;
    }
    for pid in in_group {
        if !tree.contains(&pid) {
            tree.push(pid);
        }
    }
    tree
}

/// Every process's `(ppid, pgrp)`, read at most every half second (`fresh`: now).
fn process_table(fresh: bool) -> std::sync::Arc<HashMap<u32, (u32, u32)>> {
    type Table = std::sync::Arc<HashMap<u32, (u32, u32)>>;
    static CACHE: std::sync::Mutex<Option<(std::time::Instant, Table)>> =
        std::sync::Mutex::new(None);
    let mut cache = CACHE.lock().expect("process table lock");
    if let Some((at, table)) = cache.as_ref()
        && !fresh
        && at.elapsed() < Duration::from_millis(500)
    {
        return table.clone();
    }
    let table: Table = std::sync::Arc::new(
        fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let pid = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
                Some((pid, parent_and_group(pid)?))
            })
            .collect(),
    );
    *cache = Some((std::time::Instant::now(), table.clone()));
    table
}

/// `ppid` and `pgrp` from `/proc/<pid>/stat` (after the command, which may hold anything).
fn parent_and_group(pid: u32) -> Option<(u32, u32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let _state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((ppid, pgrp))
}

/// The memory of `pids`, in bytes, and their CPU time in seconds (user + system, with what
/// their reaped children used). `precise`: PSS from `smaps_rollup` where readable (shared
/// pages counted once across the tree, as a zygote's children share theirs; it walks every
/// mapping, so it is only read where a limit is enforced by sampling), else RSS.
pub fn tree_usage(pids: &[u32], precise: bool) -> (u64, f64) {
    let (page, ticks) = (page_size(), clock_ticks());
    let mut memory = 0;
    let mut cpu_ticks = 0u64;
    for pid in pids {
        let pss = if precise { pss(*pid) } else { None };
        memory += pss.unwrap_or_else(|| rss_pages(*pid).unwrap_or(0) * page);
        cpu_ticks += cpu_ticks_of(*pid).unwrap_or(0);
    }
    (memory, cpu_ticks as f64 / ticks as f64)
}

fn pss(pid: u32) -> Option<u64> {
    let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let kb: u64 = rollup
        .lines()
        .find_map(|line| line.strip_prefix("Pss:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

fn rss_pages(pid: u32) -> Option<u64> {
    let statm = fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    statm.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime + cutime + cstime, in clock ticks.
fn cpu_ticks_of(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command: state is field 3 of stat(5), utime 14 ... cstime 17.
    let at = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<i64>().ok());
    Some(
        [at(14)?, at(15)?, at(16)?, at(17)?]
            .iter()
            .sum::<i64>()
            .max(0) as u64,
    )
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |v| v as u64)
}

fn clock_ticks() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100, |v| v as u64)
}

/// The worker's own `oom_score_adj`, and what its agents get: higher, so a host that runs
/// out of memory kills an agent (one call) before the worker (every call of the replica).
pub fn agent_oom_score_adj() -> Option<i32> {
    let own: i32 = fs::read_to_string("/proc/self/oom_score_adj")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (own < 1000).then(|| (own + 500).min(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_hit_names_the_limit_and_who_enforced_it() {
        let hit = MemoryLimitHit {
            limit: 256 << 20,
            by: LimitedBy::OomKill,
        };
        assert_eq!(hit.to_string(), "memory limit 256 MiB reached (oom_kill)");
    }

    #[test]
    fn this_process_s_tree_holds_its_children_and_uses_memory_and_cpu() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let me = std::process::id();
        // Our own group is not ours alone (the test harness's), but our children are ours.
        let tree = tree(me);
        assert_eq!(tree[0], me);
        assert!(tree.contains(&child.id()), "{tree:?}");
        let (memory, cpu) = tree_usage(&[me], true);
        assert!(tree_usage(&[me], false).0 > 1 << 20);
        assert!(memory > 1 << 20, "{memory}");
        assert!(cpu >= 0.0);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(agent_oom_score_adj().is_some());
    }

    #[test]
    fn the_peak_only_grows() {
        let first = Usage::after(None, 100, 0, 1.0);
        let second = Usage::after(Some(first), 50, 0, 2.0);
        assert_eq!((second.memory_bytes, second.peak_bytes), (50, 100));
    }
}
