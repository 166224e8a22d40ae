//! The worker's HTTP listener with its console: bound before anything else (a taken
//! `http.addr` refuses the start before Redis is tried), so `/readyz` tells why a worker
//! waiting for Redis is not ready; stopped after everything else, so probes and scrapes see
//! the whole drain.

use std::{io, net::SocketAddr, sync::Arc};

use tokio_util::sync::{CancellationToken, DropGuard};

use crate::{
    console::Console,
    health::Health,
    http::{self, HttpServer},
    metrics,
    settings::Settings,
    shutdown::Shutdown,
};

/// The running listener. Dropped without [`Listener::stop`], it still stops (without waiting).
pub(super) struct Listener {
    server: HttpServer,
    console: Console,
    /// Cancels the server, the console's rate sampling and the draining watch.
    stop: DropGuard,
}

impl Listener {
    /// Binds `http.addr` and serves `/metrics`, `/healthz`, `/readyz` (from `health`) and the
    /// console; from `shutdown`'s first request on, `/readyz` answers `draining`.
    pub(super) async fn start(
        settings: &Settings,
        health: Arc<Health>,
        shutdown: &Shutdown,
    ) -> io::Result<Self> {
        let stop = CancellationToken::new();
        let handle = metrics::install_recorder();
        let console = Console::new(settings, handle.clone());
        let server = http::serve_with(
            settings.http.addr,
            handle,
            health.clone(),
            console.router(),
            stop.clone(),
        )
        .await?;
        tracing::info!(actions = console.has_actions(), "console_serving");
        tokio::spawn(console.clone().sample_rates(stop.clone()));
        tokio::spawn(mark_draining(
            health,
            shutdown.graceful.clone(),
            stop.clone(),
        ));
        Ok(Self {
            server,
            console,
            stop: stop.drop_guard(),
        })
    }

    /// The address bound (the real port when `http.addr` has port 0).
    pub(super) fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// The console, which reads Redis once the worker is connected.
    pub(super) fn console(&self) -> &Console {
        &self.console
    }

    /// Stops serving and waits until open requests were answered.
    pub(super) async fn stop(self) {
        let Self { server, stop, .. } = self;
        drop(stop);
        if let Err(error) = server.stopped().await {
            tracing::warn!(error = %error, "http_listener_failed");
        }
    }
}

/// Readiness ends at the first shutdown request, for good: `/readyz` answers `draining`.
async fn mark_draining(health: Arc<Health>, graceful: CancellationToken, stop: CancellationToken) {
    tokio::select! {
        _ = graceful.cancelled() => health.set_draining(),
        _ = stop.cancelled() => {}
    }
}
