//! `agent-worker`: parse the command line, load settings, start telemetry, hand over.

use std::{process::ExitCode, time::Duration};

use agent_worker::{
    agent::cgroup_guard,
    cli::{self, Cli, Command, test_agent},
    connection,
    settings::Settings,
    telemetry,
};
use clap::Parser;

fn main() -> ExitCode {
    // The processes the worker starts from its own binary, before clap: the stand-in agent of
    // the demo and the tests (its arguments are the agent command line of the contract, not
    // ours) and the cgroup guard. Neither needs settings.
    let mut args = std::env::args_os();
    let hidden = args.nth(1);
    let rest = || args.map(|a| a.to_string_lossy().into_owned()).collect();
    match hidden.as_deref().and_then(std::ffi::OsStr::to_str) {
        Some(test_agent::SUBCOMMAND) => return ExitCode::from(test_agent::main(rest()) as u8),
        Some(cgroup_guard::SUBCOMMAND) => return ExitCode::from(cgroup_guard::main(rest()) as u8),
        _ => {}
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
    // Before the subscriber, whose OpenTelemetry layer needs the tracer; kept to the end of
    // main, which flushes what is queued.
    let otel = telemetry::otel::init();
    let (log_writer, _flush_logs_at_exit) = telemetry::non_blocking_stderr();
    telemetry::init_subscriber(telemetry::get_subscriber(
        settings.telemetry.format,
        default_filter,
        log_writer,
    ));
    telemetry::otel::log_status(&otel);
    // redis.tls_insecure is warned about by every command, before it connects.
    connection::log_tls_mode(&settings.redis);
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let result = runtime.block_on(cli::execute(cli.command, settings));
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
