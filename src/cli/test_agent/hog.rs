//! The test agent's resource hogs, for the limits tests: a helper that leaks memory, a tree
//! that grows to a size, a fork storm.

use std::{process::Stdio, time::Duration};

use nix::sys::signal::SigSet;

use super::{SUBCOMMAND, own_exe, say};

/// `leak-helper`: starts a helper (`--behaviour leak`) that allocates memory until something
/// kills it, prints the ready line, and waits for the helper. Then prints `helper ended
/// <status>` and exits 1, or with `--on-helper-death=continue` runs on until SIGTERM.
pub(super) fn leak_helper(room: &str, continue_after: bool, term: &SigSet) -> i32 {
    let helper = std::process::Command::new(own_exe())
        .args([SUBCOMMAND, "--behaviour", "leak"])
        .arg(format!("--room={room}-helper"))
        // Its own behaviour, not the session's (which the config in its environment names).
        .env_remove("SESSION_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut helper = match helper {
        Ok(helper) => helper,
        Err(error) => {
            say(&format!("helper failed: {error}"));
            return 2;
        }
    };
    say(&format!("helper {}", helper.id()));
    say(&format!("Room joined {room}"));
    let status = helper.wait();
    say(&format!("helper ended {status:?}"));
    if continue_after {
        let _ = term.wait();
        return 0;
    }
    1
}

/// `leak`: allocates and touches 8 MiB every 5 ms, keeping all of it, until killed.
pub(super) fn leak() -> i32 {
    let mut kept: Vec<Vec<u8>> = Vec::new();
    loop {
        kept.push(vec![1u8; 8 << 20]);
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `grow`: allocates and touches `mib` MiB, prints `grown <mib> MiB` and the ready line, and
/// runs until SIGTERM.
pub(super) fn grow(room: &str, mib: usize, term: &SigSet) -> i32 {
    let kept = vec![1u8; mib << 20];
    say(&format!("grown {} MiB", kept.len() >> 20));
    say(&format!("Room joined {room}"));
    let _ = term.wait();
    drop(kept);
    0
}

/// `fork-storm`: tries to start `forks` children that linger (`--behaviour linger`), prints
/// `forks ok=<started> failed=<refused>` and the ready line, and runs until SIGTERM (the
/// children end with its group).
pub(super) fn fork_storm(room: &str, forks: usize, term: &SigSet) -> i32 {
    let (mut ok, mut failed) = (0, 0);
    let mut children = Vec::new();
    for _ in 0..forks {
        let child = std::process::Command::new(own_exe())
            .args([SUBCOMMAND, "--behaviour", "linger"])
            .arg(format!("--room={room}-storm"))
            // Its own behaviour, not the session's (which the config in its environment names).
            .env_remove("SESSION_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match child {
            Ok(child) => {
                ok += 1;
                children.push(child);
            }
            Err(_) => failed += 1,
        }
    }
    say(&format!("forks ok={ok} failed={failed}"));
    say(&format!("Room joined {room}"));
    let _ = term.wait();
    drop(children);
    0
}
