//! The OTLP endpoints part 12 points the `agent-worker run` binary at: one that accepts
//! connections and never answers, one that refuses them, and one that answers every export
//! with 200 at once. All on loopback, in this process, for the whole part.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

/// The three endpoints and what they saw. The listeners stop when this is dropped.
pub struct Collectors {
    /// Accepts every connection and holds it open without reading or answering.
    pub blackhole: SocketAddr,
    /// A port nothing listens on: every connection is refused.
    pub refused: SocketAddr,
    /// Reads each request and answers `200 OK` with an empty body.
    pub answering: SocketAddr,
    held: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Collectors {
    pub async fn start() -> anyhow::Result<Self> {
        let blackhole = TcpListener::bind("127.0.0.1:0").await?;
        let answering = TcpListener::bind("127.0.0.1:0").await?;
        // Bound and released: nothing listens there while the part runs.
        let refused = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let (held, answered) = (Arc::default(), Arc::default());
        let addrs = (blackhole.local_addr()?, answering.local_addr()?);
        let tasks = vec![
            tokio::spawn(hold(blackhole, Arc::clone(&held))),
            tokio::spawn(answer(answering, Arc::clone(&answered))),
        ];
        Ok(Self {
            blackhole: addrs.0,
            refused,
            answering: addrs.1,
            held,
            answered,
            tasks,
        })
    }

    /// Connections the blackhole accepted so far.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Export requests the answering collector answered so far.
    pub fn answered(&self) -> usize {
        self.answered.load(Ordering::Relaxed)
    }
}

impl Drop for Collectors {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Accepts and keeps every socket, so the exporter's requests wait for an answer that never comes.
async fn hold(listener: TcpListener, held: Arc<AtomicUsize>) {
    let mut sockets = Vec::new();
    while let Ok((socket, _)) = listener.accept().await {
        held.fetch_add(1, Ordering::Relaxed);
        sockets.push(socket);
    }
}

async fn answer(listener: TcpListener, answered: Arc<AtomicUsize>) {
    while let Ok((socket, _)) = listener.accept().await {
        let answered = Arc::clone(&answered);
        tokio::spawn(async move {
            if serve(socket).await.unwrap_or(false) {
                answered.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
}

/// Reads one request (headers, then `Content-Length` bytes of body) and answers 200; the
/// exporter opens a connection per export. Whether a request was answered.
async fn serve(mut socket: TcpStream) -> std::io::Result<bool> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let body_at = loop {
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            return Ok(false);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..body_at]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut read = buf.len() - body_at;
    while read < length {
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            return Ok(false);
        }
        read += n;
    }
    socket
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .await?;
    socket.shutdown().await?;
    Ok(true)
}
