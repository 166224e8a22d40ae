//! The agent-worker benchmark harness (issue 6, and the sweep figure of issue 3).
//!
//! ```text
//! cargo bench --bench agent_start               # every part at full size (a few minutes)
//! cargo bench --bench agent_start -- --quick    # a tenth of the sizes (under a minute)
//! cargo bench --bench agent_start -- --parts 1,5   # only some parts
//! ```
//!
//! It starts its own redis-server (persistence off, on a free loopback port), prints the
//! machine and the versions, runs each part and prints a results table with every target
//! beside it. Method of each part: the doc comment of its module, and BENCHMARKS.md.
//! This is a report: nothing here asserts a timing.
//!
//! cargo builds the `agent-worker` binary (which is also the test agent) for a bench target, in the same
//! profile, so the worker and agents measured are release builds of this tree.

#[path = "agent_start/baseline.rs"]
mod baseline;
#[path = "agent_start/burst.rs"]
mod burst;
#[path = "agent_start/burst30.rs"]
mod burst30;
#[path = "agent_start/collectors.rs"]
mod collectors;
#[path = "agent_start/console.rs"]
mod console;
#[path = "agent_start/containment.rs"]
mod containment;
#[path = "agent_start/cost.rs"]
mod cost;
#[path = "agent_start/enqueue.rs"]
mod enqueue;
#[path = "agent_start/env.rs"]
mod env;
#[path = "agent_start/footprint.rs"]
mod footprint;
#[path = "agent_start/harness.rs"]
mod harness;
#[path = "agent_start/latency.rs"]
mod latency;
#[path = "agent_start/procfs.rs"]
mod procfs;
#[path = "agent_start/queue.rs"]
mod queue;
#[path = "agent_start/report.rs"]
mod report;
#[path = "agent_start/stats.rs"]
mod stats;
#[path = "agent_start/sweep.rs"]
mod sweep;
#[path = "agent_start/traces.rs"]
mod traces;
#[path = "agent_start/warm.rs"]
mod warm;

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use agent_worker::cli::local_redis::LocalRedis;

use crate::{
    harness::{Ctx, Load, SpawnLayer},
    report::Row,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--parts 1,5`: run only those parts (0 is the baseline, which later parts use).
    let parts: Option<Vec<u8>> = args
        .iter()
        .position(|a| a == "--parts")
        .and_then(|i| args.get(i + 1))
        .map(|list| {
            list.split(',')
                .filter_map(|p| p.trim().parse().ok())
                .collect()
        });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(run(quick, parts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("agent_start bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(quick: bool, parts: Option<Vec<u8>>) -> anyhow::Result<()> {
    SpawnLayer::install();
    // The in-process worker records its metrics as the binary does, so their cost is counted.
    let _metrics = agent_worker::metrics::install_recorder();
    let wanted = |part: u8| parts.as_ref().is_none_or(|p| p.contains(&part));

    println!(
        "# agent-worker benchmark{}",
        if quick {
            " (--quick: a tenth of the sizes)"
        } else {
            ""
        }
    );
    println!();
    for (what, value) in env::describe() {
        println!("- {what}: {value}");
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "- load average at start: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!();

    let redis = LocalRedis::start().await?;
    let ctx = Ctx::new(
        quick,
        redis.url(),
        redis.port(),
        PathBuf::from(env!("CARGO_BIN_EXE_agent-worker")),
    )
    .await?;

    let started = Instant::now();
    let mut rows = Vec::new();
    eprintln!("part 0: baselines");
    let baseline = match baseline::run(&ctx).await {
        Ok((baseline, baseline_rows)) => {
            rows.extend(baseline_rows);
            baseline
        }
        Err(error) => {
            rows.push(Row::failed("0 baseline", &error));
            baseline::Baseline {
                sequential: f64::NAN,
                multiplexed: f64::NAN,
            }
        }
    };

    // Each part cleans Redis before it starts and stops whatever it started, so one that
    // fails leaves its error in the table and the next runs as usual.
    // Other processes on this (shared) machine skew every figure: wait for a quiet moment
    // before each part, and report how much CPU others took while it ran.
    let patience = Duration::from_secs(if quick { 10 } else { 120 });
    macro_rules! part {
        ($n:expr, $name:expr, $run:expr) => {
            if wanted($n) {
                let quiet = Load::wait_for_quiet(&ctx, patience).await;
                eprintln!(
                    "part {}: {} ({:.0} s in; other processes at {:.0} % CPU)",
                    $n,
                    $name,
                    started.elapsed().as_secs_f64(),
                    quiet * 100.0
                );
                let before = Load::now(&ctx).await;
                match $run.await {
                    Ok(part_rows) => rows.extend(part_rows),
                    Err(error) => {
                        eprintln!("  failed: {error:#}");
                        rows.push(Row::failed($name, &error));
                    }
                }
                let others = Load::now(&ctx).await.others_since(&before);
                rows.push(Row::info(
                    $name,
                    "other processes' share of the machine's CPU during this part",
                    format!("{:.0} %", others * 100.0),
                ));
            }
        };
    }
    part!(1, "1 latency", latency::run(&ctx));
    part!(2, "2 burst", burst::run(&ctx));
    part!(3, "3 queue path", queue::run(&ctx, baseline.sequential));
    part!(4, "4 redis cost", cost::run(&ctx));
    part!(5, "5 sweep", sweep::run(&ctx));
    part!(6, "6 footprint", footprint::run(&ctx));
    part!(7, "7 enqueue", enqueue::run(&ctx, &baseline));
    part!(8, "8 warm pool", warm::run(&ctx));
    part!(9, "9 console", console::run(&ctx));
    part!(10, "10 containment", containment::run(&ctx));
    part!(11, "11 burst of 30", burst30::run(&ctx));
    part!(12, "12 traces", traces::run(&ctx));
    ctx.flush().await?;

    println!("## Results ({:.0} s)\n", started.elapsed().as_secs_f64());
    println!("{}", report::table(&rows));
    Ok(())
}
