//! `agent-worker`: parse the command line, load settings, start telemetry, hand over.

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use agent_jobs::{AgentStart, Producer, QueueKeys, SessionConfigInput, SessionId};
use agent_worker::{
    connection, demo,
    launcher::{Launcher, ProcessLauncher},
    session::{SessionStore, unix_now},
    settings::Settings,
    sweep::{self as stale, StaleSessionSweep},
    telemetry, worker,
};
use anyhow::Context;
use clap::{Parser, Subcommand};

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
    /// Start two sessions of one user at once (voices Craig and Olivia) with a test agent and
    /// show which voice each agent received.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("agent-worker: {error}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_subscriber(telemetry::get_subscriber(
        settings.telemetry.format,
        "info",
        std::io::stderr,
    ));
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
            Command::Demo => demo::run(settings).await,
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
    let shutdown = worker::Shutdown::new();
    tokio::spawn(stop_on_signals(shutdown.clone()));
    let agent = settings.agent.clone();
    worker::run(
        settings,
        Box::new(move |output| {
            Arc::new(ProcessLauncher::new(
                agent.ready_patterns,
                agent.startup_timeout,
                output,
            )) as Arc<dyn Launcher>
        }),
        shutdown,
    )
    .await;
    Ok(())
}

/// First SIGTERM or SIGINT: graceful shutdown (drain). Second: stop the agents now.
async fn stop_on_signals(shutdown: worker::Shutdown) {
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
    let mut conn = connection::connect(&settings.redis)
        .await
        .with_context(|| format!("cannot reach Redis at {}", settings.redis.url))?;
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
    let conn = connection::connect(&settings.redis)
        .await
        .with_context(|| format!("cannot reach Redis at {}", settings.redis.url))?;
    let store = SessionStore::new(
        conn.clone(),
        settings.session.ttl,
        settings.agent.default_voice.clone(),
        settings.agent.log_lines,
    );
    let sweep = StaleSessionSweep::new(
        conn,
        store,
        settings.sweep.batch_size,
        settings.session.stale_after,
        settings.session.max_age,
    );
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
