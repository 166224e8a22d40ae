//! What a Python agent script sees when a start mode runs it: the probe agent
//! (`tests/agents/warm_probe/probe.py`) reports it (`probe report {json}`), and the start
//! modes that import ahead of the session (the warm shim, the zygote) must give it exactly what
//! a cold `python3 SCRIPT --leading=x <session args>` gives it.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use serde_json::Value;

/// The checkout (the probe's paths are compared as cold `python3` sees them from here).
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The probe agent script.
pub fn probe() -> PathBuf {
    repo().join("tests/agents/warm_probe/probe.py")
}

/// The session's environment, as the worker adds it to an agent's.
pub const PROBE_SESSION_ENV: [(&str, &str); 3] = [
    ("SESSION_ID", "shim-1"),
    ("VOICE_ID", "-r oops"),
    ("SESSION_CONFIG", "{\"voiceId\":\"-r oops\"}"),
];

/// [`PROBE_SESSION_ENV`] as the JSON object a handoff or a request carries.
pub fn probe_session_env() -> serde_json::Map<String, Value> {
    PROBE_SESSION_ENV
        .iter()
        .map(|(k, v)| (k.to_string(), Value::from(*v)))
        .collect()
}

/// The session's arguments: odd values, and a system prompt of about 100 KB of non-ASCII text
/// (under the 128 KiB an argument can hold, for the cold start) after `-u nice{marks}`.
pub fn probe_args(marks: &str) -> Vec<String> {
    let text = "Grüße 你好 🎙️ ".repeat(100 * 1000 / 23);
    vec![
        "--room=shim-1".to_owned(),
        "--voice-id=-r oops".to_owned(),
        "--opening-line=line one\nline two $(id) `x` \"q\" Grüße".to_owned(),
        format!("--system-prompt=-u nice{marks} {text}"),
        "--exit-after-ready".to_owned(),
    ]
}

/// The probe's report among `lines`.
pub fn probe_report(lines: &[String]) -> Value {
    let line = lines
        .iter()
        .find_map(|l| l.strip_prefix("probe report "))
        .unwrap_or_else(|| panic!("no probe report in {lines:?}"));
    serde_json::from_str(line).unwrap()
}

/// What `python3 SCRIPT --leading=x <args>` with the session's environment prints in `cwd`.
pub fn cold_probe(script: &str, args: &[String], cwd: &Path) -> Vec<String> {
    let output = Command::new("python3")
        .arg(script)
        .arg("--leading=x")
        .args(args)
        .envs(PROBE_SESSION_ENV)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .expect("python3");
    stdout_lines(output)
}

/// The lines a process printed on stdout; fails the test unless it succeeded.
pub fn stdout_lines(output: Output) -> Vec<String> {
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Asserts that the `mode` start's report (which preloaded `email.mime.text`) shows what the
/// cold one shows, naming the keys that differ (values cut short: the prompt is 100 KB), and
/// that both show the session's `args`.
pub fn assert_probe_saw_cold(
    mode: &str,
    got: &Value,
    cold: &Value,
    args: &[String],
    context: &str,
) {
    // The one difference there must be: the preloaded module is already imported.
    assert_eq!(cold["preloaded_email"], false);
    assert_eq!(got["preloaded_email"], true);
    let strip = |report: &Value| {
        let mut report = report.as_object().unwrap().clone();
        report.remove("preloaded_email");
        report
    };
    let (got, cold) = (strip(got), strip(cold));
    let short = |v: Option<&Value>| {
        let text = v.map_or_else(|| "(none)".to_owned(), Value::to_string);
        text.chars().take(300).collect::<String>()
    };
    let differ: Vec<String> = got
        .keys()
        .chain(cold.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|key| got.get(*key) != cold.get(*key))
        .map(|key| {
            format!(
                "{key}: {mode} {} / cold {}",
                short(got.get(key)),
                short(cold.get(key))
            )
        })
        .collect();
    assert!(
        differ.is_empty(),
        "{context}: {mode} and cold differ in {differ:#?}"
    );
    assert_eq!(cold["args"]["voice_id"], "-r oops");
    assert_eq!(cold["args"]["room"], "shim-1");
    assert_eq!(cold["name"], "__main__");
    assert_eq!(cold["main_is_this"], true);
    assert_eq!(cold["stdin"], "");
    // The prompt arrived whole, as the cold start got it.
    let prompt = args[3].strip_prefix("--system-prompt=").unwrap();
    assert_eq!(cold["args"]["system_prompt"], prompt);
    // No signal handler installed and multiprocessing's start method left unset (compared
    // with cold above; named here so a change to both shows).
    assert_eq!(cold["sigint"], "default_int_handler");
    assert_eq!(cold["sigterm"], "SIG_DFL");
    assert_eq!(cold["start_method"], Value::Null);
}
