//! The cgroup guard: what kills a SIGKILLed worker's escaped processes at once.
//!
//! With cgroups (see [`crate::agent::containment`]) a worker kills each agent's cgroup when
//! its session ends. A worker that is SIGKILLed (OOM killer, `kill -9`, a node agent) cannot:
//! its agents die by their death signal, but a grandchild that daemonized (double fork,
//! `setsid()`) is no one's child and lives on, until the next worker in the same cgroup starts
//! and kills what dead workers left. The guard closes that window: `agent-worker run` starts
//! one small process, `agent-worker cgroup-guard <dir>` (a hidden subcommand of the same
//! binary), that does nothing but block on a pipe whose write end only the worker holds. When
//! the worker is gone, however it died, the kernel closes the pipe; the guard wakes, kills the
//! worker's agent cgroups (`cgroup.kill` of each, the whole subtree), removes them and exits.
//!
//! The guard is not inside the cgroups it kills (it stays in the worker's own cgroup), runs in
//! a process group of its own (a Ctrl-C or a signal to the worker's group is for the worker,
//! which may still be draining), and has no death signal: outliving the worker is its job. On
//! a clean exit the worker has removed its cgroups already; the guard finds nothing and exits.
//! Only `agent-worker run` starts one (`enable`): an embedding program's executable is not
//! ours to run.

use std::{
    io::{self, Read},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::OnceLock,
};

/// The hidden subcommand's name: `agent-worker cgroup-guard <dir>`.
pub const SUBCOMMAND: &str = "cgroup-guard";

/// The executable to run the guard with, once `agent-worker run` has enabled it.
static GUARD_EXE: OnceLock<PathBuf> = OnceLock::new();

/// Lets workers in this process start a guard, running `exe` (this process's own binary,
/// which must handle [`SUBCOMMAND`]).
pub fn enable(exe: PathBuf) {
    let _ = GUARD_EXE.set(exe);
}

/// A running guard of one worker's cgroup directory.
#[derive(Debug)]
pub struct Guard {
    child: Child,
    // Never written: its closing (the worker's exit or death) is the guard's signal.
    _pipe: ChildStdin,
}

impl Guard {
    /// Starts a guard of `dir` if guards are enabled in this process.
    pub fn start(dir: &Path) -> io::Result<Option<Self>> {
        let Some(exe) = GUARD_EXE.get() else {
            return Ok(None);
        };
        let mut child = Command::new(exe)
            .arg(SUBCOMMAND)
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()?;
        let pipe = child.stdin.take().expect("stdin is piped");
        Ok(Some(Self { child, _pipe: pipe }))
    }

    /// The guard's pid (logged, so an operator can tell it from an agent).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// The guard process: waits until its stdin closes, then removes the worker's agent cgroups
/// below `dir` with everything in them. Returns its exit code.
pub fn main(args: Vec<String>) -> i32 {
    let [dir] = args.as_slice() else {
        eprintln!("usage: agent-worker {SUBCOMMAND} <worker cgroup directory>");
        return 2;
    };
    let mut sink = [0u8; 64];
    // Nothing is ever written; EOF (or an error: the pipe is gone either way) is the signal.
    while let Ok(n) = io::stdin().read(&mut sink) {
        if n == 0 {
            break;
        }
    }
    let killed = super::cgroup::remove_worker_cgroup(Path::new(dir));
    if killed > 0 {
        // Only after a worker died with agents' processes left: one line on the worker's
        // stderr, in the shape of its JSON log events.
        let event = serde_json::json!({
            "level": "WARN",
            "message": "cgroup_guard_killed_leftovers",
            "processes": killed,
            "cgroup": dir,
        });
        eprintln!("{event}");
    }
    0
}
