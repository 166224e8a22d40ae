//! Part 9: the operator console over many live sessions (issue 16).
//!
//! N ready sessions (100,000; 10,000 with `--quick`) are written into `session:ready` with
//! their records, in the layout the worker uses, over ten workers. The console is served alone
//! (no worker, so every command Redis counts is the console's) on a loopback port. Then every
//! page of `/sessions` is fetched in turn, following its "Next page" link, each request timed
//! end to end (Redis round trips, rendering, HTTP); `INFO commandstats` before and after gives
//! the commands per page. The overview and one session's page are fetched 50 times each.
//! `tests/console.rs` asserts the command bound; this part reports the time.

use std::{
    collections::HashSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use agent_jobs::{SessionKeys, keys::SESSIONS_READY};
use agent_worker::{console::Console, health::Health, http, metrics};
use tokio_util::sync::CancellationToken;

use crate::{
    harness::{Ctx, http_client::http_get_within, ids},
    report::Row,
    stats::{Dist, thousands},
};

const PART: &str = "9 console";

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    ctx.flush().await?;
    let n = ctx.size(100_000);
    let all = ids("co", n);
    ctx.pipelined(&all, |pipe, chunk| {
        for (i, id) in chunk.iter().enumerate() {
            let worker = format!("bench-worker-{}", i % 10);
            pipe.sadd(SESSIONS_READY, id.as_str())
                .ignore()
                .hset_multiple(
                    SessionKeys::new(id).state(),
                    &[
                        ("status", "ready"),
                        ("voiceId", "Olivia"),
                        ("userId", "bench_user"),
                        ("workerId", worker.as_str()),
                        ("createdAt", "1700000000"),
                        ("startupTime", "0.5"),
                        ("lastActive", "1700000100"),
                    ],
                )
                .ignore();
        }
    })
    .await?;

    let settings = ctx.settings("ready", &[]);
    let console = Console::new(&settings, metrics::install_recorder());
    console.connected(ctx.conn.clone());
    let stop = CancellationToken::new();
    let server = http::serve_with(
        "127.0.0.1:0".parse()?,
        metrics::install_recorder(),
        Health::new(),
        console.router(),
        stop.clone(),
    )
    .await?;
    let addr = server.local_addr();
    ctx.quiet().await;

    let before = calls(ctx).await?;
    let mut times = Vec::new();
    let mut seen = HashSet::new();
    let mut path = "/sessions".to_owned();
    let started = Instant::now();
    loop {
        let at = Instant::now();
        let page = get(addr, &path).await?;
        times.push(at.elapsed().as_secs_f64() * 1000.0);
        seen.extend(
            page.match_indices("<a href=\"/sessions/")
                .map(|(i, _)| page[i..].split('"').nth(1).unwrap_or_default().to_owned()),
        );
        match next_link(&page) {
            Some(next) => path = next,
            None => break,
        }
        anyhow::ensure!(times.len() <= n, "paging does not end");
    }
    let wall = started.elapsed().as_secs_f64();
    let commands = calls(ctx).await? - before - 1;
    anyhow::ensure!(
        seen.len() == n,
        "{} of {n} sessions on the pages",
        seen.len()
    );
    let pages = times.len();
    let per_page = commands as f64 / pages as f64;
    let pages_dist = Dist::new(times);
    eprintln!(
        "  {pages} pages over {} sessions in {wall:.1} s, {per_page:.1} commands a page",
        thousands(n as f64)
    );

    let mut overview = Vec::new();
    let mut one = Vec::new();
    for _ in 0..50 {
        let at = Instant::now();
        get(addr, "/").await?;
        overview.push(at.elapsed().as_secs_f64() * 1000.0);
        let at = Instant::now();
        get(addr, "/sessions/co-0000042").await?;
        one.push(at.elapsed().as_secs_f64() * 1000.0);
    }
    stop.cancel();
    server.stopped().await?;
    ctx.flush().await?;

    let (overview, one) = (Dist::new(overview), Dist::new(one));
    let sessions = thousands(n as f64);
    Ok(vec![
        Row::target(
            PART,
            format!("/sessions over {sessions} sessions: p95 of {pages} pages"),
            format!("{:.1} ms", pages_dist.pct(95.0)),
            "< 50 ms",
            pages_dist.pct(95.0) < 50.0,
        )
        .spread(format!(
            "p50 {:.1} ms, max {:.1} ms",
            pages_dist.pct(50.0),
            pages_dist.max()
        )),
        Row::target(
            PART,
            "  Redis commands per page (50 rows)",
            format!("{per_page:.1}"),
            "<= 54, not growing with sessions",
            per_page <= 54.0,
        ),
        Row::info(
            PART,
            "  every session once, paging all of them",
            format!("{wall:.1} s"),
        ),
        Row::info(
            PART,
            format!("/ (overview) over {sessions} sessions: p95 of 50"),
            format!("{:.1} ms", overview.pct(95.0)),
        ),
        Row::info(
            PART,
            "/sessions/<id>: p95 of 50",
            format!("{:.1} ms", one.pct(95.0)),
        ),
    ])
}

/// Calls of every command so far (`INFO commandstats`), the `INFO` itself included.
async fn calls(ctx: &Ctx) -> anyhow::Result<u64> {
    Ok(ctx.commandstats().await?.values().sum())
}

/// `GET path` (within 10 s): the body of a 200 answer.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    match http_get_within(addr, path, Duration::from_secs(10)).await {
        Some((200, body)) => Ok(body),
        Some((code, _)) => anyhow::bail!("GET {path}: {code}"),
        None => anyhow::bail!("GET {path}: no answer from {addr}"),
    }
}

/// The `Next page` link of a sessions page.
fn next_link(page: &str) -> Option<String> {
    let end = page.find("\">Next page</a>")?;
    let start = page[..end].rfind("href=\"")? + "href=\"".len();
    Some(page[start..end].replace("&amp;", "&"))
}
