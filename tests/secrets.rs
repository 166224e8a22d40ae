//! Redis credentials: never printed, whatever characters they hold; refused credentials are
//! named and fail a command at once.

mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use nix::sys::signal::Signal;

/// Secrets as generators make them: every character a URL parser stops at.
const SECRETS: [&str; 5] = [
    "s3cr3t/PW+x",
    "s3cr3t#PW",
    "s3cr3t@PW",
    "s3cr3t%PW",
    "s3c?r3t=PW",
];

/// Percent-encodes a password for the userinfo part of a URL.
fn encoded(secret: &str) -> String {
    secret
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn cli(url: &str, args: &[&str]) -> Command {
    let mut command = worker_bin();
    command
        .args(args)
        .env_remove("AGENT_WORKER__REDIS__URL")
        .env_remove("RUST_LOG")
        .env("REDIS_URL", url)
        .env("AGENT_WORKER__TELEMETRY__FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// stdout and stderr of a finished command, as text.
async fn run(command: Command) -> (bool, String) {
    run_output(WorkerProcess::spawn(command)).await
}

fn assert_hidden(secret: &str, text: &str) {
    for shown in [secret.to_owned(), encoded(secret), "s3cr3t".to_owned()] {
        assert!(!text.contains(&shown), "{shown:?} was printed:\n{text}");
    }
}

/// Everything `run` prints with `url` until it has acted on it: it refused the setting and
/// exited, or it got an answer from Redis (refused credentials, or connected) and was then
/// stopped with SIGTERM.
async fn run_worker_once(url: &str) -> String {
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut command = cli(url, &["run"]);
    command
        .env("AGENT_WORKER__HTTP__ADDR", http.to_string())
        .env(
            "AGENT_WORKER__AGENT__COMMAND",
            format!("{TEST_AGENT},--behaviour,ready"),
        );
    let mut worker = WorkerProcess::spawn(command);
    let exited = wait_for(
        "the worker to refuse the URL or get an answer from Redis",
        Duration::from_secs(20),
        || {
            let exited = worker.try_wait().is_some();
            async move {
                if exited {
                    return Some(true);
                }
                // "redis unreachable" until its first connection attempt has an answer.
                http_get(http, "/readyz")
                    .await
                    .filter(|(_, body)| !body.contains("unreachable"))
                    .map(|_| false)
            }
        },
    )
    .await;
    if !exited {
        worker.signal(Signal::SIGTERM);
    }
    let (_, text) = run_output(worker).await;
    text
}

/// stdout and stderr of a worker that was started with both piped, once it exits.
async fn run_output(worker: WorkerProcess) -> (bool, String) {
    let out = worker.output().await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_with_url_reserved_characters_are_never_printed() {
    for secret in SECRETS {
        let redis = TestRedis::start_requiring(secret, &encoded(secret)).await;
        let port = redis.redis.port();
        // As written by hand (not a valid URL: parsers stop at the reserved character) and
        // percent-encoded (valid, and accepted by Redis).
        let raw = format!("redis://:{secret}@127.0.0.1:{port}/0");
        let good = format!("redis://:{}@127.0.0.1:{port}/0", encoded(secret));
        // As written by hand, the URL points nowhere useful (or nowhere): `status` (after its
        // connection attempts give up) and the worker (until it refuses the setting or gets
        // an answer from Redis) show what is printed of it.
        let (_, text) = run(cli(&raw, &["status"])).await;
        assert_hidden(secret, &text);
        let text = run_worker_once(&raw).await;
        assert!(
            text.contains("redis"),
            "the worker said what it made of the URL: {text}"
        );
        assert_hidden(secret, &text);
        for args in [&["status"][..], &["dead", "list"], &["sweep", "--dry-run"]] {
            let (ok, text) = run(cli(&good, args)).await;
            assert!(ok, "{args:?} with {secret:?}: {text}");
            assert_hidden(secret, &text);
        }
        let (ok, text) = run(cli(&good, &["enqueue", "--session-id", "s-1"])).await;
        assert!(ok, "{text}");
        assert_hidden(secret, &text);
        // The worker's own logs, start-up to shutdown.
        let mut worker = cli(&good, &["run"]);
        worker
            .env("AGENT_WORKER__HTTP__ADDR", "127.0.0.1:0")
            .env("AGENT_WORKER__SHUTDOWN__DRAIN_TIMEOUT", "0s")
            .env(
                "AGENT_WORKER__AGENT__COMMAND",
                format!("{TEST_AGENT},--behaviour,ready"),
            );
        let worker = WorkerProcess::spawn(worker);
        wait_status(&redis.conn, &sid("s-1"), "ready", Duration::from_secs(20)).await;
        let out = worker.stop().await;
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(text.contains("worker_started"), "{text}");
        assert_hidden(secret, &text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_fail_a_command_at_once_and_keep_the_worker_unready() {
    let redis = TestRedis::start_requiring("right-one", "right-one").await;
    let port = redis.redis.port();
    for (url, what) in [
        (
            format!("redis://:wrong-one@127.0.0.1:{port}"),
            "a wrong password",
        ),
        (format!("redis://127.0.0.1:{port}"), "no password"),
    ] {
        let started = Instant::now();
        let (ok, text) = run(cli(&url, &["status"])).await;
        let took = started.elapsed();
        assert!(!ok, "{what}: {text}");
        assert!(text.contains("redis_auth_failed"), "{what}: {text}");
        assert!(!text.contains("wrong-one"), "{text}");
        // It used to retry for 7.6 s, as if Redis were down. (A refused AUTH is answered in
        // milliseconds: 1 s leaves a loaded machine room and still catches any retry loop.)
        assert!(took < Duration::from_secs(1), "{what}: took {took:?}");
    }

    let http = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut worker = cli(&format!("redis://:wrong-one@127.0.0.1:{port}"), &["run"]);
    worker.env("AGENT_WORKER__HTTP__ADDR", http.to_string());
    let worker = WorkerProcess::spawn(worker);
    let (code, body) = wait_for("/readyz", Duration::from_secs(10), || async {
        http_get(http, "/readyz")
            .await
            .filter(|(_, body)| body.contains("authentication"))
    })
    .await;
    assert_eq!(code, 503);
    assert_eq!(body, "not ready: redis authentication failed\n");
    let out = worker.stop_cleanly().await;
    let auth_failures = events(&out.stderr)
        .iter()
        .filter(|e| e["message"] == "redis_auth_failed")
        .count();
    assert_eq!(auth_failures, 1, "logged once, not per retry");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("wrong-one"));
}
