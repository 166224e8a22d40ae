//! Part 1: start-up latency of one session on an idle worker.
//!
//! The real worker runs in-process with the real process launcher, wrapped so that the bench
//! sees when `launch` was called and when it returned a ready agent; the spawn instant comes
//! from the launcher's own `agent_process_spawned` event. Sessions are enqueued one at a time,
//! every 10 ms, through our producer, with their config written beforehand as the
//! orchestrator does. The 20 newest agents stay running (idle voice sessions, as on a replica
//! at the default `agent.max_agents`); older ones are stopped, so the worker supervises a
//! steady 20 and has nothing else to do between two starts.
//!
//! A last round runs while a `yes > /dev/null` process keeps one of the cores busy: the targets
//! are judged on the quiet rounds, and this one shows what a neighbour on the host costs.

use std::time::{Duration, Instant};

use agent_jobs::{AgentStart, Producer};
use agent_worker::connection::RedisConn;

use crate::{
    harness::{Ctx, InProcessWorker, Probe, RecordingLauncher, Stamps, ids},
    report::Row,
    stats::Dist,
};

const PART: &str = "1 latency";
/// Gap between two enqueues: gentle enough that starts never overlap.
const GAP: Duration = Duration::from_millis(10);
/// The sessions are split in rounds so that the spread between rounds can be stated.
const ROUNDS: usize = 2;
/// Agents left running: the oldest is stopped when a new one is ready, so the worker always
/// supervises as many as a replica at the default `agent.max_agents`. (A fork costs in
/// proportion to the worker's memory, which grows with every agent it supervises.)
const KEEP_RUNNING: usize = 20;

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    ctx.flush().await?;
    let settings = ctx.settings("ready", &[]);
    let probe = Probe::new();
    let before = ctx.commandstats().await?;
    let worker = InProcessWorker::start(
        settings.clone(),
        RecordingLauncher::factory(&settings, probe.clone(), Some(KEEP_RUNNING)),
    );
    let measured = measure(ctx, &probe, &before).await;
    worker.stop().await?;
    let (rounds, loaded) = measured?;
    eprintln!(
        "  {} sessions in {ROUNDS} rounds, one every {GAP:?}",
        rounds.iter().map(Vec::len).sum::<usize>()
    );

    let mut rows = Vec::new();
    for span in SPANS {
        let samples = |stamps: &[Stamps]| -> Vec<f64> {
            stamps.iter().filter_map(|s| span.millis(s)).collect()
        };
        let per_round: Vec<Dist> = rounds.iter().map(|r| Dist::new(samples(r))).collect();
        let pooled = Dist::new(samples(&rounds.concat()));
        for &(p, target) in span.percentiles {
            let value = pooled.pct(p);
            let metric = format!("{} p{p:.0} (n={})", span.metric, pooled.len());
            let row = match target {
                Some(t) => Row::target(
                    PART,
                    metric,
                    format!("{value:.2} ms"),
                    format!("≤ {t} ms"),
                    value <= t,
                ),
                None => Row::info(PART, metric, format!("{value:.2} ms")),
            };
            let rounds: Vec<String> = per_round
                .iter()
                .map(|d| format!("{:.2}", d.pct(p)))
                .collect();
            rows.push(row.spread(format!("per round: {} ms", rounds.join(" / "))));
        }
        if span.show_max {
            rows.push(Row::info(
                PART,
                format!("{} max", span.metric),
                format!("{:.2} ms", pooled.max()),
            ));
        }
    }
    for span in SPANS.iter().filter(|span| span.show_max) {
        let busy = Dist::new(loaded.iter().filter_map(|s| span.millis(s)).collect());
        for p in [50.0, 99.0] {
            rows.push(Row::info(
                PART,
                format!("{} p{p:.0}, one core busy (n={})", span.metric, busy.len()),
                format!("{:.2} ms", busy.pct(p)),
            ));
        }
    }
    Ok(rows)
}

/// A stage of one start, as stamped by the probe.
#[derive(Clone, Copy)]
enum Stage {
    Enqueued,
    Launched,
    Spawned,
    Ready,
}

/// A reported span between two stages, at some percentiles, each with its target (ms) if any.
struct Span {
    metric: &'static str,
    from: Stage,
    to: Stage,
    percentiles: &'static [(f64, Option<f64>)],
    show_max: bool,
}

impl Span {
    fn millis(&self, s: &Stamps) -> Option<f64> {
        let at = |stage| match stage {
            Stage::Enqueued => s.enqueued,
            Stage::Launched => s.launched,
            Stage::Spawned => s.spawned,
            Stage::Ready => s.ready,
        };
        Some(
            at(self.to)?
                .checked_duration_since(at(self.from)?)?
                .as_secs_f64()
                * 1e3,
        )
    }
}

const SPANS: [Span; 5] = [
    Span {
        metric: "enqueue → agent spawned",
        from: Stage::Enqueued,
        to: Stage::Spawned,
        percentiles: &[(50.0, Some(5.0)), (95.0, None), (99.0, Some(25.0))],
        show_max: true,
    },
    Span {
        metric: "enqueue → agent ready",
        from: Stage::Enqueued,
        to: Stage::Ready,
        percentiles: &[(50.0, Some(10.0)), (95.0, None), (99.0, None)],
        show_max: true,
    },
    Span {
        metric: "  of which enqueue → launch() (pick-up, config, claim)",
        from: Stage::Enqueued,
        to: Stage::Launched,
        percentiles: &[(50.0, None), (99.0, None)],
        show_max: false,
    },
    Span {
        metric: "  of which launch() → spawned (clone + exec)",
        from: Stage::Launched,
        to: Stage::Spawned,
        percentiles: &[(50.0, None), (99.0, None)],
        show_max: false,
    },
    Span {
        metric: "  of which spawned → ready line read",
        from: Stage::Spawned,
        to: Stage::Ready,
        percentiles: &[(50.0, None), (99.0, None)],
        show_max: false,
    },
];

/// Enqueues the sessions of each round at the gentle rate and returns each quiet round's
/// stamps, then those of the round with one core busy.
/// `before`: the commandstats from before the worker started.
async fn measure(
    ctx: &Ctx,
    probe: &Probe,
    before: &std::collections::HashMap<String, u64>,
) -> anyhow::Result<(Vec<Vec<Stamps>>, Vec<Stamps>)> {
    ctx.wait_worker_idle(before).await?;
    // The producer has its own connection, as the orchestrator would.
    let producer = ctx.producer(ctx.connect().await?);

    // Warm-up, not measured: the first spawns page the agent binary in, and the worker's
    // scripts are loaded into Redis on first use.
    let warm = ids("warm", 20);
    ctx.write_configs(&warm).await?;
    for id in &warm {
        producer.enqueue(&AgentStart::new(id.clone())).await?;
        tokio::time::sleep(GAP).await;
    }
    probe
        .wait_ready(warm.len(), Duration::from_secs(30))
        .await?;
    probe.take();

    let per_round = ctx.size(500);
    let mut rounds = Vec::new();
    for round in 0..ROUNDS {
        rounds.push(
            self::round(
                ctx,
                probe,
                &producer,
                &format!("lat{round}"),
                per_round,
                true,
            )
            .await?,
        );
    }
    // Killed (and reaped) however the round ends, a panic included.
    let mut hog = tokio::process::Command::new("yes")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let loaded = self::round(ctx, probe, &producer, "latbusy", per_round, false).await;
    let _ = hog.kill().await;
    Ok((rounds, loaded?))
}

/// One round: `n` sessions enqueued one every [`GAP`], their stamps once all are ready
/// (part 10 runs its rounds with this too).
pub async fn round(
    ctx: &Ctx,
    probe: &Probe,
    producer: &Producer<RedisConn>,
    name: &str,
    n: usize,
    wait_for_quiet: bool,
) -> anyhow::Result<Vec<Stamps>> {
    let ids = ids(name, n);
    ctx.write_configs(&ids).await?;
    if wait_for_quiet {
        ctx.quiet().await;
    }
    let start = tokio::time::Instant::now();
    for (i, id) in ids.iter().enumerate() {
        tokio::time::sleep_until(start + GAP * i as u32).await;
        probe.enqueued(id.as_str(), Instant::now());
        producer.enqueue(&AgentStart::new(id.clone())).await?;
    }
    probe.wait_ready(n, Duration::from_secs(60)).await?;
    // The spawn event is recorded by the tracing layer in the same task that then waits for
    // the ready line, so it is in by now.
    Ok(probe.take().into_values().collect())
}
