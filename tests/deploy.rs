//! A rolling deploy with the shipped settings never cuts a call.
//!
//! Replica W1 runs three calls; W2 (the new version) starts; W1 gets SIGTERM as Kubernetes
//! sends it. W1 drains: /readyz 503, `status` shows it draining with its calls, new calls go
//! to W2, and W1's calls go on past the old 30 s drain timeout until the orchestrator ends
//! them; then W1 exits 0. Both replicas run `agent-worker run` with nothing but the Redis URL,
//! the agent command and a free HTTP port set: every other value is the shipped default.
//!
//! And the numbers the deploy files give (grace periods) agree with the settings they ship.

mod common;

use std::{net::SocketAddr, process::Stdio, time::Duration};

use agent_jobs::SessionKeys;
use agent_worker::{connection::RedisConn, settings::Settings};
use common::*;
use nix::sys::signal::Signal;
use redis::AsyncCommands;

/// `agent-worker run` on `url` with the shipped defaults: only the Redis URL, the test agent
/// and a free HTTP port are set.
fn shipped(url: &str) -> WorkerProcess {
    let mut command = worker_bin();
    command
        .arg("run")
        .env_remove("RUST_LOG")
        .env_remove("REDIS_URL")
        .env("AGENT_WORKER__REDIS__URL", url)
        .env("AGENT_WORKER__HTTP__ADDR", "127.0.0.1:0")
        .env(
            "AGENT_WORKER__AGENT__COMMAND",
            format!("{TEST_AGENT},--behaviour,ready"),
        )
        .env("AGENT_WORKER__TELEMETRY__FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    WorkerProcess::spawn(command)
}

/// The worker's id and HTTP address, from its start-up events.
async fn identity(worker: &WorkerProcess) -> (String, SocketAddr) {
    let started = worker
        .wait_event("worker_started", Duration::from_secs(20))
        .await;
    let http = worker
        .wait_event("http_listening", Duration::from_secs(20))
        .await;
    (
        started["worker_id"].as_str().expect("worker_id").to_owned(),
        http["addr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .expect("http_listening names the address"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_deploy_with_the_shipped_defaults_cuts_no_call() {
    let redis = TestRedis::start().await;
    let conn = &redis.conn;
    let old = shipped(&redis.url());
    let (old_id, old_http) = identity(&old).await;
    let calls: Vec<_> = (1..=3).map(|i| sid(&format!("deploy-call-{i}"))).collect();
    let mut pids = Vec::new();
    for id in &calls {
        start_ready(conn, id).await;
        assert_eq!(
            hget(conn, &SessionKeys::new(id).state(), "workerId").await,
            Some(old_id.clone())
        );
        pids.push(agent_pid(conn, id).await);
    }

    // The new version comes up, then the old one is told to stop.
    let mut new = shipped(&redis.url());
    let (new_id, _) = identity(&new).await;
    wait_for(
        "the new replica's presence",
        Duration::from_secs(20),
        || async {
            let seen: Option<f64> = conn
                .clone()
                .zscore(agent_jobs::keys::WORKERS, &new_id)
                .await
                .ok()?;
            seen.map(drop)
        },
    )
    .await;
    let mut old = old;
    let sigterm_at = tokio::time::Instant::now();
    old.signal(Signal::SIGTERM);

    // Draining: not ready, shown as draining with its three calls, counted in /metrics.
    wait_for("/readyz 503 draining", Duration::from_secs(10), || async {
        let (code, body) = get(old_http, "/readyz").await;
        (code == 503 && body.contains("draining")).then_some(())
    })
    .await;
    let status = wait_for(
        "status --json shows the old replica draining",
        Duration::from_secs(20),
        || async {
            let out = worker_command(&redis.url(), &["status", "--json"], "ready", &[])
                .output()
                .expect("agent-worker status");
            let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let row = status["workers"]
                .as_array()?
                .iter()
                .find(|w| w["id"] == old_id.as_str())?
                .clone();
            row["info"]["draining_since"].as_u64().map(|_| row)
        },
    )
    .await;
    assert_eq!(status["agents"], 3, "{status}");
    assert_eq!(status["alive"], true, "{status}");
    let metrics = get(old_http, "/metrics").await.1;
    assert!(metrics.contains("agent_worker_draining 1"), "{metrics}");

    // A new call goes to the new replica.
    let late = sid("deploy-call-after-sigterm");
    start_ready(conn, &late).await;
    assert_eq!(
        hget(conn, &SessionKeys::new(&late).state(), "workerId").await,
        Some(new_id.clone())
    );

    // The old default drain (30 s) passes: the calls are still up. This waits for time itself
    // to pass, which is what is tested.
    tokio::time::sleep_until(sigterm_at + Duration::from_secs(32)).await;
    assert!(old.try_wait().is_none(), "the old replica still runs");
    for (id, pid) in calls.iter().zip(&pids) {
        assert!(alive(*pid), "the agent of {id} outlived the old 30 s drain");
        assert_eq!(status_of(conn, id).await.as_deref(), Some("ready"));
        assert_eq!(
            hget(conn, &SessionKeys::new(id).state(), "stopReason").await,
            None
        );
    }
    // A draining replica keeps heartbeating its calls: their scores are fresh.
    let now = agent_worker::clock::unix_now() as f64;
    for id in &calls {
        let score = heartbeat_score(conn, id).await.expect("still indexed");
        assert!(now - score < 20.0, "{id} heartbeated {}s ago", now - score);
    }

    // The orchestrator ends the calls; the old replica stops them and exits at once after.
    for id in &calls {
        end_as_orchestrator(conn, id).await;
    }
    let exit = old.wait_exit(Duration::from_secs(60)).await;
    assert!(exit.success(), "the old replica exits 0: {exit:?}");
    for pid in &pids {
        wait_gone("the ended call's agent exits", Duration::from_secs(5), *pid).await;
    }
    let stops = old.events_named("agent_stopped");
    assert!(
        stops.iter().all(|e| e["reason"] == "session_ended"),
        "every call ended by the orchestrator, none by the shutdown: {stops:?}"
    );
    assert_eq!(stops.len(), 3, "{stops:?}");
    let drained = old
        .wait_event("worker_drained", Duration::from_secs(1))
        .await;
    assert_eq!(drained["outcome"], "ended", "{drained}");

    // The new replica keeps serving.
    assert!(new.try_wait().is_none());
    assert_eq!(status_of(conn, &late).await.as_deref(), Some("ready"));
}

/// `session:<id>`'s status.
async fn status_of(conn: &RedisConn, id: &agent_jobs::SessionId) -> Option<String> {
    common::status(conn, id).await
}

/// Seconds of a `"14460s"` or `14460` value.
fn seconds(value: &str) -> u64 {
    value
        .trim()
        .trim_end_matches('s')
        .parse()
        .unwrap_or_else(|_| panic!("{value:?} is a number of seconds"))
}

/// The value of `key:` on its own line in `text`.
fn yaml_value<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|line| line.trim().strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("{key} is set"))
        .trim()
        .trim_matches('"')
}

/// The shipped defaults with `overrides` (not the tests' own fast settings).
fn shipped_settings(overrides: &[(&str, &str)]) -> Settings {
    let env = overrides
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Settings::load_from(None, env).expect("valid settings")
}

/// The longest graceful stop `settings` allow, plus the 20 s margin the deploy files use.
fn grace(settings: &Settings) -> u64 {
    (settings.agent.startup_timeout + settings.shutdown.drain_timeout + settings.agent.stop_grace)
        .as_secs()
        + 20
}

#[test]
fn the_deploy_files_give_the_grace_period_their_settings_need() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |path: &str| std::fs::read_to_string(root.join(path)).expect(path);
    let defaults = shipped_settings(&[]);
    assert_eq!(
        defaults.shutdown.drain_timeout, defaults.session.max_age,
        "the default drain covers a whole call"
    );

    // Kubernetes: the ConfigMap's three values, and the Deployment's grace period.
    let configmap = read("deploy/kubernetes/configmap.yaml");
    let keys = [
        "AGENT_WORKER__AGENT__STARTUP_TIMEOUT",
        "AGENT_WORKER__SHUTDOWN__DRAIN_TIMEOUT",
        "AGENT_WORKER__AGENT__STOP_GRACE",
    ];
    let overrides: Vec<(&str, &str)> = keys
        .iter()
        .map(|k| (*k, yaml_value(&configmap, k)))
        .collect();
    let kubernetes = shipped_settings(&overrides);
    let deployment = read("deploy/kubernetes/deployment.yaml");
    assert_eq!(
        seconds(yaml_value(&deployment, "terminationGracePeriodSeconds")),
        grace(&kubernetes)
    );

    // Compose: its own environment over the defaults, and its stop_grace_period.
    let compose = read("deploy/compose.yaml");
    let compose_env: Vec<(&str, &str)> = keys
        .iter()
        .filter(|k| compose.contains(&format!("{k}:")))
        .map(|k| (*k, yaml_value(&compose, k)))
        .collect();
    assert_eq!(
        seconds(yaml_value(&compose, "stop_grace_period")),
        grace(&shipped_settings(&compose_env))
    );

    // The agent image, README and default.toml name the number for the defaults.
    let default_grace = grace(&defaults).to_string();
    for file in [
        "deploy/agent-image/Dockerfile",
        "README.md",
        "config/default.toml",
    ] {
        assert!(
            read(file).contains(&default_grace),
            "{file} names the default grace period {default_grace} s"
        );
    }
}
