//! The subreaper mechanism of containment (`PR_SET_CHILD_SUBREAPER`, which `agent-worker run`
//! sets on itself): an orphan of an agent's tree is re-parented to the worker instead of to
//! init. Each agent's environment carries [`SCOPE_VAR`] (`<worker id>/<session id>`), which
//! its descendants inherit; when its session ends, the worker kills its re-parented children
//! carrying that marker, round after round as their own children are re-parented in turn
//! (`kill_marked`), and reaps them. Orphans that exit on their own are reaped by
//! [`reap_adopted`]; never an agent, which its owner task reaps (the registry of
//! [`agent_started`] / [`agent_reaped`] tells them apart).
//!
//! A leaf: `/proc` scans and signals, with nothing of the agent's.

use std::{
    collections::HashSet,
    fs, io,
    sync::{LazyLock, Mutex},
};

use nix::{
    sys::{
        signal::Signal,
        wait::{WaitPidFlag, waitpid},
    },
    unistd::Pid,
};

/// The environment variable that marks an agent's descendants as its own.
pub const SCOPE_VAR: &str = "AGENT_WORKER_SCOPE";

/// Rounds of killing re-parented descendants (each round reaches one more generation).
const SUBREAPER_ROUNDS: usize = 20;

/// Pids of the agents the worker owns (spawned or adopted): reaped by their own owner tasks,
/// never by [`reap_adopted`].
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

/// Registers the pid of an agent the worker owns (its owner task reaps it).
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
pub(crate) fn kill_marked(marker: &str) {
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
