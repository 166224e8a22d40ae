//! Part 6: footprint of the real `agent-worker run` binary, as deployed.
//!
//! The worker runs as a child process ([`WorkerProcess`]: JSON logs to a file, configured only
//! through `AGENT_WORKER__*` variables). Measured from /proc: RSS when
//! idle, RSS with 100 and then 200 supervised agents (the test agent, which sleeps until
//! SIGTERM), and the CPU time and context switches of the worker over a quiet window, idle and
//! with the 200 agents. An idle worker that polls shows up as CPU time and wake-ups here.

use std::time::{Duration, Instant};

use agent_jobs::keys::SESSIONS_READY;
use redis::AsyncCommands;

use crate::{
    harness::{Ctx, WorkerProcess, ids, wait_until},
    procfs::{CpuTimes, context_switches, status_kb, threads},
    report::Row,
};

const PART: &str = "6 footprint";
const AGENTS: usize = 200;

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    ctx.flush().await?;
    let before = ctx.commandstats().await?;
    let worker = WorkerProcess::start(ctx, "ready")?;
    let result = measure(ctx, worker.pid(), &before).await;
    worker.stop(result.is_ok()).await;
    result
}

/// `before`: the commandstats from before the worker started.
async fn measure(
    ctx: &Ctx,
    pid: u32,
    before: &std::collections::HashMap<String, u64>,
) -> anyhow::Result<Vec<Row>> {
    // Quick mode shortens the windows; the idle CPU is then measured over 2 s, not 10.
    let (window, settle) = if ctx.quick {
        (Duration::from_secs(2), Duration::from_millis(500))
    } else {
        (Duration::from_secs(10), Duration::from_secs(2))
    };
    ctx.wait_worker_idle(before).await?;
    tokio::time::sleep(settle).await;
    let rss = |field| status_kb(pid, field).unwrap_or(0) as f64;
    let idle_rss = rss("VmRSS");
    let idle_anon = rss("RssAnon");
    let idle_threads = threads(pid);
    let idle = quiet_window(pid, window).await?;

    // Two steps of 100 agents: the slope between them is the per-agent cost without the
    // one-off growth of the first agents (runtime buffers, script cache, log shipper).
    let mut rss_at = Vec::new();
    for step in 0..2 {
        let ids = ids(&format!("fp{step}"), AGENTS / 2);
        ctx.write_configs(&ids).await?;
        ctx.enqueue_all(&ids).await?;
        let want = (step + 1) * AGENTS / 2;
        wait_until(
            "the agents to be ready",
            Duration::from_secs(60),
            || async {
                let ready: usize = ctx.conn.clone().scard(SESSIONS_READY).await.ok()?;
                (ready >= want).then_some(())
            },
        )
        .await?;
        tokio::time::sleep(settle).await;
        rss_at.push(rss("VmRSS"));
    }
    let busy = quiet_window(pid, window).await?;

    let mib = |kb: f64| format!("{:.1} MiB", kb / 1024.0);
    let per_agent = (rss_at[1] - idle_rss) / AGENTS as f64;
    let slope = (rss_at[1] - rss_at[0]) / (AGENTS / 2) as f64;
    let idle_cpu_share = idle.cpu / idle.wall;
    Ok(vec![
        Row::target(
            PART,
            "idle RSS (VmRSS)",
            mib(idle_rss),
            "≤ 20 MB",
            idle_rss <= 20.0 * 1000.0,
        )
        .spread(format!(
            "RssAnon {}, {idle_threads} threads",
            mib(idle_anon)
        )),
        Row::info(
            PART,
            format!("RSS with {AGENTS} supervised sleeping agents"),
            mib(rss_at[1]),
        )
        .spread(format!("with {}: {}", AGENTS / 2, mib(rss_at[0]))),
        Row::target(
            PART,
            "RSS per supervised agent ((RSS@200 − idle) ÷ 200)",
            format!("{per_agent:.0} KB"),
            "≤ 64 KB",
            per_agent <= 64.0,
        )
        .spread(format!("slope 100→200: {slope:.0} KB")),
        Row::target(
            PART,
            format!("idle worker CPU over {:.0} s", idle.wall),
            format!(
                "{:.0} ms ({:.2} % of a core)",
                idle.cpu * 1e3,
                idle_cpu_share * 100.0
            ),
            "no busy polling",
            idle_cpu_share < 0.005,
        )
        .spread(format!("{:.1} wake-ups/s", idle.wakeups_per_s)),
        Row::info(
            PART,
            format!("worker CPU with {AGENTS} agents over {:.0} s", busy.wall),
            format!(
                "{:.0} ms ({:.2} % of a core)",
                busy.cpu * 1e3,
                busy.cpu / busy.wall * 100.0
            ),
        )
        .spread(format!("{:.1} wake-ups/s", busy.wakeups_per_s)),
    ])
}

struct Window {
    wall: f64,
    cpu: f64,
    wakeups_per_s: f64,
}

/// The worker's CPU seconds and context switches over `window`, with nothing asked of it.
async fn quiet_window(pid: u32, window: Duration) -> anyhow::Result<Window> {
    let id = pid.to_string();
    let (cpu0, switches0, t0) = (CpuTimes::of(&id), context_switches(pid), Instant::now());
    tokio::time::sleep(window).await;
    let (cpu1, switches1) = (CpuTimes::of(&id), context_switches(pid));
    let wall = t0.elapsed().as_secs_f64();
    let (Some(cpu0), Some(cpu1)) = (cpu0, cpu1) else {
        anyhow::bail!("the worker (pid {pid}) is gone");
    };
    Ok(Window {
        wall,
        cpu: cpu1.since(&cpu0).own,
        wakeups_per_s: switches1.saturating_sub(switches0) as f64 / wall,
    })
}
