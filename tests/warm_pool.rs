//! The warm pool (`agent.warm_pool`): sessions handed to idle warm processes, one session per
//! process, refilled with back-off, never at the cost of a start.
//!
//! The warm processes are the test agent in its warm mode (`test-agent --warm`: it prints the
//! warm line, reads its handoff line, then behaves as a cold agent with those arguments), so
//! every assertion below is about what a real process received and did. The ledger records each
//! warm spawn (`warm <pid> <ms>`) and each agent's session (`<room> <pid>`) as it happens.

mod common;

use agent_worker::connection::RedisConn;
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    process::Stdio,
    time::Duration,
};

use agent_jobs::{SessionId, SessionKeys, keys::WORKER_WARM};
use common::*;
use nix::sys::signal::Signal;
use redis::AsyncCommands;

/// The idle warm processes the worker last reported with its presence (every second here).
async fn warm_idle(conn: &RedisConn) -> Vec<u64> {
    let counts: HashMap<String, u64> = conn.clone().hgetall(WORKER_WARM).await.expect("HGETALL");
    counts.into_values().collect()
}

async fn wait_warm_idle(conn: &RedisConn, want: u64) {
    wait_for(
        &format!("{want} idle warm processes"),
        Duration::from_secs(30),
        || async { (warm_idle(conn).await == [want]).then_some(()) },
    )
    .await
}

/// Waits for a presence beat from at least a second after `after_ms` (unix ms; scores are unix
/// seconds) that reports `want` idle warm processes: the pool as it is since then, not a count
/// from before.
async fn wait_idle_after(conn: &RedisConn, after_ms: u64, want: u64) {
    let after = after_ms / 1000 + 2;
    wait_for(
        &format!("a presence beat reporting {want} idle warm processes"),
        Duration::from_secs(20),
        || async {
            let seen: Vec<(String, u64)> = conn
                .clone()
                .zrange_withscores(agent_jobs::keys::WORKERS, 0, -1)
                .await
                .unwrap();
            let beat_after = seen.iter().any(|(_, at)| *at >= after);
            (beat_after && warm_idle(conn).await == [want]).then_some(())
        },
    )
    .await
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A file whose creation lets warm-ups started with [`Gate::warm_arg`] print their warm line:
/// the test decides when a warm-up ends.
struct Gate(std::path::PathBuf);

impl Gate {
    fn new() -> Self {
        Self(std::env::temp_dir().join(format!("warm-gate-{}", ulid::Ulid::generate())))
    }

    /// The test agent's option that waits for this gate.
    fn warm_arg(&self) -> String {
        format!("--warm-wait-file={}", self.0.display())
    }

    fn open(&self) {
        std::fs::write(&self.0, b"").expect("open the gate");
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The value of the sample `series` (name with labels, exactly as exposed) in a scrape.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// `agent-worker run` in its own process (its own metrics, its log on stderr), stopped with
/// the test even if the test fails.
struct BinWorker(WorkerProcess);

impl BinWorker {
    fn start(redis: &TestRedis, env: &[(&'static str, String)]) -> Self {
        let mut command = worker_command(&redis.url(), &["run"], "ready", &borrowed(env));
        command.stdout(Stdio::null());
        Self(WorkerProcess::spawn(command))
    }

    /// Where it serves HTTP (it logs `http_listening`: port 0 was asked for).
    async fn addr(&self) -> SocketAddr {
        let listening = self
            .0
            .wait_event("http_listening", Duration::from_secs(20))
            .await;
        listening["addr"]
            .as_str()
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("an address in {listening}"))
    }

    async fn metrics(&self) -> String {
        let (status, page) = get(self.addr().await, "/metrics").await;
        assert_eq!(status, 200);
        page
    }

    /// Waits until a scrape satisfies `check`.
    async fn wait_metrics(&self, check: impl Fn(&str) -> bool) {
        let last = std::cell::RefCell::new(String::new());
        let found = poll(
            Duration::from_secs(20),
            Duration::from_millis(50),
            || async {
                let page = self.metrics().await;
                let ok = check(&page);
                *last.borrow_mut() = page;
                ok.then_some(())
            },
        )
        .await;
        if found.is_none() {
            let last = last.into_inner();
            let pool: Vec<&str> = last.lines().filter(|l| l.contains("warm")).collect();
            panic!("timed out waiting for the metrics; the pool's: {pool:#?}");
        }
    }

    /// SIGTERMs it, waits for it, and returns its log's events (whole: read to the end of
    /// the pipe).
    async fn stop(self) -> Vec<serde_json::Value> {
        events(&self.0.stop().await.stderr)
    }
}

/// The overrides of a pool of `size` warm test agents started with `warm_args`, warming up
/// `concurrency` at a time; the cold agents behave as `behaviour`, and so do the warm ones once
/// they have their session. Every agent writes to `ledger`.
fn pool_env(
    ledger: &Ledger,
    behaviour: &str,
    size: usize,
    warm_args: &str,
    concurrency: usize,
) -> Vec<(&'static str, String)> {
    let warm_args = [format!("--behaviour,{behaviour}"), warm_args.to_owned()]
        .into_iter()
        .filter(|a| !a.is_empty())
        .collect::<Vec<_>>()
        .join(",");
    vec![
        ("AGENT_WORKER__AGENT__COMMAND", ledger.command(behaviour)),
        (
            "AGENT_WORKER__AGENT__WARM_COMMAND",
            ledger.warm_command(&warm_args),
        ),
        ("AGENT_WORKER__AGENT__WARM_POOL", size.to_string()),
        (
            "AGENT_WORKER__AGENT__WARM_CONCURRENCY",
            concurrency.to_string(),
        ),
    ]
}

/// `env` as the borrowed pairs the settings and the worker's command take.
fn borrowed<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// A test's own Redis and ledger, and an in-process worker on them with a pool of `size` warm
/// test agents started with `warm_args`, two warm-ups at a time ([`pool_env`]), and the `extra`
/// overrides.
async fn start_pooled(
    behaviour: &str,
    size: usize,
    warm_args: &str,
    extra: &[(&str, &str)],
) -> (TestRedis, Ledger, TestWorker) {
    let (redis, ledger) = (TestRedis::start().await, Ledger::new());
    let env = pool_env(&ledger, behaviour, size, warm_args, 2);
    let mut overrides = borrowed(&env);
    overrides.extend_from_slice(extra);
    let worker = TestWorker::start(redis.settings(behaviour, &overrides));
    (redis, ledger, worker)
}

/// A line limit that keeps the test agent's report of a 100 KB prompt whole.
const WHOLE_LINES: (&str, &str) = ("AGENT_WORKER__AGENT__MAX_LINE_BYTES", "1048576");

/// Waits for the warm-up number `index` (from 0) to be idle in the pool ([`wait_idle_after`]
/// its spawn); its pid.
async fn wait_warm_up_idle(conn: &RedisConn, ledger: &Ledger, index: usize) -> u32 {
    let (pid, spawned_ms) = wait_warm_start(ledger, index).await;
    wait_idle_after(conn, spawned_ms, 1).await;
    pid
}

/// Starts the session `name` and asserts that the warm process `pid` took it.
async fn assert_warm_take(conn: &RedisConn, name: &str, pid: u32) {
    let (_, got) = start_session(conn, &sid(name), "Olivia").await;
    assert_eq!(got["warm"], true, "{name} started warm");
    assert_eq!(
        got["pid"].as_u64(),
        Some(u64::from(pid)),
        "{name} went to {pid}"
    );
}

/// Writes `id`'s config (`voice`, user `user`), enqueues its start (for `user`) and waits
/// until its agent is ready: the task id and what the agent reported receiving.
async fn start_session(
    conn: &RedisConn,
    id: &SessionId,
    voice: &str,
) -> (String, serde_json::Value) {
    write_config(conn, id, voice, "user").await;
    let task = enqueue(conn, id, Some("user")).await;
    wait_status(conn, id, "ready", Duration::from_secs(20)).await;
    (task, wait_received(conn, id).await)
}

/// Waits (up to 20 s) for the warm-up number `index` (from 0) in the ledger: its pid and
/// spawn time (unix ms).
async fn wait_warm_start(ledger: &Ledger, index: usize) -> (u32, u64) {
    wait_for(
        &format!("warm-up number {}", index + 1),
        Duration::from_secs(20),
        || async { ledger.warm_starts().get(index).copied() },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_sessions_through_a_pool_of_four_each_get_their_own_agent_and_voice() {
    // Agents end their call at once, so the replica keeps taking sessions, warm and cold.
    let max_agents = ("AGENT_WORKER__AGENT__MAX_AGENTS", "8");
    let (redis, ledger, worker) = start_pooled("exit-after-ready", 4, "", &[max_agents]).await;
    wait_warm_idle(&redis.conn, 4).await;
    let sessions: Vec<_> = (0..100)
        .map(|i| (sid(&format!("warm-many-{i}")), format!("Voice{i:03}")))
        .collect();
    for (id, voice) in &sessions {
        write_config(&redis.conn, id, voice, "test_concurrent_user").await;
    }
    let jobs: Vec<_> = sessions
        .iter()
        .map(|(id, _)| agent_jobs::AgentStart::new(id.clone()).with_user("test_concurrent_user"))
        .collect();
    producer(&redis.conn).enqueue_many(&jobs).await.unwrap();

    let mut pids = HashSet::new();
    let mut warm_sessions = 0;
    for (id, voice) in &sessions {
        wait_status(&redis.conn, id, "completed", Duration::from_secs(120)).await;
        let got = wait_received(&redis.conn, id).await;
        assert_agent_of(&got, id, voice);
        let pid = got["pid"].as_u64().unwrap();
        assert!(pids.insert(pid), "pid {pid} served two sessions");
        let warm = hget(&redis.conn, &SessionKeys::new(id).state(), "warm").await;
        let expected = if got["warm"] == true { "1" } else { "0" };
        assert_eq!(warm.as_deref(), Some(expected), "warm field of {id}");
        warm_sessions += usize::from(got["warm"] == true);
    }
    eprintln!("{warm_sessions} of 100 sessions started warm");
    // The four warm at the start were taken, at least.
    assert!(
        warm_sessions >= 4,
        "only {warm_sessions} sessions started warm"
    );
    // No process, warm or cold, ever took a second room.
    let mut rooms_of: HashMap<u32, Vec<String>> = HashMap::new();
    for (room, pid) in ledger.sessions() {
        rooms_of.entry(pid).or_default().push(room);
    }
    for (pid, rooms) in &rooms_of {
        assert_eq!(rooms.len(), 1, "process {pid} served {rooms:?}");
    }
    let warm_pids: HashSet<u32> = ledger
        .warm_starts()
        .into_iter()
        .map(|(pid, _)| pid)
        .collect();
    let handed = rooms_of
        .keys()
        .filter(|pid| warm_pids.contains(pid))
        .count();
    assert_eq!(
        handed, warm_sessions,
        "warm sessions are the ledger's warm processes"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handoff_carries_every_value_verbatim() {
    // The test agent's report quotes a 100 KB prompt: keep its line whole.
    let (redis, _ledger, worker) = start_pooled("ready", 1, "", &[WHOLE_LINES]).await;
    wait_warm_idle(&redis.conn, 1).await;
    let id = sid("warm-verbatim");
    let opening =
        "-r oops; $(rm -rf /) `id` | \"quoted\" 'single' \\ back\nsecond line\tTAB Grüße 你好 🎙️";
    let prompt = format!("-u nice {}", "prompt ✓ ".repeat(100 * 1024 / 10));
    // SESSION_CONFIG carries the config's other fields: odd ones there too, and a field the
    // worker does not know, which it passes on all the same.
    let user = "-u $(id) `x` \"q\"\nline two\ttab Grüße 🎙️";
    let extra = "{\"not\": \"json of ours\"} \\ ; rm -rf / \u{7f} 你好";
    write_full_config(
        &redis.conn,
        &id,
        "-Voice=odd",
        user,
        Some(opening),
        Some(&prompt),
    )
    .await;
    let config_key = SessionKeys::new(&id).config();
    let _: () = redis
        .conn
        .clone()
        .hset(&config_key, "x-extra", extra)
        .await
        .unwrap();
    enqueue(&redis.conn, &id, Some("user")).await;
    wait_status(&redis.conn, &id, "ready", Duration::from_secs(20)).await;
    let got = wait_received(&redis.conn, &id).await;
    assert_eq!(got["warm"], true, "a warm process took it");
    assert_eq!(got["contract"]["room"], id.as_str());
    assert_eq!(got["contract"]["voice_id"], "-Voice=odd");
    assert_eq!(got["contract"]["opening_line"], opening);
    assert_eq!(got["contract"]["system_prompt"], prompt.as_str());
    assert_eq!(got["env"]["SESSION_ID"], id.as_str());
    assert_eq!(got["env"]["VOICE_ID"], "-Voice=odd");
    // SESSION_CONFIG is the config hash as JSON, but for the opening line and the prompt
    // (they travel once, as options).
    let config: HashMap<String, String> =
        serde_json::from_str(got["env"]["SESSION_CONFIG"].as_str().unwrap()).unwrap();
    let mut stored: HashMap<String, String> =
        redis.conn.clone().hgetall(&config_key).await.unwrap();
    assert!(stored.remove("openingLine").is_some());
    assert!(stored.remove("systemPrompt").is_some());
    assert_eq!(config, stored);
    assert_eq!(config["voiceId"], "-Voice=odd");
    assert_eq!(config["userName"], user);
    assert_eq!(config["x-extra"], extra);
    assert!(config.contains_key("updatedAt"), "{config:?}");
    // The argv is the warm command's, then exactly the session's options.
    let argv: Vec<&str> = got["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let tail = &argv[argv.len() - 4..];
    assert_eq!(
        tail,
        [
            format!("--room={id}").as_str(),
            "--voice-id=-Voice=odd",
            format!("--opening-line={opening}").as_str(),
            format!("--system-prompt={prompt}").as_str(),
        ]
    );
    assert_eq!(
        hget(&redis.conn, &SessionKeys::new(&id).state(), "warm")
            .await
            .as_deref(),
        Some("1")
    );
    worker.stop().await;
}

/// A warm command that fails every time, as `warm_behaviour` says, through the worker's
/// binary (for its log): sessions start cold, and the warm-ups are retried one at a time after
/// back-offs of 1 s, 2 s, 4 s: growing, never a respawn loop, and logged once for the streak.
async fn failing_warm_ups_back_off(warm_behaviour: &str, pool: usize) {
    let redis = TestRedis::start().await;
    let ledger = Ledger::new();
    let warm_args = format!("--warm-behaviour={warm_behaviour}");
    // One warm-up at a time from the start, so every gap is a back-off.
    let worker = BinWorker::start(&redis, &pool_env(&ledger, "ready", pool, &warm_args, 1));
    let id = sid(&format!("warm-failing-{warm_behaviour}"));
    let (_, got) = start_session(&redis.conn, &id, "Craig").await;
    assert_eq!(got["warm"], false);
    assert_eq!(got["contract"]["voice_id"], "Craig");
    assert_eq!(
        hget(&redis.conn, &SessionKeys::new(&id).state(), "warm")
            .await
            .as_deref(),
        Some("0")
    );
    // Spawns at 0 s, then after back-offs of 1 s, 2 s, 4 s (each after the failure, which comes
    // within milliseconds of the spawn). A constant back-off would make equal gaps, a respawn
    // loop tiny ones.
    let starts = wait_for("four warm-ups", Duration::from_secs(40), || async {
        let starts = ledger.warm_starts();
        (starts.len() >= 4).then_some(starts)
    })
    .await;
    let gaps: Vec<u64> = starts
        .windows(2)
        .take(3)
        .map(|pair| pair[1].1 - pair[0].1)
        .collect();
    eprintln!("{warm_behaviour}: gaps between warm-ups {gaps:?} ms");
    assert!(gaps[0] >= 800, "a first back-off of 1 s: gaps {gaps:?} ms");
    for pair in gaps.windows(2) {
        // Doubling, with room for scheduling delays: at least 1.6 times the gap before.
        assert!(
            pair[1] * 10 >= pair[0] * 16,
            "each gap at least 1.6 times the one before: {gaps:?} ms"
        );
    }
    let page = worker.metrics().await;
    let timed = sample(&page, "agent_worker_warm_up_seconds_count");
    if warm_behaviour == "crash" {
        // Never warm, never idle, never timed.
        assert_eq!(warm_idle(&redis.conn).await, [0]);
        assert_eq!(sample(&page, "agent_worker_warm_idle"), Some(0.0));
        assert_eq!(timed, None, "{page}");
    } else {
        // Each warm for a moment (so idle may be seen at 1 now).
        assert!(timed >= Some(3.0), "{page}");
    }
    // The first three at least have failed by the fourth spawn.
    assert!(
        sample(&page, "agent_worker_warm_up_failures_total") >= Some(3.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, r#"agent_worker_warm_takes_total{result="cold"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&page, r#"agent_worker_warm_takes_total{result="warm"}"#),
        Some(0.0)
    );
    // Several failures, one streak: one warning saying so.
    let events = worker.stop().await;
    let streaks: Vec<&str> = events
        .iter()
        .filter_map(|e| e["message"].as_str())
        .filter(|m| m.ends_with("; retrying with back-off, sessions start cold meanwhile"))
        .collect();
    assert_eq!(streaks.len(), 1, "{streaks:?}");
    assert!(
        !events
            .iter()
            .any(|e| e["message"].as_str() == Some("warm_pool_recovered")),
        "the streak never ended"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_up_that_always_crashes_backs_off_and_sessions_start_cold() {
    // A pool of two that never fills: still one warm-up at a time.
    failing_warm_ups_back_off("crash", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_process_that_dies_right_after_its_warm_line_backs_off_too() {
    // Its warm-ups "succeed": only staying up (or taking a session) ends the streak. A pool of
    // one, as a second slot would be filled at once while the first still looks warm.
    failing_warm_ups_back_off("die-after-warm", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_up_past_warm_timeout_is_killed_and_retried_after_a_back_off() {
    // Its warm line would come after 5 s; 1 s is allowed.
    let timeout = ("AGENT_WORKER__AGENT__WARM_TIMEOUT", "1s");
    let (redis, ledger, worker) =
        start_pooled("ready", 1, "--warm-delay-ms=5000", &[timeout]).await;
    let (first, first_ms) = wait_warm_start(&ledger, 0).await;
    // Meanwhile sessions start cold.
    let (_, got) = start_session(&redis.conn, &sid("warm-timeout"), "Craig").await;
    assert_eq!(got["warm"], false);
    assert_ne!(got["pid"].as_u64(), Some(u64::from(first)));
    let (second, second_ms) = wait_warm_start(&ledger, 1).await;
    assert_ne!(second, first);
    // The first was killed at its timeout, before the retry: left alone it would still be
    // sleeping now (about 2 s after its spawn, 3 s before its warm line).
    assert!(!alive(first), "the timed-out warm process {first} is gone");
    // The retry came after the timeout (1 s) and a back-off (1 s), not right at the timeout.
    assert!(
        second_ms - first_ms >= 1500,
        "the second warm-up {} ms after the first",
        second_ms - first_ms
    );
    assert_eq!(warm_idle(&redis.conn).await, [0]);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_warm_process_older_than_warm_max_idle_is_recycled() {
    let max_idle = ("AGENT_WORKER__AGENT__WARM_MAX_IDLE", "3s");
    let (redis, ledger, worker) = start_pooled("ready", 1, "", &[max_idle]).await;
    wait_warm_idle(&redis.conn, 1).await;
    let (first, _) = ledger.warm_starts()[0];
    wait_gone(
        "the old warm process to be recycled",
        Duration::from_secs(20),
        first,
    )
    .await;
    let second = wait_warm_up_idle(&redis.conn, &ledger, 1).await;
    assert_ne!(second, first);
    // The fresh one (or, if it grew old meanwhile, its own replacement) serves a session warm:
    // a recycle is no failure, so no back-off leaves the pool empty.
    let (_, got) = start_session(&redis.conn, &sid("warm-recycled"), "Olivia").await;
    assert_eq!(got["warm"], true);
    let pid = got["pid"].as_u64().unwrap() as u32;
    assert_ne!(pid, first, "the recycled process took no session");
    assert!(
        ledger.warm_starts().iter().any(|(p, _)| *p == pid),
        "{pid} is a warm process"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_replica_keeps_no_idle_warm_process_and_the_pool_grows_back() {
    let gate = Gate::new();
    // Room for one agent, a pool of two: the target is min(2, 1 − running − starting).
    let max_agents = ("AGENT_WORKER__AGENT__MAX_AGENTS", "1");
    let (redis, ledger, worker) = start_pooled("ready", 2, &gate.warm_arg(), &[max_agents]).await;
    // With no session, min(2, 1) = 1: one warm-up, held at the gate.
    let (held, _) = wait_warm_start(&ledger, 0).await;
    // Nothing idle: the session starts cold and fills the replica.
    let id = sid("warm-full");
    let (_, got) = start_session(&redis.conn, &id, "Craig").await;
    assert_eq!(got["warm"], false);
    let agent = got["pid"].as_u64().unwrap() as u32;
    // The held warm-up ends with no room left: the pool stops it instead of keeping it.
    gate.open();
    wait_gone(
        "the warm process beyond the room left to be stopped",
        Duration::from_secs(20),
        held,
    )
    .await;
    let stopped_ms = unix_ms();
    wait_idle_after(&redis.conn, stopped_ms, 0).await;
    assert_eq!(
        ledger.warm_starts().len(),
        1,
        "no warm-up while the replica is full"
    );
    // The session ends: room for one again, so one idle warm process again.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent as i32), Signal::SIGTERM).unwrap();
    wait_status(&redis.conn, &id, "completed", Duration::from_secs(20)).await;
    let grown = wait_warm_up_idle(&redis.conn, &ledger, 1).await;
    // And it serves the next session.
    assert_warm_take(&redis.conn, "warm-full-next", grown).await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_the_pools_takes_warm_ups_and_failures() {
    let redis = TestRedis::start().await;
    let ledger = Ledger::new();
    let gate = Gate::new();
    // Its own process: the metrics recorder is process-wide, and other tests of this binary
    // run pools at the same time.
    let worker = BinWorker::start(&redis, &pool_env(&ledger, "ready", 1, &gate.warm_arg(), 1));
    let (held, _) = wait_warm_start(&ledger, 0).await;
    let expect = |idle: f64, warm: f64, cold: f64, warmed: f64, failed: f64| {
        move |page: &str| {
            // A histogram is exposed from its first sample on; the rest from the start.
            let timed = sample(page, "agent_worker_warm_up_seconds_count");
            timed.or((warmed == 0.0).then_some(0.0)) == Some(warmed)
                && [
                    ("agent_worker_warm_idle", idle),
                    (r#"agent_worker_warm_takes_total{result="warm"}"#, warm),
                    (r#"agent_worker_warm_takes_total{result="cold"}"#, cold),
                    ("agent_worker_warm_up_failures_total", failed),
                ]
                .iter()
                .all(|(series, want)| sample(page, series) == Some(*want))
        }
    };
    // Held at the gate: nothing yet, every series at zero.
    worker.wait_metrics(expect(0.0, 0.0, 0.0, 0.0, 0.0)).await;
    // Nothing idle: a cold take.
    start_session(&redis.conn, &sid("warm-metrics-cold"), "Craig").await;
    worker.wait_metrics(expect(0.0, 0.0, 1.0, 0.0, 0.0)).await;
    // The warm-up ends: one idle, one warm-up timed.
    gate.open();
    worker.wait_metrics(expect(1.0, 0.0, 1.0, 1.0, 0.0)).await;
    // A warm take; its replacement warms at once (the gate is open).
    assert_warm_take(&redis.conn, "warm-metrics-warm", held).await;
    worker.wait_metrics(expect(1.0, 1.0, 1.0, 2.0, 0.0)).await;
    // The replacement killed while idle: a failure, and after a back-off a third warm-up.
    let (replacement, _) = ledger.warm_starts()[1];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(replacement as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    worker.wait_metrics(expect(1.0, 1.0, 1.0, 3.0, 1.0)).await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_process_killed_while_idle_is_replaced() {
    let (redis, ledger, worker) = start_pooled("ready", 1, "", &[]).await;
    wait_warm_idle(&redis.conn, 1).await;
    let (first, _) = ledger.warm_starts()[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    // One idle in a beat after the replacement's spawn: the replacement, not the killed one
    // counted late.
    let second = wait_warm_up_idle(&redis.conn, &ledger, 1).await;
    assert_ne!(second, first);
    // And the replacement serves the next session.
    assert_warm_take(&redis.conn, "warm-after-kill", second).await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_process_lost_at_the_handoff_makes_that_start_cold_at_once() {
    let (redis, ledger, worker) =
        start_pooled("ready", 1, "--warm-behaviour=exit-on-handoff", &[]).await;
    wait_warm_idle(&redis.conn, 1).await;
    let (taken, _) = ledger.warm_starts()[0];
    let id = sid("warm-lost");
    let (task, got) = start_session(&redis.conn, &id, "Craig").await;
    assert_eq!(got["warm"], false, "the session's agent started cold");
    assert_ne!(got["pid"].as_u64(), Some(u64::from(taken)));
    // One attempt, no error left behind: the pool's loss is not the session's failure.
    let state = SessionKeys::new(&id).state();
    assert_eq!(hget(&redis.conn, &state, "lastError").await, None);
    wait_done(&redis.conn, &task, Duration::from_secs(10)).await;
    // The lost process never took a room.
    assert!(ledger.sessions().iter().all(|(_, pid)| *pid != taken));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_process_that_does_not_read_its_handoff_is_lost_and_that_start_goes_cold() {
    let (redis, ledger, worker) = start_pooled(
        "ready",
        1,
        "--warm-behaviour=ignore-handoff",
        &[WHOLE_LINES],
    )
    .await;
    wait_warm_idle(&redis.conn, 1).await;
    let (taken, _) = ledger.warm_starts()[0];
    // More than its stdin's pipe holds: the write waits for a reader that never comes.
    let id = sid("warm-not-reading");
    let prompt = "a prompt longer than a pipe holds ".repeat(100 * 1024 / 34);
    write_full_config(&redis.conn, &id, "Craig", "user", None, Some(&prompt)).await;
    let task = enqueue(&redis.conn, &id, Some("user")).await;
    wait_status(&redis.conn, &id, "ready", Duration::from_secs(30)).await;
    let got = wait_received(&redis.conn, &id).await;
    assert_eq!(got["warm"], false, "the session's agent started cold");
    assert_eq!(got["contract"]["system_prompt"], prompt.as_str());
    wait_gone(
        "the process that did not read to be killed",
        Duration::from_secs(10),
        taken,
    )
    .await;
    // Cold at once after that loss: no other warm process was tried (and lost) for it. Its
    // replacement, started at the take, is still there, idle.
    let others: Vec<u32> = ledger
        .warm_starts()
        .into_iter()
        .map(|(pid, _)| pid)
        .filter(|pid| *pid != taken)
        .collect();
    assert!(
        others.iter().all(|pid| alive(*pid)),
        "warm processes {others:?}: none taken after the first loss"
    );
    // One attempt, no error: the pool's loss is not the session's failure.
    assert_eq!(
        hget(&redis.conn, &SessionKeys::new(&id).state(), "lastError").await,
        None
    );
    wait_done(&redis.conn, &task, Duration::from_secs(10)).await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_worker_takes_its_warm_processes_and_sigterm_stops_idle_ones_at_once() {
    let redis = TestRedis::start().await;
    for ending in [Signal::SIGKILL, Signal::SIGTERM] {
        // The SIGKILLed worker of the first round left its count behind.
        let _: () = redis.conn.clone().del(WORKER_WARM).await.unwrap();
        let ledger = Ledger::new();
        let mut env = pool_env(&ledger, "ready", 2, "", 2);
        // A drain long enough that "at once" cannot be the drain ending.
        env.push(("AGENT_WORKER__SHUTDOWN__DRAIN_TIMEOUT", "60s".to_owned()));
        let worker = WorkerProcess::spawn(worker_command(
            &redis.url(),
            &["run"],
            "ready",
            &borrowed(&env),
        ));
        // One live session, so a SIGTERM has something to drain.
        let id = sid(&format!("warm-ending-{}", ending as i32));
        let (_, got) = start_session(&redis.conn, &id, "Craig").await;
        let agent = got["pid"].as_u64().unwrap() as u32;
        let idle = wait_for(
            "two idle warm processes",
            Duration::from_secs(30),
            || async {
                let taken: HashSet<u32> = ledger.sessions().into_iter().map(|(_, p)| p).collect();
                let idle: Vec<u32> = ledger
                    .warm_starts()
                    .into_iter()
                    .map(|(pid, _)| pid)
                    .filter(|pid| !taken.contains(pid) && alive(*pid))
                    .collect();
                (idle.len() == 2 && warm_idle(&redis.conn).await.contains(&2)).then_some(idle)
            },
        )
        .await;
        if ending == Signal::SIGKILL {
            // What an operator sees: `status` lists the worker's idle warm processes.
            let status =
                WorkerProcess::spawn(worker_command(&redis.url(), &["status"], "ready", &[]))
                    .output()
                    .await;
            let shown = String::from_utf8_lossy(&status.stdout);
            assert!(shown.contains("warm idle 2"), "{shown}");
        }
        worker.signal(ending);
        wait_for(
            "the idle warm processes to be gone",
            Duration::from_secs(10),
            || async { idle.iter().all(|pid| !alive(*pid)).then_some(()) },
        )
        .await;
        if ending == Signal::SIGTERM {
            // The drain goes on: the session's agent is still there.
            assert!(
                alive(agent),
                "the session's agent outlives the idle warm processes"
            );
            worker.signal(Signal::SIGTERM);
        }
        let _ = worker.output().await;
        wait_gone(
            "the session's agent to be gone",
            Duration::from_secs(10),
            agent,
        )
        .await;
    }
}
