//! Asking a running worker to stop, in two steps.
//!
//! The first request (SIGTERM or SIGINT for `agent-worker run`) is graceful: stop fetching, let
//! starts in progress finish, drain agents for up to `shutdown.drain_timeout`, then stop them.
//! The second stops the agents at once and abandons starts in progress. The worker takes a
//! [`Shutdown`] as an argument (tests and the demo cancel it themselves); [`on_signals`] is
//! what ties it to the process's signals.

use tokio_util::sync::CancellationToken;

/// How a running worker is asked to stop.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// First request: stop fetching, finish starts in progress, drain agents for up to
    /// `shutdown.drain_timeout`, then stop them.
    pub graceful: CancellationToken,
    /// Second request: stop the agents now (no drain, no grace) and abandon starts in
    /// progress.
    pub immediate: CancellationToken,
}

impl Shutdown {
    /// Not yet asked to stop.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks for both steps at once: stop fetching and stop the agents without draining.
    pub fn stop_now(&self) {
        self.graceful.cancel();
        self.immediate.cancel();
    }
}

/// The first SIGTERM or SIGINT asks `shutdown` to stop gracefully (`shutdown_requested`), the
/// second to stop at once (`immediate_shutdown_requested`).
///
/// # Panics
///
/// If the signal handlers cannot be installed (no tokio runtime with signals enabled).
pub fn on_signals(shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("a SIGINT handler");
    tokio::spawn(async move {
        for (step, token) in [
            ("shutdown_requested", &shutdown.graceful),
            ("immediate_shutdown_requested", &shutdown.immediate),
        ] {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            tracing::info!(signal = name, "{step}");
            token.cancel();
        }
    })
}
