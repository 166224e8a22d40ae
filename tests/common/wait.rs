//! Waiting for a condition with a deadline, never for a fixed time. Shared with
//! `benches/agent_start/harness.rs` by path, so it uses nothing else of `tests/common`.

use std::{
    future::Future,
    time::{Duration, Instant},
};

/// Calls `check` every `every` until it gives `Some`, or gives `None` once `deadline` has
/// passed (after one last call).
pub async fn poll<T, F, Fut>(deadline: Duration, every: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if Instant::now() > until {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `deadline` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll(deadline, Duration::from_millis(20), check)
        .await
        .unwrap_or_else(|| panic!("timed out after {deadline:?} waiting for {what}"))
}
