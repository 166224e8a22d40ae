//! Part 8: the warm pool, with a Python agent whose import phase is realistically heavy.
//!
//! The agent is `heavy_agent.py`: it imports a fixed set of modules, then prints its ready
//! line. With pipecat and livekit installed (`pip install "pipecat-ai[livekit]"`) the set is
//! theirs ([`REAL_AGENT_MODULES`]), what a real voice agent imports; otherwise a fixed set of
//! large standard-library modules ([`STDLIB_MODULES`]), and the table says which. The
//! interpreter is the real one (`sys.executable`), not a version manager's shim script.
//!
//! The same sessions run twice through the real worker in-process: cold (`agent.warm_pool =
//! 0`: `python3 heavy_agent.py --modules=…`), then through a pool of [`POOL`] (`python3 -m
//! agent_worker.warm --preload … -- heavy_agent.py --modules=…`, one warm-up at a time). Both
//! runs enqueue one session every cold start-up time (measured in the cold run), so in the warm
//! run a warm-up is in progress at nearly every take: the p99 is the pool *while refilling*.
//! Measured per session: enqueue → `Launcher::launch` returned a ready agent. Reported: p50
//! and p99 of both, their ratio, how many warm-run sessions a warm process took, and the RSS
//! of an idle warm process.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use agent_jobs::{AgentStart, SessionKeys, keys::WORKER_WARM};
use redis::AsyncCommands;

use crate::{
    harness::{Ctx, InProcessWorker, Probe, RecordingLauncher, ids, wait_until},
    procfs::status_kb,
    report::Row,
    stats::Dist,
};

const PART: &str = "8 warm pool";
/// Idle warm processes kept.
pub const POOL: usize = 4;
/// What a Pipecat agent with the LiveKit transport imports.
pub const REAL_AGENT_MODULES: &str =
    "pipecat.pipeline.pipeline:pipecat.transports.livekit.transport:livekit.rtc";
/// Large standard-library modules, when pipecat is not installed.
pub const STDLIB_MODULES: &str = "asyncio:email.mime.multipart:http.server:xml.etree.ElementTree:\
decimal:sqlite3:ssl:unittest:multiprocessing.pool:concurrent.futures:logging.handlers:\
urllib.request:zipfile:tarfile:csv:difflib:pydoc:inspect:typing:dataclasses:ctypes:uuid:\
statistics:fractions:pickle:tomllib:wave:shelve:mailbox:smtplib:imaplib:xmlrpc.server:\
http.cookiejar:configparser:pdb:doctest";

/// A latency in ms against its limit.
fn within_ms(metric: impl Into<String>, ms: f64, limit: f64) -> Row {
    Row::target(
        PART,
        metric,
        format!("{ms:.1} ms"),
        format!("≤ {limit:.0} ms"),
        ms <= limit,
    )
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    let python = interpreter()?;
    let (modules, which) = if imports(&python, REAL_AGENT_MODULES) {
        (REAL_AGENT_MODULES, "pipecat + livekit (installed)")
    } else {
        (
            STDLIB_MODULES,
            "36 large standard-library modules (pipecat/livekit not installed)",
        )
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/agent_start/heavy_agent.py");
    let shim_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("python");
    let script = script.display().to_string();
    let leading = format!("--modules={modules}");
    let n = ctx.size(30).max(6);

    let cold_settings = {
        let mut s = ctx.settings("ready", &[("AGENT_WORKER__AGENT__STARTUP_TIMEOUT", "60s")]);
        s.agent.command = vec![python.clone(), script.clone(), leading.clone()];
        s
    };
    let cold = sessions(ctx, cold_settings, "cold", n, None).await?;
    let cold_dist = Dist::new(cold.iter().map(|(ms, _)| *ms).collect());
    let gap = Duration::from_secs_f64(cold_dist.pct(50.0) / 1e3);

    let warm_settings = {
        let mut s = ctx.settings(
            "ready",
            &[
                ("AGENT_WORKER__AGENT__STARTUP_TIMEOUT", "60s"),
                ("AGENT_WORKER__AGENT__WARM_POOL", "4"),
                ("AGENT_WORKER__AGENT__WARM_CONCURRENCY", "1"),
            ],
        );
        s.agent.command = vec![python.clone(), script.clone(), leading.clone()];
        s.agent.warm_command = vec![
            "env".into(),
            // The shim first, then what the agent's own imports need.
            format!(
                "PYTHONPATH={}:{}",
                shim_path.display(),
                std::env::var("PYTHONPATH").unwrap_or_default()
            ),
            python.clone(),
            "-m".into(),
            "agent_worker.warm".into(),
            "--preload".into(),
            modules.replace(':', ","),
            "--".into(),
            script.clone(),
            leading.clone(),
        ];
        s
    };
    let warm = sessions(ctx, warm_settings, "warm", n, Some(gap)).await?;
    let (rss_kb, warm_runs) = (warm.rss_kb, warm.results);
    let all = Dist::new(warm_runs.iter().map(|(ms, _)| *ms).collect());
    let taken = Dist::new(
        warm_runs
            .iter()
            .filter(|(_, warm)| *warm)
            .map(|(ms, _)| *ms)
            .collect(),
    );
    let ratio = cold_dist.pct(50.0) / taken.pct(50.0);
    Ok(vec![
        Row::info(PART, "agent import set", which),
        Row::info(
            PART,
            format!("cold: enqueue → ready p50 (n={})", cold_dist.len()),
            format!("{:.1} ms", cold_dist.pct(50.0)),
        ),
        Row::info(
            PART,
            "cold: enqueue → ready p99",
            format!("{:.1} ms", cold_dist.pct(99.0)),
        ),
        within_ms(
            format!("warm: enqueue → ready p50 (n={} taken warm)", taken.len()),
            taken.pct(50.0),
            50.0,
        ),
        within_ms(
            "warm: enqueue → ready p99 (pool refilling)",
            taken.pct(99.0),
            100.0,
        ),
        Row::target(
            PART,
            "cold p50 / warm p50",
            format!("{ratio:.1}×"),
            "≥ 20×",
            ratio >= 20.0,
        ),
        Row::info(
            PART,
            format!(
                "pool run, all {} sessions (cold when none idle): p50 / p99",
                all.len()
            ),
            format!("{:.1} / {:.1} ms", all.pct(50.0), all.pct(99.0)),
        ),
        Row::info(
            PART,
            "one session every (the cold p50)",
            format!("{:.0} ms", gap.as_secs_f64() * 1e3),
        ),
        Row::info(
            PART,
            "RSS of an idle warm process",
            format!("{:.1} MiB", rss_kb / 1024.0),
        ),
    ])
}

/// The results of one run.
struct Run {
    /// Enqueue → ready (ms) and whether a warm process took it, per session.
    results: Vec<(f64, bool)>,
    /// Mean RSS of the idle warm processes before the first session (0 without a pool).
    rss_kb: f64,
}

impl std::ops::Deref for Run {
    type Target = [(f64, bool)];
    fn deref(&self) -> &Self::Target {
        &self.results
    }
}

/// Runs `n` sessions through a worker with `settings`, one every `gap` (default: each after
/// the last is ready), and stops it.
async fn sessions(
    ctx: &Ctx,
    settings: agent_worker::settings::Settings,
    name: &str,
    n: usize,
    gap: Option<Duration>,
) -> anyhow::Result<Run> {
    ctx.flush().await?;
    let probe = Probe::new();
    let pooled = settings.agent.warm_pool > 0;
    let before = ctx.commandstats().await?;
    let worker = InProcessWorker::start(
        settings.clone(),
        RecordingLauncher::factory(&settings, probe.clone(), Some(n + POOL)),
    );
    let result = async {
        ctx.wait_worker_idle(&before).await?;
        let mut rss_kb = 0.0;
        if pooled {
            wait_until("a full warm pool", Duration::from_secs(120), || {
                let mut conn = ctx.conn.clone();
                async move {
                    let idle: Vec<u64> = conn.hvals(WORKER_WARM).await.ok()?;
                    (idle == [POOL as u64]).then_some(())
                }
            })
            .await?;
            let rss: Vec<u64> = warm_processes()
                .iter()
                .filter_map(|pid| status_kb(*pid, "VmRSS"))
                .collect();
            rss_kb = rss.iter().sum::<u64>() as f64 / rss.len().max(1) as f64;
        }
        let producer = ctx.producer(ctx.connect().await?);
        let ids = ids(name, n);
        ctx.write_configs(&ids).await?;
        ctx.quiet().await;
        let start = tokio::time::Instant::now();
        for (i, id) in ids.iter().enumerate() {
            match gap {
                Some(gap) => tokio::time::sleep_until(start + gap * i as u32).await,
                None => probe.wait_ready(i, Duration::from_secs(120)).await?,
            }
            probe.enqueued(id.as_str(), Instant::now());
            producer.enqueue(&AgentStart::new(id.clone())).await?;
        }
        probe.wait_ready(n, Duration::from_secs(300)).await?;
        let stamps = probe.take();
        let mut results = Vec::new();
        for id in &ids {
            let s = stamps[id.as_str()];
            let ms = s
                .ready
                .zip(s.enqueued)
                .map(|(r, e)| r.duration_since(e).as_secs_f64() * 1e3)
                .unwrap_or(f64::NAN);
            let warm: Option<String> = ctx
                .conn
                .clone()
                .hget(SessionKeys::new(id).state(), "warm")
                .await?;
            results.push((ms, warm.as_deref() == Some("1")));
        }
        anyhow::Ok(Run { results, rss_kb })
    }
    .await;
    worker.stop().await?;
    result
}

/// The interpreter `python3` runs (a version manager's `python3` is a shell script that
/// would add its own start-up to every cold start).
pub fn interpreter() -> anyhow::Result<String> {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()?;
    anyhow::ensure!(out.status.success(), "python3 is needed for parts 8 and 11");
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// Whether `python` can import every module of `modules` (colon-separated).
pub fn imports(python: &str, modules: &str) -> bool {
    let code = format!(
        "import importlib\nfor m in {:?}.split(':'): importlib.import_module(m)",
        modules
    );
    Command::new(python)
        .args(["-c", &code])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Pids of this process's children that are warm processes (the shim, not yet given a
/// session: their command line is the shim's either way, so this is called before any take).
fn warm_processes() -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            ppid == Some(me) && String::from_utf8_lossy(&cmdline).contains("agent_worker.warm")
        })
        .collect()
}
