//! `agent-worker`: parse the command line, load settings, start telemetry, hand over.

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use agent_jobs::{AgentStart, Producer, QueueKeys, SessionConfigInput, SessionId};
use agent_worker::{
    clock, connection, demo, observability, operator,
    session::{SessionStore, unix_now},
    settings::Settings,
    sweep::{self as stale, StaleSessionSweep},
    telemetry, test_agent, worker,
};
use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// Starts and supervises one voice agent per session from agent-start jobs in Redis.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Settings file overriding config/default.toml (only the keys it sets).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the worker until SIGTERM or SIGINT.
    Run,
    /// Enqueue an agent-start job; with --voice-id, --opening-line or --system-prompt, first
    /// write the session's config as the orchestrator does. Prints the task id.
    Enqueue {
        /// Session to start an agent for: 1-128 characters of [A-Za-z0-9._-].
        #[arg(long)]
        session_id: String,
        /// Who started the session (informational).
        #[arg(long)]
        user_id: Option<String>,
        /// TTS voice for the session.
        #[arg(long)]
        voice_id: Option<String>,
        /// The agent's opening line.
        #[arg(long)]
        opening_line: Option<String>,
        /// The agent's system prompt.
        #[arg(long)]
        system_prompt: Option<String>,
    },
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

#[derive(Debug, Subcommand)]
enum DeadCommand {
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

fn main() -> ExitCode {
    // The stand-in agent of the demo and the tests, before clap: its arguments are the agent
    // command line of the contract, not ours, and it needs no settings.
    let mut args = std::env::args_os();
    if args.nth(1).as_deref() == Some(std::ffi::OsStr::new(test_agent::SUBCOMMAND)) {
        let argv = args.map(|a| a.to_string_lossy().into_owned()).collect();
        return ExitCode::from(test_agent::main(argv) as u8);
    }
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("agent-worker: {error}");
            return ExitCode::from(2);
        }
    };
    // The demo's own lines and table are what a newcomer reads; its worker's logs are noise
    // there unless asked for.
    let default_filter = match cli.command {
        Command::Demo { verbose: false } => "warn",
        _ => "info",
    };
    let (log_writer, _flush_logs_at_exit) = telemetry::non_blocking_stderr();
    telemetry::init_subscriber(telemetry::get_subscriber(
        settings.telemetry.format,
        default_filter,
        log_writer,
    ));
    // redis.tls_insecure is warned about by every command, before it connects.
    connection::log_tls_mode(&settings.redis);
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run => run(settings).await,
            Command::Enqueue {
                session_id,
                user_id,
                voice_id,
                opening_line,
                system_prompt,
            } => {
                enqueue(
                    settings,
                    &session_id,
                    user_id,
                    voice_id,
                    opening_line,
                    system_prompt,
                )
                .await
            }
            Command::Sweep { dry_run, scan } => sweep(settings, dry_run, scan).await,
            Command::Status { json } => status(settings, json).await,
            Command::Dead { command } => dead(settings, command).await,
            Command::Demo { .. } => demo::run(settings).await,
        }
    });
    // Agents are stopped by now; do not wait for lingering blocking tasks.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "agent_worker_failed");
            eprintln!("agent-worker: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    // The worker process owns its agents' trees: orphans in them come back to it, so they can
    // be killed with their session (see containment.rs).
    if let Err(error) = agent_worker::containment::become_subreaper() {
        tracing::warn!(error = %error, "subreaper_unavailable");
    }
    let health = observability::Health::new();
    // The listener outlives the worker's drain, so probes and scrapes keep answering while
    // agents finish.
    let http_stop = CancellationToken::new();
    let server = observability::serve(
        settings.http.addr,
        observability::install_recorder(),
        health.clone(),
        http_stop.clone(),
    )
    .await
    .with_context(|| format!("cannot listen on http.addr {}", settings.http.addr))?;
    let shutdown = worker::Shutdown::new();
    tokio::spawn(stop_on_signals(shutdown.clone(), health.clone()));
    let launcher = worker::process_launcher(&settings.agent);
    let ran = worker::run_with_health(settings, launcher, shutdown, health).await;
    http_stop.cancel();
    server.stopped().await?;
    Ok(ran?)
}

/// First SIGTERM or SIGINT: graceful shutdown (drain). Second: stop the agents now and abandon
/// starts in progress.
async fn stop_on_signals(shutdown: worker::Shutdown, health: Arc<observability::Health>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("a SIGINT handler");
    for step in ["shutdown_requested", "immediate_shutdown_requested"] {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "{step}");
        if step == "shutdown_requested" {
            health.set_draining();
            shutdown.graceful.cancel();
        } else {
            shutdown.immediate.cancel();
        }
    }
}

async fn enqueue(
    settings: Settings,
    session_id: &str,
    user_id: Option<String>,
    voice_id: Option<String>,
    opening_line: Option<String>,
    system_prompt: Option<String>,
) -> anyhow::Result<()> {
    let id = SessionId::parse(session_id).context("invalid --session-id")?;
    let mut conn = connection::connect(&settings.redis).await?;
    if voice_id.is_some() || opening_line.is_some() || system_prompt.is_some() {
        let config = SessionConfigInput {
            voice_id: voice_id.unwrap_or_else(|| settings.agent.default_voice.clone()),
            user_name: user_id.clone().unwrap_or_default(),
            opening_line,
            system_prompt,
        };
        agent_jobs::write_session_config(&mut conn, &id, &config, settings.session.ttl)
            .await
            .context("writing the session config")?;
    }
    let keys = QueueKeys::new(&settings.redis.queue)?;
    let producer = Producer::new(conn, keys).idempotency_ttl(settings.session.ttl);
    let mut job = AgentStart::new(id);
    job.user_id = user_id;
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
    let status = operator::status(&conn, &keys, unix_now(), settings.worker.orphan_timeout).await?;
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
        agent_worker::dataset::NO_EVICTION => "",
        "unknown" => "  (could not be read)",
        _ => "  (evicts keys: session records can vanish; set noeviction)",
    };
    println!("redis     maxmemory-policy {policy}{warning}");
    println!("workers");
    for w in &status.workers {
        println!(
            "  {:<40} agents {:>4}  seen {:>4}s ago  {}",
            w.id,
            w.agents,
            w.last_seen_secs,
            if w.alive { "alive" } else { "silent" }
        );
    }
    Ok(())
}

async fn dead(settings: Settings, command: DeadCommand) -> anyhow::Result<()> {
    let conn = connection::connect(&settings.redis).await?;
    let keys = QueueKeys::new(&settings.redis.queue)?;
    match command {
        DeadCommand::List { limit, json } => {
            let jobs = operator::dead_jobs(&conn, &keys, limit).await?;
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
            let requeued = operator::retry_dead(&conn, &keys, ids).await?;
            for id in &requeued {
                println!("requeued {id}");
            }
            println!("{} job(s) requeued", requeued.len());
        }
    }
    Ok(())
}
