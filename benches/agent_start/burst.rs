//! Part 2: a burst of session starts, against what this machine can spawn at all.
//!
//! Burst: N sessions (configs written first) are enqueued at once, in batches of 1,000, to an
//! idle worker with the real launcher; the agent prints its ready line and exits. Measured
//! twice:
//! - through the `agent-worker run` binary, as deployed (JSON logs, metrics), seen from Redis
//!   only: N over the time from the first enqueue until every job is acknowledged and every
//!   session removed. This is the headline figure; then again with `worker.batch_size = 8`,
//!   which shows what fetching one job per round trip (the default) costs;
//! - with the worker in this process: N over the time to the last agent reported ready (and
//!   to every session removed).
//!
//! Ceiling: the same agent binary, N times, with the same concurrency (`worker.concurrency`),
//! spawned with `tokio::process` and no Redis at all: spawn, read stdout up to the ready line,
//! reap. Three ways, see [`Spawn`]: plainly (the ceiling), with the launcher's own spawn
//! (`agent_worker::agent::spawn`), and the way the launcher spawned before it (std with a `pre_exec`
//! hook, which makes std fork), to show what that spawn saves.
//!
//! CPU time is split between the worker, the reaped agents and redis-server, which is where
//! the time goes on a 2-core machine.

use std::{
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
    sync::Semaphore,
};

use crate::{
    harness::{
        CpuSplit, Ctx, InProcessWorker, Probe, RecordingLauncher, WorkerProcess, ids, wait_until,
        with_cpu,
    },
    procfs::CpuTimes,
    report::Row,
    stats::{Spread, thousands},
};

const PART: &str = "2 burst";
/// `worker.batch_size` of the second binary burst.
const BATCHED: &str = "8";

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    let n = ctx.size(10_000);
    let settings = ctx.settings("exit-after-ready", &[]);
    let concurrency = settings.worker.concurrency;

    let mut burst = Vec::new();
    let mut ended = Vec::new();
    let mut burst_cpu = Vec::new();
    for rep in 0..ctx.reps() {
        ctx.quiet().await;
        ctx.flush().await?;
        let ids = ids(&format!("burst{rep}"), n);
        ctx.write_configs(&ids).await?;
        let probe = Probe::new();
        let before = ctx.commandstats().await?;
        let worker = InProcessWorker::start(
            settings.clone(),
            RecordingLauncher::factory(&settings, probe.clone(), None),
        );
        let result = async {
            ctx.wait_worker_idle(&before).await?;
            let t0 = Instant::now();
            let ((), cpu) = with_cpu(ctx, async {
                ctx.enqueue_all(&ids).await?;
                probe.wait_ready(n, Duration::from_secs(600)).await
            })
            .await?;
            // Every agent has exited and its session was removed by the worker.
            wait_until("every session to end", Duration::from_secs(120), || async {
                (ctx.live_sessions().await.ok()? == 0).then_some(())
            })
            .await?;
            anyhow::Ok((cpu, t0.elapsed().as_secs_f64()))
        }
        .await;
        probe.take();
        worker.stop().await?;
        let (cpu, all_ended) = result?;
        eprintln!(
            "  burst {rep}: {} sessions/s ({})",
            thousands(n as f64 / cpu.wall),
            cpu.describe()
        );
        burst.push(n as f64 / cpu.wall);
        ended.push(n as f64 / all_ended);
        burst_cpu.push(cpu);
    }

    let (binary, binary_cpu) = binary_bursts(ctx, n, &[]).await?;
    // The same with jobs fetched 8 per round trip: what the fetch at the default batch of 1
    // costs (the default is 1 so that a replica at `agent.max_agents` holds no jobs it cannot
    // start; the bench lifts that limit).
    let (batched, batched_cpu) =
        binary_bursts(ctx, n, &[("AGENT_WORKER__WORKER__BATCH_SIZE", BATCHED)]).await?;

    ctx.flush().await?;
    let mut ceilings = Vec::new();
    for spawn in [Spawn::Plain, Spawn::Ours, Spawn::Fork] {
        let mut rates = Vec::new();
        let mut cpu = CpuSplit::default();
        for _ in 0..ctx.reps() {
            ctx.quiet().await;
            let (rate, split) = with_cpu(ctx, spawn_ceiling(ctx, n, concurrency, spawn)).await?;
            rates.push(rate);
            cpu = split;
        }
        ceilings.push((spawn, Spread::of(&rates), cpu));
    }

    let (burst, ended) = (Spread::of(&burst), Spread::of(&ended));
    burst_cpu.sort_by(|a, b| a.wall.total_cmp(&b.wall));
    let burst_cpu = burst_cpu[ctx.reps() / 2];
    let ceiling = ceilings[0].1.median;
    let (ratio, in_process_ratio) = (binary.median / ceiling, burst.median / ceiling);
    let bench_rss = crate::procfs::status_kb(std::process::id(), "VmRSS").unwrap_or(0);
    let mut rows = vec![
        Row::rate(
            PART,
            format!(
                "burst through the agent-worker binary: {n} starts at once, concurrency {concurrency}: sessions/s (enqueue → all ended)"
            ),
            &binary,
        ),
        Row::info(PART, "  CPU of the binary and its agents", binary_cpu),
        Row::rate(
            PART,
            format!("same burst through the binary with worker.batch_size = {BATCHED}"),
            &batched,
        ),
        Row::info(PART, "  CPU of the binary and its agents", batched_cpu),
        Row::rate(
            PART,
            "same burst, in-process worker: sessions/s to the last agent ready",
            &burst,
        ),
        Row::rate(
            PART,
            "  in-process: sessions/s to every session ended",
            &ended,
        ),
        Row::cpu(PART, "  CPU, in-process", &burst_cpu, n, "session"),
        Row::info(
            PART,
            "  RSS of the bench process (the in-process worker's)",
            format!("{:.0} MiB", bench_rss as f64 / 1024.0),
        ),
    ];
    for (spawn, rate, cpu) in &ceilings {
        rows.push(Row::rate(PART, spawn.describe(concurrency), rate));
        rows.push(Row::cpu(PART, "  CPU", cpu, n, "spawn"));
    }
    rows.push(Row::target(
        PART,
        "burst (binary) ÷ bare spawn ceiling",
        format!("{:.0} %", ratio * 100.0),
        "≥ 70 %",
        ratio >= 0.7,
    ));
    rows.push(Row::info(
        PART,
        format!("burst (binary, batch {BATCHED}) ÷ bare spawn ceiling"),
        format!("{:.0} %", batched.median / ceiling * 100.0),
    ));
    rows.push(Row::info(
        PART,
        "burst (in-process) ÷ bare spawn ceiling",
        format!("{:.0} %", in_process_ratio * 100.0),
    ));
    Ok(rows)
}

/// How the ceiling spawns the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spawn {
    /// `tokio::process` as is: std spawns with `posix_spawn` (a vfork: no page tables copied).
    Plain,
    /// The launcher's spawn: a vfork-style clone that leads a new process group and arms the
    /// death signal before exec.
    Ours,
    /// What the launcher did before: `tokio::process` with its own process group and a
    /// `pre_exec` setting the death signal, which makes std fall back to `fork` + `exec`.
    Fork,
}

impl Spawn {
    fn describe(self, concurrency: usize) -> String {
        match self {
            Self::Plain => {
                format!("ceiling: bare spawns/s (tokio::process, {concurrency} at once, no Redis)")
            }
            Self::Ours => {
                "the launcher's spawn alone (clone + own group + death signal), no Redis".into()
            }
            Self::Fork => "for comparison: std with a pre_exec death signal (fork + exec)".into(),
        }
    }
}

/// Spawns the agent `n` times, `concurrency` at once, each to its ready line and exit.
/// Returns spawns per second.
async fn spawn_ceiling(
    ctx: &Ctx,
    n: usize,
    concurrency: usize,
    spawn: Spawn,
) -> anyhow::Result<f64> {
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for i in 0..n {
        let permit = permits.clone().acquire_owned().await?;
        let program = ctx.worker_bin.clone();
        tasks.spawn(async move {
            let result = spawn_one(&program, &format!("ceiling-{i}"), spawn).await;
            drop(permit);
            result
        });
        // Reap finished tasks as we go so that errors surface early.
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

async fn spawn_one(program: &std::path::Path, room: &str, spawn: Spawn) -> anyhow::Result<()> {
    let args = [
        "test-agent",
        "--behaviour",
        "exit-after-ready",
        "--room",
        room,
        "--voice-id",
        "Craig",
    ];
    if spawn == Spawn::Ours {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let mut child = agent_worker::agent::spawn::spawn(&program.to_string_lossy(), &args, &[])?;
        let stdout = child.stdout.take().expect("stdout is a pipe");
        read_to_ready(stdout).await?;
        child.wait().await?;
        return Ok(());
    }
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if spawn == Spawn::Fork {
        command.process_group(0);
        // SAFETY: runs in the forked child before exec and only calls prctl, which is
        // async-signal-safe. Mirrors what the launcher did before `agent_worker::agent::spawn`.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = command.spawn()?;
    read_to_ready(child.stdout.take().expect("stdout is piped")).await?;
    child.wait().await?;
    Ok(())
}

async fn read_to_ready(stdout: impl tokio::io::AsyncRead + Unpin) -> anyhow::Result<()> {
    let mut lines = BufReader::new(stdout).lines();
    while let Some(line) = lines.next_line().await? {
        if line.contains("Room joined") {
            break;
        }
    }
    Ok(())
}

/// [`binary_burst`] once per repetition with the extra settings `env`: the spread of the rates,
/// and where the CPU went in the run with the median rate.
async fn binary_bursts(
    ctx: &Ctx,
    n: usize,
    env: &[(&str, &str)],
) -> anyhow::Result<(Spread, String)> {
    let mut runs = Vec::new();
    for rep in 0..ctx.reps() {
        ctx.quiet().await;
        let (rate, cpu) = binary_burst(ctx, n, rep, env).await?;
        eprintln!(
            "  burst {rep} through the binary {env:?}: {} sessions/s",
            thousands(rate)
        );
        runs.push((rate, cpu));
    }
    let rates: Vec<f64> = runs.iter().map(|(rate, _)| *rate).collect();
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok((Spread::of(&rates), runs.swap_remove(ctx.reps() / 2).1))
}

/// The same burst through the `agent-worker run` binary, seen from Redis only: from the first
/// enqueue until every job is acknowledged and every session removed. Returns sessions/s and
/// where the binary's CPU went.
async fn binary_burst(
    ctx: &Ctx,
    n: usize,
    rep: usize,
    env: &[(&str, &str)],
) -> anyhow::Result<(f64, String)> {
    ctx.flush().await?;
    let ids = ids(&format!("binary{rep}"), n);
    ctx.write_configs(&ids).await?;
    let before = ctx.commandstats().await?;
    let worker = WorkerProcess::start_with(ctx, "exit-after-ready", env)?;
    let pid = worker.pid().to_string();
    let result = async {
        ctx.wait_worker_idle(&before).await?;
        let (cpu0, t0) = (CpuTimes::of(&pid), Instant::now());
        ctx.enqueue_all(&ids).await?;
        wait_until("every session to end", Duration::from_secs(600), || async {
            let live = ctx.live_sessions().await.ok()?;
            (live == 0 && ctx.acked().await.ok()? >= n).then_some(())
        })
        .await?;
        let wall = t0.elapsed().as_secs_f64();
        let cpu = CpuTimes::of(&pid)
            .zip(cpu0)
            .map(|(a, b)| a.since(&b))
            .unwrap_or_default();
        let us = |s: f64| thousands(s / n as f64 * 1e6);
        let cpu = format!(
            "worker {}, agents {} µs CPU per session",
            us(cpu.own),
            us(cpu.children)
        );
        anyhow::Ok((n as f64 / wall, cpu))
    }
    .await;
    worker.stop(result.is_ok()).await;
    result
}
