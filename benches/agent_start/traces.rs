//! Part 12: what OpenTelemetry traces cost a start, and what an unreachable collector costs
//! (issue 25: "an unreachable exporter endpoint changes nothing for starts").
//!
//! Traces are configured only by the standard `OTEL_*` variables and installed once per
//! process, so each mode runs the `agent-worker run` binary as a child (as part 2 does):
//! - `off`: no `OTEL_*` variable (the bench removes any it inherited): the baseline;
//! - `blackhole`: `OTEL_EXPORTER_OTLP_ENDPOINT` at a listener of this process that accepts
//!   every connection and never reads or answers, so each export waits for the exporter's
//!   timeout (the default 10 s);
//! - `blackhole, small queue`: the same with `OTEL_BSP_MAX_QUEUE_SIZE=256`, so that the
//!   round's spans overflow the queue while the first export waits: spans are dropped
//!   during the round (with the default 2,048 a round's 1,860 spans, 6 per start, fit beside the held
//!   batch of 512, and nothing is dropped before the worker stops);
//! - `refused`: the endpoint is a loopback port nothing listens on;
//! - `collector`: a listener that reads each export and answers 200 at once.
//!
//! Each round: a fresh worker per mode (the order of the modes rotated every round), the
//! instant-ready test agent (`exit-after-ready`), [`WARM_UP`] unmeasured sessions then N
//! (300 per round, 30 quick) enqueued one every 10 ms through our producer, configs written
//! first. Per session, enqueue → ready two ways: on the bench's clock, from the instant
//! before the enqueue call to the instant a blocking `XREAD` of the event stream
//! (`agent-worker:events`) returned its `ready` event (µs resolution, includes that read's
//! round trip); and on Redis's clock, the event's own `ready_ms − enqueued_ms` (ms resolution,
//! jobs/README.md §4). p50/p99 per mode over every round, with the per-round values and the
//! ratio against `off`; at the end of each round `agent_worker_otel_spans_dropped_total` from
//! the worker's `/metrics`, and how many export connections the blackhole held and the
//! collector answered.

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use agent_jobs::{AgentStart, SessionId, keys::EVENTS};
use agent_worker::connection::RedisConn;
use anyhow::{Context as _, bail};

use crate::{
    collectors::Collectors,
    harness::{Ctx, Load, WorkerProcess, http_client, ids},
    report::Row,
    stats::Dist,
};

const PART: &str = "12 traces";
/// Gap between two enqueues (part 1's): starts never overlap.
const GAP: Duration = Duration::from_millis(10);
/// Sessions each fresh worker starts before it is measured (page-in, scripts loaded).
const WARM_UP: usize = 10;
/// Measured sessions per mode and round (a tenth with `--quick`).
const PER_ROUND: usize = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Mode {
    Off,
    Blackhole,
    SmallQueue,
    Refused,
    Collector,
}

const MODES: [Mode; 5] = [
    Mode::Off,
    Mode::Blackhole,
    Mode::SmallQueue,
    Mode::Refused,
    Mode::Collector,
];

/// `OTEL_BSP_MAX_QUEUE_SIZE` of [`Mode::SmallQueue`]: a round's spans overflow it while the
/// blackhole holds the first export, so spans are dropped during the round.
const SMALL_QUEUE: &str = "256";

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Off => "traces off",
            Self::Blackhole => "blackhole collector (accepts, never answers)",
            Self::SmallQueue => "blackhole, OTEL_BSP_MAX_QUEUE_SIZE=256",
            Self::Refused => "refused port",
            Self::Collector => "collector answering 200",
        }
    }

    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, if this mode sets it.
    fn endpoint(self, collectors: &Collectors) -> Option<String> {
        let addr = match self {
            Self::Off => return None,
            Self::Blackhole | Self::SmallQueue => collectors.blackhole,
            Self::Refused => collectors.refused,
            Self::Collector => collectors.answering,
        };
        Some(format!("http://{addr}"))
    }
}

/// One session's enqueue → ready, in ms.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Bench clock: before the enqueue call → the `ready` event read.
    bench: f64,
    /// Redis's clock: the event's `ready_ms − enqueued_ms`.
    redis: Option<f64>,
}

/// What one mode measured over the rounds.
#[derive(Default)]
struct Measured {
    rounds: Vec<Vec<Sample>>,
    dropped: Vec<u64>,
    /// Other processes' share of the machine's CPU during each round.
    others: Vec<f64>,
    /// Export connections seen by the mode's endpoint (blackhole held / collector answered).
    exports: usize,
}

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    let collectors = Collectors::start().await?;
    let rounds = if ctx.quick { 2 } else { 4 };
    let n = ctx.size(PER_ROUND);
    let mut measured: HashMap<Mode, Measured> = HashMap::new();
    for r in 0..rounds {
        for i in 0..MODES.len() {
            let mode = MODES[(i + r) % MODES.len()];
            ctx.quiet().await;
            let seen = (collectors.held(), collectors.answered());
            let load = Load::now(ctx).await;
            let (samples, dropped) = round(ctx, &collectors, mode, n, r)
                .await
                .with_context(|| format!("{} round {r}", mode.name()))?;
            let others = Load::now(ctx).await.others_since(&load);
            let exports = match mode {
                Mode::Blackhole | Mode::SmallQueue => collectors.held() - seen.0,
                Mode::Collector => collectors.answered() - seen.1,
                _ => 0,
            };
            let dist = Dist::new(samples.iter().map(|s| s.bench).collect());
            eprintln!(
                "  round {r}, {}: p50 {:.2} ms, p99 {:.2} ms, {dropped} spans dropped, {exports} exports, others {:.0} % CPU",
                mode.name(),
                dist.pct(50.0),
                dist.pct(99.0),
                others * 100.0
            );
            let entry = measured.entry(mode).or_default();
            entry.rounds.push(samples);
            entry.dropped.push(dropped);
            entry.others.push(others);
            entry.exports += exports;
        }
    }
    ctx.flush().await?;
    Ok(rows(&measured, n, rounds))
}

/// One mode's round on a fresh worker: its samples, and the spans it dropped.
async fn round(
    ctx: &Ctx,
    collectors: &Collectors,
    mode: Mode,
    n: usize,
    r: usize,
) -> anyhow::Result<(Vec<Sample>, u64)> {
    ctx.flush().await?;
    let ids = ids(&format!("traces{r}-{mode:?}"), WARM_UP + n);
    ctx.write_configs(&ids).await?;
    let http: SocketAddr = format!("127.0.0.1:{}", http_client::free_port()).parse()?;
    let http_addr = http.to_string();
    let endpoint = mode.endpoint(collectors);
    let mut env = vec![("AGENT_WORKER__HTTP__ADDR", http_addr.as_str())];
    if let Some(endpoint) = &endpoint {
        env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()));
    }
    if mode == Mode::SmallQueue {
        env.push(("OTEL_BSP_MAX_QUEUE_SIZE", SMALL_QUEUE));
    }
    let before = ctx.commandstats().await?;
    let worker = WorkerProcess::start_with(ctx, "exit-after-ready", &env)?;
    let result = async {
        ctx.wait_worker_idle(&before).await?;
        let reader = ctx.connect().await?;
        let (enqueued, ready) = tokio::try_join!(
            enqueue_spaced(ctx, &ids),
            read_ready(reader, ids.len(), Duration::from_secs(120)),
        )?;
        let samples = ids
            .iter()
            .zip(enqueued)
            .skip(WARM_UP)
            .map(|(id, at)| {
                let seen = ready
                    .get(id.as_str())
                    .context("a session without its ready event")?;
                Ok(Sample {
                    bench: seen.at.duration_since(at).as_secs_f64() * 1e3,
                    redis: seen.redis_ms,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let dropped = spans_dropped(http).await?;
        anyhow::Ok((samples, dropped))
    }
    .await;
    worker.stop(result.is_ok()).await;
    result
}

/// Enqueues `ids` one every [`GAP`]: the instant before each enqueue call.
async fn enqueue_spaced(ctx: &Ctx, ids: &[SessionId]) -> anyhow::Result<Vec<Instant>> {
    let producer = ctx.producer(ctx.conn.clone());
    let mut tick = tokio::time::interval(GAP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stamps = Vec::with_capacity(ids.len());
    for id in ids {
        tick.tick().await;
        stamps.push(Instant::now());
        producer.enqueue(&AgentStart::new(id.clone())).await?;
    }
    Ok(stamps)
}

/// A start's `ready` event: when the bench read it, and its Redis-clock enqueue → ready.
struct Ready {
    at: Instant,
    redis_ms: Option<f64>,
}

/// Reads the event stream from its start (flushed before the round) with a blocking `XREAD`
/// on a connection of its own, until `want` sessions have a start's `ready` event.
async fn read_ready(
    mut conn: RedisConn,
    want: usize,
    deadline: Duration,
) -> anyhow::Result<HashMap<String, Ready>> {
    type Reply = Option<Vec<(String, Vec<(String, Vec<String>)>)>>;
    let until = Instant::now() + deadline;
    let mut last = "0-0".to_owned();
    let mut seen = HashMap::new();
    while seen.len() < want {
        if Instant::now() > until {
            bail!("{} of {want} ready events within {deadline:?}", seen.len());
        }
        let reply: Reply = redis::cmd("XREAD")
            .arg("BLOCK")
            .arg(1000)
            .arg("COUNT")
            .arg(1000)
            .arg("STREAMS")
            .arg(EVENTS)
            .arg(&last)
            .query_async(&mut conn)
            .await?;
        let at = Instant::now();
        for (_, entries) in reply.into_iter().flatten() {
            for (id, fields) in entries {
                last = id;
                if let Some((session, redis_ms)) = start_ready(&fields) {
                    seen.entry(session).or_insert(Ready { at, redis_ms });
                }
            }
        }
    }
    Ok(seen)
}

/// A start's `ready` event (one with `ready_ms`): its session and `ready_ms − enqueued_ms`.
fn start_ready(fields: &[String]) -> Option<(String, Option<f64>)> {
    let field = |name: &str| {
        fields
            .chunks_exact(2)
            .find(|pair| pair[0] == name)
            .map(|pair| pair[1].as_str())
    };
    let number = |name: &str| field(name)?.parse::<u64>().ok();
    if field("status") != Some("ready") {
        return None;
    }
    let ready = number("ready_ms")?;
    let took = number("enqueued_ms").and_then(|e| ready.checked_sub(e));
    Some((field("session_id")?.to_owned(), took.map(|ms| ms as f64)))
}

/// `agent_worker_otel_spans_dropped_total` from the worker's `/metrics` (0 while absent: the
/// counter appears with its first drop).
async fn spans_dropped(http: SocketAddr) -> anyhow::Result<u64> {
    let (code, body) = http_client::http_get_within(http, "/metrics", Duration::from_secs(10))
        .await
        .context("the worker's /metrics did not answer")?;
    if code != 200 {
        bail!("the worker's /metrics answered {code}");
    }
    Ok(body
        .lines()
        .find(|l| l.starts_with(agent_worker::metrics::OTEL_SPANS_DROPPED_TOTAL))
        .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map_or(0, |v| v as u64))
}

/// One way of reading a sample: its name, its value, and the decimals it is shown with.
type Clock = (&'static str, fn(&Sample) -> Option<f64>, usize);

const CLOCKS: [Clock; 2] = [
    (
        "enqueue → ready event read (bench clock)",
        |s| Some(s.bench),
        2,
    ),
    (
        "ready_ms − enqueued_ms (Redis clock, ms steps)",
        |s| s.redis,
        0,
    ),
];

/// The table: per clock, p50 and p99 of each mode against `off`, then drops and exports.
fn rows(measured: &HashMap<Mode, Measured>, n: usize, rounds: usize) -> Vec<Row> {
    let mut rows = Vec::new();
    for clock in CLOCKS {
        for p in [50.0, 99.0] {
            rows.extend(percentile_rows(measured, clock, p));
        }
    }
    for mode in MODES {
        rows.extend(round_rows(mode, &measured[&mode], n, rounds));
    }
    rows
}

/// Percentile `p` of every mode on `clock`, with its per-round values and the ratio to `off`.
fn percentile_rows(measured: &HashMap<Mode, Measured>, clock: Clock, p: f64) -> Vec<Row> {
    let (name, value, decimals) = clock;
    let pct = |mode: Mode| -> (f64, Vec<String>, usize) {
        let m = &measured[&mode];
        let all: Vec<f64> = m.rounds.concat().iter().filter_map(value).collect();
        let per_round = m
            .rounds
            .iter()
            .map(|r| Dist::new(r.iter().filter_map(value).collect()).pct(p))
            .map(|v| format!("{v:.decimals$}"))
            .collect();
        (Dist::new(all.clone()).pct(p), per_round, all.len())
    };
    let (base, ..) = pct(Mode::Off);
    MODES
        .into_iter()
        .map(|mode| {
            let (v, per_round, count) = pct(mode);
            let ratio = if mode == Mode::Off {
                String::new()
            } else {
                format!(" ({:.2}×)", v / base)
            };
            Row::info(
                PART,
                format!("{name} p{p:.0}, {} (n={count})", mode.name()),
                format!("{v:.decimals$} ms{ratio}"),
            )
            .spread(format!("per round: {} ms", per_round.join(" / ")))
        })
        .collect()
}

/// One mode's spans dropped and export connections, and other processes' CPU, per round.
fn round_rows(mode: Mode, m: &Measured, n: usize, rounds: usize) -> [Row; 2] {
    let dropped: Vec<String> = m.dropped.iter().map(u64::to_string).collect();
    let exports = match mode {
        Mode::Blackhole | Mode::SmallQueue => format!("; {} connections held", m.exports),
        Mode::Collector => format!("; {} exports answered", m.exports),
        _ => String::new(),
    };
    let others: Vec<String> = m
        .others
        .iter()
        .map(|o| format!("{:.0}", o * 100.0))
        .collect();
    [
        Row::info(
            PART,
            format!(
                "{}: spans dropped per round ({n} + {WARM_UP} starts each, {rounds} rounds)",
                mode.name()
            ),
            format!("{}{exports}", dropped.join(" / ")),
        ),
        Row::info(
            PART,
            format!("{}: other processes' CPU share per round", mode.name()),
            format!("{} %", others.join(" / ")),
        ),
    ]
}
