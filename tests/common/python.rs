//! `python3` with the project's Python package (`python/`) ahead of whatever `cargo xtask test`
//! installed, and the package's unittest modules (`python/tests/`) run as one test.

use std::{process::Output, time::Duration};

use tokio::process::Command;

/// The package's root (what `pip install ./python` installs from, and `tests` is in).
pub const PYTHON_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python");

/// `PYTHONPATH` with [`PYTHON_DIR`] first (and no empty entry, which would put the working
/// directory on the path).
pub fn python_path() -> String {
    match std::env::var("PYTHONPATH") {
        Ok(rest) if !rest.is_empty() => format!("{PYTHON_DIR}:{rest}"),
        _ => PYTHON_DIR.to_owned(),
    }
}

/// `python3` on [`python_path`], killed when dropped (a test that fails half-way leaves no
/// Python behind), writing no `__pycache__` into the source tree.
pub fn python() -> Command {
    let mut command = Command::new("python3");
    command
        .env("PYTHONPATH", python_path())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .kill_on_drop(true);
    command
}

/// What a `python3` run printed on stdout, as JSON; fails the test, naming `what` ran, unless
/// it succeeded and printed JSON.
pub fn printed_json<T: serde::de::DeserializeOwned>(what: &str, output: &Output) -> T {
    let stdout = super::stdout_of(what, output);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{what} prints JSON ({e}): {stdout}"))
}

/// Fails the test, with what to install, unless `python3` can import `modules`.
pub async fn require_python(modules: &[&str]) {
    let code = format!("import {}", modules.join(", "));
    let help = "install Python 3.11+ and what `cargo xtask test` installs \
                (`python3 -m pip install redis jsonschema fastapi uvicorn httpx`)";
    match python().args(["-c", &code]).output().await {
        Err(e) => panic!("these tests need python3, which could not be run ({e}); {help}"),
        Ok(out) if !out.status.success() => panic!(
            "these tests need python3 with {modules:?}; {help}\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Ok(_) => {}
    }
}

/// Runs `python3 -m unittest -v tests.<module>` in [`PYTHON_DIR`] with `env` set and `unset`
/// removed (within 5 minutes); panics with its output unless exactly `tests` tests ran and
/// all passed (none failed, none was skipped).
pub async fn unittest(module: &str, tests: usize, env: &[(&str, String)], unset: &[&str]) {
    let mut command = python();
    command
        .args(["-m", "unittest", "-v", &format!("tests.{module}")])
        .current_dir(PYTHON_DIR)
        .env("PYTHONUNBUFFERED", "1")
        .envs(env.iter().map(|(k, v)| (k, v)));
    for name in unset {
        command.env_remove(name);
    }
    let out = tokio::time::timeout(Duration::from_secs(300), command.output())
        .await
        .expect("the Python tests finish within 5 minutes")
        .expect("these tests need python3 (cargo xtask test installs what they import)");
    let report = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Shown with --nocapture: the measured latencies are in it.
    eprintln!("{report}{stdout}");
    assert!(
        out.status.success(),
        "tests.{module} failed:\n{report}{stdout}"
    );
    // unittest's summary: `Ran 1 test in 0.1s`, `Ran 4 tests in 2.3s`.
    let ran = report.lines().find_map(|l| {
        l.strip_prefix("Ran ")?
            .split(' ')
            .next()?
            .parse::<usize>()
            .ok()
    });
    assert_eq!(ran, Some(tests), "expected {tests} tests to run:\n{report}");
    let last = report.lines().rev().find(|l| !l.trim().is_empty());
    assert_eq!(last, Some("OK"), "no failures and no skips:\n{report}");
}
