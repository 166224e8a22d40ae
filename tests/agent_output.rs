//! What happens to an agent's output: per-session log files (`agent.log_dir`) and their size
//! limit, the cut of over-long lines, in the file and in `agent:<id>:logs` alike, and a flood:
//! rate-limited in the worker's own log, never slowed by it.

mod common;

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use agent_jobs::{SessionId, SessionKeys};
use agent_worker::connection::RedisConn;
use common::*;
use redis::AsyncCommands;

/// A fresh directory for the agents' log files (`agent.log_dir`), removed with the test.
struct LogDir(PathBuf);

impl LogDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{name}-{}", ulid::Ulid::generate()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// The log file of `id`'s agent.
    fn file_of(&self, id: &SessionId) -> PathBuf {
        self.0.join(format!("{id}.log"))
    }

    /// An in-process worker on `redis` whose agents (the test agent as `behaviour`, with
    /// `agent_args` after it) write their log files here; `extra` overrides.
    fn worker(
        &self,
        redis: &TestRedis,
        behaviour: &str,
        agent_args: &str,
        extra: &[(&str, &str)],
    ) -> TestWorker {
        let command = format!("{TEST_AGENT},--behaviour,{behaviour}{agent_args}");
        let dir = self.0.display().to_string();
        let mut overrides = vec![
            ("AGENT_WORKER__AGENT__COMMAND", command.as_str()),
            ("AGENT_WORKER__AGENT__LOG_DIR", dir.as_str()),
        ];
        overrides.extend_from_slice(extra);
        TestWorker::start(redis.settings(behaviour, &overrides))
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits (up to `deadline`) until the file at `path` satisfies `done`; its text.
async fn wait_file(
    what: &str,
    deadline: Duration,
    path: &Path,
    done: impl Fn(&str) -> bool,
) -> String {
    wait_for(what, deadline, || {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let done = done(&text);
        async move { done.then_some(text) }
    })
    .await
}

/// The last five lines of `id`'s agent shipped to Redis.
async fn last_logs(conn: &RedisConn, id: &SessionId) -> Vec<String> {
    conn.clone()
        .lrange(SessionKeys::new(id).agent_logs(), -5, -1)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_agent_writes_its_whole_output_to_its_own_log_file_recorded_in_redis() {
    let redis = TestRedis::start().await;
    let dir = LogDir::new("agent-logs");
    let worker = dir.worker(&redis, "chatty", "", &[]);
    let (a, b) = (sid("logged-a"), sid("logged-b"));
    for id in [&a, &b] {
        enqueue(&redis.conn, id, None).await;
        wait_status(&redis.conn, id, "ready", Duration::from_secs(20)).await;
    }
    for id in [&a, &b] {
        let path = dir.file_of(id);
        // All 252 lines (the report, the ready line, 250 chatty lines): the file has the whole
        // output, where Redis keeps the last 100.
        let text = wait_file(
            "the whole output in the file",
            Duration::from_secs(10),
            &path,
            |text| text.lines().count() >= 252,
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_symlink_is_not_followed_and_the_agent_still_starts() {
    let redis = TestRedis::start().await;
    let dir = LogDir::new("agent-logs-link");
    let id = sid("linked-1");
    let target = dir.0.join("elsewhere.txt");
    std::fs::write(&target, "precious\n").unwrap();
    std::os::unix::fs::symlink(&target, dir.file_of(&id)).unwrap();
    let worker = dir.worker(&redis, "ready", "", &[]);
    enqueue(&redis.conn, &id, None).await;
    wait_status(&redis.conn, &id, "ready", Duration::from_secs(20)).await;
    // Its output still reaches Redis; the link's target is untouched.
    wait_received(&redis.conn, &id).await;
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_long_line_is_cut_with_a_marker_in_the_file_and_in_redis() {
    let redis = TestRedis::start().await;
    let dir = LogDir::new("agent-logs-long");
    let max_line = ("AGENT_WORKER__AGENT__MAX_LINE_BYTES", "4096");
    let worker = dir.worker(&redis, "ready", ",--long-line-bytes,300000", &[max_line]);
    let id = sid("long-line-1");
    enqueue(&redis.conn, &id, None).await;
    // The ready line after the long one is still seen.
    wait_status(&redis.conn, &id, "ready", Duration::from_secs(20)).await;
    let marker = "[agent-worker: 295904 more bytes of this line cut at agent.max_line_bytes]";
    let expected = format!("{} {marker}", "x".repeat(4096));
    let logs: Vec<String> = wait_for("the cut line in Redis", Duration::from_secs(10), || async {
        let logs = agent_logs(&redis.conn, &id).await;
        (logs.len() >= 3).then_some(logs)
    })
    .await;
    assert_eq!(logs[1], expected);
    assert_eq!(logs[2], format!("Room joined {id}"));
    let file = std::fs::read_to_string(dir.file_of(&id)).unwrap();
    assert_eq!(file.lines().nth(1), Some(expected.as_str()));
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_file_stops_at_its_size_limit_with_a_last_line_saying_so() {
    let redis = TestRedis::start().await;
    let dir = LogDir::new("agent-logs-full");
    let max: u64 = 1024 * 1024;
    let max_s = max.to_string();
    // The smallest limit allowed; the flood prints tens of MB.
    let limit = ("AGENT_WORKER__AGENT__LOG_FILE_MAX_BYTES", max_s.as_str());
    let worker = dir.worker(&redis, "flood", ",--flood-secs,2", &[limit]);
    let id = sid("full-log-1");
    enqueue(&redis.conn, &id, None).await;
    let path = dir.file_of(&id);
    let marker = "[agent-worker: this file reached agent.log_file_max_bytes; the rest of the \
                  output is only in agent:<id>:logs and the worker's log]";
    let text = wait_file(
        "the file to end at its limit",
        Duration::from_secs(30),
        &path,
        |text| text.lines().last() == Some(marker),
    )
    .await;
    // The agent went on printing (to Redis) after the file stopped.
    let number = |line: &str| -> Option<u64> { line.split(' ').nth(2)?.parse().ok() };
    let last_in_file = text.lines().rev().find_map(number).unwrap();
    wait_for(
        "lines past the file's last",
        Duration::from_secs(30),
        || async {
            let logs = last_logs(&redis.conn, &id).await;
            logs.iter()
                .any(|l| {
                    l.starts_with("flood done ") || number(l).is_some_and(|n| n > last_in_file)
                })
                .then_some(())
        },
    )
    .await;
    worker.stop().await;
    let after = std::fs::read_to_string(&path).unwrap();
    assert_eq!(after.len(), text.len(), "nothing written after the marker");
    assert!(
        text.len() as u64 <= max + marker.len() as u64 + 1,
        "{} bytes",
        text.len()
    );
    assert!(text.len() as u64 > max / 2, "{} bytes", text.len());
    assert_eq!(text.matches(marker).count(), 1);
    // Whole lines up to the marker, none cut.
    for line in text.lines().skip(2) {
        assert!(
            line == marker || line.starts_with("flood line ") && line.ends_with(" too much"),
            "{line:?}"
        );
    }
}

/// Where a flooding agent's worker writes its own log.
#[derive(Clone, Copy, PartialEq)]
enum WorkerStderr {
    /// A file: as fast as the disk takes it.
    File,
    /// `/dev/null`: takes everything at once.
    Null,
    /// A pipe drained at about 200 KB/s (4 KiB every 20 ms), as a slow log shipper would.
    Slow,
}

/// What one flood run showed.
struct Flood {
    /// The agent's own output rate, lines/s, as it measured it.
    rate: f64,
    /// Bytes the worker wrote to its stderr.
    logged: u64,
    /// The worker's log, when it went to a file.
    log: String,
}

/// Runs an agent flooding for `secs` under a worker whose stderr is `stderr`, showing up to
/// `lines_per_second` of its lines in the worker's log (`None`: the default budget).
async fn flood(stderr: WorkerStderr, lines_per_second: Option<&str>, secs: u32) -> Flood {
    use std::io::Read;
    let redis = TestRedis::start().await;
    let command = format!("{TEST_AGENT},--behaviour,flood,--flood-secs,{secs}");
    let mut env = vec![("AGENT_WORKER__AGENT__COMMAND", command.as_str())];
    if let Some(rate) = lines_per_second {
        env.push(("AGENT_WORKER__AGENT__LOG_LINES_PER_SECOND", rate));
    }
    let mut worker = worker_command(&redis.url(), &["run"], "flood", &env);
    let log = std::env::temp_dir().join(format!("flood-{}.log", ulid::Ulid::generate()));
    match stderr {
        WorkerStderr::File => {
            worker.stderr(std::fs::File::create(&log).unwrap());
        }
        WorkerStderr::Null => {
            worker.stderr(std::process::Stdio::null());
        }
        WorkerStderr::Slow => {}
    }
    let (mut worker, drained) = if stderr == WorkerStderr::Slow {
        let (worker, pipe) = WorkerProcess::spawn_reading_stderr(worker);
        (worker, Some(pipe))
    } else {
        (WorkerProcess::spawn(worker), None)
    };
    let drained = drained.map(|mut pipe| {
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
        let logs = last_logs(&redis.conn, &id).await;
        logs.into_iter().find(|l| l.starts_with("flood done "))
    })
    .await;
    let rate: f64 = done.rsplit(' ').next().unwrap().parse().unwrap();
    worker.signal(nix::sys::signal::Signal::SIGTERM);
    let status = worker.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success());
    let (logged, text) = match (drained, stderr) {
        (Some(reader), _) => (reader.join().unwrap(), String::new()),
        (None, WorkerStderr::File) => {
            let text = std::fs::read_to_string(&log).unwrap();
            (text.len() as u64, text)
        }
        (None, _) => (0, String::new()),
    };
    let _ = std::fs::remove_file(&log);
    Flood {
        rate,
        logged,
        log: text,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_agent_is_not_slowed_by_a_slow_worker_log_and_the_log_stays_small() {
    // At the default budget, a file for a log. One second: at the fastest rates seen here
    // (700k lines/s) two would pass the 32 MiB queue for Redis, which could drop the agent's
    // `flood done` line this waits for.
    let fast = flood(WorkerStderr::File, None, 1).await;
    // It used to write ~900 MB of log in 10 s.
    assert!(
        fast.logged < 1024 * 1024,
        "the worker logged {} bytes",
        fast.logged
    );
    let suppressed: u64 = events(fast.log.as_bytes())
        .iter()
        .filter(|e| e["message"] == "agent_output_suppressed")
        .map(|e| e["suppressed"].as_u64().unwrap())
        .sum();
    assert!(
        suppressed > 10_000,
        "agent_output_suppressed says what was left out of the worker's log: {suppressed}"
    );
    assert!(
        fast.rate > 10_000.0,
        "the flood flooded: {} lines/s",
        fast.rate
    );
    // Every line shown (about 200 bytes each in the worker's log, tens of MB/s), to a stderr
    // that takes it all and to one drained at 200 KB/s: a log writer that waited for stderr
    // would hold the agent's output to about a thousand lines a second in the second run. It
    // used to be blocked behind it. (Both runs show every line, so both pay for formatting
    // them: only the stderr differs.)
    let every_line = Some("100000000");
    let unhindered = flood(WorkerStderr::Null, every_line, 2).await;
    let slow = flood(WorkerStderr::Slow, every_line, 2).await;
    assert!(
        slow.rate * 2.0 >= unhindered.rate,
        "agent output rate: {} lines/s with a slow stderr, {} with a fast one",
        slow.rate,
        unhindered.rate
    );
    // The log is bounded by what stderr takes, not by what the agent prints.
    assert!(
        slow.logged < 4 * 1024 * 1024,
        "the worker logged {} bytes",
        slow.logged
    );
}
