//! The machine and the versions a run was made with, printed at the top of every report.

use std::process::Command;

/// Lines like `cpu: AMD EPYC (2 cores)`, in print order.
pub fn describe() -> Vec<(&'static str, String)> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, m)| m.trim().to_owned())
            })
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let kb: u64 = info
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some(format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let crates = ["apalis", "apalis-core", "apalis-redis", "redis", "tokio"]
        .iter()
        .map(|name| format!("{name} {}", locked_version(name)))
        .collect::<Vec<_>>()
        .join(", ");
    vec![
        ("cpu", format!("{cpu}, nproc {cores}")),
        ("memory", memory),
        ("kernel", kernel),
        ("rustc", first_line("rustc", &["--version"])),
        ("redis-server", first_line("redis-server", &["--version"])),
        ("crates (Cargo.lock)", crates),
        ("commit", commit()),
    ]
}

/// The version of `name` in Cargo.lock (`[[package]] name = "…" version = "…"`).
pub fn locked_version(name: &str) -> String {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock"))
        .unwrap_or_default();
    let header = format!("name = \"{name}\"\n");
    lock.split("[[package]]")
        .find(|block| block.trim_start().starts_with(&header))
        .and_then(|block| {
            block
                .lines()
                .find_map(|l| l.strip_prefix("version = \"")?.strip_suffix('"'))
        })
        .unwrap_or("?")
        .to_owned()
}

fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| format!("{program}: not found"))
}

/// `git rev-parse --short HEAD`, with `+dirty` when the tree has uncommitted changes.
fn commit() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let head = first_line("git", &["-C", dir, "rev-parse", "--short", "HEAD"]);
    let dirty = Command::new("git")
        .args(["-C", dir, "status", "--porcelain", "--untracked-files=no"])
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    if dirty { format!("{head}+dirty") } else { head }
}
