//! The stand-in voice agent: `agent-worker test-agent …`, a hidden subcommand of the worker's
//! own binary.
//!
//! It lives in the worker's binary so that the demo (and a smoke test of a deployed image) has
//! nothing else to build or install: the demo launches `[current_exe, "test-agent"]` through
//! the normal launcher. The tests and benchmarks use it too. It takes the agent command line
//! of the contract, prints what it received, and behaves as asked:
//!
//! ```text
//! agent-worker test-agent [--behaviour B] [--ready-delay-ms N] --room=R --voice-id=V
//!                         [--opening-line=T] [--system-prompt=T]
//! ```
//! Contract options are accepted in both forms the worker can send (`agent.arg_style`):
//! `--name=value` and `--name value`. It first prints one line `test-agent received {json}`
//! with its argv, the parsed contract options, its `SESSION_ID` / `VOICE_ID` /
//! `SESSION_CONFIG` / `TRACEPARENT` / `TRACESTATE` environment and the names of any `AGENT_WORKER__*` variables it inherited
//! (`settings_vars`). Behaviours:
//! - `ready` (default): print `Room joined <room>`, then run until SIGTERM and exit 0.
//! - `exit-after-ready`: print the ready line and exit 0 at once.
//! - `exit-before-ready`: print `failing on purpose` and exit 3.
//! - `never-ready`: print `warming up` and never a ready line; runs until killed.
//! - `alive-never-ready`: print `AGENT_ALIVE` (the alive phase) and never a ready line.
//! - `chatty`: print the ready line, then 250 lines `chatty line <i>`, then run until SIGTERM.
//! - `ignore-term`: print the ready line and ignore SIGTERM; only SIGKILL ends it.
//! - `crash-after-ready`: print the ready line and exit 3 at once (a call that crashes).
//! - `escape`: daemonize a process as a helper would: start a child (`--behaviour
//!   escape-middle`) that starts a grandchild (`--behaviour setsid-linger`, which calls
//!   `setsid()` and lingers) and exits at once, so the grandchild is an orphan in a session of
//!   its own, out of reach of a signal to the agent's group; print `escapee <its pid>`, then
//!   the ready line, and run until SIGTERM.
//! - `linger`: print nothing and run until killed.
//! - `flood`: print the ready line, then lines as fast as it can for `--flood-secs` seconds
//!   (default 2), then `flood done <lines> <lines per second>`, then run until SIGTERM.
//! - `leak-helper`: start a helper process that allocates memory until it is killed, print
//!   `helper <pid>` and the ready line, wait for the helper, print `helper ended <status>`,
//!   then exit 1 (`--on-helper-death=continue`: run on until SIGTERM).
//! - `grow`: allocate `--grow-mib` MiB (default 64), print `grown <n> MiB` and the ready line,
//!   run until SIGTERM.
//! - `fork-storm`: try to start `--forks` (default 100) lingering children, print
//!   `forks ok=<n> failed=<n>` and the ready line, run until SIGTERM.
//!
//! With `--warm` it is a warm process of the worker's pool (protocol: `crate::agent::warm`):
//! it prints `AGENT_WORKER_WARM`, reads one handoff line on stdin, appends its `args` to its
//! own argv and takes its `env` as its environment, then carries on as above (the received
//! line reports `"warm": true`). `--warm-behaviour=crash` exits 4 before the warm line;
//! `--warm-behaviour=exit-on-handoff` exits 0 right after reading its line, printing nothing;
//! `--warm-behaviour=die-after-warm` exits 7 right after its warm line;
//! `--warm-behaviour=ignore-handoff` never reads its stdin and runs until killed;
//! `--warm-delay-ms=N` waits that long before the warm line; `--warm-wait-file=PATH` waits
//! until `PATH` exists (so a test decides when a warm-up ends). A ledger gets
//! `warm <pid> <unix ms>` when a warm process starts.
//!
//! A session's config can choose for itself: its `testBehaviour` field is the behaviour and
//! its `testOptions` field (`name=value` pairs separated by spaces) more options.
//!
//! With `--long-line-bytes N` it first prints one line of `N` times `x` (no newline until the
//! end). With `--ledger <file>` (or `TEST_AGENT_LEDGER=<file>` in its environment) it also
//! appends `<room> <pid>` to that file, before anything else.

mod hog;

use std::{collections::BTreeMap, io::Write, time::Duration};

use nix::sys::signal::{SigSet, Signal};
use serde_json::json;

/// The hidden subcommand's name: `agent-worker test-agent …`.
pub const SUBCOMMAND: &str = "test-agent";

/// The contract options the test agent reports, by their option name.
const CONTRACT_OPTIONS: [&str; 4] = ["room", "voice-id", "opening-line", "system-prompt"];

/// Runs the test agent with `argv` (the arguments after the subcommand); returns its exit code.
pub fn main(mut argv: Vec<String>) -> i32 {
    // Blocked before anything else, so a SIGTERM that arrives early waits for `sigwait`
    // instead of killing the process (a single thread: the mask is the whole process's).
    let term = SigSet::from(Signal::SIGTERM);
    let _ = term.thread_block();

    let mut handed_env = BTreeMap::new();
    let warm = argv.iter().any(|a| a == "--warm");
    if warm {
        argv.retain(|a| a != "--warm");
        match warm_up(&argv) {
            Ok((args, env)) => {
                argv.extend(args);
                handed_env = env;
            }
            Err(code) => return code,
        }
    }
    let mut options = parse(&argv);
    let room = say_received(&argv, &options, &handed_env, warm);
    options.extend(config_options(&handed_env));
    // Tests that must know every agent that ever started name a ledger file.
    record(&options, &format!("{room} {}", std::process::id()));

    if let Some(n) = options.get("long-line-bytes").and_then(|n| n.parse().ok()) {
        say(&"x".repeat(n));
    }
    let ready_delay = options
        .get("ready-delay-ms")
        .and_then(|ms| ms.parse().ok())
        .map_or(Duration::ZERO, Duration::from_millis);
    std::thread::sleep(ready_delay);
    let behaviour = options.get("behaviour").map_or("ready", String::as_str);
    behave(behaviour, &options, &room, &term)
}

/// Options a test put in the session's config, which reaches the agent untouched in
/// `SESSION_CONFIG` (contract §1): `testBehaviour` (the behaviour) and `testOptions`
/// (`name=value` pairs separated by spaces). So one worker's agents can behave differently
/// per session.
fn config_options(handed_env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let config = handed_env
        .get("SESSION_CONFIG")
        .cloned()
        .or_else(|| std::env::var("SESSION_CONFIG").ok())
        .and_then(|json| serde_json::from_str::<serde_json::Value>(&json).ok())
        .unwrap_or_default();
    let mut options = BTreeMap::new();
    if let Some(behaviour) = config["testBehaviour"].as_str() {
        options.insert("behaviour".to_owned(), behaviour.to_owned());
    }
    for pair in config["testOptions"]
        .as_str()
        .unwrap_or_default()
        .split_whitespace()
    {
        if let Some((name, value)) = pair.split_once('=') {
            options.insert(name.to_owned(), value.to_owned());
        }
    }
    options
}

/// Prints the `test-agent received {json}` line: its argv, the contract options, the session
/// environment (the handoff's, for a warm process, else its own) and the names of inherited
/// `AGENT_WORKER__*` variables. Returns the room.
fn say_received(
    argv: &[String],
    options: &BTreeMap<String, String>,
    handed_env: &BTreeMap<String, String>,
    warm: bool,
) -> String {
    let env_var = |key: &str| {
        handed_env
            .get(key)
            .cloned()
            .or_else(|| std::env::var(key).ok())
    };
    let contract: BTreeMap<String, String> = CONTRACT_OPTIONS
        .iter()
        .filter_map(|name| Some((name.replace('-', "_"), options.get(*name)?.clone())))
        .collect();
    let session_vars = [
        "SESSION_ID",
        "VOICE_ID",
        "SESSION_CONFIG",
        "TRACEPARENT",
        "TRACESTATE",
    ];
    let env: BTreeMap<&str, Option<String>> =
        session_vars.into_iter().map(|k| (k, env_var(k))).collect();
    // Names only: the worker's own settings (which may hold the Redis password) must not
    // reach agents.
    let settings_vars: Vec<String> = std::env::vars_os()
        .map(|(key, _)| key.to_string_lossy().into_owned())
        .filter(|key| key.starts_with("AGENT_WORKER__"))
        .collect();
    let received = json!({
        "argv": argv,
        "contract": contract,
        "env": env,
        "settings_vars": settings_vars,
        "pid": std::process::id(),
        "warm": warm,
    });
    say(&format!("test-agent received {received}"));
    contract.get("room").cloned().unwrap_or_default()
}

/// Behaves as `behaviour` says (see the module docs); returns the exit code.
fn behave(behaviour: &str, options: &BTreeMap<String, String>, room: &str, term: &SigSet) -> i32 {
    let ready = format!("Room joined {room}");
    match behaviour {
        "exit-before-ready" => {
            eprintln!("failing on purpose");
            3
        }
        "never-ready" => {
            say("warming up");
            park_forever()
        }
        "alive-never-ready" => {
            say("AGENT_ALIVE");
            park_forever()
        }
        "exit-after-ready" => {
            say(&ready);
            0
        }
        "chatty" => {
            // More output than `agent:<id>:logs` keeps (the last 100 lines).
            say(&ready);
            for i in 0..250 {
                say(&format!("chatty line {i}"));
            }
            let _ = term.wait();
            0
        }
        "flood" => {
            say(&ready);
            let secs = options
                .get("flood-secs")
                .and_then(|s| s.parse().ok())
                .unwrap_or(2.0);
            let (lines, rate) = flood(Duration::from_secs_f64(secs));
            say(&format!("flood done {lines} {rate:.0}"));
            let _ = term.wait();
            0
        }
        "crash-after-ready" => {
            say(&ready);
            3
        }
        "escape" => {
            say_escapee(room);
            say(&ready);
            let _ = term.wait();
            0
        }
        "escape-middle" => start_escapee(room),
        "setsid-linger" => {
            // A session (and process group) of its own, as a daemon makes itself.
            let _ = nix::unistd::setsid();
            park_forever()
        }
        "linger" => park_forever(),
        "leak-helper" => hog::leak_helper(
            room,
            options.get("on-helper-death").map(String::as_str) == Some("continue"),
            term,
        ),
        "leak" => hog::leak(),
        "grow" => {
            let mib = options
                .get("grow-mib")
                .and_then(|n| n.parse().ok())
                .unwrap_or(64);
            hog::grow(room, mib, term)
        }
        "fork-storm" => {
            let forks = options
                .get("forks")
                .and_then(|n| n.parse().ok())
                .unwrap_or(100);
            hog::fork_storm(room, forks, term)
        }
        "ignore-term" => {
            // SIGTERM stays blocked and is never waited for: only SIGKILL ends this one.
            say(&ready);
            park_forever()
        }
        _ => {
            say(&ready);
            let _ = term.wait();
            say("test-agent stopping on SIGTERM");
            0
        }
    }
}

/// `escape`: runs the middle process, which prints its child's pid and exits; the grandchild is
/// then re-parented away from us, as a double-forked daemon is. Prints `escapee <pid>`.
fn say_escapee(room: &str) {
    let middle = std::process::Command::new(own_exe())
        .args([SUBCOMMAND, "--behaviour", "escape-middle"])
        .arg(format!("--room={room}-escapee"))
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    match middle {
        // Its last line is the pid (after its own `test-agent received` line).
        Ok(out) => {
            let stdout = String::from_utf8_lossy(&out.stdout);
            let pid = stdout.lines().last().unwrap_or_default().trim();
            say(&format!("escapee {pid}"));
        }
        Err(error) => say(&format!("escapee failed: {error}")),
    }
}

/// `escape-middle`: starts the grandchild (`setsid-linger`), prints its pid; the exit code.
fn start_escapee(room: &str) -> i32 {
    let grandchild = std::process::Command::new(own_exe())
        .args([SUBCOMMAND, "--behaviour", "setsid-linger"])
        .arg(format!("--room={room}"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    match grandchild {
        Ok(child) => {
            println!("{}", child.id());
            0
        }
        Err(_) => 1,
    }
}

/// This binary (the worker's, running as the test agent).
fn own_exe() -> std::path::PathBuf {
    std::env::current_exe().expect("the test agent's own binary")
}

/// The warm phase: the warm line, then the handoff line's `args` and `env`, or the exit code
/// to end with.
fn warm_up(argv: &[String]) -> Result<(Vec<String>, BTreeMap<String, String>), i32> {
    let options = parse(argv);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    record(&options, &format!("warm {} {now_ms}", std::process::id()));
    if let Some(ms) = options.get("warm-delay-ms").and_then(|ms| ms.parse().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
    }
    if let Some(path) = options.get("warm-wait-file") {
        // Polled: the test agent has no other way to be told, and a warm-up may wait long.
        while !std::path::Path::new(path).exists() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let behaviour = options.get("warm-behaviour").map(String::as_str);
    if behaviour == Some("crash") {
        eprintln!("warm-up crashing on purpose");
        return Err(4);
    }
    say("AGENT_WORKER_WARM");
    if behaviour == Some("die-after-warm") {
        return Err(7);
    }
    if behaviour == Some("ignore-handoff") {
        // Never reads its stdin: a long handoff line fills the pipe and the write waits.
        park_forever()
    }
    let mut line = String::new();
    if std::io::stdin().read_line(&mut line).is_err() || line.is_empty() {
        eprintln!("no handoff line");
        return Err(5);
    }
    if behaviour == Some("exit-on-handoff") {
        return Err(0);
    }
    let handoff: serde_json::Value = match serde_json::from_str(&line) {
        Ok(value) => value,
        Err(error) => {
            eprintln!("bad handoff line: {error}");
            return Err(6);
        }
    };
    let args = handoff["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let env = handoff["env"]
        .as_object()
        .map(|e| {
            e.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    Ok((args, env))
}

/// Appends `line` to the ledger file, if the agent was given one.
fn record(options: &BTreeMap<String, String>, line: &str) {
    let ledger = options
        .get("ledger")
        .map(std::ffi::OsString::from)
        .or_else(|| std::env::var_os("TEST_AGENT_LEDGER"));
    if let Some(ledger) = ledger {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(ledger);
        if let Ok(mut file) = file {
            // One short O_APPEND write per line is atomic.
            let _ = file.write_all(format!("{line}\n").as_bytes());
        }
    }
}

/// Options as `name → value`, from `--name=value` or `--name value`; the first occurrence
/// wins, as argparse's last-wins would hide a duplicate the tests want to see in `argv`.
fn parse(argv: &[String]) -> BTreeMap<String, String> {
    let mut options = BTreeMap::new();
    let mut args = argv.iter().peekable();
    while let Some(arg) = args.next() {
        let Some(option) = arg.strip_prefix("--") else {
            continue;
        };
        let (name, value) = match option.split_once('=') {
            Some((name, value)) => (name.to_owned(), value.to_owned()),
            None => (option.to_owned(), args.next().cloned().unwrap_or_default()),
        };
        options.entry(name).or_insert(value);
    }
    options
}

/// Writes numbered lines to stdout for `length`, as fast as the pipe takes them; returns the
/// lines written and their rate per second.
fn flood(length: Duration) -> (u64, f64) {
    let started = std::time::Instant::now();
    let mut stdout = std::io::stdout().lock();
    let mut lines = 0u64;
    while started.elapsed() < length {
        for _ in 0..100 {
            let _ = writeln!(
                stdout,
                "flood line {lines} of a chatty agent that logs too much"
            );
            lines += 1;
        }
    }
    let _ = stdout.flush();
    (lines, lines as f64 / started.elapsed().as_secs_f64())
}

/// One line on stdout, flushed at once: the worker reads it from a pipe.
fn say(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn both_option_forms_parse_and_values_may_start_with_dashes() {
        let options = parse(&strings(&[
            "--behaviour",
            "ready",
            "--room=s-1",
            "--voice-id=Craig",
            "--opening-line=-r oops",
            "--system-prompt",
            "--not-an-option",
        ]));
        assert_eq!(options["behaviour"], "ready");
        assert_eq!(options["room"], "s-1");
        assert_eq!(options["voice-id"], "Craig");
        assert_eq!(options["opening-line"], "-r oops");
        assert_eq!(options["system-prompt"], "--not-an-option");
    }
}
