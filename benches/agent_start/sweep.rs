//! Part 5: the stale-session sweep over a large heartbeat index (issue 3's benchmark).
//!
//! N sessions are written with pipelines in the layout the worker uses (`src/session/`):
//! every session has `session:<id>` (status, ids, times), `session:<id>:config`, an entry in
//! `agent-worker:session-heartbeats` and in `session:ready` / `session:starting`; 1 % are
//! stale (heartbeat an hour old; a tenth of them `starting`, a tenth `error`) and also have
//! `agent:<id>:pid`, `:health` and `:logs`, which the sweep must delete. Then
//! `StaleSessionSweep::run` runs with the default `sweep.batch_size` and `session.stale_after`,
//! with `slowlog-log-slower-than 0` so that SLOWLOG holds every command of the sweep, and the
//! slowest one is reported. The stale 1 % is written again before each repetition.

use std::time::Instant;

use agent_jobs::{
    SessionId, SessionKeys,
    keys::{SESSION_HEARTBEATS, SESSIONS_READY, SESSIONS_STARTING},
};
use agent_worker::{clock::unix_now, jobs::sweep::StaleSessionSweep, session::SessionStore};

use crate::{
    harness::{Ctx, ids},
    report::Row,
    stats::{Spread, thousands},
};

const PART: &str = "5 sweep";

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    ctx.flush().await?;
    let n = ctx.size(1_000_000);
    let all = ids("sw", n);
    // Every 100th session is stale: spread over the id space, at the head of the index.
    let stale: Vec<SessionId> = all.iter().step_by(100).cloned().collect();
    let now = unix_now();

    let started = Instant::now();
    populate(ctx, &all, now).await?;
    eprintln!(
        "  populated {} sessions in {:.1} s ({})",
        thousands(n as f64),
        started.elapsed().as_secs_f64(),
        used_memory(ctx).await?
    );

    redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-max-len")
        .arg(1_000_000)
        .query_async::<()>(&mut ctx.conn.clone())
        .await?;
    let default_batch = ctx.settings("ready", &[]).sweep.batch_size;
    // (sweep.batch_size, SLOWLOG threshold µs): the default as the issue asks (every command
    // logged); the same with only commands over 1 ms logged, since logging every command
    // inside the script slows the script down; and a smaller batch.
    let variants = [(default_batch, 0), (default_batch, 1000), (SMALL_BATCH, 0)];
    let mut rows = Vec::new();
    let mut first = true;
    for (batch, threshold) in variants {
        let mut walls = Vec::new();
        let mut slowest: Vec<(f64, String)> = Vec::new();
        let mut commands = 0;
        for _ in 0..ctx.reps() {
            if !first {
                populate(ctx, &stale, now).await?;
            }
            first = false;
            ctx.quiet().await;
            let run = sweep_once(ctx, batch, threshold).await?;
            eprintln!(
                "  batch {batch}, slowlog > {threshold} µs: removed {} in {:.3} s; {} commands logged, slowest {:.2} ms ({})",
                run.removed, run.wall, run.commands, run.slowest_ms, run.slowest
            );
            let left = ctx.live_sessions().await?;
            anyhow::ensure!(
                run.removed == stale.len() && left == n - stale.len(),
                "the sweep removed {} sessions and left {left}; expected {} and {}",
                run.removed,
                stale.len(),
                n - stale.len()
            );
            walls.push(run.wall);
            slowest.push((run.slowest_ms, run.slowest));
            commands = run.commands;
        }
        let wall = Spread::of(&walls);
        let (max_ms, max_what) = slowest
            .iter()
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .cloned()
            .unwrap_or_default();
        let per_run = slowest
            .iter()
            .map(|(ms, _)| format!("{ms:.2}"))
            .collect::<Vec<_>>()
            .join(" / ");
        let label = format!(
            "batch {batch}{}, SLOWLOG > {threshold} µs",
            if batch == default_batch {
                " (default)"
            } else {
                ""
            }
        );
        let wall_metric = format!(
            "{} sessions, {} stale, {label}: wall time",
            thousands(n as f64),
            thousands(stale.len() as f64)
        );
        let slow_metric = format!("  slowest command ({commands} logged)");
        let (wall_value, slow_value) = (
            format!("{:.3} s", wall.median),
            format!("{max_ms:.2} ms ({max_what})"),
        );
        // Targets apply to the run the issue describes: the default settings, every command
        // in SLOWLOG. The other variants explain it.
        if (batch, threshold) == (default_batch, 0) {
            rows.push(
                Row::target(PART, wall_metric, wall_value, "≤ 3 s", wall.max <= 3.0)
                    .spread(wall.describe(" s", 3)),
            );
            rows.push(
                Row::target(PART, slow_metric, slow_value, "≤ 10 ms", max_ms <= 10.0)
                    .spread(format!("per run: {per_run} ms")),
            );
        } else {
            rows.push(Row::info(PART, wall_metric, wall_value).spread(wall.describe(" s", 3)));
            rows.push(
                Row::info(PART, slow_metric, slow_value).spread(format!("per run: {per_run} ms")),
            );
        }
    }
    rows.push(Row::info(
        PART,
        "every stale session removed, every fresh one kept",
        "yes (checked after each run)",
    ));
    Ok(rows)
}

/// A smaller `sweep.batch_size`, to show how the slowest command scales with it.
const SMALL_BATCH: usize = 100;

struct SweepRun {
    wall: f64,
    removed: usize,
    commands: usize,
    slowest_ms: f64,
    slowest: String,
}

/// One `StaleSessionSweep::run` with `batch` sessions per script call, logging every command
/// slower than `threshold` µs in SLOWLOG.
async fn sweep_once(ctx: &Ctx, batch: usize, threshold: u64) -> anyhow::Result<SweepRun> {
    let settings = ctx.settings("ready", &[]);
    let conn = ctx.connect().await?;
    let store = SessionStore::new(conn.clone(), settings.session.ttl, "Ashley", 100);
    let sweep = StaleSessionSweep::new(
        conn,
        store,
        batch,
        settings.session.stale_after,
        settings.session.max_age,
    );
    set_slowlog_threshold(ctx, threshold).await?;
    redis::cmd("SLOWLOG")
        .arg("RESET")
        .query_async::<()>(&mut ctx.conn.clone())
        .await?;
    let t0 = Instant::now();
    let report = sweep.run(unix_now(), false).await;
    let wall = t0.elapsed().as_secs_f64();
    set_slowlog_threshold(ctx, 10_000).await?;
    let report = report?;
    let log = slowlog(ctx).await?;
    let (max_us, slowest) = log
        .iter()
        .max_by_key(|(us, _)| *us)
        .cloned()
        .unwrap_or((0, "none".into()));
    Ok(SweepRun {
        wall,
        removed: report.removed.len(),
        commands: log.len(),
        slowest_ms: max_us as f64 / 1e3,
        slowest,
    })
}

async fn set_slowlog_threshold(ctx: &Ctx, micros: u64) -> anyhow::Result<()> {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-log-slower-than")
        .arg(micros)
        .query_async::<()>(&mut ctx.conn.clone())
        .await?;
    Ok(())
}

/// Every SLOWLOG entry as (microseconds, command), without the bench's own commands.
async fn slowlog(ctx: &Ctx) -> anyhow::Result<Vec<(u64, String)>> {
    type Entry = (u64, u64, u64, Vec<Vec<u8>>, String, String);
    let entries: Vec<Entry> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(1_000_000)
        .query_async(&mut ctx.conn.clone())
        .await?;
    Ok(entries
        .into_iter()
        .filter_map(|(_, _, micros, args, _, _)| {
            let name = String::from_utf8_lossy(args.first()?).to_uppercase();
            if matches!(name.as_str(), "CONFIG" | "SLOWLOG" | "INFO") {
                return None;
            }
            let what = match name.as_str() {
                // SLOWLOG keeps 32 arguments at most; the last one says how many more.
                "EVALSHA" | "EVAL" => {
                    let more = String::from_utf8_lossy(args.last()?)
                        .strip_prefix("... (")
                        .and_then(|rest| rest.split(' ').next()?.parse::<usize>().ok())
                        .unwrap_or(0);
                    let total = args.len() + more - usize::from(more > 0);
                    format!("{name}, {total} args")
                }
                _ => name,
            };
            Some((micros, what))
        })
        .collect())
}

async fn used_memory(ctx: &Ctx) -> anyhow::Result<String> {
    let info = ctx.info("memory").await?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory_human:"))
        .map(|m| format!("redis uses {}", m.trim()))
        .unwrap_or_default())
}

/// Writes the sessions `ids` (stale or fresh as in the module docs), a few pipelines at once.
async fn populate(ctx: &Ctx, ids: &[SessionId], now: u64) -> anyhow::Result<()> {
    ctx.pipelined(ids, |pipe, chunk| write_sessions(pipe, chunk, now))
        .await
}

/// Is this session (`sw-<n>`) one of the stale ones?
fn is_stale(id: &SessionId) -> bool {
    index(id) % 100 == 0
}

fn index(id: &SessionId) -> u64 {
    id.as_str()
        .rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}

/// Adds to `pipe` the writes of the sessions of `chunk`, the stale ones with their agent keys.
fn write_sessions(pipe: &mut redis::Pipeline, chunk: &[SessionId], now: u64) {
    const TTL: i64 = 4 * 3600;
    let mut index_entries = Vec::with_capacity(chunk.len());
    for id in chunk {
        let stale = is_stale(id);
        let seen = if stale { now - 3600 } else { now };
        let status = match (stale, index(id) / 100 % 10) {
            (true, 0) => "starting",
            (true, 1) => "error",
            _ => "ready",
        };
        let keys = SessionKeys::new(id);
        let (state, config) = (keys.state(), keys.config());
        let seen_text = seen.to_string();
        pipe.hset_multiple(
            &state,
            &[
                ("status", status),
                ("userId", "bench"),
                ("voiceId", "Craig"),
                ("taskId", "01JBENCH00000000000000000"),
                ("workerId", "bench-host-1-abcdef"),
                ("agentPid", "4242"),
                ("agentPgid", "4242"),
                ("startupTime", "0.012"),
                ("createdAt", &seen_text),
                ("lastActive", &seen_text),
            ],
        )
        .ignore()
        .expire(&state, TTL)
        .ignore()
        .hset_multiple(
            &config,
            &[
                ("voiceId", "Craig"),
                ("userName", "bench"),
                ("updatedAt", &seen_text),
            ],
        )
        .ignore()
        .expire(&config, TTL)
        .ignore();
        if stale {
            let (health, logs) = (keys.agent_health(), keys.agent_logs());
            pipe.set_ex(keys.agent_pid(), 4242, TTL as u64)
                .ignore()
                .hset_multiple(
                    &health,
                    &[("last_check", seen_text.as_str()), ("status", "alive")],
                )
                .ignore()
                .expire(&health, TTL)
                .ignore()
                .rpush(&logs, &["test-agent received {}", "Room joined", "bye"])
                .ignore()
                .expire(&logs, TTL)
                .ignore();
        }
        match status {
            "starting" => pipe.sadd(SESSIONS_STARTING, id.as_str()).ignore(),
            "ready" => pipe.sadd(SESSIONS_READY, id.as_str()).ignore(),
            _ => pipe,
        };
        index_entries.push((seen, id.as_str()));
    }
    pipe.zadd_multiple(SESSION_HEARTBEATS, &index_entries)
        .ignore();
}
