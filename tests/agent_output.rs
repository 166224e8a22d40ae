//! What happens to an agent's output: per-session log files (`agent.log_dir`) and the cut of
//! over-long lines, in the file and in `agent:<id>:logs` alike.

mod common;

use std::{os::unix::fs::PermissionsExt, time::Duration};

use agent_jobs::SessionKeys;
use common::*;
use redis::AsyncCommands;

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", ulid::Ulid::generate()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_agent_writes_its_whole_output_to_its_own_log_file_recorded_in_redis() {
    let redis = TestRedis::start().await;
    let dir = temp_dir("agent-logs");
    let dir_s = dir.display().to_string();
    let worker = TestWorker::start(redis.settings(
        "chatty",
        &[("AGENT_WORKER__AGENT__LOG_DIR", dir_s.as_str())],
    ));
    let (a, b) = (sid("logged-a"), sid("logged-b"));
    for id in [&a, &b] {
        enqueue(&redis.conn, id, None).await;
        wait_status(&redis.conn, id, "ready", Duration::from_secs(20)).await;
    }
    for id in [&a, &b] {
        let path = dir.join(format!("{id}.log"));
        // All 252 lines (the report, the ready line, 250 chatty lines): the file has the whole
        // output, where Redis keeps the last 100.
        let text = wait_for(
            "the whole output in the file",
            Duration::from_secs(10),
            || {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                async move { (text.lines().count() >= 252).then_some(text) }
            },
        )
        .await;
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("test-agent received "), "{}", lines[0]);
        assert!(lines[0].contains(&format!("--room={id}")), "{}", lines[0]);
        assert_eq!(lines[1], format!("Room joined {id}"));
        assert_eq!(lines[251], "chatty line 249");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !0o640, 0, "mode {mode:o}: at most 0640");
        let keys = SessionKeys::new(id);
        let recorded: String = redis.conn.clone().get(keys.agent_logfile()).await.unwrap();
        assert_eq!(recorded, path.display().to_string());
        assert_eq!(
            hget(&redis.conn, &keys.state(), "logFile").await,
            Some(recorded)
        );
    }
    worker.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_symlink_is_not_followed_and_the_agent_still_starts() {
    let redis = TestRedis::start().await;
    let dir = temp_dir("agent-logs-link");
    let target = dir.join("elsewhere.txt");
    std::fs::write(&target, "precious\n").unwrap();
    std::os::unix::fs::symlink(&target, dir.join("linked-1.log")).unwrap();
    let dir_s = dir.display().to_string();
    let worker = TestWorker::start(
        redis.settings("ready", &[("AGENT_WORKER__AGENT__LOG_DIR", dir_s.as_str())]),
    );
    let id = sid("linked-1");
    enqueue(&redis.conn, &id, None).await;
    wait_status(&redis.conn, &id, "ready", Duration::from_secs(20)).await;
    // Its output still reaches Redis; the link's target is untouched.
    wait_received(&redis.conn, &id).await;
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
    worker.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_long_line_is_cut_with_a_marker_in_the_file_and_in_redis() {
    let redis = TestRedis::start().await;
    let dir = temp_dir("agent-logs-long");
    let dir_s = dir.display().to_string();
    let command = format!("{TEST_AGENT},--behaviour,ready,--long-line-bytes,300000");
    let worker = TestWorker::start(redis.settings(
        "ready",
        &[
            ("AGENT_WORKER__AGENT__COMMAND", command.as_str()),
            ("AGENT_WORKER__AGENT__LOG_DIR", dir_s.as_str()),
            ("AGENT_WORKER__AGENT__MAX_LINE_BYTES", "4096"),
        ],
    ));
    let id = sid("long-line-1");
    enqueue(&redis.conn, &id, None).await;
    // The ready line after the long one is still seen.
    wait_status(&redis.conn, &id, "ready", Duration::from_secs(20)).await;
    let marker = "[agent-worker: 295904 more bytes of this line cut at agent.max_line_bytes]";
    let expected = format!("{} {marker}", "x".repeat(4096));
    let logs: Vec<String> = wait_for("the cut line in Redis", Duration::from_secs(10), || async {
        let logs: Vec<String> = redis
            .conn
            .clone()
            .lrange(SessionKeys::new(&id).agent_logs(), 0, -1)
            .await
            .unwrap();
        (logs.len() >= 3).then_some(logs)
    })
    .await;
    assert_eq!(logs[1], expected);
    assert_eq!(logs[2], format!("Room joined {id}"));
    let file = std::fs::read_to_string(dir.join(format!("{id}.log"))).unwrap();
    assert_eq!(file.lines().nth(1), Some(expected.as_str()));
    worker.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs a flooding agent under a worker whose stderr goes to a file, or to a pipe drained at
/// about 200 KB/s; returns the agent's own output rate (lines/s) and the bytes the worker
/// logged.
async fn flood(slow_stderr: bool) -> (f64, u64) {
    use std::io::Read;
    let redis = TestRedis::start().await;
    let command = format!("{TEST_AGENT},--behaviour,flood,--flood-secs,2");
    let mut worker = worker_command(
        &redis.url(),
        &["run"],
        "flood",
        &[("AGENT_WORKER__AGENT__COMMAND", command.as_str())],
    );
    let log = std::env::temp_dir().join(format!("flood-{}.log", ulid::Ulid::generate()));
    if !slow_stderr {
        worker.stderr(std::fs::File::create(&log).unwrap());
    }
    let mut worker = worker.spawn().unwrap();
    let drained = slow_stderr.then(|| {
        let mut pipe = worker.stderr.take().unwrap();
        std::thread::spawn(move || {
            let (mut total, mut buf) = (0u64, [0u8; 4096]);
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n as u64,
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    });
    let id = sid("flooding-1");
    enqueue(&redis.conn, &id, None).await;
    let done = wait_for("the flood to end", Duration::from_secs(60), || async {
        let logs: Vec<String> = redis
            .conn
            .clone()
            .lrange(SessionKeys::new(&id).agent_logs(), -5, -1)
            .await
            .unwrap();
        logs.into_iter().find(|l| l.starts_with("flood done "))
    })
    .await;
    let rate: f64 = done.rsplit(' ').next().unwrap().parse().unwrap();
    signal(&worker, nix::sys::signal::Signal::SIGTERM);
    let status = tokio::task::spawn_blocking(move || worker.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
    let logged = match drained {
        Some(reader) => reader.join().unwrap(),
        None => std::fs::metadata(&log).unwrap().len(),
    };
    let _ = std::fs::remove_file(&log);
    (rate, logged)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_agent_is_not_slowed_by_a_slow_worker_log_and_the_log_stays_small() {
    let (fast_rate, fast_logged) = flood(false).await;
    let (slow_rate, slow_logged) = flood(true).await;
    // It used to write ~900 MB of log in 10 s, and be blocked behind a slow stderr.
    for logged in [fast_logged, slow_logged] {
        assert!(logged < 1024 * 1024, "the worker logged {logged} bytes");
    }
    assert!(
        slow_rate * 2.0 >= fast_rate,
        "agent output rate: {slow_rate} lines/s with a slow stderr, {fast_rate} with a fast one"
    );
    assert!(
        fast_rate > 10_000.0,
        "the flood flooded: {fast_rate} lines/s"
    );
}
