//! Part 11: a burst of 30 sessions at once with a heavy Python agent (issue 24): cold, a warm
//! pool of 4, and a zygote.
//!
//! The agent is part 8's `heavy_agent.py` (the pipecat + livekit import set when it can be
//! imported, and always the CPU-bound standard-library set), run by the real interpreter. For
//! each set, each of three start modes runs the same burst through the real worker in-process:
//! - **cold**: `agent.warm_pool = 0`, no zygote: `python3 heavy_agent.py --modules=…`;
//! - **warm pool of 4**: `python3 -m agent_worker.warm --preload <set> -- heavy_agent.py`
//!   (as part 8, the default `agent.warm_concurrency`): 4 sessions are handed to warm
//!   processes, the rest start cold while the pool refills;
//! - **zygote**: `agent.zygote_command = [python3, -m, agent_worker.zygote, --preload, <set>,
//!   --, heavy_agent.py, --modules=…]`: every start a fork of the zygote. Where the worker does
//!   not (yet) fork from it, its sessions start cold, and the table says so.
//!
//! Each run starts a fresh worker and one session, not measured, that it waits for and stops:
//! that pages the interpreter in, and with a zygote it is repeated until a session was forked
//! (the zygote is up) or a minute passed. With a pool, the pool is then waited for to be full
//! again. Then the burst: [`BURST`] sessions' configs are written, the sessions enqueued in one
//! `enqueue_many` call (all stamped at the instant before it), and every session's enqueue →
//! `Launcher::launch` returned a ready agent is recorded. With every agent ready and idle (the
//! heavy agent waits for SIGTERM after its ready line), the PSS of each agent's process tree
//! (`/proc/<pid>/smaps_rollup`) is summed and divided by the sessions; the zygote's own PSS,
//! and that of the pool's idle warm processes, are reported beside it, not in it. The modes
//! are interleaved over the repetitions (3; 1 with `--quick`, whose burst is 10). p50 and p99
//! are over the sessions of every repetition; the last session's time (the burst's slowest)
//! is the median over the repetitions.

use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, Instant},
};

use agent_jobs::{SessionId, SessionKeys};
use agent_worker::settings::Settings;
use redis::AsyncCommands;

use crate::{
    harness::{Ctx, InProcessWorker, Probe, RecordingLauncher, Stamps, ids, wait_until},
    procfs::{cmdline, parents, pss_kb, tree},
    report::Row,
    stats::{Dist, Spread},
    warm::{POOL, REAL_AGENT_MODULES, STDLIB_MODULES, imports, interpreter},
};

const PART: &str = "11 burst of 30";
/// Sessions enqueued at once (a third with `--quick`).
const BURST: usize = 30;
/// Time allowed to the zygote to come up (its first forked session).
const ZYGOTE_UP: Duration = Duration::from_secs(60);
/// Time after which a worker that has started no zygote process is taken to have none.
const NO_ZYGOTE: Duration = Duration::from_secs(5);

/// How the sessions of a run start.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Cold,
    Warm,
    Zygote,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Cold, Mode::Warm, Mode::Zygote];

    fn name(self) -> &'static str {
        match self {
            Mode::Cold => "cold",
            Mode::Warm => "warm pool of 4",
            Mode::Zygote => "zygote",
        }
    }
}

/// The agent, its interpreter and its import set.
struct Agent {
    python: String,
    set: &'static str,
    modules: &'static str,
    script: String,
    /// The shim package (`python/`) first, then what the agent's own imports need.
    pythonpath: String,
}

impl Agent {
    /// `agent.command`, a warm process's or the zygote's command line.
    fn command(&self, shim: Option<&str>) -> Vec<String> {
        let leading = format!("--modules={}", self.modules);
        let Some(shim) = shim else {
            return vec![self.python.clone(), self.script.clone(), leading];
        };
        [
            "env",
            &format!("PYTHONPATH={}", self.pythonpath),
            &self.python,
            "-m",
            shim,
            "--preload",
            &self.modules.replace(':', ","),
            "--",
            &self.script,
            &leading,
        ]
        .map(str::to_owned)
        .to_vec()
    }

    fn settings(&self, ctx: &Ctx, mode: Mode) -> Settings {
        let pool = if mode == Mode::Warm { "4" } else { "0" };
        let mut s = ctx.settings(
            "ready",
            &[
                ("AGENT_WORKER__AGENT__STARTUP_TIMEOUT", "60s"),
                ("AGENT_WORKER__AGENT__ALIVE_TIMEOUT", "60s"),
                ("AGENT_WORKER__AGENT__WARM_POOL", pool),
            ],
        );
        s.agent.command = self.command(None);
        match mode {
            Mode::Cold => s.agent.zygote_command.clear(),
            Mode::Warm => s.agent.warm_command = self.command(Some("agent_worker.warm")),
            Mode::Zygote => s.agent.zygote_command = self.command(Some("agent_worker.zygote")),
        }
        s
    }
}

/// What one burst measured.
struct Burst {
    /// Enqueue → ready (ms) of each session.
    ready_ms: Vec<f64>,
    /// Enqueue → `launch()` (ms) of each session: the worker's pick-up.
    pickup_ms: Vec<f64>,
    /// With a zygote: `launch()` → the zygote's reply (the agent forked and placed), and
    /// from then to the ready line read (ms), of each forked session.
    reply_ms: Vec<f64>,
    after_ms: Vec<f64>,
    /// With a zygote, after the burst, sessions one at a time: enqueue → ready, `launch()` →
    /// reply, reply → ready (ms).
    single_ms: Vec<f64>,
    single_reply_ms: Vec<f64>,
    single_after_ms: Vec<f64>,
    /// Sessions by how they started (the session record's `warm`: 0 cold, 1 warm, 2 forked).
    started: HashMap<String, usize>,
    /// Sum of the PSS of every agent's process tree (kB).
    agents_pss_kb: u64,
    /// PSS of the replica's other Python processes: the zygote, or the idle warm processes.
    others_pss_kb: u64,
    /// How many of those there were.
    others: usize,
    /// Whether the zygote forked the warm-up session.
    zygote_up: bool,
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    let python = interpreter()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pythonpath = match std::env::var("PYTHONPATH") {
        Ok(path) if !path.is_empty() => format!("{}:{path}", root.join("python").display()),
        _ => root.join("python").display().to_string(),
    };
    let script = root.join("benches/agent_start/heavy_agent.py");
    let mut rows = Vec::new();
    let mut sets = Vec::new();
    if imports(&python, REAL_AGENT_MODULES) {
        sets.push(("pipecat + livekit", REAL_AGENT_MODULES));
    } else {
        rows.push(Row::info(
            PART,
            "pipecat + livekit set",
            "not importable by this python3: skipped",
        ));
    }
    sets.push(("36 standard-library modules", STDLIB_MODULES));
    // A forked agent is re-parented to the worker (`docs/zygote.md`), as `agent-worker run`
    // makes itself the subreaper of its agents.
    agent_worker::agent::containment::become_subreaper()?;
    for (set, modules) in sets {
        let agent = Agent {
            python: python.clone(),
            set,
            modules,
            script: script.display().to_string(),
            pythonpath: pythonpath.clone(),
        };
        let mut runs: Vec<Vec<Burst>> = Mode::ALL.iter().map(|_| Vec::new()).collect();
        for rep in 0..ctx.reps() {
            for k in 0..Mode::ALL.len() {
                let m = (rep + k) % Mode::ALL.len();
                eprintln!("  {set}: {} (repetition {rep})", Mode::ALL[m].name());
                let name = format!("b{m}r{rep}");
                runs[m].push(burst(ctx, &agent, Mode::ALL[m], &name).await?);
            }
        }
        rows.extend(report(&agent, &runs));
    }
    Ok(rows)
}

/// The rows of one import set: each mode's figures, against cold's.
fn report(agent: &Agent, runs: &[Vec<Burst>]) -> Vec<Row> {
    let figures: Vec<Figures> = runs.iter().map(|r| Figures::of(r)).collect();
    let cold = &figures[0];
    let mut rows = vec![Row::info(PART, "agent import set", agent.set)];
    for (mode, f) in Mode::ALL.iter().zip(&figures) {
        let judged = *mode == Mode::Zygote && f.forked;
        let label = |what: &str| format!("{}, {}: {what}", agent.set, mode.name());
        rows.push(Row::info(
            PART,
            label("sessions started"),
            f.started.clone(),
        ));
        let p50 = Row::info(
            PART,
            label(&format!("enqueue → ready p50 (n={})", f.ready.len())),
            format!("{:.1} ms", f.ready.pct(50.0)),
        );
        let p99 = Row::info(
            PART,
            label("enqueue → ready p99"),
            format!("{:.1} ms", f.ready.pct(99.0)),
        );
        let versus = |text: String| {
            if *mode == Mode::Cold {
                String::new()
            } else {
                text
            }
        };
        let last_ratio = cold.last.median / f.last.median;
        let last = Row::info(
            PART,
            label("the last session ready (median of the bursts)"),
            format!(
                "{:.1} ms{}",
                f.last.median,
                versus(format!(" ({last_ratio:.1}× sooner than cold)"))
            ),
        )
        .spread(f.last.describe(" ms", 1));
        let pss_ratio = f.pss_per_agent_kb / cold.pss_per_agent_kb;
        let pss = Row::info(
            PART,
            label("PSS per idle agent (its process tree's, ÷ sessions)"),
            format!(
                "{:.1} MiB{}",
                f.pss_per_agent_kb / 1024.0,
                versus(format!(" ({pss_ratio:.2}× a cold agent's)"))
            ),
        );
        let pickup = Row::info(
            PART,
            label("  of which enqueue → launch() (the worker's pick-up) p50 / p99"),
            format!("{:.1} / {:.1} ms", f.pickup.pct(50.0), f.pickup.pct(99.0)),
        );
        if judged {
            rows.push(p50.against("≤ 10 ms", f.ready.pct(50.0) <= 10.0));
            rows.push(p99.against("≤ 20 ms", f.ready.pct(99.0) <= 20.0));
            rows.push(last.against("≥ 10× sooner than cold", last_ratio >= 10.0));
            rows.push(pss.against("≤ ¼ of a cold agent's", pss_ratio <= 0.25));
        } else {
            rows.extend([p50, p99, last, pss]);
        }
        rows.push(pickup);
        let split = |reply: &Dist, after: &Dist| {
            format!(
                "{:.1} / {:.1} ms; then to the ready line read {:.1} / {:.1} ms",
                reply.pct(50.0),
                reply.pct(99.0),
                after.pct(50.0),
                after.pct(99.0)
            )
        };
        if f.reply.len() > 0 {
            rows.push(Row::info(
                PART,
                label("  of which launch() → the zygote's reply (forked, placed) p50 / p99"),
                split(&f.reply, &f.after),
            ));
        }
        if f.single.len() > 0 {
            rows.push(Row::info(
                PART,
                label(&format!(
                    "one at a time after the burst (each when the one before is ready): enqueue → ready p50 / p99 (n={})",
                    f.single.len()
                )),
                format!("{:.1} / {:.1} ms", f.single.pct(50.0), f.single.pct(99.0)),
            )
            .spread(format!(
                "launch() → reply {}",
                split(&f.single_reply, &f.single_after)
            )));
        }
        if *mode != Mode::Cold {
            let whose = match mode {
                Mode::Zygote => "the zygote's own PSS (zygote processes)",
                _ => "PSS of the idle warm processes refilled meanwhile, together (processes)",
            };
            rows.push(Row::info(
                PART,
                label(whose),
                format!("{:.1} MiB ({})", f.others_pss_kb / 1024.0, f.others),
            ));
        }
        if *mode == Mode::Zygote && !f.forked {
            rows.push(Row::info(
                PART,
                label("not judged"),
                "no session was forked: this worker started them cold (no zygote support, or the zygote did not come up)",
            ));
        }
    }
    rows
}

/// One mode's figures over its bursts.
struct Figures {
    ready: Dist,
    pickup: Dist,
    reply: Dist,
    after: Dist,
    single: Dist,
    single_reply: Dist,
    single_after: Dist,
    last: Spread,
    pss_per_agent_kb: f64,
    others_pss_kb: f64,
    /// How many processes that was (the last burst's).
    others: usize,
    /// `30 forked` / `4 warm, 26 cold`, over every burst.
    started: String,
    /// The zygote came up in every burst and forked at least one session.
    forked: bool,
}

impl Figures {
    fn of(bursts: &[Burst]) -> Self {
        let ready = Dist::new(bursts.iter().flat_map(|b| b.ready_ms.clone()).collect());
        let lasts: Vec<f64> = bursts
            .iter()
            .map(|b| Dist::new(b.ready_ms.clone()).max())
            .collect();
        let median = |values: Vec<f64>| Dist::new(values).pct(50.0);
        let sessions: usize = bursts.iter().map(|b| b.ready_ms.len()).sum();
        let mut started: HashMap<&str, usize> = HashMap::new();
        for burst in bursts {
            for (warm, n) in &burst.started {
                let how = match warm.as_str() {
                    "0" => "cold",
                    "1" => "warm",
                    "2" => "forked",
                    _ => "unknown",
                };
                *started.entry(how).or_default() += n;
            }
        }
        let mut started: Vec<String> = started
            .iter()
            .map(|(how, n)| format!("{n} {how}"))
            .collect();
        started.sort();
        let all = |of: fn(&Burst) -> &Vec<f64>| {
            Dist::new(bursts.iter().flat_map(|b| of(b).clone()).collect())
        };
        Self {
            ready,
            pickup: all(|b| &b.pickup_ms),
            reply: all(|b| &b.reply_ms),
            after: all(|b| &b.after_ms),
            single: all(|b| &b.single_ms),
            single_reply: all(|b| &b.single_reply_ms),
            single_after: all(|b| &b.single_after_ms),
            last: Spread::of(&lasts),
            pss_per_agent_kb: median(
                bursts
                    .iter()
                    .map(|b| b.agents_pss_kb as f64 / b.ready_ms.len() as f64)
                    .collect(),
            ),
            others_pss_kb: median(bursts.iter().map(|b| b.others_pss_kb as f64).collect()),
            others: bursts.last().map_or(0, |b| b.others),
            started: format!("{} (of {sessions})", started.join(", ")),
            forked: bursts.iter().all(|b| b.zygote_up),
        }
    }
}

/// One burst in `mode`, through a fresh in-process worker, stopped at the end.
async fn burst(ctx: &Ctx, agent: &Agent, mode: Mode, name: &str) -> anyhow::Result<Burst> {
    ctx.flush().await?;
    let settings = agent.settings(ctx, mode);
    let n = if ctx.quick { BURST / 3 } else { BURST };
    let probe = Probe::new();
    let before = ctx.commandstats().await?;
    let worker = InProcessWorker::start(
        settings.clone(),
        // Every agent is kept running until the worker stops (or the probe stops them).
        RecordingLauncher::factory(&settings, probe.clone(), Some(usize::MAX)),
    );
    let result = async {
        ctx.wait_worker_idle(&before).await?;
        let zygote_up = warm_up(ctx, &probe, mode, name).await?;
        if mode == Mode::Warm {
            pool_full(ctx).await?;
        }
        let ids = ids(name, n);
        ctx.write_configs(&ids).await?;
        ctx.quiet().await;
        let at = Instant::now();
        for id in &ids {
            probe.enqueued(id.as_str(), at);
        }
        ctx.enqueue_all(&ids).await?;
        probe.wait_ready(n, Duration::from_secs(300)).await?;
        let stamps = probe.take();
        let (mut ready_ms, mut pickup_ms, mut pids) = (Vec::new(), Vec::new(), Vec::new());
        let burst: Vec<Stamps> = ids.iter().map(|id| stamps[id.as_str()]).collect();
        let (reply_ms, after_ms) = forks(mode, &burst);
        let mut started: HashMap<String, usize> = HashMap::new();
        for id in &ids {
            let s = stamps[id.as_str()];
            ready_ms.push(millis(s.enqueued, s.ready));
            pickup_ms.push(millis(s.enqueued, s.launched));
            pids.extend(s.pid);
        }
        for warm in start_modes(ctx, &ids).await? {
            *started.entry(warm).or_default() += 1;
        }
        let (agents_pss_kb, others_pss_kb, others) = pss(&pids);
        let single = if mode == Mode::Zygote {
            one_at_a_time(ctx, &probe, &format!("{name}s"), n).await?
        } else {
            Vec::new()
        };
        let single_ms = single.iter().map(|s| millis(s.enqueued, s.ready)).collect();
        let (single_reply_ms, single_after_ms) = forks(mode, &single);
        anyhow::Ok(Burst {
            ready_ms,
            pickup_ms,
            reply_ms,
            after_ms,
            single_ms,
            single_reply_ms,
            single_after_ms,
            started,
            agents_pss_kb,
            others_pss_kb,
            others,
            zygote_up,
        })
    }
    .await;
    worker.stop().await?;
    result
}

/// Milliseconds from `from` to `to`, NaN without both.
fn millis(from: Option<Instant>, to: Option<Instant>) -> f64 {
    from.zip(to)
        .and_then(|(f, t)| t.checked_duration_since(f))
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

/// With a zygote, `launch()` → the zygote's reply and reply → ready (ms) of each session
/// (the reply is the `agent_forked` event); nothing in other modes.
fn forks(mode: Mode, stamps: &[Stamps]) -> (Vec<f64>, Vec<f64>) {
    if mode != Mode::Zygote {
        return (Vec::new(), Vec::new());
    }
    let known = |v: Vec<f64>| v.into_iter().filter(|ms| !ms.is_nan()).collect();
    (
        known(
            stamps
                .iter()
                .map(|s| millis(s.launched, s.spawned))
                .collect(),
        ),
        known(stamps.iter().map(|s| millis(s.spawned, s.ready)).collect()),
    )
}

/// After the burst, its agents stopped: `n` sessions one at a time, each enqueued once the one
/// before is ready; their stamps.
async fn one_at_a_time(
    ctx: &Ctx,
    probe: &Probe,
    name: &str,
    n: usize,
) -> anyhow::Result<Vec<Stamps>> {
    probe.stop_running(Duration::from_secs(2));
    wait_until(
        "the burst's sessions to end",
        Duration::from_secs(60),
        || async { (ctx.live_sessions().await.ok()? == 0).then_some(()) },
    )
    .await?;
    let ids = ids(name, n);
    ctx.write_configs(&ids).await?;
    ctx.quiet().await;
    for (i, id) in ids.iter().enumerate() {
        probe.enqueued(id.as_str(), Instant::now());
        ctx.enqueue_all(std::slice::from_ref(id)).await?;
        probe.wait_ready(i + 1, Duration::from_secs(60)).await?;
    }
    let stamps = probe.take();
    Ok(ids.iter().map(|id| stamps[id.as_str()]).collect())
}

/// One session, not measured, waited for and stopped; with a zygote, repeated until one was
/// forked or [`ZYGOTE_UP`] passed. Returns whether one was forked.
async fn warm_up(ctx: &Ctx, probe: &Probe, mode: Mode, name: &str) -> anyhow::Result<bool> {
    let deadline = Instant::now() + ZYGOTE_UP;
    for attempt in 0.. {
        let id = ids(&format!("{name}w{attempt}"), 1);
        ctx.write_configs(&id).await?;
        ctx.enqueue_all(&id).await?;
        probe.wait_ready(1, Duration::from_secs(120)).await?;
        probe.take();
        probe.stop_running(Duration::from_secs(2));
        let warm = start_modes(ctx, &id).await?.pop();
        wait_until(
            "the warm-up session to end",
            Duration::from_secs(30),
            || async { (ctx.live_sessions().await.ok()? == 0).then_some(()) },
        )
        .await?;
        let forked = warm.as_deref() == Some("2");
        // A worker without zygote support never starts one: no use waiting a minute.
        let no_zygote = Instant::now() + ZYGOTE_UP - deadline > NO_ZYGOTE && zygotes() == 0;
        if mode != Mode::Zygote || forked || no_zygote || Instant::now() >= deadline {
            return Ok(forked);
        }
        // The zygote is still importing: its sessions start cold meanwhile.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    unreachable!("the loop returns")
}

/// How each of the sessions `ids` started (their record's `warm`), once the worker has
/// recorded them ready (it does so after `launch()` returned).
async fn start_modes(ctx: &Ctx, ids: &[SessionId]) -> anyhow::Result<Vec<String>> {
    wait_until("the ready records", Duration::from_secs(30), || async {
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.hget(SessionKeys::new(id).state(), "warm");
        }
        let modes: Vec<Option<String>> = pipe.query_async(&mut ctx.conn.clone()).await.ok()?;
        modes.into_iter().collect::<Option<Vec<String>>>()
    })
    .await
}

/// This process's children that are zygotes.
fn zygotes() -> usize {
    let me = std::process::id();
    parents()
        .iter()
        .filter(|&(&pid, &ppid)| ppid == me && cmdline(pid).contains("agent_worker.zygote"))
        .count()
}

/// Waits until the pool has its [`POOL`] idle warm processes.
async fn pool_full(ctx: &Ctx) -> anyhow::Result<()> {
    wait_until("a full warm pool", Duration::from_secs(120), || {
        let mut conn = ctx.conn.clone();
        async move {
            let idle: Vec<u64> = conn.hvals(agent_jobs::keys::WORKER_WARM).await.ok()?;
            (idle == [POOL as u64]).then_some(())
        }
    })
    .await
}

/// The PSS (kB) of the process trees of `agents` together, and of this process's other
/// Python children (the zygote, idle warm processes) together, and how many those are.
fn pss(agents: &[u32]) -> (u64, u64, usize) {
    let parents = parents();
    let agent_pids: Vec<u32> = agents.iter().flat_map(|&pid| tree(pid, &parents)).collect();
    let me = std::process::id();
    let others: Vec<u32> = parents
        .iter()
        .filter(|&(pid, &ppid)| ppid == me && !agent_pids.contains(pid))
        .map(|(&pid, _)| pid)
        .filter(|&pid| {
            let cmd = cmdline(pid);
            cmd.contains("agent_worker.zygote") || cmd.contains("agent_worker.warm")
        })
        .collect();
    let other_pids: Vec<u32> = others.iter().flat_map(|&pid| tree(pid, &parents)).collect();
    let sum = |pids: &[u32]| pids.iter().filter_map(|&pid| pss_kb(pid)).sum();
    (sum(&agent_pids), sum(&other_pids), others.len())
}
