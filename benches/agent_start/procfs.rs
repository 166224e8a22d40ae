//! Reading CPU time, memory and wake-ups of a process from /proc.

/// CPU seconds of a process: its own, and that of its children it has reaped.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTimes {
    pub own: f64,
    pub children: f64,
}

impl CpuTimes {
    /// From `/proc/<pid>/stat` (`"self"` for this process): utime + stime, cutime + cstime.
    pub fn of(pid: &str) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may contain spaces; the fields we want follow its closing paren.
        let fields: Vec<f64> = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0.0))
            .collect();
        // SAFETY: sysconf only reads a configuration value.
        let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        // Fields 14-17 of proc(5) (utime, stime, cutime, cstime); index 0 here is field 3.
        Some(Self {
            own: (fields.get(11)? + fields.get(12)?) / tick,
            children: (fields.get(13)? + fields.get(14)?) / tick,
        })
    }

    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            own: self.own - earlier.own,
            children: self.children - earlier.children,
        }
    }
}

/// A `kB` field of `/proc/<pid>/status`, e.g. `VmRSS` or `RssAnon`.
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Context switches of all threads of a process so far: each one is a thread going to sleep
/// or being preempted, so their rate counts wake-ups (busy polling shows up here).
pub fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter_map(|l| {
                    let (key, value) = l.split_once(':')?;
                    key.ends_with("ctxt_switches")
                        .then(|| value.trim().parse::<u64>().ok())?
                })
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Threads of a process.
pub fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

/// CPU seconds the whole machine has been busy (not idle, not waiting for I/O), from the first
/// line of /proc/stat.
pub fn machine_busy() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal …
    let busy: f64 = ticks.iter().take(8).sum::<f64>() - ticks.get(3)? - ticks.get(4)?;
    // SAFETY: sysconf only reads a configuration value.
    Some(busy / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64)
}

/// Proportional set size of a process in kB (`Pss` of `/proc/<pid>/smaps_rollup`): its
/// private pages plus its share of the pages it shares with others, so the PSS of several
/// processes adds up to the memory they use together.
pub fn pss_kb(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Parent of every process now running, from `/proc/<pid>/stat`.
pub fn parents() -> std::collections::HashMap<u32, u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Default::default();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name may contain spaces and parens; the parent follows the last paren.
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// `root` and all its descendants, given every process's parent ([`parents`]).
pub fn tree(root: u32, parents: &std::collections::HashMap<u32, u32>) -> Vec<u32> {
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|&(_, &p)| p == parent)
                .map(|(&pid, _)| pid),
        );
        i += 1;
    }
    found
}

/// The command line of a process, its arguments joined by spaces.
pub fn cmdline(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&raw).replace('\0', " ")
}
