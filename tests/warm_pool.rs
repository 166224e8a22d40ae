//! The warm pool (`agent.warm_pool`): sessions handed to idle warm processes, one session per
//! process, refilled with back-off, never at the cost of a start.
//!
//! The warm processes are the test agent in its warm mode (`test-agent --warm`: it prints the
//! warm line, reads its handoff line, then behaves as a cold agent with those arguments), so
//! every assertion below is about what a real process received and did. The ledger records each
//! warm spawn (`warm <pid> <ms>`) and each agent's session (`<room> <pid>`) as it happens.

mod common;

use std::{collections::HashMap, collections::HashSet, time::Duration};

use agent_jobs::{SessionKeys, keys::WORKER_WARM};
use common::*;
use nix::sys::signal::Signal;
use redis::AsyncCommands;

/// The idle warm processes the worker last reported with its presence (every second here).
async fn warm_idle(conn: &redis::aio::ConnectionManager) -> Vec<u64> {
    let counts: HashMap<String, u64> = conn.clone().hgetall(WORKER_WARM).await.expect("HGETALL");
    counts.into_values().collect()
}

async fn wait_warm_idle(conn: &redis::aio::ConnectionManager, want: u64) {
    wait_for(
        &format!("{want} idle warm processes"),
        Duration::from_secs(30),
        || async { (warm_idle(conn).await == [want]).then_some(()) },
    )
    .await
}

/// Settings of a worker with a pool of `size` warm test agents started with `warm_args`.
fn pooled(
    redis: &TestRedis,
    ledger: &Ledger,
    behaviour: &str,
    size: usize,
    warm_args: &str,
    extra: &[(&str, &str)],
) -> agent_worker::settings::Settings {
    let size = size.to_string();
    // The warm processes behave as the cold agents do once they have their session.
    let warm_args = [format!("--behaviour,{behaviour}"), warm_args.to_owned()]
        .into_iter()
        .filter(|a| !a.is_empty())
        .collect::<Vec<_>>()
        .join(",");
    let (command, warm) = (ledger.command(behaviour), ledger.warm_command(&warm_args));
    let mut overrides = vec![
        ("AGENT_WORKER__AGENT__COMMAND", command.as_str()),
        ("AGENT_WORKER__AGENT__WARM_COMMAND", warm.as_str()),
        ("AGENT_WORKER__AGENT__WARM_POOL", size.as_str()),
        ("AGENT_WORKER__AGENT__WARM_CONCURRENCY", "2"),
    ];
    overrides.extend_from_slice(extra);
    redis.settings(behaviour, &overrides)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_sessions_through_a_pool_of_four_each_get_their_own_agent_and_voice() {
    let redis = TestRedis::start().await;
    let ledger = Ledger::new();
    // Agents end their call at once, so the replica keeps taking sessions, warm and cold.
    let settings = pooled(
        &redis,
        &ledger,
        "exit-after-ready",
        4,
        "",
        &[("AGENT_WORKER__AGENT__MAX_AGENTS", "8")],
    );
    let sessions: Vec<_> = (0..100)
        .map(|i| (sid(&format!("warm-many-{i}")), format!("Voice{i:03}")))
        .collect();
    for (id, voice) in &sessions {
        write_config(&redis.conn, id, voice, "test_concurrent_user").await;
    }
    let worker = TestWorker::start(settings);
    wait_warm_idle(&redis.conn, 4).await;
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
        assert_eq!(got["contract"]["voice_id"], voice.as_str(), "argv of {id}");
        assert_eq!(got["contract"]["room"], id.as_str());
        assert_eq!(got["env"]["VOICE_ID"], voice.as_str());
        assert_eq!(got["env"]["SESSION_ID"], id.as_str());
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
    let redis = TestRedis::start().await;
    let ledger = Ledger::new();
    let settings = pooled(
        &redis,
        &ledger,
        "ready",
        1,
        "",
        // The test agent's report quotes a 100 KB prompt: keep its line whole.
        &[("AGENT_WORKER__AGENT__MAX_LINE_BYTES", "1048576")],
    );
    let worker = TestWorker::start(settings);
    wait_warm_idle(&redis.conn, 1).await;
    let id = sid("warm-verbatim");
    let opening =
        "-r oops; $(rm -rf /) `id` | \"quoted\" 'single' \\ back\nsecond line\tTAB Grüße 你好 🎙️";
    let prompt = format!("-u nice {}", "prompt ✓ ".repeat(100 * 1024 / 10));
    write_full_config(
        &redis.conn,
        &id,
        "-Voice=odd",
        "user",
        Some(opening),
        Some(&prompt),
    )
    .await;
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
    // SESSION_CONFIG is the session's config as the cold path sends it.
    let config: serde_json::Value =
        serde_json::from_str(got["env"]["SESSION_CONFIG"].as_str().unwrap()).unwrap();
    assert_eq!(config["voiceId"], "-Voice=odd");
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

/// A warm command that fails every time, as `warm_behaviour` says: sessions start cold, and
/// the warm-ups are retried one at a time after 1 s, 2 s, 4 s: never a respawn loop.
async fn failing_warm_ups_back_off(warm_behaviour: &str) {
    let redis = TestRedis::start().await;
    let ledger = Ledger::new();
    // One warm-up at a time from the start, so every gap is a back-off.
    let settings = pooled(
        &redis,
        &ledger,
        "ready",
        2,
        &format!("--warm-behaviour={warm_behaviour}"),
        &[("AGENT_WORKER__AGENT__WARM_CONCURRENCY", "1")],
    );
    let worker = TestWorker::start(settings);
    let id = sid(&format!("warm-failing-{warm_behaviour}"));
    write_config(&redis.conn, &id, "Craig", "user").await;
    enqueue(&redis.conn, &id, Some("user")).await;
    wait_status(&redis.conn, &id, "ready", Duration::from_secs(20)).await;
    let got = wait_received(&redis.conn, &id).await;
    assert_eq!(got["warm"], false);
    assert_eq!(got["contract"]["voice_id"], "Craig");
    assert_eq!(
        hget(&redis.conn, &SessionKeys::new(&id).state(), "warm")
            .await
            .as_deref(),
        Some("0")
    );
    // Spawns at 0 s (and at once a second one to fill the pool, when the first looked warm),
    // then after back-offs of 1 s, 2 s, 4 s...: wait for one 7 s or more after the first and
    // count those before it. A respawn loop at the first back-off would make 7 or more.
    let starts = wait_for(
        "a warm-up 7 s after the first",
        Duration::from_secs(40),
        || async {
            let starts = ledger.warm_starts();
            let first = starts.first()?.1;
            starts
                .iter()
                .any(|(_, at)| at - first >= 7000)
                .then_some(starts)
        },
    )
    .await;
    let first = starts[0].1;
    let early: Vec<u64> = starts
        .iter()
        .map(|(_, at)| at - first)
        .filter(|ms| *ms < 7000)
        .collect();
    assert!(
        early.len() <= 5,
        "{} warm-ups in the first 7 s (ms after the first: {early:?})",
        early.len()
    );
    assert_eq!(warm_idle(&redis.conn).await, [0]);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_up_that_always_crashes_backs_off_and_sessions_start_cold() {
    failing_warm_ups_back_off("crash").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_process_that_dies_right_after_its_warm_line_backs_off_too() {
    // Its warm-ups "succeed": only staying up (or taking a session) ends the streak.
    failing_warm_ups_back_off("die-after-warm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_process_killed_while_idle_is_replaced() {
    let redis = TestRedis::start().await;
    let ledger = Ledger::new();
    let worker = TestWorker::start(pooled(&redis, &ledger, "ready", 1, "", &[]));
    wait_warm_idle(&redis.conn, 1).await;
    let (first, _) = ledger.warm_starts()[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    let (second, spawned_ms) = wait_for(
        "a replacement warm process",
        Duration::from_secs(20),
        || async { ledger.warm_starts().get(1).copied() },
    )
    .await;
    assert_ne!(second, first);
    // A presence beat from at least a second after the replacement's spawn (scores are unix
    // seconds) that reports one idle: the replacement, not the killed one counted late.
    let after = spawned_ms / 1000 + 2;
    wait_for(
        "the replacement in the pool",
        Duration::from_secs(20),
        || async {
            let seen: Vec<(String, u64)> = redis
                .conn
                .clone()
                .zrange_withscores(agent_jobs::keys::WORKERS, 0, -1)
                .await
                .unwrap();
            let beat_after = seen.iter().any(|(_, at)| *at >= after);
            (beat_after && warm_idle(&redis.conn).await == [1]).then_some(())
        },
    )
    .await;
    // And the replacement serves the next session.
    let id = sid("warm-after-kill");
    write_config(&redis.conn, &id, "Olivia", "user").await;
    enqueue(&redis.conn, &id, Some("user")).await;
    wait_status(&redis.conn, &id, "ready", Duration::from_secs(20)).await;
    let got = wait_received(&redis.conn, &id).await;
    assert_eq!(got["warm"], true);
    assert_eq!(got["pid"].as_u64(), Some(u64::from(second)));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_process_lost_at_the_handoff_makes_that_start_cold_at_once() {
    let redis = TestRedis::start().await;
    let ledger = Ledger::new();
    let settings = pooled(
        &redis,
        &ledger,
        "ready",
        1,
        "--warm-behaviour=exit-on-handoff",
        &[],
    );
    let worker = TestWorker::start(settings);
    wait_warm_idle(&redis.conn, 1).await;
    let (taken, _) = ledger.warm_starts()[0];
    let id = sid("warm-lost");
    write_config(&redis.conn, &id, "Craig", "user").await;
    let task = enqueue(&redis.conn, &id, Some("user")).await;
    wait_status(&redis.conn, &id, "ready", Duration::from_secs(20)).await;
    let got = wait_received(&redis.conn, &id).await;
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
async fn sigkill_of_the_worker_takes_its_warm_processes_and_sigterm_stops_idle_ones_at_once() {
    let redis = TestRedis::start().await;
    for ending in [Signal::SIGKILL, Signal::SIGTERM] {
        // The SIGKILLed worker of the first round left its count behind.
        let _: () = redis.conn.clone().del(WORKER_WARM).await.unwrap();
        let ledger = Ledger::new();
        let (command, warm) = (ledger.command("ready"), ledger.warm_command(""));
        let child = worker_command(
            &redis.url(),
            &["run"],
            "ready",
            &[
                ("AGENT_WORKER__AGENT__COMMAND", command.as_str()),
                ("AGENT_WORKER__AGENT__WARM_COMMAND", warm.as_str()),
                ("AGENT_WORKER__AGENT__WARM_POOL", "2"),
                ("AGENT_WORKER__AGENT__WARM_CONCURRENCY", "2"),
                // A drain long enough that "at once" cannot be the drain ending.
                ("AGENT_WORKER__SHUTDOWN__DRAIN_TIMEOUT", "60s"),
            ],
        )
        .spawn()
        .expect("start the worker");
        // One live session, so a SIGTERM has something to drain.
        let id = sid(&format!("warm-ending-{}", ending as i32));
        write_config(&redis.conn, &id, "Craig", "user").await;
        enqueue(&redis.conn, &id, Some("user")).await;
        wait_status(&redis.conn, &id, "ready", Duration::from_secs(20)).await;
        let got = wait_received(&redis.conn, &id).await;
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
            let status = worker_command(&redis.url(), &["status"], "ready", &[])
                .output()
                .expect("agent-worker status");
            let shown = String::from_utf8_lossy(&status.stdout);
            assert!(shown.contains("warm idle 2"), "{shown}");
        }
        signal(&child, ending);
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
            signal(&child, Signal::SIGTERM);
        }
        let _ = output_of(child).await;
        wait_for(
            "the session's agent to be gone",
            Duration::from_secs(10),
            || async { (!alive(agent)).then_some(()) },
        )
        .await;
    }
}
