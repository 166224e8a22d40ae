//! Baselines measured in the same run: how many round trips one Redis connection does here.
//!
//! `PING` in a loop on one connection, one at a time (what a strictly sequential client such as
//! the sequential enqueue can reach), and from 32 tasks sharing one multiplexed connection
//! (what concurrent callers of one `RedisConn`, like the worker, can reach).

use std::time::{Duration, Instant};

use crate::{
    harness::{Ctx, with_cpu},
    report::Row,
    stats::{Spread, thousands},
};

const PART: &str = "0 baseline";

/// Round trips per second: (sequential, 32 concurrent on one connection).
pub struct Baseline {
    pub sequential: f64,
    pub multiplexed: f64,
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<(Baseline, Vec<Row>)> {
    let window = if ctx.quick {
        Duration::from_millis(300)
    } else {
        Duration::from_secs(2)
    };
    let mut rows = Vec::new();
    let mut medians = Vec::new();
    for (tasks, metric) in [
        (1, "PING round trips/s, one connection, sequential"),
        (32, "PING/s, 32 tasks on one multiplexed connection"),
    ] {
        let mut rates = Vec::new();
        let mut cpu = String::new();
        for _ in 0..ctx.reps() {
            ctx.quiet().await;
            let (pings, split) = with_cpu(ctx, pings(ctx, tasks, window)).await?;
            rates.push(pings as f64 / split.wall);
            cpu = split.per(pings, "PING");
        }
        let rate = Spread::of(&rates);
        rows.push(Row::info(PART, metric, thousands(rate.median)).spread(rate.describe("", 0)));
        rows.push(Row::info(PART, "  CPU (last run)", cpu));
        medians.push(rate.median);
    }
    let baseline = Baseline {
        sequential: medians[0],
        multiplexed: medians[1],
    };
    Ok((baseline, rows))
}

/// PINGs answered to `tasks` tasks sharing one fresh connection, over `window`.
async fn pings(ctx: &Ctx, tasks: usize, window: Duration) -> anyhow::Result<usize> {
    let conn = ctx.connect().await?;
    let until = Instant::now() + window;
    let workers = (0..tasks).map(|_| {
        let mut conn = conn.clone();
        tokio::spawn(async move {
            let mut count = 0;
            while Instant::now() < until {
                redis::cmd("PING").query_async::<()>(&mut conn).await?;
                count += 1;
            }
            anyhow::Ok(count)
        })
    });
    let mut total = 0;
    for worker in futures::future::join_all(workers).await {
        total += worker??;
    }
    Ok(total)
}
