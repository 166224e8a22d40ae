//! The HTTP listener: `/metrics` (Prometheus text), `/healthz` (the process runs) and
//! `/readyz` (see [`crate::health::Health`]); the worker adds the console's pages
//! ([`crate::console`]) with [`serve_with`].
//!
//! [`serve`] binds first (a taken port is an error at once; port 0 works, and
//! [`HttpServer::local_addr`] tells the port), then serves in a task until its token is
//! cancelled. It outlives the worker's drain, so probes and scrapes keep answering while agents
//! finish.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::health::Health;

/// How often the recorder's histograms are drained when nobody scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The running HTTP listener of [`serve`].
#[derive(Debug)]
pub struct HttpServer {
    local_addr: SocketAddr,
    task: JoinHandle<io::Result<()>>,
}

impl HttpServer {
    /// The bound address (the real port when `serve` was given port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Waits until the server has stopped (after its shutdown token was cancelled and open
    /// requests were answered).
    pub async fn stopped(self) -> io::Result<()> {
        match self.task.await {
            Ok(result) => result,
            Err(join) => Err(io::Error::other(join)),
        }
    }
}

#[derive(Clone)]
struct AppState {
    handle: PrometheusHandle,
    health: Arc<Health>,
}

/// Binds `addr` and serves `/metrics`, `/healthz` and `/readyz` in a spawned task until
/// `shutdown` is cancelled. Binding happens before this returns, so a taken port is an error
/// here, and port 0 works ([`HttpServer::local_addr`]). Also runs the recorder's upkeep
/// (histogram draining) while it serves.
///
/// - `GET /metrics`: the Prometheus text exposition of `handle`.
/// - `GET /healthz`: `200 ok` as long as the process (its runtime) runs.
/// - `GET /readyz`: `200 ready` while [`Health::is_ready`], else `503` with the reason.
pub async fn serve(
    addr: SocketAddr,
    handle: PrometheusHandle,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> io::Result<HttpServer> {
    serve_with(addr, handle, health, Router::new(), shutdown).await
}

/// [`serve`], with the routes of `extra` (the console's) beside the three endpoints.
pub async fn serve_with(
    addr: SocketAddr,
    handle: PrometheusHandle,
    health: Arc<Health>,
    extra: Router,
    shutdown: CancellationToken,
) -> io::Result<HttpServer> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    tokio::spawn(upkeep_loop(handle.clone(), shutdown.clone()));
    let app = router(AppState { handle, health }).merge(extra);
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    });
    tracing::info!(addr = %local_addr, "http_listening");
    Ok(HttpServer { local_addr, task })
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.handle.render(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    match state.health.not_ready_reason() {
        None => (StatusCode::OK, "ready\n".to_owned()),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

/// Histograms are drained into their buckets on render; without scrapes they would grow, so
/// drain them on a timer too (the exporter's own upkeep task needs its `http-listener`
/// feature, which we do not use).
async fn upkeep_loop(handle: PrometheusHandle, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(UPKEEP_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => handle.run_upkeep(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{install_recorder, redis_error};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.expect("read");
        let response = String::from_utf8(response).expect("utf-8");
        let (head, body) = response.split_once("\r\n\r\n").expect("a header block");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status code");
        (status, body.to_owned())
    }

    #[tokio::test]
    async fn endpoints_answer_from_health_and_the_recorder() {
        let handle = install_recorder();
        let health = Health::new();
        let shutdown = CancellationToken::new();
        let server = serve(
            "127.0.0.1:0".parse().unwrap(),
            handle,
            health.clone(),
            shutdown.clone(),
        )
        .await
        .expect("bind port 0");
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0);

        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_owned()));
        let (status, body) = get(addr, "/readyz").await;
        assert_eq!(
            (status, body.as_str()),
            (503, "not ready: redis unreachable\n")
        );
        health.set_redis(true);
        health.set_job_worker(true);
        assert_eq!(get(addr, "/readyz").await, (200, "ready\n".to_owned()));

        redis_error("unit_test_op");
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            body.contains(r#"agent_worker_redis_errors_total{op="unit_test_op"} 1"#),
            "{body}"
        );
        assert!(
            body.contains("# TYPE agent_worker_jobs_total counter"),
            "{body}"
        );
        assert_eq!(get(addr, "/nope").await.0, 404);

        // A second listener on the same port is refused at bind time.
        let taken = serve(
            addr,
            install_recorder(),
            health.clone(),
            CancellationToken::new(),
        )
        .await;
        assert!(taken.is_err());

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), server.stopped())
            .await
            .expect("stops at once")
            .expect("stops cleanly");
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
