//! A stand-in voice agent for the demo, the tests and the benchmarks: a real process that takes
//! the agent command line of the contract, prints what it received, and behaves as asked.
//!
//! ```text
//! test-agent [--behaviour B] [--ready-delay-ms N] --room R --voice-id V
//!            [--opening-line T] [--system-prompt T]
//! ```
//! It first prints one line `test-agent received {json}` with its argv, the parsed contract
//! arguments, its `SESSION_ID` / `VOICE_ID` / `SESSION_CONFIG` environment and the names of any
//! `AGENT_WORKER__*` variables it inherited (`settings_vars`). Behaviours:
//! - `ready` (default): print `Room joined <room>`, then run until SIGTERM and exit 0.
//! - `exit-after-ready`: print the ready line and exit 0 at once.
//! - `exit-before-ready`: print `failing on purpose` and exit 3.
//! - `never-ready`: print `warming up` and never a ready line; runs until killed.
//! - `chatty`: print the ready line, then 250 lines `chatty line <i>`, then run until SIGTERM.
//! - `ignore-term`: print the ready line and ignore SIGTERM; only SIGKILL ends it.
//!
//! With `TEST_AGENT_LEDGER=<file>` in its environment it also appends `<room> <pid>` to that file.

use std::{collections::BTreeMap, time::Duration};

use serde_json::json;

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut behaviour = "ready".to_owned();
    let mut ready_delay = Duration::ZERO;
    let mut contract = BTreeMap::new();
    let mut args = argv.iter();
    while let Some(arg) = args.next() {
        let value = || args.clone().next().cloned().unwrap_or_default();
        match arg.as_str() {
            "--behaviour" => behaviour = value(),
            "--ready-delay-ms" => {
                ready_delay = Duration::from_millis(value().parse().unwrap_or(0));
            }
            "--room" | "--voice-id" | "--opening-line" | "--system-prompt" => {
                contract.insert(arg.trim_start_matches("--").replace('-', "_"), value());
            }
            _ => continue,
        }
        args.next();
    }
    let env: BTreeMap<&str, Option<String>> = ["SESSION_ID", "VOICE_ID", "SESSION_CONFIG"]
        .into_iter()
        .map(|k| (k, std::env::var(k).ok()))
        .collect();
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
    });
    println!("test-agent received {received}");
    let room = contract.get("room").cloned().unwrap_or_default();
    // Tests that must know every agent that ever started (their logs in Redis go with their
    // sessions) name a ledger file; one short O_APPEND write per agent is atomic.
    if let Some(ledger) = std::env::var_os("TEST_AGENT_LEDGER") {
        use std::io::Write;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(ledger);
        if let Ok(mut file) = file {
            let _ = file.write_all(format!("{room} {}\n", std::process::id()).as_bytes());
        }
    }

    std::thread::sleep(ready_delay);
    match behaviour.as_str() {
        "exit-before-ready" => {
            eprintln!("failing on purpose");
            std::process::exit(3);
        }
        "never-ready" => {
            println!("warming up");
            park_forever();
        }
        "exit-after-ready" => {
            println!("Room joined {room}");
        }
        "chatty" => {
            // More output than `agent:<id>:logs` keeps (the last 100 lines).
            println!("Room joined {room}");
            for i in 0..250 {
                println!("chatty line {i}");
            }
            wait_for_sigterm();
        }
        "ignore-term" => {
            // SAFETY: setting a signal to SIG_IGN installs no handler code.
            unsafe {
                let _ = nix::sys::signal::signal(
                    nix::sys::signal::Signal::SIGTERM,
                    nix::sys::signal::SigHandler::SigIgn,
                );
            }
            println!("Room joined {room}");
            park_forever();
        }
        _ => {
            println!("Room joined {room}");
            wait_for_sigterm();
            println!("test-agent stopping on SIGTERM");
        }
    }
}

fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}

fn wait_for_sigterm() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        term.recv().await;
    });
}
