//! Part 7: enqueue rate through our producer (`agent_jobs::Producer`), with no worker running.
//!
//! - sequential: one caller, each enqueue awaited before the next (one script call each);
//! - concurrent: 32 tasks sharing one `RedisConn`, which pipelines their calls;
//! - bulk: `enqueue_many` with batches of 1,000 (one script call per batch).
//!
//! Every job is a distinct session, so none is deduplicated by its idempotency key.

use agent_jobs::{AgentStart, Producer};
use agent_worker::connection::RedisConn;

use crate::{
    baseline::Baseline,
    harness::{CpuSplit, Ctx, ids, median_run, with_cpu},
    report::Row,
    stats::Spread,
};

const PART: &str = "7 enqueue";
const TASKS: usize = 32;

pub async fn run(ctx: &Ctx, baseline: &Baseline) -> anyhow::Result<Vec<Row>> {
    let mut sequential = Vec::new();
    let mut concurrent = Vec::new();
    let mut bulk = Vec::new();
    for _ in 0..ctx.reps() {
        sequential.push(timed(ctx, ctx.size(20_000), Mode::Sequential).await?);
        concurrent.push(timed(ctx, ctx.size(50_000), Mode::Concurrent).await?);
        bulk.push(timed(ctx, ctx.size(200_000), Mode::Bulk).await?);
    }
    // The CPU split of each mode's median run explains its rate: client, or Redis, bound.
    let cpu = |mode: &str, split: CpuSplit, n: usize| {
        let value = format!("{}; {}", split.describe(), split.per(n, "job"));
        Row::info(PART, format!("  CPU, {mode}"), value)
    };
    // A rate beside the PING rate of the same shape of traffic.
    let of_ping = |ratio: &str, rate: &Spread, ping: f64| {
        let value = format!("{:.0} %", rate.median / ping * 100.0);
        Row::info(PART, format!("  {ratio} PING rate"), value)
    };
    let (sequential, sequential_cpu) = median_run(&mut sequential);
    let (concurrent, concurrent_cpu) = median_run(&mut concurrent);
    let (bulk, bulk_cpu) = median_run(&mut bulk);
    Ok(vec![
        Row::rate(PART, "sequential: jobs/s", &sequential)
            .against("≥ 12,000", sequential.median >= 12_000.0),
        cpu("sequential", sequential_cpu, ctx.size(20_000)),
        of_ping("sequential ÷ sequential", &sequential, baseline.sequential),
        Row::rate(
            PART,
            format!("concurrent ({TASKS} tasks, one connection): jobs/s"),
            &concurrent,
        ),
        cpu("concurrent", concurrent_cpu, ctx.size(50_000)),
        of_ping(
            "concurrent ÷ multiplexed",
            &concurrent,
            baseline.multiplexed,
        ),
        Row::rate(PART, "bulk (enqueue_many, batches of 1,000): jobs/s", &bulk)
            .against("≥ 100,000", bulk.median >= 100_000.0),
        cpu("bulk", bulk_cpu, ctx.size(200_000)),
    ])
}

#[derive(Clone, Copy)]
enum Mode {
    Sequential,
    Concurrent,
    Bulk,
}

/// Enqueues `n` new sessions in `mode` on a fresh connection; returns jobs per second.
async fn timed(ctx: &Ctx, n: usize, mode: Mode) -> anyhow::Result<(f64, CpuSplit)> {
    ctx.flush().await?;
    ctx.quiet().await;
    let jobs: Vec<AgentStart> = ids("enq", n).into_iter().map(AgentStart::new).collect();
    let producer = ctx.producer(ctx.connect().await?);
    let ((), cpu) = with_cpu(ctx, enqueue(&producer, jobs, mode)).await?;
    Ok((n as f64 / cpu.wall, cpu))
}

async fn enqueue(
    producer: &Producer<RedisConn>,
    jobs: Vec<AgentStart>,
    mode: Mode,
) -> anyhow::Result<()> {
    let n = jobs.len();
    match mode {
        Mode::Sequential => {
            for job in &jobs {
                producer.enqueue(job).await?;
            }
        }
        Mode::Concurrent => {
            let share = n.div_ceil(TASKS);
            let tasks = jobs.chunks(share).map(|chunk| {
                let (producer, chunk) = (producer.clone(), chunk.to_vec());
                tokio::spawn(async move {
                    for job in &chunk {
                        producer.enqueue(job).await?;
                    }
                    anyhow::Ok(())
                })
            });
            for task in futures::future::join_all(tasks).await {
                task??;
            }
        }
        Mode::Bulk => {
            for batch in jobs.chunks(1000) {
                producer.enqueue_many(batch).await?;
            }
        }
    }
    Ok(())
}
