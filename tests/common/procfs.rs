//! Processes as `/proc` shows them: zombies, liveness, and the test agents a worker runs.

use std::{collections::HashMap, time::Duration};

use super::wait_for;

/// Our child processes that are zombies (exited, not reaped).
pub fn zombie_children() -> Vec<u32> {
    let me = std::process::id();
    let mut zombies = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return zombies;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some((state, ppid)) = proc_state(pid)
            && state == 'Z'
            && ppid == me
        {
            zombies.push(pid);
        }
    }
    zombies
}

/// (state, parent pid) of a process, from /proc/<pid>/stat.
pub fn proc_state(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    proc_state(pid).is_some_and(|(state, _)| state != 'Z')
}

/// Waits (up to `deadline`) until `pid` has exited ([`alive`] no longer); panics with `what`.
pub async fn wait_gone(what: &str, deadline: Duration, pid: u32) {
    wait_for(what, deadline, || async { (!alive(pid)).then_some(()) }).await
}

/// Live `test-agent` processes per session whose parent is one of `parents`, read from /proc.
/// (Other tests, or another checkout's tests, may run agents with the same room names.)
pub fn live_agents(parents: &[u32]) -> HashMap<String, Vec<u32>> {
    let mut by_session: HashMap<String, Vec<u32>> = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return by_session;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Some((state, ppid)) = proc_state(pid) else {
            continue;
        };
        if state == 'Z' || !parents.contains(&ppid) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.get(1).map(String::as_str) != Some("test-agent") {
            continue;
        }
        if let Some(room) = room_of(&args) {
            by_session.entry(room).or_default().push(pid);
        }
    }
    by_session
}

/// The `--room` of an agent's argv, in either form the worker sends (`--room=R`, `--room R`).
pub fn room_of(args: &[String]) -> Option<String> {
    args.iter()
        .enumerate()
        .find_map(|(i, arg)| match arg.strip_prefix("--room") {
            Some(value) if value.starts_with('=') => Some(value[1..].to_owned()),
            Some("") => args.get(i + 1).cloned(),
            _ => None,
        })
}
