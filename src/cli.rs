//! The command line: its commands, and what each one does and prints.
//!
//! `main` parses [`Cli`], loads settings, starts telemetry and hands the command to
//! [`execute`]. `run` is the worker ([`crate::worker::run`]) tied to the process's signals; the
//! others are short operator commands:
//! - `status` and `dead list|retry` print what [`crate::inspect`] reads (the console shows
//!   the same queries).
//! - [`demo`]: `demo`, the seed scenario end to end.
//! - [`local_redis`]: a private `redis-server` for the demo (and the tests) when none answers.
//! - [`test_agent`]: the stand-in agent, `agent-worker test-agent` (dispatched by `main`
//!   before any parsing: its arguments are the agent's command line, not ours).

pub mod demo;
pub mod local_redis;
pub mod test_agent;

use std::path::PathBuf;

use agent_jobs::{AgentStart, Producer, QueueKeys, SessionConfigInput, SessionId};
use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::{
    agent::{cgroup_guard, containment},
    clock::{self, unix_now},
    connection, inspect,
    jobs::sweep::{self as stale, StaleSessionSweep},
    session::SessionStore,
    settings::Settings,
    shutdown::{self, Shutdown},
    worker,
};

/// Starts and supervises one voice agent per session from agent-start jobs in Redis.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Settings file overriding config/default.toml (only the keys it sets).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the worker until SIGTERM or SIGINT.
    Run,
    /// Enqueue an agent-start job; with --voice-id, --opening-line or --system-prompt, first
    /// write the session's config as the orchestrator does. Prints the task id.
    Enqueue(EnqueueArgs),
    /// Remove stale sessions now (those the scheduled sweep would remove) and print each one
    /// with the reason.
    Sweep {
        /// Report what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also walk legacy `session:<id>` hashes (not in the heartbeat index) with SCAN and
        /// remove those idle for longer than session.max_age. A one-off migration step.
        #[arg(long)]
        scan: bool,
    },
    /// Show the queue, the sessions and the live workers.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Inspect or retry jobs in the dead set.
    Dead {
        /// List or retry.
        #[command(subcommand)]
        command: DeadCommand,
    },
    /// Start two sessions of one user at once (voices Craig and Olivia) with a test agent and
    /// show which voice each agent received.
    Demo {
        /// Show the worker's logs (info level) instead of warnings only; `RUST_LOG` wins.
        #[arg(long, short)]
        verbose: bool,
    },
}

/// What `enqueue` takes.
#[derive(Debug, clap::Args)]
pub struct EnqueueArgs {
    /// Session to start an agent for: 1-128 characters of [A-Za-z0-9._-].
    #[arg(long)]
    pub session_id: String,
    /// Who started the session (informational).
    #[arg(long)]
    pub user_id: Option<String>,
    /// TTS voice for the session.
    #[arg(long)]
    pub voice_id: Option<String>,
    /// The agent's opening line.
    #[arg(long)]
    pub opening_line: Option<String>,
    /// The agent's system prompt.
    #[arg(long)]
    pub system_prompt: Option<String>,
    /// Deadline after the enqueue (`30s`, `500ms`, `2m`), on Redis's clock: a worker that
    /// claims the job later starts no agent (`start_expired`). None by default.
    #[arg(long, value_name = "DURATION")]
    pub start_within: Option<humantime::Duration>,
    /// W3C traceparent (`00-<trace id>-<parent id>-<flags>`) the worker continues.
    #[arg(long)]
    pub traceparent: Option<String>,
    /// W3C tracestate that goes with --traceparent.
    #[arg(long, requires = "traceparent")]
    pub tracestate: Option<String>,
}

/// `dead` commands.
#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// List the most recent dead jobs: task id, session, error, when.
    List {
        /// How many to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Put dead jobs back on the ready list.
    Retry {
        /// Task ids to retry.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        task_ids: Vec<String>,
        /// Retry every dead job.
        #[arg(long)]
        all: bool,
    },
}

/// Runs `command` with `settings`.
pub async fn execute(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Run => run(settings).await,
        Command::Enqueue(args) => enqueue(settings, args).await,
        Command::Sweep { dry_run, scan } => sweep(settings, dry_run, scan).await,
        Command::Status { json } => status(settings, json).await,
        Command::Dead { command } => dead(settings, command).await,
        Command::Demo { .. } => demo::run(settings).await,
    }
}

/// A zygote's state in one phrase: `ready (pid 42, 17 forked)`, `backing-off: <reason>`.
fn zygote_summary(z: &crate::agent::launcher::ZygoteStatus) -> String {
    let mut text = z.state.clone();
    if let Some(pid) = z.pid {
        text.push_str(&format!(" (pid {pid}, {} forked)", z.forked));
    }
    if let Some(reason) = &z.reason {
        text.push_str(&format!(": {reason}"));
    }
    text
}

/// `run`: the worker, until SIGTERM/SIGINT.
async fn run(settings: Settings) -> anyhow::Result<()> {
    // The worker process owns its agents' trees: orphans in them come back to it, so they can
    // be killed with their session (see containment.rs).
    if let Err(error) = containment::become_subreaper() {
        tracing::warn!(error = %error, "subreaper_unavailable");
    }
    // With cgroups, a guard started from this binary removes them if the worker is killed.
    match std::env::current_exe() {
        Ok(exe) => cgroup_guard::enable(exe),
        Err(error) => tracing::warn!(error = %error, "cgroup_guard_unavailable"),
    }
    let shutdown = Shutdown::new();
    let signals = shutdown::on_signals(shutdown.clone());
    let launcher = worker::process_launcher(&settings.agent);
    let ran = worker::run(settings, launcher, shutdown).await;
    signals.abort();
    Ok(ran?)
}

async fn enqueue(settings: Settings, args: EnqueueArgs) -> anyhow::Result<()> {
    // Everything is checked before anything is written.
    let id = SessionId::parse(&args.session_id).context("invalid --session-id")?;
    let mut job = AgentStart::new(id.clone());
    job.user_id = args.user_id.clone();
    if let Some(traceparent) = args.traceparent {
        job = job.with_traceparent(traceparent)?;
    }
    if let Some(tracestate) = args.tracestate {
        job = job.with_tracestate(tracestate)?;
    }
    if let Some(within) = args.start_within {
        job = job.with_start_within(within.into());
    }
    let mut conn = connection::connect(&settings.redis).await?;
    let EnqueueArgs {
        voice_id,
        opening_line,
        system_prompt,
        user_id,
        ..
    } = args;
    if voice_id.is_some() || opening_line.is_some() || system_prompt.is_some() {
        let config = SessionConfigInput {
            voice_id: voice_id.unwrap_or_else(|| settings.agent.default_voice.clone()),
            user_name: user_id.unwrap_or_default(),
            opening_line,
            system_prompt,
        };
        agent_jobs::write_session_config(&mut conn, &id, &config, settings.session.ttl)
            .await
            .context("writing the session config")?;
    }
    let keys = QueueKeys::new(&settings.redis.queue)?;
    let producer = Producer::new(conn, keys).idempotency_ttl(settings.session.ttl);
    let enqueued = producer.enqueue(&job).await?;
    if enqueued.duplicate {
        tracing::info!(task_id = %enqueued.task_id, "already_enqueued");
    }
    println!("{}", enqueued.task_id);
    Ok(())
}

async fn sweep(settings: Settings, dry_run: bool, scan: bool) -> anyhow::Result<()> {
    let conn = connection::connect(&settings.redis).await?;
    // Staleness is judged on Redis's clock, as the workers do.
    clock::sync(&mut conn.clone()).await?;
    let store = SessionStore::from_settings(conn.clone(), &settings);
    let sweep = StaleSessionSweep::from_settings(conn, store, &settings);
    let now = unix_now();
    let mut reports = vec![("heartbeat index", sweep.run(now, dry_run).await?)];
    if scan {
        reports.push(("legacy scan", sweep.scan_legacy(now, dry_run).await?));
    }
    let verb = if dry_run { "would remove" } else { "removed" };
    for (what, report) in &reports {
        stale::log_report(report, None, dry_run);
        for (id, reason) in &report.removed {
            println!("{verb} {id} ({reason})");
        }
        println!(
            "{what}: examined {}, {verb} {}, {} ms",
            report.examined,
            report.removed.len(),
            report.duration.as_millis()
        );
    }
    Ok(())
}

async fn status(settings: Settings, json: bool) -> anyhow::Result<()> {
    let conn = connection::connect(&settings.redis).await?;
    // Staleness is judged on Redis's clock, as the workers do.
    clock::sync(&mut conn.clone()).await?;
    let keys = QueueKeys::new(&settings.redis.queue)?;
    let status = inspect::status(&conn, &keys, unix_now(), settings.worker.orphan_timeout).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let j = &status.jobs;
    println!("queue {}", status.queue);
    println!(
        "  jobs      ready {}  scheduled {}  inflight {}  done {}  dead {}",
        j.ready, j.scheduled, j.inflight, j.done, j.dead
    );
    println!(
        "  sessions  starting {}  ready {}",
        status.sessions.starting, status.sessions.ready
    );
    let policy = status.maxmemory_policy.as_deref().unwrap_or("unknown");
    let warning = match policy {
        crate::dataset::NO_EVICTION => "",
        "unknown" => "  (could not be read)",
        _ => "  (evicts keys: session records can vanish; set noeviction)",
    };
    println!("redis     maxmemory-policy {policy}{warning}");
    println!("workers");
    for w in &status.workers {
        let mut warm = w
            .warm_idle
            .map_or_else(String::new, |n| format!("  warm idle {n}"));
        if let Some(zygote) = w.info.as_ref().and_then(|i| i.zygote.as_ref()) {
            warm.push_str(&format!("  zygote {}", zygote_summary(zygote)));
        }
        let draining = w.info.as_ref().and_then(|i| i.draining_since);
        let state = match (w.alive, draining) {
            (false, _) => "silent".to_owned(),
            // The calls left are its agents: it exits when the last one ends.
            (true, Some(since)) => format!(
                "draining for {}s, {} calls left",
                crate::clock::unix_now().saturating_sub(since),
                w.agents
            ),
            (true, None) => "alive".to_owned(),
        };
        let memory: u64 = w
            .info
            .iter()
            .flat_map(|i| &i.agents)
            .map(|a| a.memory_bytes)
            .sum();
        let memory = if memory > 0 {
            format!("  agents' memory {}", crate::settings::ByteSize(memory))
        } else {
            String::new()
        };
        println!(
            "  {:<40} agents {:>4}  seen {:>4}s ago  {state}{warm}{memory}",
            w.id, w.agents, w.last_seen_secs,
        );
    }
    Ok(())
}

async fn dead(settings: Settings, command: DeadCommand) -> anyhow::Result<()> {
    let conn = connection::connect(&settings.redis).await?;
    let keys = QueueKeys::new(&settings.redis.queue)?;
    match command {
        DeadCommand::List { limit, json } => {
            let jobs = inspect::dead_jobs(&conn, &keys, limit).await?.jobs;
            if json {
                println!("{}", serde_json::to_string_pretty(&jobs)?);
                return Ok(());
            }
            for job in &jobs {
                let when = job
                    .failed_at
                    .and_then(|t| chrono::DateTime::from_timestamp(t as i64, 0))
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{}  {:<24}  {}  {}",
                    job.task_id,
                    job.session_id.as_deref().unwrap_or("-"),
                    when,
                    job.error
                );
            }
        }
        DeadCommand::Retry { task_ids, all } => {
            let ids = if all { None } else { Some(task_ids) };
            let requeued = inspect::retry_dead(&conn, &keys, ids).await?;
            for id in &requeued {
                println!("requeued {id}");
            }
            println!("{} job(s) requeued", requeued.len());
        }
    }
    Ok(())
}
