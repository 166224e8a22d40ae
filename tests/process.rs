//! The real `agent-worker` binary as operators run it: signals, the death of the worker,
//! JSON logs without secrets, and the `enqueue` command.

mod common;

use std::time::Duration;

use agent_jobs::{QueueKeys, SessionKeys};
use agent_worker::{cli::local_redis::LocalRedis, connection};
use common::*;
use nix::sys::signal::Signal;
use redis::AsyncCommands;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_die_with_a_sigkilled_worker() {
    let redis = TestRedis::start().await;
    let mut worker = WorkerProcess::run(&redis.url(), "ready", &[]);
    let ids = [sid("pdeath-1"), sid("pdeath-2")];
    for id in &ids {
        enqueue(&redis.conn, id, None).await;
    }
    let mut pids = Vec::new();
    for id in &ids {
        wait_status(&redis.conn, id, "ready", Duration::from_secs(20)).await;
        pids.push(agent_pid(&redis.conn, id).await);
    }
    assert!(pids.iter().all(|pid| alive(*pid)));
    worker.kill();
    for pid in pids {
        wait_gone(
            &format!("agent {pid} to die with its worker"),
            Duration::from_secs(5),
            pid,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_agents_ends_their_sessions_and_exits_zero() {
    let redis = TestRedis::start().await;
    // JSON logs (as worker_command sets), read for the agents' exits.
    let worker = WorkerProcess::run(&redis.url(), "ready", &[]);
    let id = sid("sigterm-1");
    start_ready(&redis.conn, &id).await;
    let pid = agent_pid(&redis.conn, &id).await;
    let output = worker.stop_cleanly().await;
    assert_eq!(
        exits(&output.stderr),
        ["code 0"],
        "the agent got SIGTERM and exited cleanly"
    );
    assert!(!alive(pid));
    // The session ended with its agent: its record stays for the orchestrator (with a TTL of
    // at most session.ended_ttl), the pid goes, and it is no longer live anywhere.
    let keys = SessionKeys::new(&id);
    let state = keys.state();
    assert_eq!(status(&redis.conn, &id).await.as_deref(), Some("completed"));
    assert_eq!(
        hget(&redis.conn, &state, "stopReason").await.as_deref(),
        Some("worker_shutdown")
    );
    let (pid_left, ttl): (bool, i64) = redis::pipe()
        .exists(keys.agent_pid())
        .ttl(&state)
        .query_async(&mut redis.conn.clone())
        .await
        .unwrap();
    assert!(!pid_left);
    assert!((1..=3600).contains(&ttl), "TTL {ttl}");
    assert!(!is_member(&redis.conn, "session:ready", id.as_str()).await);
    let indexed: Option<f64> = redis
        .conn
        .clone()
        .zscore(agent_jobs::keys::SESSION_HEARTBEATS, id.as_str())
        .await
        .unwrap();
    assert_eq!(indexed, None);
}

/// The `exit` of each `agent_exited` event in a JSON log.
fn exits(stderr: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["message"] == "agent_exited")
        .map(|event| event["exit"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_ignoring_sigterm_is_killed_after_the_grace_period() {
    let redis = TestRedis::start().await;
    let grace = ("AGENT_WORKER__AGENT__STOP_GRACE", "500ms");
    let worker = WorkerProcess::run(&redis.url(), "ignore-term", &[grace]);
    let id = sid("stubborn-1");
    start_ready(&redis.conn, &id).await;
    let output = worker.stop_cleanly().await;
    assert_eq!(exits(&output.stderr), ["signal 9"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_events_and_never_the_redis_password() {
    let secret = "s3cret-pa55word";
    let redis = LocalRedis::start_with(&["--requirepass", secret])
        .await
        .unwrap();
    let url = format!("redis://:{secret}@127.0.0.1:{}/", redis.port());
    let settings = common::settings(&url, &[]);
    let conn = connection::connect(&settings.redis).await.unwrap();
    let id = sid("json-logs-1");
    write_config(&conn, &id, "Craig", "u").await;
    let mut command = worker_command(
        &url,
        &["run"],
        "ready",
        &[("AGENT_WORKER__TELEMETRY__FORMAT", "json")],
    );
    command.env("REDIS_URL", &url);
    let worker = WorkerProcess::spawn(command);
    enqueue(&conn, &id, Some("u")).await;
    wait_status(&conn, &id, "ready", Duration::from_secs(20)).await;
    // The worker's settings variables (here the URL with the password) stay out of the
    // agent's environment.
    let received = wait_received(&conn, &id).await;
    assert_eq!(
        received["settings_vars"],
        serde_json::json!([]),
        "{received}"
    );
    let output = worker.stop_cleanly().await;
    let stderr = String::from_utf8(output.stderr).unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        !stderr.contains(secret) && !stdout.contains(secret),
        "the password leaked"
    );

    let events: Vec<serde_json::Value> = stderr
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not one JSON object: {line:?}: {e}"))
        })
        .collect();
    let event = |name: &str| {
        events
            .iter()
            .find(|e| e["message"] == name)
            .unwrap_or_else(|| panic!("no {name} event in {stderr}"))
            .clone()
    };
    let loaded = event("session_config_loaded");
    assert_eq!(loaded["session_id"], "json-logs-1");
    assert_eq!(loaded["voice_id"], "Craig");
    assert_eq!(loaded["source"], "stored");
    assert!(loaded["fields"].as_str().unwrap().contains("voiceId"));
    let spawned = event("agent_process_spawned");
    assert!(spawned["pid"].as_u64().is_some() && spawned["pgid"] == spawned["pid"]);
    assert!(event("agent_ready")["startup_ms"].as_u64().is_some());
    assert_eq!(event("agent_exited")["exit"], "code 0");
    assert!(
        event("worker_started")["redis"]
            .as_str()
            .unwrap()
            .contains("***@")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_enqueue_command_writes_the_config_and_prints_the_task_id() {
    let redis = TestRedis::start().await;
    let output = worker_bin()
        .args(["enqueue", "--session-id", "cli-1", "--user-id", "carol"])
        .args(["--voice-id", "Olivia", "--opening-line", "Hello $(whoami)"])
        .env("AGENT_WORKER__REDIS__URL", redis.url())
        .output()
        .unwrap();
    let task_id = stdout_of("agent-worker enqueue", &output).trim().to_owned();
    assert_eq!(task_id.len(), 26, "a ULID task id: {task_id:?}");
    let key = SessionKeys::new(&sid("cli-1")).config();
    let expected = [
        ("voiceId", "Olivia"),
        ("userName", "carol"),
        ("openingLine", "Hello $(whoami)"),
    ];
    assert_fields(&redis.conn, &key, &expected).await;
    let ttl = ttl_of(&redis.conn, &key).await;
    assert!(ttl > 4 * 3600 - 60 && ttl <= 4 * 3600);
    assert_eq!(active_jobs(&redis.conn).await, [task_id]);

    let bad = worker_bin()
        .args(["enqueue", "--session-id", "a:b"])
        .env("AGENT_WORKER__REDIS__URL", redis.url())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("invalid --session-id") && stderr.contains("':'"),
        "{stderr}"
    );
}

/// A listener on a stopped Redis's port that hangs up on every connection, counting them: a
/// Redis that is still unreachable, but where each connection attempt can be seen.
struct HangUp {
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl HangUp {
    async fn on(port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the stopped Redis's port");
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        Self { accepted, task }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Closes the listener, freeing the port.
    async fn close(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_before_redis_waits_for_it_then_works() {
    let mut redis = TestRedis::start().await;
    redis.redis.stop();
    let mut worker = WorkerProcess::run(&redis.url(), "ready", &[]);
    let unreachable = |lines: &[String]| {
        lines
            .iter()
            .filter(|l| l.contains("redis_unreachable"))
            .count()
    };
    // The worker finds Redis missing (its first attempt is refused) and says so.
    worker
        .wait_log("redis_unreachable", Duration::from_secs(30), |lines| {
            (unreachable(lines) >= 1).then_some(())
        })
        .await;
    // It keeps retrying with back-off without exiting. Each attempt is one probe connection
    // and the connection manager's 1 + 6 tries (connection.rs): nine connections mean a
    // second attempt failed in full and a third began.
    let hang_up = HangUp::on(redis.redis.port()).await;
    wait_for(
        "the worker to try again twice",
        Duration::from_secs(60),
        || async { (hang_up.accepted() >= 9).then_some(()) },
    )
    .await;
    hang_up.close().await;
    assert!(worker.try_wait().is_none(), "the worker must not exit");
    redis.redis.restart().await.unwrap();
    let id = sid("after-late-redis");
    enqueue_when_up(&redis.conn, &id, Duration::from_secs(10)).await;
    wait_status(&redis.conn, &id, "ready", Duration::from_secs(20)).await;
    let output = worker.stop_cleanly().await;
    let lines: Vec<String> = String::from_utf8_lossy(&output.stderr)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        unreachable(&lines),
        1,
        "one log line per outage, not one per attempt: {lines:?}"
    );
    let reachable = events(&output.stderr)
        .into_iter()
        .find(|e| e["message"] == "redis_reachable")
        .unwrap_or_else(|| panic!("no redis_reachable event: {lines:?}"));
    assert!(
        reachable["failures"].as_u64().is_some_and(|n| n >= 2),
        "the outage spanned several failed attempts: {reachable}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_abandons_a_start_in_progress_and_exits() {
    let redis = TestRedis::start().await;
    let ledger = Ledger::new();
    // An agent that never gets ready, with a start-up timeout far beyond the waits below.
    let command = ledger.command("never-ready");
    let mut worker = WorkerProcess::run(
        &redis.url(),
        "never-ready",
        &[
            ("AGENT_WORKER__AGENT__COMMAND", command.as_str()),
            ("AGENT_WORKER__AGENT__STARTUP_TIMEOUT", "120s"),
            ("AGENT_WORKER__SESSION__STALE_AFTER", "300s"),
            ("AGENT_WORKER__SHUTDOWN__DRAIN_TIMEOUT", "120s"),
        ],
    );
    let id = sid("abandoned-1");
    enqueue(&redis.conn, &id, None).await;
    let agent: u32 = wait_for("the agent to start", Duration::from_secs(20), || async {
        ledger
            .sessions()
            .into_iter()
            .find_map(|(room, pid)| (room == id.as_str()).then_some(pid))
    })
    .await;
    worker.signal(Signal::SIGTERM);
    // Signals of one kind do not queue: the second must come after the first was handled.
    worker
        .wait_event("shutdown_requested", Duration::from_secs(10))
        .await;
    worker.signal(Signal::SIGTERM);
    let status = worker.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}");
    assert!(!alive(agent), "the starting agent was killed");
    worker
        .wait_event("agent_start_abandoned", Duration::from_secs(10))
        .await;
    // Left for another replica: still `starting` with the reason, the job retryable (waiting
    // in the scheduled set, its idempotency key kept), our claim gone with our presence.
    assert_eq!(
        common::status(&redis.conn, &id).await.as_deref(),
        Some("starting")
    );
    let reason = hget(&redis.conn, &SessionKeys::new(&id).state(), "lastError").await;
    assert!(reason.unwrap_or_default().contains("abandoned"));
    let keys = QueueKeys::new(QUEUE).unwrap();
    let (scheduled, dead): (usize, usize) = redis::pipe()
        .zcard(keys.scheduled())
        .scard(keys.dead())
        .query_async(&mut redis.conn.clone())
        .await
        .unwrap();
    assert_eq!((scheduled, dead), (1, 0), "retryable, not dead");
    let key = keys.session_idempotency(&id);
    let kept: bool = redis.conn.clone().exists(key).await.unwrap();
    assert!(kept, "the idempotency key is kept for the retry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_dropped_before_its_agent_is_ready_kills_the_agent() {
    use agent_worker::agent::{
        cold::ProcessLauncher, command::LaunchSpec, launcher::Launcher, output::OutputLimits,
        phase::Readiness,
    };
    let ledger = std::env::temp_dir().join(format!("dropped-launch-{}", std::process::id()));
    let _ = std::fs::remove_file(&ledger);
    let (sink, _lines) = agent_worker::agent::log_list::channel();
    let launcher = ProcessLauncher::new(
        Readiness::ready_only(vec!["Room joined".into()], Duration::from_secs(120)),
        OutputLimits::default(),
        sink,
    );
    let spec = LaunchSpec {
        session_id: sid("dropped-1"),
        program: WORKER_BIN.into(),
        args: [
            "test-agent",
            "--behaviour",
            "never-ready",
            "--room",
            "dropped-1",
        ]
        .map(String::from)
        .to_vec(),
        leading_args: 1,
        env: vec![("TEST_AGENT_LEDGER".into(), ledger.to_str().unwrap().into())],
        log_file: None,
    };
    let launch = launcher.launch(spec);
    let started = wait_for("the agent to start", Duration::from_secs(20), || async {
        let line = std::fs::read_to_string(&ledger).ok()?;
        line.split_whitespace().nth(1)?.parse::<u32>().ok()
    });
    // The launch runs until the agent has started, then is dropped (as an abandoned start is).
    let agent = tokio::select! {
        _ = launch => panic!("a never-ready agent was reported ready"),
        agent = started => agent,
    };
    // This process lives on, so no death signal: only the launcher can have stopped it.
    wait_gone("the agent to be killed", Duration::from_secs(10), agent).await;
    let _ = std::fs::remove_file(ledger);
}

/// The test support itself: a worker left behind by a failing test is killed and reaped, and
/// its agents die with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_worker_process_is_killed_and_reaped_with_its_agents() {
    let redis = TestRedis::start().await;
    let worker = WorkerProcess::run(&redis.url(), "ready", &[]);
    let id = sid("dropped-worker-1");
    start_ready(&redis.conn, &id).await;
    let (pid, agent) = (worker.pid(), agent_pid(&redis.conn, &id).await);
    drop(worker);
    assert!(
        proc_state(pid).is_none(),
        "the worker is gone, not a zombie"
    );
    wait_gone(
        "the agent to die with its worker",
        Duration::from_secs(5),
        agent,
    )
    .await;
}
