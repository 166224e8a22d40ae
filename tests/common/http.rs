//! A minimal HTTP/1.1 client for the worker's listener, and free ports. Shared with
//! `benches/agent_start/harness.rs` by path, so it uses nothing else of `tests/common`.

use std::{collections::HashMap, time::Duration};

/// A port nothing listens on right now (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `GET path` over HTTP/1.1 (within 5 s): the status code and the body, or `None` when
/// nothing answers.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    http_get_within(addr, path, Duration::from_secs(5)).await
}

/// [`http_get`] with its own time limit.
pub async fn http_get_within(
    addr: std::net::SocketAddr,
    path: &str,
    within: Duration,
) -> Option<(u16, String)> {
    let (code, _, body) = exchange(addr, "GET", path, &[], "", within).await?;
    Some((code, body))
}

/// [`http_get`] that must be answered.
pub async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    http_get(addr, path)
        .await
        .unwrap_or_else(|| panic!("GET {path}: no answer from {addr}"))
}

/// One HTTP/1.1 exchange with extra request `headers` and a `body` (form-encoded for a
/// `POST`) that must be answered within 10 s: status, headers (lower-case names), body.
pub async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, HashMap<String, String>, String) {
    exchange(addr, method, path, headers, body, Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("{method} {path}: no answer from {addr} within 10 s"))
}

/// One request over a fresh connection (closed after the answer), or `None` when nothing
/// answers within `within` or the answer is not HTTP.
async fn exchange(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    within: Duration,
) -> Option<(u16, HashMap<String, String>, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    // A GET without a body says nothing of one, as a browser's does.
    if method != "GET" || !body.is_empty() {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    if method == "POST" {
        head.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let talk = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream.write_all(head.as_bytes()).await.ok()?;
        stream.write_all(body.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        Some(response)
    };
    let response = tokio::time::timeout(within, talk).await.ok()??;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let code = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some((code, headers, body.to_owned()))
}
