//! The least-privilege Redis ACL rule shipped in `deploy/redis/agent-worker.acl`: the worker,
//! its operator commands and its producer work end to end under exactly that rule, and a rule
//! without apalis-redis's undeclared `core:apalis:queues:list` fails with an error that names
//! the key.

mod common;

use agent_worker::connection::RedisConn;
use std::{collections::HashMap, path::PathBuf, time::Duration};

use agent_jobs::{SessionId, SessionKeys};
use common::*;
use redis::AsyncCommands;

/// The shipped rule, as operators load it.
const ACL_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/redis/agent-worker.acl");
const PASSWORD: &str = "acl-test-secret";
/// The one key the worker writes outside its documented families (apalis-redis's worker
/// registration, `lua/register_worker.lua`).
const APALIS_KEY: &str = "~core:apalis:queues:list";

/// The `user agent-worker …` line of the shipped file.
fn shipped_rule() -> String {
    let text = std::fs::read_to_string(ACL_FILE).expect("deploy/redis/agent-worker.acl");
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    // Redis before 8.8 refuses a whole ACL file that has a comment line in it.
    assert_eq!(lines.len(), 1, "one rule and nothing else: {text}");
    lines[0].to_owned()
}

/// Writes an ACL file: an unrestricted passwordless `default` user (the test's own admin
/// connection, playing the orchestrator) plus `rule` with the test password.
fn acl_file(rule: &str) -> PathBuf {
    assert!(rule.contains(" >CHANGE-ME "), "{rule}");
    let path = std::env::temp_dir().join(format!(
        "agent-worker-acl-{}-{}.acl",
        std::process::id(),
        ulid::Ulid::generate()
    ));
    let rule = rule.replace(" >CHANGE-ME ", &format!(" >{PASSWORD} "));
    std::fs::write(
        &path,
        format!("user default on nopass ~* &* +@all\n{rule}\n"),
    )
    .unwrap();
    path
}

/// A private Redis whose users come from `rule`, and the URL of the restricted user.
async fn redis_with(rule: &str) -> (TestRedis, String, PathBuf) {
    let file = acl_file(rule);
    let redis = TestRedis::start_with(&["--aclfile", file.to_str().unwrap()]).await;
    let url = format!(
        "redis://agent-worker:{PASSWORD}@127.0.0.1:{}/",
        redis.redis.port()
    );
    (redis, url, file)
}

/// Runs an `agent-worker` command under the restricted user: (success, stdout, stderr).
async fn cli(url: &str, args: &[&str]) -> (bool, String, String) {
    let out = WorkerProcess::spawn(worker_command(url, args, "ready", &[]))
        .output()
        .await;
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `agent-worker enqueue` of `id` with the voice Craig under the restricted user, as the
/// orchestrator runs it: (success, stdout, stderr).
async fn enqueue_craig(url: &str, id: &SessionId) -> (bool, String, String) {
    cli(
        url,
        &[
            "enqueue",
            "--session-id",
            id.as_str(),
            "--voice-id",
            "Craig",
        ],
    )
    .await
}

/// The server's ACL LOG as (reason, object, count) per entry.
async fn acl_log(admin: &RedisConn) -> Vec<(String, String, u64)> {
    let entries: Vec<HashMap<String, redis::Value>> = redis::cmd("ACL")
        .arg("LOG")
        .arg(1000)
        .query_async(&mut admin.clone())
        .await
        .expect("ACL LOG");
    entries
        .iter()
        .map(|entry| {
            let text = |field: &str| -> String {
                entry
                    .get(field)
                    .and_then(|v| redis::from_redis_value_ref(v).ok())
                    .unwrap_or_default()
            };
            let count = entry
                .get("count")
                .and_then(|v| redis::from_redis_value_ref(v).ok())
                .unwrap_or(0);
            (text("reason"), text("object"), count)
        })
        .collect()
}

#[test]
fn the_shipped_rule_is_least_privilege() {
    let rule = shipped_rule();
    let tokens: Vec<&str> = rule.split_whitespace().collect();
    assert_eq!(&tokens[..4], ["user", "agent-worker", "on", ">CHANGE-ME"]);
    // Starts from nothing, then grants one by one.
    for reset in ["resetkeys", "resetchannels", "-@all"] {
        assert!(tokens.contains(&reset), "{reset} in {rule}");
    }
    for broad in [
        "allkeys",
        "allchannels",
        "allcommands",
        "nopass",
        "~*",
        "&*",
        "%R~*",
        "%W~*",
    ] {
        assert!(!tokens.contains(&broad), "{broad} in {rule}");
    }
    assert!(
        !tokens.iter().any(|t| t.starts_with("+@")),
        "commands are listed one by one, never by category: {rule}"
    );
    for dangerous in [
        "+flushall",
        "+flushdb",
        "+keys",
        "+config",
        "+debug",
        "+eval",
        "+script",
        "+script|flush",
        "+acl",
        "+shutdown",
        "+monitor",
        "+client",
        "+scan",
        "+select",
        "+psubscribe",
    ] {
        assert!(!tokens.contains(&dangerous), "{dangerous} in {rule}");
    }
    assert!(tokens.contains(&APALIS_KEY), "{rule}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_runs_end_to_end_under_the_shipped_rule() {
    let (redis, url, file) = redis_with(&shipped_rule()).await;
    let admin = &redis.conn;

    // The rule is in force: the user cannot list keys, read another application's keys or
    // wipe the server.
    let mut user = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("the restricted user authenticates");
    for (what, command) in [
        ("KEYS", redis::cmd("KEYS").arg("*").clone()),
        ("GET", redis::cmd("GET").arg("billing:secret").clone()),
        ("FLUSHALL", redis::cmd("FLUSHALL").clone()),
        ("CONFIG", redis::cmd("CONFIG").arg("GET").arg("*").clone()),
    ] {
        let error = command
            .query_async::<redis::Value>(&mut user)
            .await
            .expect_err(what);
        assert_eq!(error.code(), Some("NOPERM"), "{what}: {error}");
    }
    let _: () = redis::cmd("ACL")
        .arg("LOG")
        .arg("RESET")
        .query_async(&mut admin.clone())
        .await
        .unwrap();

    // The producer side (as the orchestrator's `agent-worker enqueue` does), before any worker.
    let id = sid("acl-1");
    let (ok, task_id, stderr) = enqueue_craig(&url, &id).await;
    assert!(ok, "enqueue: {stderr}");
    assert!(!task_id.trim().is_empty());

    let log_dir =
        std::env::temp_dir().join(format!("agent-worker-acl-logs-{}", std::process::id()));
    let worker = WorkerProcess::spawn(worker_command(
        &url,
        &["run"],
        "ready",
        &[
            // Pick-up relies on the wake channel (SUBSCRIBE), not on polling.
            ("AGENT_WORKER__WORKER__POLL_INTERVAL", "1h"),
            ("AGENT_WORKER__SWEEP__INTERVAL", "1s"),
            ("AGENT_WORKER__RETENTION__INTERVAL", "1s"),
            ("AGENT_WORKER__RETENTION__DONE", "1s"),
            ("AGENT_WORKER__AGENT__LOG_DIR", log_dir.to_str().unwrap()),
        ],
    ));
    wait_status(admin, &id, "ready", Duration::from_secs(20)).await;
    assert_eq!(
        wait_received(admin, &id).await["contract"]["voice_id"],
        "Craig"
    );
    let keys = SessionKeys::new(&id);
    let pid = agent_pid(admin, &id).await;
    assert!(alive(pid), "the agent runs");

    // The same session enqueued again is stored once (the producer reads the holder of its
    // idempotency key).
    let (ok, again, err) = cli(&url, &["enqueue", "--session-id", id.as_str()]).await;
    assert!(
        ok && again.contains(task_id.trim()),
        "enqueue again: {again}{err}"
    );

    // A job that fails for good, for `dead list` and `dead retry`: its session's config is
    // not a hash (the worker names the type; the dead job releases its idempotency key).
    let broken = sid("acl-broken");
    let _: () = admin
        .clone()
        .set(SessionKeys::new(&broken).config(), "not a hash")
        .await
        .unwrap();
    let (ok, dead, err) = cli(&url, &["enqueue", "--session-id", broken.as_str()]).await;
    assert!(ok, "enqueue: {err}");
    let dead = dead.trim().to_owned();
    let result = wait_dead(admin, &dead).await;
    assert!(result.contains("string"), "{result}");

    // The operator commands, under the same user.
    let (ok, out, err) = cli(&url, &["status", "--json"]).await;
    assert!(ok, "status: {err}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    assert_eq!(status["sessions"]["ready"], 1, "{out}");
    assert_eq!(status["maxmemory_policy"], "noeviction", "{out}");
    assert_eq!(status["workers"].as_array().map(Vec::len), Some(1), "{out}");
    let (ok, out, err) = cli(&url, &["status"]).await;
    assert!(ok && out.contains("alive"), "status: {out}{err}");
    let (ok, out, err) = cli(&url, &["dead", "list", "--json"]).await;
    assert!(ok && out.contains(&dead), "dead list: {out}{err}");
    let (ok, out, err) = cli(&url, &["dead", "retry", &dead]).await;
    assert!(
        ok && out.contains("1 job(s) requeued"),
        "dead retry: {out}{err}"
    );
    for args in [&["sweep", "--dry-run"][..], &["sweep"]] {
        let (ok, out, err) = cli(&url, args).await;
        assert!(ok, "{args:?}: {out}{err}");
    }
    // The one-off legacy migration walks the whole keyspace: not granted (see the README).
    let (ok, _, err) = cli(&url, &["sweep", "--scan", "--dry-run"]).await;
    assert!(!ok && err.contains("'scan'"), "sweep --scan: {err}");

    // The orchestrator ends the session by deleting its keys: the agent stops.
    let _: () = admin.clone().del(&keys.all()).await.unwrap();
    wait_gone(
        "the agent to stop after its keys were deleted",
        Duration::from_secs(15),
        pid,
    )
    .await;

    // A second session after all that, to see the worker still takes jobs.
    let second = sid("acl-2");
    let (ok, _, err) = cli(
        &url,
        &[
            "enqueue",
            "--session-id",
            second.as_str(),
            "--voice-id",
            "Olivia",
        ],
    )
    .await;
    assert!(ok, "enqueue: {err}");
    wait_status(admin, &second, "ready", Duration::from_secs(20)).await;

    // The orchestrator's Python client under the same rule: enqueue, wait for ready on the
    // event stream (XREAD), end the session (its atomic delete script): the agent stops.
    let third = sid("acl-python");
    let python = |args: &'static [&'static str]| {
        let (url, third) = (url.clone(), third.clone());
        async move {
            let out = common::python()
                .current_dir(PYTHON_DIR)
                .args(["-m", "agent_worker", args[0]])
                .args(["--redis-url", url.as_str(), "--session-id", third.as_str()])
                .args(&args[1..])
                .output()
                .await
                .expect("python3 -m agent_worker (run through `cargo xtask test`)");
            assert!(
                out.status.success(),
                "python client {}: {}{}",
                args[0],
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    python(&["enqueue", "--voice-id", "Ashley"]).await;
    python(&["wait", "--timeout", "20"]).await;
    let received = wait_received(admin, &third).await;
    assert_eq!(received["contract"]["voice_id"], "Ashley");
    let python_agent = received["pid"].as_u64().unwrap() as u32;
    python(&["end"]).await;
    wait_gone(
        "the agent to stop after the Python client ended its session",
        Duration::from_secs(15),
        python_agent,
    )
    .await;

    // The scheduled sweep and retention ran (a job claims its next tick only after the last
    // one finished).
    wait_for(
        "two ticks of sweep and retention",
        Duration::from_secs(10),
        || async {
            let mut ticks = 0;
            for job in ["sweep", "retention"] {
                let leases: Vec<String> = admin
                    .clone()
                    .keys(format!("agent-worker:tick-lease:{job}:*"))
                    .await
                    .unwrap();
                ticks += usize::from(leases.len() >= 2);
            }
            (ticks == 2).then_some(())
        },
    )
    .await;

    let out = worker.stop_cleanly().await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    for done in ["sweep_complete", "retention_complete"] {
        assert_logged(&out.stderr, done, &[]);
    }
    assert_logged(&out.stderr, "agent_stopped", &[("reason", "session_ended")]);
    for refused in ["NOPERM", "NoPerm", "can't", "redis_permission_denied"] {
        assert!(!stderr.contains(refused), "{refused}: {stderr}");
    }
    // Redis itself saw no refusal but the SCAN above. (CLIENT SETINFO, which redis-rs sends
    // on connect and whose failure it ignores, is refused on Redis >= 7.2 and unknown before.)
    let refused: Vec<_> = acl_log(admin)
        .await
        .into_iter()
        .filter(|(_, object, _)| object != "scan" && !object.starts_with("client|setinfo"))
        .collect();
    assert!(
        refused.is_empty(),
        "refused under the shipped rule: {refused:?}"
    );
    let _ = std::fs::remove_file(file);
    let _ = std::fs::remove_dir_all(log_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_without_the_apalis_key_fails_with_an_error_naming_it() {
    let rule = shipped_rule();
    let narrower = rule.replace(&format!(" {APALIS_KEY}"), "");
    assert_ne!(narrower, rule);
    let (redis, url, file) = redis_with(&narrower).await;
    let admin = &redis.conn;

    let id = sid("narrow-1");
    let (ok, _, err) = enqueue_craig(&url, &id).await;
    assert!(ok, "the producer needs no apalis key: {err}");
    let worker = WorkerProcess::spawn(worker_command(
        &url,
        &["run"],
        "ready",
        &[("AGENT_WORKER__WORKER__RESTART_BACKOFF_MAX", "200ms")],
    ));
    // Each run of the job worker fails its registration: Redis counts the refusals.
    wait_for(
        "three refused registrations",
        Duration::from_secs(20),
        || async {
            acl_log(admin)
                .await
                .iter()
                .any(|(reason, object, count)| {
                    reason == "key" && object == "core:apalis:queues:list" && *count >= 3
                })
                .then_some(())
        },
    )
    .await;
    assert_eq!(status(admin, &id).await, None, "no agent starts meanwhile");

    // Someone fixes the rule: the waiting worker starts the session, no restart needed.
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("agent-worker")
        .arg(APALIS_KEY)
        .query_async(&mut admin.clone())
        .await
        .unwrap();
    wait_status(admin, &id, "ready", Duration::from_secs(20)).await;

    let out = worker.stop_cleanly().await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let events = events(&out.stderr);
    let denied: Vec<_> = events
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("redis_permission_denied"))
        })
        .collect();
    // Once for the streak, not once per restart.
    assert_eq!(denied.len(), 1, "{stderr}");
    let restarts = events
        .iter()
        .filter(|e| e["message"] == "worker_restarted")
        .count();
    assert!(restarts >= 2, "{stderr}");
    let event = denied[0];
    assert_eq!(event["level"], "ERROR");
    assert_eq!(event["denied"], "key");
    assert_eq!(event["key"], "core:apalis:queues:list");
    let message = event["message"].as_str().unwrap();
    assert!(
        message.contains("access the key core:apalis:queues:list")
            && message.contains("deploy/redis/agent-worker.acl"),
        "{message}"
    );
    let _ = std::fs::remove_file(file);
}
