//! The OTLP exporter's HTTP client: one HTTP/1.1 request per export over a fresh connection,
//! on hyper (already in the tree through the HTTP listener), so the exporter needs neither
//! reqwest nor HTTP/2. Plain `http://` only: a collector is normally a local agent or sidecar;
//! an `https://` endpoint is refused when the exporter is built ([`super::otel`]).
//!
//! It runs on the export thread's own runtime ([`super::span_queue`]), never on the worker's.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use tokio_util::task::AbortOnDropHandle;

/// A collector's answer larger than this is not read (it is a short status message).
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// The client (see the module docs). Every request is bounded by `timeout`, connect included.
#[derive(Debug, Clone)]
pub struct Http1Client {
    timeout: Duration,
}

impl Http1Client {
    /// A client whose requests give up after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }

    async fn send(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let uri = request.uri();
        if uri.scheme_str() != Some("http") {
            return Err(format!("only http:// endpoints are supported, not {uri}").into());
        }
        let host = uri.host().ok_or("the endpoint has no host")?;
        let port = uri.port_u16().unwrap_or(80);
        let stream = tokio::net::TcpStream::connect((host, port)).await?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
        // Ends with the request, answered or timed out: a collector that never answers must
        // not keep a connection (and its socket) per export.
        let _connection = AbortOnDropHandle::new(tokio::spawn(connection));
        let (mut parts, body) = request.into_parts();
        if !parts.headers.contains_key(hyper::header::HOST) {
            let authority = parts.uri.authority().map(|a| a.as_str().to_owned());
            if let Some(value) = authority.and_then(|a| a.parse().ok()) {
                parts.headers.insert(hyper::header::HOST, value);
            }
        }
        let response = sender
            .send_request(Request::from_parts(parts, Full::new(body)))
            .await?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_RESPONSE_BYTES).collect().await?;
        Ok(Response::from_parts(parts, body.to_bytes()))
    }
}

#[async_trait::async_trait]
impl HttpClient for Http1Client {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        tokio::time::timeout(self.timeout, self.send(request))
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))?
    }
}
