//! Shared test harness: a private redis-server per test, an in-process worker with the real
//! process launcher and the test agent, and helpers that wait for a condition with a deadline.
#![allow(dead_code)]

mod commandstats;
mod worker_process;

// Not every test binary uses every helper.
#[allow(unused_imports)]
pub use commandstats::{command_calls, parse_commandstats};
#[allow(unused_imports)]
pub use worker_process::WorkerProcess;

use std::{
    collections::HashMap,
    future::Future,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use agent_jobs::{AgentStart, Producer, QueueKeys, SessionConfigInput, SessionId, SessionKeys};
use agent_worker::{
    cli::local_redis::LocalRedis, connection, settings::Settings, shutdown::Shutdown, worker,
};
use redis::{AsyncCommands, aio::ConnectionManager};
use tokio::task::JoinHandle;

pub const QUEUE: &str = "agent-start";
pub const WORKER_BIN: &str = env!("CARGO_BIN_EXE_agent-worker");
/// `agent.command` (comma-separated) of the stand-in agent built into the worker's binary;
/// append `,--behaviour,<b>` and other options.
pub const TEST_AGENT: &str = concat!(env!("CARGO_BIN_EXE_agent-worker"), ",test-agent");

/// A test's own Redis, with a connection to it.
pub struct TestRedis {
    pub redis: LocalRedis,
    pub conn: ConnectionManager,
}

impl TestRedis {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    pub async fn start_with(args: &[&str]) -> Self {
        let redis = LocalRedis::start_with(args)
            .await
            .expect("redis-server must be on PATH for the tests");
        let settings = settings(&redis.url(), &[]);
        let conn = connection::connect(&settings.redis).await.expect("connect");
        Self { redis, conn }
    }

    /// A Redis whose default user needs `password` (percent-encoded here for our own
    /// connection; `url()` stays without it).
    pub async fn start_requiring(password: &str, encoded: &str) -> Self {
        let redis = LocalRedis::start_with(&["--requirepass", password])
            .await
            .expect("redis-server must be on PATH for the tests");
        let url = redis
            .url()
            .replacen("redis://", &format!("redis://:{encoded}@"), 1);
        let conn = connection::connect(&settings(&url, &[]).redis)
            .await
            .expect("connect with the password");
        Self { redis, conn }
    }

    pub fn url(&self) -> String {
        self.redis.url()
    }

    /// Settings pointing at this Redis and the test agent with `behaviour`, plus overrides.
    pub fn settings(&self, behaviour: &str, overrides: &[(&str, &str)]) -> Settings {
        let command = format!("{TEST_AGENT},--behaviour,{behaviour}");
        let mut all = vec![("AGENT_WORKER__AGENT__COMMAND", command.as_str())];
        all.extend_from_slice(overrides);
        settings(&self.url(), &all)
    }
}

/// Test settings: fast retries and timeouts; the fallback poll is effectively off so that
/// pick-up relies on wake-ups.
pub fn settings(url: &str, overrides: &[(&str, &str)]) -> Settings {
    let mut env: HashMap<String, String> = [
        ("AGENT_WORKER__REDIS__URL", url),
        ("AGENT_WORKER__AGENT__STARTUP_TIMEOUT", "5s"),
        ("AGENT_WORKER__AGENT__RETRY_BACKOFF", "20ms"),
        ("AGENT_WORKER__AGENT__STOP_GRACE", "2s"),
        ("AGENT_WORKER__WORKER__POLL_INTERVAL", "1h"),
        ("AGENT_WORKER__WORKER__HEARTBEAT_INTERVAL", "1s"),
        ("AGENT_WORKER__WORKER__ORPHAN_TIMEOUT", "3s"),
        ("AGENT_WORKER__WORKER__RESTART_BACKOFF_MAX", "500ms"),
        // Every in-process worker serves HTTP too; many run at once.
        ("AGENT_WORKER__HTTP__ADDR", "127.0.0.1:0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for (k, v) in overrides {
        env.insert(k.to_string(), v.to_string());
    }
    Settings::load_from(None, env).expect("test settings are valid")
}

/// An in-process worker.
pub struct TestWorker {
    shutdown: Shutdown,
    task: Option<JoinHandle<Result<(), worker::RefusedToStart>>>,
}

impl TestWorker {
    pub fn start(settings: Settings) -> Self {
        let shutdown = Shutdown::new();
        let launcher = worker::process_launcher(&settings.agent);
        let task = tokio::spawn(worker::run(settings, launcher, shutdown.clone()));
        Self {
            shutdown,
            task: Some(task),
        }
    }

    /// Stops the worker and its agents (no drain) and waits for it.
    pub async fn stop(mut self) {
        self.shutdown.stop_now();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("the worker stops within 30 s")
                .expect("the worker task does not panic")
                .expect("the worker started");
        }
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.shutdown.stop_now();
    }
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `deadline` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > until {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn sid(s: &str) -> SessionId {
    SessionId::parse(s).expect("valid test session id")
}

pub async fn write_config(conn: &ConnectionManager, id: &SessionId, voice: &str, user: &str) {
    write_full_config(conn, id, voice, user, None, None).await
}

pub async fn write_full_config(
    conn: &ConnectionManager,
    id: &SessionId,
    voice: &str,
    user: &str,
    opening_line: Option<&str>,
    system_prompt: Option<&str>,
) {
    let config = SessionConfigInput {
        voice_id: voice.to_owned(),
        user_name: user.to_owned(),
        opening_line: opening_line.map(str::to_owned),
        system_prompt: system_prompt.map(str::to_owned),
    };
    agent_jobs::write_session_config(&mut conn.clone(), id, &config, Duration::from_secs(3600))
        .await
        .expect("write config");
}

pub fn producer(conn: &ConnectionManager) -> Producer<ConnectionManager> {
    Producer::new(conn.clone(), QueueKeys::new(QUEUE).unwrap())
}

pub async fn enqueue(conn: &ConnectionManager, id: &SessionId, user: Option<&str>) -> String {
    let mut job = AgentStart::new(id.clone());
    job.user_id = user.map(str::to_owned);
    producer(conn).enqueue(&job).await.expect("enqueue").task_id
}

/// Writes a job with arbitrary payload bytes in the wire format, as a foreign producer could.
pub async fn push_raw(conn: &ConnectionManager, payload: &[u8]) -> String {
    let keys = QueueKeys::new(QUEUE).unwrap();
    let id = ulid::Ulid::generate().to_string();
    let mut c = conn.clone();
    redis::pipe()
        .hset(keys.data(), &id, payload)
        .ignore()
        .hset_multiple(
            keys.meta(&id),
            &[
                ("attempts", "0"),
                ("max_attempts", "1"),
                ("status", "Pending"),
            ],
        )
        .ignore()
        .rpush(keys.active(), &id)
        .ignore()
        .publish(keys.wake_channel(), 1)
        .ignore()
        .query_async::<()>(&mut c)
        .await
        .expect("push raw job");
    id
}

pub async fn hget(conn: &ConnectionManager, key: &str, field: &str) -> Option<String> {
    conn.clone().hget(key, field).await.expect("HGET")
}

pub async fn status(conn: &ConnectionManager, id: &SessionId) -> Option<String> {
    hget(conn, &SessionKeys::new(id).state(), "status").await
}

/// Waits until the session's status is `want`.
pub async fn wait_status(conn: &ConnectionManager, id: &SessionId, want: &str, deadline: Duration) {
    let what = format!("session {id} to be {want}");
    wait_for(&what, deadline, || async {
        (status(conn, id).await.as_deref() == Some(want)).then_some(())
    })
    .await
}

/// The output lines of a session's agent shipped to Redis so far (shipped asynchronously:
/// the latest may not have arrived yet).
pub async fn agent_logs(conn: &ConnectionManager, id: &SessionId) -> Vec<String> {
    conn.clone()
        .lrange(SessionKeys::new(id).agent_logs(), 0, -1)
        .await
        .expect("LRANGE the agent's logs")
}

/// The pid of a session's agent, recorded once it was spawned; panics if there is none.
pub async fn agent_pid(conn: &ConnectionManager, id: &SessionId) -> u32 {
    let pid: Option<u32> = conn
        .clone()
        .get(SessionKeys::new(id).agent_pid())
        .await
        .expect("GET the agent's pid");
    pid.unwrap_or_else(|| panic!("no agent pid recorded for {id}"))
}

/// Enqueues a job for `id` and waits (up to 20 s) until its agent is ready; the task id.
pub async fn start_ready(conn: &ConnectionManager, id: &SessionId) -> String {
    let task = enqueue(conn, id, None).await;
    wait_status(conn, id, "ready", Duration::from_secs(20)).await;
    task
}

/// What the test agent of a session reported receiving (`test-agent received {json}`).
pub async fn received(conn: &ConnectionManager, id: &SessionId) -> Option<serde_json::Value> {
    let lines = agent_logs(conn, id).await;
    lines.iter().find_map(|line| {
        line.strip_prefix("test-agent received ")
            .and_then(|json| serde_json::from_str(json).ok())
    })
}

pub async fn wait_received(conn: &ConnectionManager, id: &SessionId) -> serde_json::Value {
    wait_for(
        &format!("the agent of {id} to report its arguments"),
        Duration::from_secs(10),
        || received(conn, id),
    )
    .await
}

pub async fn is_member(conn: &ConnectionManager, set: &str, member: &str) -> bool {
    conn.clone()
        .sismember(set, member)
        .await
        .expect("SISMEMBER")
}

/// Waits until task `task_id` is in the dead set and returns its stored result.
pub async fn wait_dead(conn: &ConnectionManager, task_id: &str) -> String {
    let keys = QueueKeys::new(QUEUE).unwrap();
    wait_for(
        &format!("task {task_id} in the dead set"),
        Duration::from_secs(20),
        || async { is_member(conn, &keys.dead(), task_id).await.then_some(()) },
    )
    .await;
    hget(conn, &keys.meta(task_id), "result")
        .await
        .unwrap_or_default()
}

/// True once the task finished well: in the done set, or already moved from it into the
/// retention index.
pub async fn is_done(conn: &ConnectionManager, task_id: &str) -> bool {
    let keys = QueueKeys::new(QUEUE).unwrap();
    let indexed: Option<f64> = conn
        .clone()
        .zscore(keys.done_at(), task_id)
        .await
        .expect("ZSCORE");
    indexed.is_some() || is_member(conn, &keys.done(), task_id).await
}

/// Finished-well jobs: the done set plus the retention index.
pub async fn done_count(conn: &ConnectionManager) -> u64 {
    let keys = QueueKeys::new(QUEUE).unwrap();
    let (inbox, indexed): (u64, u64) = redis::pipe()
        .scard(keys.done())
        .zcard(keys.done_at())
        .query_async(&mut conn.clone())
        .await
        .expect("counts");
    inbox + indexed
}

pub async fn wait_done(conn: &ConnectionManager, task_id: &str, deadline: Duration) {
    wait_for(&format!("task {task_id} to be done"), deadline, || async {
        is_done(conn, task_id).await.then_some(())
    })
    .await
}

/// Our child processes that are zombies (exited, not reaped).
pub fn zombie_children() -> Vec<u32> {
    let me = std::process::id();
    let mut zombies = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return zombies;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some((state, ppid)) = proc_state(pid)
            && state == 'Z'
            && ppid == me
        {
            zombies.push(pid);
        }
    }
    zombies
}

/// (state, parent pid) of a process, from /proc/<pid>/stat.
pub fn proc_state(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    proc_state(pid).is_some_and(|(state, _)| state != 'Z')
}

/// Names of the registered apalis worker runs (`<worker id>-<run>`).
pub async fn worker_runs(conn: &ConnectionManager) -> Vec<String> {
    conn.clone()
        .zrange(QueueKeys::new(QUEUE).unwrap().workers(), 0, -1)
        .await
        .expect("ZRANGE")
}

/// Waits (up to 10 s) until the one worker on this Redis is idle: registered, subscribed to
/// the wake channel, and its first (empty) fetch done (the fetch script is the only caller of
/// LRANGE).
pub async fn wait_idle(conn: &ConnectionManager) {
    let keys = QueueKeys::new(QUEUE).unwrap();
    wait_for("the worker to be idle", Duration::from_secs(10), || async {
        let subscribed: Vec<(String, u64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(keys.wake_channel())
            .query_async(&mut conn.clone())
            .await
            .expect("PUBSUB NUMSUB");
        let fetched = command_calls(conn)
            .await
            .get("lrange")
            .is_some_and(|calls| *calls >= 1);
        (subscribed[0].1 == 1 && fetched && worker_runs(conn).await.len() == 1).then_some(())
    })
    .await
}

/// Asserts that the job worker is still in its first run: nothing made it crash and restart.
pub async fn assert_first_run(conn: &ConnectionManager, context: &str) {
    let runs = worker_runs(conn).await;
    assert!(
        runs.len() == 1 && runs[0].ends_with("-0"),
        "{context}: the first run of the job worker is still the only one: {runs:?}"
    );
}

/// The `agent-worker` binary, killed (SIGKILL) when the thread that started it ends: a test
/// that fails half-way leaves no worker behind, whatever it was doing.
pub fn worker_bin() -> Command {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(WORKER_BIN);
    // SAFETY: runs in the forked child before exec and only calls prctl, which is
    // async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

/// The `agent-worker` binary ([`worker_bin`]) with `args`, pointed at `url`, running the test
/// agent with `behaviour`, JSON logs, no drain; `env` overrides. stdout and stderr are piped.
pub fn worker_command(url: &str, args: &[&str], behaviour: &str, env: &[(&str, &str)]) -> Command {
    let mut command = worker_bin();
    command
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("REDIS_URL")
        .env("AGENT_WORKER__REDIS__URL", url)
        // Several workers per test machine: no fixed metrics port.
        .env("AGENT_WORKER__HTTP__ADDR", "127.0.0.1:0")
        .env(
            "AGENT_WORKER__AGENT__COMMAND",
            format!("{TEST_AGENT},--behaviour,{behaviour}"),
        )
        .env("AGENT_WORKER__AGENT__STARTUP_TIMEOUT", "5s")
        .env("AGENT_WORKER__AGENT__STOP_GRACE", "2s")
        .env("AGENT_WORKER__WORKER__HEARTBEAT_INTERVAL", "1s")
        .env("AGENT_WORKER__WORKER__ORPHAN_TIMEOUT", "3s")
        .env("AGENT_WORKER__SESSION__HEARTBEAT_INTERVAL", "1s")
        .env("AGENT_WORKER__SESSION__STALE_AFTER", "6s")
        .env("AGENT_WORKER__SHUTDOWN__DRAIN_TIMEOUT", "0s")
        .env("AGENT_WORKER__TELEMETRY__FORMAT", "json")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Sends `signal` to a child process.
pub fn signal(child: &std::process::Child, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal)
        .expect("signal the child");
}

/// Waits for a child to exit (off the async runtime) and returns its output.
pub async fn output_of(child: std::process::Child) -> std::process::Output {
    tokio::task::spawn_blocking(move || child.wait_with_output().expect("wait for the child"))
        .await
        .expect("the waiting task")
}

/// The JSON events of a worker's stderr.
pub fn events(stderr: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Live `test-agent` processes per session whose parent is one of `parents`, read from /proc.
/// (Other tests, or another checkout's tests, may run agents with the same room names.)
pub fn live_agents(parents: &[u32]) -> HashMap<String, Vec<u32>> {
    let mut by_session: HashMap<String, Vec<u32>> = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return by_session;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Some((state, ppid)) = proc_state(pid) else {
            continue;
        };
        if state == 'Z' || !parents.contains(&ppid) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.get(1).map(String::as_str) != Some("test-agent") {
            continue;
        }
        if let Some(room) = room_of(&args) {
            by_session.entry(room).or_default().push(pid);
        }
    }
    by_session
}

/// The `--room` of an agent's argv, in either form the worker sends (`--room=R`, `--room R`).
pub fn room_of(args: &[String]) -> Option<String> {
    args.iter()
        .enumerate()
        .find_map(|(i, arg)| match arg.strip_prefix("--room") {
            Some(value) if value.starts_with('=') => Some(value[1..].to_owned()),
            Some("") => args.get(i + 1).cloned(),
            _ => None,
        })
}

/// A file every test agent started with [`Ledger::command`] appends `<room> <pid>` to as it
/// starts, synchronously: what tells that an agent never ran, unlike its shipped logs, which
/// arrive later.
pub struct Ledger(std::path::PathBuf);

impl Ledger {
    /// A new, empty ledger.
    pub fn new() -> Self {
        Self(std::env::temp_dir().join(format!("agent-ledger-{}", ulid::Ulid::generate())))
    }

    /// `agent.command` of the test agent with `behaviour`, writing to this ledger.
    pub fn command(&self, behaviour: &str) -> String {
        format!(
            "{TEST_AGENT},--behaviour,{behaviour},--ledger,{}",
            self.0.display()
        )
    }

    /// The test agent with `args` (comma-separated) as a warm process of the pool
    /// (`agent.warm_command`), writing to this ledger.
    pub fn warm_command(&self, args: &str) -> String {
        let args = if args.is_empty() {
            String::new()
        } else {
            format!(",{args}")
        };
        format!("{TEST_AGENT},--warm,--ledger,{}{args}", self.0.display())
    }

    fn lines(&self) -> Vec<Vec<String>> {
        std::fs::read_to_string(&self.0)
            .unwrap_or_default()
            .lines()
            .map(|l| l.split(' ').map(str::to_owned).collect())
            .collect()
    }

    /// The rooms of every agent started so far (warm processes once handed their session).
    pub fn rooms(&self) -> Vec<String> {
        self.sessions().into_iter().map(|(room, _)| room).collect()
    }

    /// `(room, pid)` of every agent started so far.
    pub fn sessions(&self) -> Vec<(String, u32)> {
        self.lines()
            .into_iter()
            .filter(|l| l.len() == 2 && l[0] != "warm")
            .filter_map(|l| Some((l[0].clone(), l[1].parse().ok()?)))
            .collect()
    }

    /// `(pid, unix ms)` of every warm process started so far, in order.
    pub fn warm_starts(&self) -> Vec<(u32, u64)> {
        self.lines()
            .into_iter()
            .filter(|l| l.len() == 3 && l[0] == "warm")
            .filter_map(|l| Some((l[1].parse().ok()?, l[2].parse().ok()?)))
            .collect()
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Kills the processes it tracks when dropped, so a failing test leaves no worker behind.
#[derive(Default)]
pub struct KillOnDrop(std::sync::Mutex<Vec<u32>>);

impl KillOnDrop {
    /// Tracks `child` and returns it.
    pub fn track(&self, child: std::process::Child) -> std::process::Child {
        self.0.lock().unwrap().push(child.id());
        child
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in self.0.lock().unwrap().iter() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// A port nothing listens on right now (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `GET path` over HTTP/1.1 (within 5 s): the status code and the body, or `None` when
/// nothing answers.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        Some(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()??;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

/// [`http_get`] that must be answered.
pub async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    http_get(addr, path)
        .await
        .unwrap_or_else(|| panic!("GET {path}: no answer from {addr}"))
}
