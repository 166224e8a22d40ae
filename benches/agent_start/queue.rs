//! Part 3: the queue path, with the launcher swapped for one that returns at once.
//!
//! N jobs (with their session configs) are enqueued first; then the real worker starts with
//! [`InstantLauncher`] and the rate is measured from the first launch to the N-th. What is
//! left is everything but the process: fetch, payload decoding, config read, session claim,
//! `ready` state, supervision, ack. Run for a few `worker.concurrency` / `worker.batch_size`
//! settings.
//!
//! Beside each, the same backlog through bare apalis-redis with the worker's queue settings
//! (`lock_tasks(false)`, same batch, same concurrency, same codec) and a handler that does
//! nothing: what the library itself allows, measured here, so the gap between the two is our
//! own per-job work.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agent_worker::{
    jobs::agent_start::{RawCodec, RawJob},
    wake::WakeHub,
};
use anyhow::Context as _;
use apalis::{
    layers::WorkerBuilderExt,
    prelude::{BackendExt, BoxDynError, Data, WorkerBuilder},
};
use apalis_redis::RedisStorage;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    harness::{
        CpuSplit, Ctx, InProcessWorker, InstantLauncher, Probe, QUEUE, ids, median_run, wait_until,
        with_cpu,
    },
    report::Row,
    stats::thousands,
};

const PART: &str = "3 queue path";
/// (worker.concurrency, worker.batch_size): the default, then larger batches.
const CONFIGS: [(usize, usize); 4] = [(32, 1), (32, 8), (128, 32), (512, 128)];
/// The target: 1.2 × BullMQ's 29,700 no-op jobs/s at concurrency 64.
const TARGET: f64 = 36_000.0;

pub async fn run(ctx: &Ctx, ping_rate: f64) -> anyhow::Result<Vec<Row>> {
    let n = ctx.size(20_000);
    let mut rows = Vec::new();
    let mut best = 0.0f64;
    for (concurrency, batch) in CONFIGS {
        let mut ours = Vec::new();
        let mut bare = Vec::new();
        for _ in 0..ctx.reps() {
            ours.push(worker_rate(ctx, n, concurrency, batch).await?);
            bare.push(bare_apalis_rate(ctx, n, concurrency, batch).await?);
        }
        let ((ours, ours_cpu), (bare, bare_cpu)) = (median_run(&mut ours), median_run(&mut bare));
        eprintln!(
            "  concurrency {concurrency}, batch {batch}: {} jobs/s (bare apalis-redis {})",
            thousands(ours.median),
            thousands(bare.median)
        );
        best = best.max(ours.median);
        rows.push(Row::rate(
            PART,
            format!("{n} jobs, concurrency {concurrency}, batch {batch}: jobs/s"),
            &ours,
        ));
        rows.push(Row::rate(
            PART,
            "  bare apalis-redis, same settings, no-op handler: jobs/s",
            &bare,
        ));
        rows.push(Row::cpu(PART, "  CPU, ours", &ours_cpu, n, "job"));
        rows.push(Row::cpu(
            PART,
            "  CPU, bare apalis-redis",
            &bare_cpu,
            n,
            "job",
        ));
        rows.push(Row::info(
            PART,
            "  ours ÷ bare apalis-redis; ours ÷ one-connection PING rate",
            format!(
                "{:.0} %; {:.2}×",
                ours.median / bare.median * 100.0,
                ours.median / ping_rate
            ),
        ));
    }
    rows.push(Row::target(
        PART,
        "best of the settings above: jobs/s",
        thousands(best),
        format!("≥ {}", thousands(TARGET)),
        best >= TARGET,
    ));
    Ok(rows)
}

/// The real worker with the instant launcher over a backlog of `n` jobs: jobs per second
/// from the first launch to the last.
async fn worker_rate(
    ctx: &Ctx,
    n: usize,
    concurrency: usize,
    batch: usize,
) -> anyhow::Result<(f64, CpuSplit)> {
    ctx.flush().await?;
    let ids = ids("queue", n);
    ctx.write_configs(&ids).await?;
    ctx.enqueue_all(&ids).await?;
    ctx.quiet().await;
    let settings = ctx.settings(
        "ready",
        &[
            (
                "AGENT_WORKER__WORKER__CONCURRENCY",
                &concurrency.to_string(),
            ),
            ("AGENT_WORKER__WORKER__BATCH_SIZE", &batch.to_string()),
        ],
    );
    let probe = Probe::new();
    let worker = InProcessWorker::start(settings, InstantLauncher::factory(probe.clone()));
    let result = with_cpu(ctx, async {
        probe.wait_launched(n, Duration::from_secs(600)).await?;
        wait_for_acks(ctx, n).await
    })
    .await;
    let stamps = probe.take();
    worker.stop().await?;
    let ((), cpu) = result?;
    let launched: Vec<Instant> = stamps.values().filter_map(|s| s.launched).collect();
    let first = launched.iter().min().expect("n > 0 launches");
    let last = launched.iter().max().expect("n > 0 launches");
    Ok((
        (n - 1) as f64 / last.duration_since(*first).as_secs_f64(),
        cpu,
    ))
}

/// Waits until apalis-redis has acknowledged `n` jobs.
async fn wait_for_acks(ctx: &Ctx, n: usize) -> anyhow::Result<()> {
    wait_until(
        "every job to be acknowledged",
        Duration::from_secs(120),
        || async { (ctx.acked().await.ok()? >= n).then_some(()) },
    )
    .await
}

/// Counts handled jobs and remembers when the first and last were handled.
struct Tally {
    count: watch::Sender<usize>,
    span: Mutex<Option<(Instant, Instant)>>,
}

async fn noop(_job: RawJob, tally: Data<Arc<Tally>>) -> Result<(), BoxDynError> {
    let now = Instant::now();
    {
        let mut span = tally.span.lock().expect("span lock");
        *span = Some(span.map_or((now, now), |(first, _)| (first, now)));
    }
    tally.count.send_modify(|c| *c += 1);
    Ok(())
}

/// Bare apalis-redis over a backlog of `n` jobs, configured like `worker::run_job_worker`.
async fn bare_apalis_rate(
    ctx: &Ctx,
    n: usize,
    concurrency: usize,
    batch: usize,
) -> anyhow::Result<(f64, CpuSplit)> {
    ctx.flush().await?;
    ctx.enqueue_all(&ids("bare", n)).await?;
    ctx.quiet().await;
    let config = apalis_redis::Config::default()
        .queue(QUEUE)
        .batch_size(batch)
        .heartbeat_interval(Duration::from_secs(5))
        .missed_heartbeats(3)
        .lock_tasks(false)
        .emit_events(false)
        .idempotency_ttl(Some(Duration::from_secs(4 * 3600)));
    // Bare: redis-rs's own manager, as an apalis-redis user without our connection would have.
    let bare = redis::Client::open(format!("redis://127.0.0.1:{}/", ctx.port))?
        .get_connection_manager()
        .await?;
    let backend = RedisStorage::<RawJob>::new(bare)
        .with_config(config)
        .with_codec(RawCodec)
        .poll_with_strategy(WakeHub::new().strategy(Duration::from_secs(1)));
    let tally = Arc::new(Tally {
        count: watch::Sender::new(0),
        span: Mutex::new(None),
    });
    let stop = CancellationToken::new();
    let worker = {
        let stop = stop.clone();
        WorkerBuilder::new(format!("bench-bare-{}", ulid::Ulid::generate()))
            .backend(backend)
            .concurrency(concurrency)
            .data(tally.clone())
            .build(noop)
            .run_until(async move {
                stop.cancelled().await;
                Ok::<(), std::io::Error>(())
            })
    };
    let worker = tokio::spawn(worker);
    let mut count = tally.count.subscribe();
    let done = with_cpu(ctx, async {
        tokio::time::timeout(Duration::from_secs(600), count.wait_for(|c| *c >= n)).await??;
        wait_for_acks(ctx, n).await
    })
    .await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), worker).await;
    let ((), cpu) = done.with_context(|| {
        format!(
            "bare apalis-redis handled {} of {n} jobs",
            *tally.count.borrow()
        )
    })?;
    let (first, last) = tally.span.lock().expect("span lock").expect("n > 0 jobs");
    Ok((
        (n - 1) as f64 / last.duration_since(first).as_secs_f64(),
        cpu,
    ))
}
