//! What every part shares: the private Redis, settings, an in-process worker, and the
//! launchers that let the bench see inside a launch through the public `Launcher` trait.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    path::PathBuf,
    sync::{Arc, LazyLock, Mutex},
    time::{Duration, Instant},
};

use agent_jobs::{
    AgentStart, Producer, QueueKeys, SessionId, SessionKeys, keys::SESSION_HEARTBEATS,
};
use agent_worker::{
    agent::{
        command::LaunchSpec,
        launcher::{AgentExit, AgentHandle, LaunchError, Launcher, RunningAgent},
    },
    connection,
    settings::Settings,
    shutdown::Shutdown,
    worker::{self, LauncherFactory},
};
use anyhow::{Context as _, bail};

use crate::{
    procfs::CpuTimes,
    stats::{Spread, thousands},
};

/// The tests' reading of `INFO commandstats`, shared so the two cannot disagree.
#[path = "../../tests/common/commandstats.rs"]
#[allow(dead_code)] // `command_calls` is for the tests (it panics where a part returns errors).
mod commandstats;
use commandstats::parse_commandstats;

/// The tests' HTTP/1.1 client.
#[path = "../../tests/common/http.rs"]
#[allow(dead_code)] // Only `http_get_within` serves a part.
pub mod http_client;

/// The tests' polling with a deadline.
#[path = "../../tests/common/wait.rs"]
#[allow(dead_code)] // `wait_for` is for the tests (it panics where a part returns errors).
mod wait;
use agent_worker::connection::RedisConn;
use futures::{StreamExt, future::BoxFuture};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};

/// The queue every part uses (the default one).
pub const QUEUE: &str = "agent-start";
/// Sessions per set-up pipeline ([`Ctx::pipelined`]).
pub const CHUNK: usize = 1000;

/// What a part needs to run.
pub struct Ctx {
    /// `--quick`: a tenth of the sizes.
    pub quick: bool,
    /// URL of the bench's private redis-server.
    pub url: String,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The bench's own connection (never the worker's).
    pub conn: RedisConn,
    /// `agent-worker`, built by cargo with this bench; also the test agent
    /// (`agent-worker test-agent`).
    pub worker_bin: PathBuf,
}

impl Ctx {
    pub async fn new(
        quick: bool,
        url: String,
        port: u16,
        worker_bin: PathBuf,
    ) -> anyhow::Result<Self> {
        let settings = Settings::load_from(
            None,
            HashMap::from([
                ("AGENT_WORKER__REDIS__URL".to_owned(), url.clone()),
                (
                    "AGENT_WORKER__REDIS__RESPONSE_TIMEOUT".to_owned(),
                    "60s".to_owned(),
                ),
            ]),
        )?;
        let conn = connection::connect(&settings.redis).await?;
        Ok(Self {
            quick,
            url,
            port,
            conn,
            worker_bin,
        })
    }

    /// `agent.command` (comma-separated) of the test agent with `behaviour`.
    pub fn agent_command(&self, behaviour: &str) -> String {
        format!(
            "{},test-agent,--behaviour,{behaviour}",
            self.worker_bin.display()
        )
    }

    /// Before one repetition of a measurement: waits (up to a minute) until other processes
    /// leave the machine alone. Not in `--quick` mode, which must stay under a minute.
    pub async fn quiet(&self) {
        if !self.quick {
            Load::wait_for_quiet(self, Duration::from_secs(60)).await;
        }
    }

    /// Repetitions of each measurement: 3, so the spread can be stated; 1 with `--quick`.
    pub fn reps(&self) -> usize {
        if self.quick { 1 } else { 3 }
    }

    /// `full` normally, `full / 10` with `--quick`.
    pub fn size(&self, full: usize) -> usize {
        if self.quick { full / 10 } else { full }
    }

    /// Worker settings for this Redis and the test agent with `behaviour`, plus overrides.
    /// `agent.max_agents` is lifted so that the capacity gate never limits a measurement
    /// (each part states the concurrency it runs at); drain and grace are short because every
    /// part ends by stopping its worker.
    pub fn settings(&self, behaviour: &str, overrides: &[(&str, &str)]) -> Settings {
        let command = self.agent_command(behaviour);
        let mut env: HashMap<String, String> = [
            ("AGENT_WORKER__REDIS__URL", self.url.as_str()),
            ("AGENT_WORKER__REDIS__RESPONSE_TIMEOUT", "60s"),
            ("AGENT_WORKER__AGENT__COMMAND", command.as_str()),
            ("AGENT_WORKER__AGENT__MAX_AGENTS", "1000000"),
            ("AGENT_WORKER__AGENT__STOP_GRACE", "2s"),
            ("AGENT_WORKER__SHUTDOWN__DRAIN_TIMEOUT", "100ms"),
            ("AGENT_WORKER__HTTP__ADDR", "127.0.0.1:0"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        // Settings in the bench's own environment apply to the in-process workers too, as they
        // do to the `agent-worker run` children (which inherit them): one knob for an A/B run,
        // e.g. `AGENT_WORKER__COMPAT__LEGACY_METRICS=false cargo bench ... -- --parts 4`.
        env.extend(std::env::vars().filter(|(k, _)| k.starts_with("AGENT_WORKER__")));
        for (k, v) in overrides {
            env.insert((*k).to_owned(), (*v).to_owned());
        }
        Settings::load_from(None, env).expect("bench settings are valid")
    }

    /// A new connection of our own (producers get their own, as an orchestrator would).
    pub async fn connect(&self) -> anyhow::Result<RedisConn> {
        let settings = self.settings("ready", &[]);
        Ok(connection::connect(&settings.redis).await?)
    }

    /// Empties Redis between runs, so that no run sees another's keys.
    pub async fn flush(&self) -> anyhow::Result<()> {
        redis::cmd("FLUSHALL")
            .arg("SYNC")
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    pub fn producer(&self, conn: RedisConn) -> Producer<RedisConn> {
        Producer::new(conn, QueueKeys::new(QUEUE).expect("valid queue name"))
    }

    /// Writes `session:<id>:config` for every id, as the orchestrator does before it enqueues,
    /// so the worker reads a stored config (one HGETALL) instead of writing defaults.
    /// Pipelined, since this is set-up, not something measured.
    pub async fn write_configs(&self, ids: &[SessionId]) -> anyhow::Result<()> {
        let now = agent_worker::clock::unix_now().to_string();
        self.pipelined(ids, |pipe, chunk| {
            for id in chunk {
                let key = SessionKeys::new(id).config();
                let config = [
                    ("voiceId", "Craig"),
                    ("userName", "bench"),
                    ("updatedAt", &now),
                ];
                pipe.hset_multiple(&key, &config)
                    .ignore()
                    .expire(&key, 3600)
                    .ignore();
            }
        })
        .await
    }

    /// Writes set-up data for the sessions `ids`: a pipeline per [`CHUNK`] of them, four
    /// pipelines at once; `write` adds a chunk's commands to its pipeline. Set-up, not
    /// something measured.
    pub async fn pipelined(
        &self,
        ids: &[SessionId],
        write: impl Fn(&mut redis::Pipeline, &[SessionId]),
    ) -> anyhow::Result<()> {
        futures::stream::iter(ids.chunks(CHUNK))
            .map(|chunk| {
                let mut pipe = redis::pipe();
                write(&mut pipe, chunk);
                let mut conn = self.conn.clone();
                async move { pipe.query_async::<()>(&mut conn).await }
            })
            .buffer_unordered(4)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<()>, _>>()?;
        Ok(())
    }

    /// Enqueues `ids` through our producer in batches of 1,000 (one script call each).
    pub async fn enqueue_all(&self, ids: &[SessionId]) -> anyhow::Result<()> {
        let producer = self.producer(self.conn.clone());
        for chunk in ids.chunks(1000) {
            let jobs: Vec<AgentStart> = chunk.iter().cloned().map(AgentStart::new).collect();
            producer.enqueue_many(&jobs).await?;
        }
        Ok(())
    }

    /// Waits until a worker started after `before` (this Redis's [`Ctx::commandstats`] then)
    /// is idle: registered with apalis-redis, subscribed to the wake channel, its first
    /// (empty) fetch and its start-up promotion done, so that nothing of its start-up is timed
    /// and from then on a push is picked up at once.
    pub async fn wait_worker_idle(&self, before: &HashMap<String, u64>) -> anyhow::Result<()> {
        let keys = QueueKeys::new(QUEUE).expect("valid queue name");
        let since = |now: &HashMap<String, u64>, command: &str| {
            let count = |stats: &HashMap<String, u64>| stats.get(command).copied().unwrap_or(0);
            count(now).saturating_sub(count(before))
        };
        wait_until("the worker to be idle", Duration::from_secs(30), || {
            let mut conn = self.conn.clone();
            let keys = keys.clone();
            async move {
                let workers: u64 = redis::cmd("ZCARD")
                    .arg(keys.workers())
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                let (_, subscribers): (String, u64) = redis::cmd("PUBSUB")
                    .arg("NUMSUB")
                    .arg(keys.wake_channel())
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                let now = self.commandstats().await.ok()?;
                // apalis-redis's fetch script is the only caller of LRANGE; it and the
                // promotion script (`promote_due.lua`) each call ZRANGEBYSCORE once.
                let fetched = since(&now, "lrange") >= 1;
                let promoted = since(&now, "zrangebyscore") >= 2;
                (workers > 0 && subscribers > 0 && fetched && promoted).then_some(())
            }
        })
        .await
    }

    /// Jobs acknowledged as done: in the done set, or already moved from it to the `done-at`
    /// index by the worker's retention.
    pub async fn acked(&self) -> anyhow::Result<usize> {
        let keys = QueueKeys::new(QUEUE)?;
        let (done, indexed): (usize, usize) = redis::pipe()
            .scard(keys.done())
            .zcard(keys.done_at())
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(done + indexed)
    }

    /// Sessions live on some worker: the size of the heartbeat index.
    pub async fn live_sessions(&self) -> anyhow::Result<usize> {
        Ok(redis::cmd("ZCARD")
            .arg(SESSION_HEARTBEATS)
            .query_async(&mut self.conn.clone())
            .await?)
    }

    /// One section of `INFO`, as Redis writes it (`field:value` lines).
    pub async fn info(&self, section: &str) -> anyhow::Result<String> {
        Ok(redis::cmd("INFO")
            .arg(section)
            .query_async(&mut self.conn.clone())
            .await?)
    }

    /// `INFO commandstats` as command → calls. Commands run inside scripts are counted too.
    pub async fn commandstats(&self) -> anyhow::Result<HashMap<String, u64>> {
        Ok(parse_commandstats(&self.info("commandstats").await?))
    }

    /// `total_reads_processed` from `INFO stats`: reads of client requests, about one per
    /// round trip (a pipeline is usually read at once).
    pub async fn reads_processed(&self) -> anyhow::Result<u64> {
        let info = self.info("stats").await?;
        info.lines()
            .find_map(|l| l.strip_prefix("total_reads_processed:"))
            .and_then(|v| v.trim().parse().ok())
            .context("INFO stats has no total_reads_processed")
    }

    /// CPU seconds redis-server has used so far (user + sys), from `INFO cpu`.
    pub async fn redis_cpu(&self) -> anyhow::Result<f64> {
        let info = self.info("cpu").await?;
        Ok(info
            .lines()
            .filter(|l| l.starts_with("used_cpu_user:") || l.starts_with("used_cpu_sys:"))
            .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
            .sum())
    }
}

/// Session ids `<prefix>-<n>`, zero-padded so they sort.
pub fn ids(prefix: &str, n: usize) -> Vec<SessionId> {
    (0..n)
        .map(|i| SessionId::parse(format!("{prefix}-{i:07}")).expect("valid session id"))
        .collect()
}

/// Polls `check` every 5 ms until it gives `Some`, or fails after `deadline`.
pub async fn wait_until<T, F, Fut>(what: &str, deadline: Duration, check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match wait::poll(deadline, Duration::from_millis(5), check).await {
        Some(value) => Ok(value),
        None => bail!("timed out after {deadline:?} waiting for {what}"),
    }
}

/// The real worker (`agent_worker::worker::run`) in this process.
pub struct InProcessWorker {
    shutdown: Shutdown,
    task: JoinHandle<Result<(), worker::RefusedToStart>>,
}

impl InProcessWorker {
    pub fn start(settings: Settings, make_launcher: LauncherFactory) -> Self {
        let shutdown = Shutdown::new();
        let task = tokio::spawn(worker::run(settings, make_launcher, shutdown.clone()));
        Self { shutdown, task }
    }

    /// Stops fetching and stops every agent at once, and waits for the worker to return.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.stop_now();
        tokio::time::timeout(Duration::from_secs(120), self.task)
            .await
            .context("the worker did not stop within 120 s")???;
        Ok(())
    }
}

/// The real `agent-worker run` binary as a child process, configured only through
/// `AGENT_WORKER__*` variables, logging JSON to a file as a log shipper would read it.
pub struct WorkerProcess {
    child: std::process::Child,
    log: PathBuf,
}

impl WorkerProcess {
    /// Starts the binary on the bench's Redis with the test agent in `behaviour`.
    pub fn start(ctx: &Ctx, behaviour: &str) -> anyhow::Result<Self> {
        Self::start_with(ctx, behaviour, &[])
    }

    /// [`WorkerProcess::start`] with more `AGENT_WORKER__*` settings.
    pub fn start_with(ctx: &Ctx, behaviour: &str, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let log = std::env::temp_dir().join(format!(
            "agent-start-bench-worker-{}-{}.log",
            std::process::id(),
            ulid::Ulid::generate()
        ));
        let command = ctx.agent_command(behaviour);
        let mut child = std::process::Command::new(&ctx.worker_bin);
        // Traces only where a part asks for them (part 12): an `OTEL_*` variable in the
        // bench's own environment would turn them on in every child.
        for (name, _) in std::env::vars().filter(|(k, _)| k.starts_with("OTEL_")) {
            child.env_remove(name);
        }
        let child = child
            .arg("run")
            .env("AGENT_WORKER__REDIS__URL", &ctx.url)
            .env("AGENT_WORKER__AGENT__COMMAND", command)
            .env("AGENT_WORKER__AGENT__MAX_AGENTS", "1000000")
            .env("AGENT_WORKER__AGENT__STOP_GRACE", "2s")
            .env("AGENT_WORKER__SHUTDOWN__DRAIN_TIMEOUT", "1s")
            .env("AGENT_WORKER__HTTP__ADDR", "127.0.0.1:0")
            .env("AGENT_WORKER__TELEMETRY__FORMAT", "json")
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        Ok(Self { child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the worker is still running (not exited, or exited and not yet reaped).
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then up to 30 s for the drain and the agents' stop, then SIGKILL. The log is
    /// kept (and its path printed) unless `ok`.
    pub async fn stop(mut self, ok: bool) {
        // SAFETY: kill(2) on our own child, not reaped yet, so its pid cannot have been reused.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.running() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if self.running() {
            eprintln!("  the worker did not stop within 30 s of SIGTERM; killing it");
        }
        if ok {
            let _ = std::fs::remove_file(&self.log);
        } else {
            eprintln!("  the worker's log is in {}", self.log.display());
        }
    }
}

/// A part that fails or panics half-way leaves no worker running (its agents die with it).
impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// When each stage of one session's start happened, as seen from outside the worker's code.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stamps {
    /// Just before the producer's enqueue call.
    pub enqueued: Option<Instant>,
    /// The worker called `Launcher::launch` (job fetched, config read, session claimed).
    pub launched: Option<Instant>,
    /// `agent_process_spawned` was emitted: the process exists and has exec'd.
    pub spawned: Option<Instant>,
    /// `Launcher::launch` returned a ready agent.
    pub ready: Option<Instant>,
    /// The ready agent's pid.
    pub pid: Option<u32>,
}

/// Collects [`Stamps`] per session and counts launches and ready agents; holds the agents a
/// [`RecordingLauncher`] with `keep_running` leaves running.
pub struct Probe {
    stamps: Mutex<HashMap<String, Stamps>>,
    launched: watch::Sender<usize>,
    ready: watch::Sender<usize>,
    running: Mutex<VecDeque<AgentHandle>>,
}

impl Probe {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            stamps: Mutex::new(HashMap::new()),
            launched: watch::Sender::new(0),
            ready: watch::Sender::new(0),
            running: Mutex::new(VecDeque::new()),
        })
    }

    fn stamp(&self, id: &str, set: impl FnOnce(&mut Stamps)) {
        set(self
            .stamps
            .lock()
            .expect("stamps lock")
            .entry(id.to_owned())
            .or_default());
    }

    pub fn enqueued(&self, id: &str, at: Instant) {
        self.stamp(id, |s| s.enqueued = Some(at));
    }

    fn launched(&self, id: &str, at: Instant) {
        self.stamp(id, |s| s.launched = Some(at));
        self.launched.send_modify(|n| *n += 1);
    }

    fn ready(&self, id: &str, at: Instant, pid: u32) {
        self.stamp(id, |s| {
            s.ready = Some(at);
            s.pid = Some(pid);
        });
        self.ready.send_modify(|n| *n += 1);
    }

    /// Every session's stamps, with the spawn instants the tracing layer saw merged in.
    pub fn take(&self) -> HashMap<String, Stamps> {
        let mut stamps = std::mem::take(&mut *self.stamps.lock().expect("stamps lock"));
        for (id, at) in SPAWNED.lock().expect("spawned lock").drain() {
            stamps.entry(id).or_default().spawned = Some(at);
        }
        self.launched.send_replace(0);
        self.ready.send_replace(0);
        stamps
    }

    pub async fn wait_launched(&self, n: usize, deadline: Duration) -> anyhow::Result<()> {
        wait_count(&self.launched, n, deadline, "launches").await
    }

    pub async fn wait_ready(&self, n: usize, deadline: Duration) -> anyhow::Result<()> {
        wait_count(&self.ready, n, deadline, "ready agents").await
    }

    /// Asks every agent left running (by a launcher with `keep_running`) to stop.
    pub fn stop_running(&self, grace: Duration) {
        for agent in self.running.lock().expect("running lock").drain(..) {
            agent.stop(grace);
        }
    }
}

async fn wait_count(
    counter: &watch::Sender<usize>,
    n: usize,
    deadline: Duration,
    what: &str,
) -> anyhow::Result<()> {
    let mut rx = counter.subscribe();
    match tokio::time::timeout(deadline, rx.wait_for(|c| *c >= n)).await {
        Ok(Ok(_)) => Ok(()),
        _ => bail!(
            "timed out after {deadline:?} with {} of {n} {what}",
            *counter.borrow()
        ),
    }
}

/// The real launcher (the [`ProcessLauncher`], with a warm pool when the settings ask for one),
/// with the instants of the call and of its result recorded.
/// With `keep_running`, only that many of the ready agents are left running: the oldest is
/// stopped when a new one is ready, as sessions end on a replica at `agent.max_agents`.
pub struct RecordingLauncher {
    inner: Arc<dyn Launcher>,
    probe: Arc<Probe>,
    keep_running: Option<usize>,
}

impl RecordingLauncher {
    /// A factory for [`worker::run`] building the real launcher from `settings`.
    pub fn factory(
        settings: &Settings,
        probe: Arc<Probe>,
        keep_running: Option<usize>,
    ) -> LauncherFactory {
        let real = agent_worker::worker::process_launcher(&settings.agent);
        Box::new(move |parts| {
            Arc::new(Self {
                inner: real(parts),
                probe,
                keep_running,
            }) as Arc<dyn Launcher>
        })
    }
}

impl Launcher for RecordingLauncher {
    fn launch(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<RunningAgent, LaunchError>> {
        let id = spec.session_id.to_string();
        self.probe.launched(&id, Instant::now());
        Box::pin(async move {
            let result = self.inner.launch(spec).await;
            if let Ok(agent) = &result {
                let at = Instant::now();
                // Held before it is counted, so a part that saw it counted can stop it.
                if let Some(keep) = self.keep_running {
                    let mut running = self.probe.running.lock().expect("running lock");
                    running.push_back(agent.handle.clone());
                    while running.len() > keep {
                        if let Some(oldest) = running.pop_front() {
                            oldest.stop(Duration::from_secs(2));
                        }
                    }
                }
                self.probe.ready(&id, at, agent.pid);
            }
            result
        })
    }

    fn close(&self) {
        self.inner.close();
    }

    fn warm_idle(&self) -> Option<usize> {
        self.inner.warm_idle()
    }

    fn wait_for_exits(&self) -> BoxFuture<'_, ()> {
        self.inner.wait_for_exits()
    }
}

/// A pid no process can have (Linux pids stay below 2^22), written to the session hash by
/// the sham agents of [`InstantLauncher`]. Never 0 or negative: those name process groups.
const SHAM_PID: u32 = 2_000_000_000;

/// Returns a "ready agent" at once, without a process: what is left is the queue path (fetch,
/// config, session claim and state, supervision, ack). The sham agent runs until stopped.
pub struct InstantLauncher {
    probe: Arc<Probe>,
}

impl InstantLauncher {
    pub fn factory(probe: Arc<Probe>) -> LauncherFactory {
        Box::new(move |_output| Arc::new(Self { probe }) as Arc<dyn Launcher>)
    }
}

impl Launcher for InstantLauncher {
    fn launch(&self, spec: LaunchSpec) -> BoxFuture<'_, Result<RunningAgent, LaunchError>> {
        self.probe
            .launched(spec.session_id.as_str(), Instant::now());
        let (stop_tx, mut stop_rx) = mpsc::unbounded_channel::<Duration>();
        let (exit_tx, exited) = oneshot::channel();
        // The sham agent "exits" on its first stop request, as a real one would on SIGTERM.
        tokio::spawn(async move {
            let _ = stop_rx.recv().await;
            let _ = exit_tx.send(AgentExit::Signal(libc::SIGTERM));
        });
        Box::pin(std::future::ready(Ok(RunningAgent {
            pid: SHAM_PID,
            pgid: SHAM_PID,
            startup: Duration::ZERO,
            exited,
            handle: AgentHandle::new(stop_tx),
            start: agent_worker::agent::launcher::StartMode::Cold,
            spawned_at: tokio::time::Instant::now(),
            alive_at: tokio::time::Instant::now(),
        })))
    }
}

/// Spawn instants by session id, written by [`SpawnLayer`].
static SPAWNED: LazyLock<Mutex<HashMap<String, Instant>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// A tracing layer that records when the launcher emits `agent_process_spawned`, the one
/// moment of a launch the `Launcher` trait cannot show from outside (after `spawn()` returned,
/// before the ready line). Every other event and span is disabled at its call site, so the
/// worker pays nothing for logging here (the real binary, in the footprint part, does log).
pub struct SpawnLayer;

impl SpawnLayer {
    fn wanted(meta: &tracing::Metadata<'_>) -> bool {
        let has = |field| meta.fields().field(field).is_some();
        // `agent_process_spawned`, or with a zygote `agent_forked` (its reply: the agent
        // forked and placed), which takes its place.
        let spawned = meta.target() == "agent_worker::agent::process" && has("pgid");
        let forked = meta.target() == "agent_worker::agent::zygote" && has("zygote_pid");
        meta.is_event() && (spawned || forked) && has("session_id")
    }

    /// Installs the layer as the process's only subscriber.
    pub fn install() {
        use tracing_subscriber::layer::SubscriberExt;
        let subscriber = tracing_subscriber::registry().with(SpawnLayer);
        let _ = tracing::subscriber::set_global_default(subscriber);
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for SpawnLayer {
    fn register_callsite(
        &self,
        meta: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if Self::wanted(meta) {
            tracing::subscriber::Interest::always()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    fn enabled(
        &self,
        meta: &tracing::Metadata<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        Self::wanted(meta)
    }

    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let at = Instant::now();
        struct SessionId(Option<String>);
        impl tracing::field::Visit for SessionId {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "session_id" {
                    self.0 = Some(format!("{value:?}"));
                }
            }
        }
        let mut id = SessionId(None);
        event.record(&mut id);
        if let Some(id) = id.0 {
            SPAWNED.lock().expect("spawned lock").insert(id, at);
        }
    }
}

/// Where the CPU went during one measured run, in CPU seconds: this process (the in-process
/// worker, or the client), the children it reaped (agents), and redis-server.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSplit {
    pub wall: f64,
    pub worker: f64,
    pub agents: f64,
    pub redis: f64,
}

impl CpuSplit {
    /// Shares of the machine: `worker 34 %, agents 41 %, redis 9 % of 2 cores over 2.0 s`.
    pub fn describe(&self) -> String {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let pct = |s: f64| s / (self.wall * cores) * 100.0;
        format!(
            "worker {:.0} %, agents {:.0} %, redis {:.0} % of {cores:.0} cores over {:.2} s",
            pct(self.worker),
            pct(self.agents),
            pct(self.redis),
            self.wall
        )
    }

    /// CPU per unit of work, in µs: `worker 1,360, agents 1,640, redis 360 µs CPU per session`.
    pub fn per(&self, n: usize, unit: &str) -> String {
        let us = |s: f64| thousands(s / n as f64 * 1e6);
        let agents = if self.agents > 0.0 {
            format!(", agents {}", us(self.agents))
        } else {
            String::new()
        };
        format!(
            "this process {}{agents}, redis {} µs CPU per {unit}",
            us(self.worker),
            us(self.redis)
        )
    }
}

/// Runs measured `(rate, CPU split)`: the spread of the rates and the CPU split of the median
/// run, which explains its rate (client, or Redis, bound).
pub fn median_run(runs: &mut [(f64, CpuSplit)]) -> (Spread, CpuSplit) {
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let rates: Vec<f64> = runs.iter().map(|run| run.0).collect();
    (Spread::of(&rates), runs[runs.len() / 2].1)
}

/// Measures wall and CPU time around `work`.
pub async fn with_cpu<T>(
    ctx: &Ctx,
    work: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, CpuSplit)> {
    let (cpu0, redis0, t0) = (CpuTimes::of("self"), ctx.redis_cpu().await?, Instant::now());
    let out = work.await?;
    let wall = t0.elapsed().as_secs_f64();
    let (cpu1, redis1) = (CpuTimes::of("self"), ctx.redis_cpu().await?);
    let cpu = cpu1.zip(cpu0).map(|(a, b)| a.since(&b)).unwrap_or_default();
    Ok((
        out,
        CpuSplit {
            wall,
            worker: cpu.own,
            agents: cpu.children,
            redis: redis1 - redis0,
        },
    ))
}

/// Machine-wide CPU use at one instant, to tell how much of it was not ours.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    at: Instant,
    machine: f64,
    ours: f64,
}

impl Load {
    /// Ours is this process, the children it reaped (agents, the footprint worker and what it
    /// reaped) and redis-server.
    pub async fn now(ctx: &Ctx) -> Self {
        let own = CpuTimes::of("self").map_or(0.0, |c| c.own + c.children);
        let redis = ctx.redis_cpu().await.unwrap_or(0.0);
        Self {
            at: Instant::now(),
            machine: crate::procfs::machine_busy().unwrap_or(0.0),
            ours: own + redis,
        }
    }

    /// Share of the machine's CPU (all cores) used by other processes since `earlier`.
    pub fn others_since(&self, earlier: &Self) -> f64 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let wall = self.at.duration_since(earlier.at).as_secs_f64();
        let others = (self.machine - earlier.machine) - (self.ours - earlier.ours);
        (others / (wall * cores)).max(0.0)
    }

    /// Waits (up to `patience`) until other processes leave the machine alone: under 10 % of
    /// its CPU over a second. Returns the share seen last.
    pub async fn wait_for_quiet(ctx: &Ctx, patience: Duration) -> f64 {
        let until = Instant::now() + patience;
        let mut said = false;
        loop {
            let before = Self::now(ctx).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let others = Self::now(ctx).await.others_since(&before);
            if others < 0.10 || Instant::now() >= until {
                return others;
            }
            if !said {
                eprintln!(
                    "  other processes use {:.0} % of the CPU; waiting up to {patience:?} for quiet",
                    others * 100.0
                );
                said = true;
            }
        }
    }
}
