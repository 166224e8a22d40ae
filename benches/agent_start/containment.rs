//! Part 10: what containment costs on the start path (issues 21, 23 and 24: "the per-agent
//! cgroup is on the start path; the limits issue takes it off").
//!
//! Part 1's measurement (the real worker in-process, the real launcher wrapped to timestamp
//! `launch()` and its result, the instant-ready test agent, one session every 10 ms, configs
//! written first, the 20 newest agents left running), once per containment mode, all in one
//! invocation:
//! - `process-group`: the agent's process group alone, no limits: the baseline of the ratios;
//! - `cgroup`: a cgroup per agent, no limits (`agent.pids_max = 0`, no `memory_max`);
//! - `cgroup + limits`: the same with `agent.memory_max = "512MiB"` and `agent.pids_max = 512`
//!   (the default), enforced by the kernel: cgroup v2, or the v1 memory and pids hierarchies
//!   where the host has those.
//!
//! Containment is chosen when a worker starts, so each mode gets a fresh worker per round. The
//! rounds are interleaved, the order of the modes rotated every round, so that the drift of a
//! shared machine falls on every mode alike. A worker's first [`WARM_UP`] sessions are not
//! measured (they page the binary in, load the scripts into Redis, and fill the pool of
//! prepared cgroups). Reported per mode: enqueue → ready and enqueue → spawned, and the split
//! pick-up (enqueue → `launch()`), clone + exec (`launch()` → spawned) and ready line
//! (spawned → ready read), at p50 and p99 with the per-round values, each against
//! process-group as a ratio. Where no cgroup can be created below this process the table says
//! so and the cgroup modes are skipped.

use std::time::Duration;

use agent_jobs::AgentStart;
use agent_worker::agent::{
    containment::{Containment, ContainmentSetting},
    limits::Limits,
};

use crate::{
    harness::{Ctx, InProcessWorker, Probe, RecordingLauncher, Stamps, ids},
    latency,
    report::Row,
    stats::Dist,
};

const PART: &str = "10 containment";
/// Gap between two warm-up enqueues (part 1's).
const GAP: Duration = Duration::from_millis(10);
/// Agents left running, as in part 1 (a replica at the default `agent.max_agents`).
const KEEP_RUNNING: usize = 20;
/// Sessions each fresh worker starts before it is measured.
const WARM_UP: usize = 10;
/// Sessions per mode over all rounds (a tenth with `--quick`).
const SESSIONS: usize = 600;

/// One containment mode: its name and the settings that make it.
struct Mode {
    name: &'static str,
    settings: &'static [(&'static str, &'static str)],
    cgroup: bool,
}

const MODES: [Mode; 3] = [
    Mode {
        name: "process-group",
        settings: &[
            ("AGENT_WORKER__AGENT__CONTAINMENT", "process-group"),
            ("AGENT_WORKER__AGENT__MEMORY_MAX", ""),
            ("AGENT_WORKER__AGENT__PIDS_MAX", "0"),
        ],
        cgroup: false,
    },
    Mode {
        name: "cgroup",
        settings: &[
            ("AGENT_WORKER__AGENT__CONTAINMENT", "cgroup"),
            ("AGENT_WORKER__AGENT__MEMORY_MAX", ""),
            ("AGENT_WORKER__AGENT__PIDS_MAX", "0"),
        ],
        cgroup: true,
    },
    Mode {
        name: "cgroup + limits",
        settings: &[
            ("AGENT_WORKER__AGENT__CONTAINMENT", "cgroup"),
            ("AGENT_WORKER__AGENT__MEMORY_MAX", "512MiB"),
            ("AGENT_WORKER__AGENT__PIDS_MAX", "512"),
        ],
        cgroup: true,
    },
];

/// A reported span of one start, between two of its stamps.
struct Span {
    metric: &'static str,
    millis: fn(&Stamps) -> Option<f64>,
}

fn between(from: Option<std::time::Instant>, to: Option<std::time::Instant>) -> Option<f64> {
    Some(to?.checked_duration_since(from?)?.as_secs_f64() * 1e3)
}

const SPANS: [Span; 5] = [
    Span {
        metric: "enqueue → ready",
        millis: |s| between(s.enqueued, s.ready),
    },
    Span {
        metric: "enqueue → spawned",
        millis: |s| between(s.enqueued, s.spawned),
    },
    Span {
        metric: "  pick-up (enqueue → launch())",
        millis: |s| between(s.enqueued, s.launched),
    },
    Span {
        metric: "  clone + exec (launch() → spawned)",
        millis: |s| between(s.launched, s.spawned),
    },
    Span {
        metric: "  ready line (spawned → ready read)",
        millis: |s| between(s.spawned, s.ready),
    },
];

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let cgroups = cgroup_probe(ctx);
    match &cgroups {
        Ok(enforcement) => rows.push(Row::info(PART, "cgroups: limits enforced by", *enforcement)),
        Err(reason) => rows.push(Row::info(
            PART,
            "cgroup containment unavailable: its rows are skipped",
            reason.clone(),
        )),
    }
    let modes: Vec<&Mode> = MODES
        .iter()
        .filter(|m| !m.cgroup || cgroups.is_ok())
        .collect();
    let rounds = if ctx.quick { 2 } else { 4 };
    let per_round = ctx.size(SESSIONS) / rounds;
    // stamps[mode][round]
    let mut stamps: Vec<Vec<Vec<Stamps>>> = modes.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for k in 0..modes.len() {
            let m = (round + k) % modes.len();
            eprintln!("  round {round}: {}", modes[m].name);
            let name = format!("c{m}r{round}");
            stamps[m].push(run_mode(ctx, modes[m], &name, per_round).await?);
        }
    }
    rows.extend(table(&modes, &stamps));
    Ok(rows)
}

/// The rows of every mode, with each figure's ratio against the first mode (process-group).
fn table(modes: &[&Mode], stamps: &[Vec<Vec<Stamps>>]) -> Vec<Row> {
    let mut rows = Vec::new();
    for (m, mode) in modes.iter().enumerate() {
        for span in &SPANS {
            let samples = |rounds: &[Vec<Stamps>]| -> Vec<f64> {
                rounds.concat().iter().filter_map(span.millis).collect()
            };
            let pooled = Dist::new(samples(&stamps[m]));
            let baseline = Dist::new(samples(&stamps[0]));
            for p in [50.0, 99.0] {
                let value = pooled.pct(p);
                let ratio = if m == 0 {
                    String::new()
                } else {
                    format!(" ({:.2}× process-group)", value / baseline.pct(p))
                };
                let per_round: Vec<String> = stamps[m]
                    .iter()
                    .map(|r| {
                        let d = Dist::new(r.iter().filter_map(span.millis).collect());
                        format!("{:.2}", d.pct(p))
                    })
                    .collect();
                rows.push(
                    Row::info(
                        PART,
                        format!(
                            "{}: {} p{p:.0} (n={})",
                            mode.name,
                            span.metric,
                            pooled.len()
                        ),
                        format!("{value:.2} ms{ratio}"),
                    )
                    .spread(format!("per round: {} ms", per_round.join(" / "))),
                );
            }
        }
    }
    rows
}

/// One round of one mode: a fresh worker with the mode's settings, [`WARM_UP`] sessions not
/// measured, then `n` sessions one every 10 ms (part 1's round); their stamps.
async fn run_mode(ctx: &Ctx, mode: &Mode, name: &str, n: usize) -> anyhow::Result<Vec<Stamps>> {
    ctx.flush().await?;
    let settings = ctx.settings("ready", mode.settings);
    let probe = Probe::new();
    let before = ctx.commandstats().await?;
    let worker = InProcessWorker::start(
        settings.clone(),
        RecordingLauncher::factory(&settings, probe.clone(), Some(KEEP_RUNNING)),
    );
    let measured = async {
        ctx.wait_worker_idle(&before).await?;
        let producer = ctx.producer(ctx.connect().await?);
        let warm = ids(&format!("{name}w"), WARM_UP);
        ctx.write_configs(&warm).await?;
        for id in &warm {
            producer.enqueue(&AgentStart::new(id.clone())).await?;
            tokio::time::sleep(GAP).await;
        }
        probe.wait_ready(WARM_UP, Duration::from_secs(30)).await?;
        probe.take();
        latency::round(ctx, &probe, &producer, name, n, true).await
    }
    .await;
    worker.stop().await?;
    measured
}

/// Whether this process may create agent cgroups, as `agent.containment = "cgroup"` needs,
/// and then how the limits of `cgroup + limits` would be enforced (`cgroup-v1 (memory,
/// pids)`, …); else why not.
fn cgroup_probe(ctx: &Ctx) -> Result<&'static str, String> {
    let with_limits = ctx.settings("ready", MODES[2].settings);
    let limits = Limits::from_settings(&with_limits.agent);
    let id = format!("bench-probe-{}", std::process::id());
    match Containment::start(ContainmentSetting::Cgroup, &id, limits) {
        Ok(containment) => {
            let name = containment.enforcement().name();
            containment.close();
            Ok(name)
        }
        Err(error) => Err(error.to_string()),
    }
}
