//! A worker that is still trying to reach Redis stops at once on SIGTERM, even in the middle
//! of a connect attempt: an attempt against a Redis that accepts and never answers lasts its
//! response timeout and the connection manager's retries (several seconds), and an operator
//! (or Kubernetes) stopping a replica that never got Redis should not wait that out.

mod common;

use std::{
    io::Read,
    net::TcpListener,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::*;
use nix::sys::signal::Signal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_connect_attempt_stops_the_worker_at_once() {
    // A "Redis" that accepts connections and never answers: every attempt hangs in it.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            counted.fetch_add(1, Ordering::Relaxed);
            // Held open, read and never answered, until the worker hangs up.
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut sink = [0u8; 512];
                while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
            });
        }
    });
    let mut worker = WorkerProcess::run(
        &format!("redis://127.0.0.1:{port}"),
        "ready",
        // Longer than the deadline below: a worker that waits the attempt out cannot pass.
        &[("AGENT_WORKER__REDIS__RESPONSE_TIMEOUT", "20s")],
    );
    wait_for(
        "the worker's connect attempt",
        Duration::from_secs(10),
        || async { (accepted.load(Ordering::Relaxed) > 0).then_some(()) },
    )
    .await;
    worker.signal(Signal::SIGTERM);
    let status = worker.wait_exit(Duration::from_secs(3)).await;
    assert!(
        status.success(),
        "a worker stopped before it reached Redis exits 0: {status:?}"
    );
}
