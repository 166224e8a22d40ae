//! The worker process, wired once: what `agent-worker run`, the demo and the tests all run.
//!
//! Two steps, so that what a worker refuses can be tested without running it:
//! - [`Worker::build`] (`startup.rs`) binds the HTTP listener (`/metrics`, `/healthz`,
//!   `/readyz`: [`crate::http`], and the console: [`crate::console`]; it answers from here to
//!   the very end, so probes and scrapes see the wait for Redis and the drain), connects to
//!   Redis (waiting for it: refused credentials and failed TLS handshakes are waited out too,
//!   `/readyz` naming them), refuses a Redis that may evict session records
//!   ([`crate::dataset`]) and chooses the agents' containment. Beside the listener it starts
//!   nothing: a refusal returns [`RefusedToStart`], a shutdown request while it waits for
//!   Redis returns `None`.
//! - [`Worker::run`] (`running.rs`) starts the agents' supervisor
//!   ([`crate::agent::supervisor`]) with its launcher (`launcher.rs`) and the shipper of their
//!   output, the background tasks (`background.rs`: the Redis probe ([`crate::health`]),
//!   wake-ups ([`crate::wake`]), the promotion of due jobs, presence ([`crate::presence`]), the
//!   session heartbeat ([`crate::heartbeat`]), the scheduled sweep and retention
//!   ([`crate::schedule`]) and, as a subreaper, the reaping of adopted orphans
//!   ([`crate::agent::containment`])), then the job worker ([`crate::job_worker`]), until the
//!   first shutdown request.
//!
//! Then it stops in the order the agents need: no more fetching (starts in progress make no
//! further attempts), the drain (`shutdown.drain_timeout`), the stop of the rest (SIGTERM,
//! `agent.stop_grace`, SIGKILL; a second request cuts the grace), then the background tasks
//! (heartbeats go on while agents drain, or their sessions would look stale), deregistration,
//! and last the HTTP listener (`listener.rs`). That order is one function, `running.rs`'s
//! `Running::until_stopped`.

mod agents;
mod background;
mod launcher;
mod listener;
mod running;
mod startup;

pub use launcher::{LauncherFactory, LauncherParts, process_launcher};
pub use startup::{RefusedToStart, Worker, worker_id};

use crate::{settings::Settings, shutdown::Shutdown};

/// Runs the worker until `shutdown`: [`Worker::build`], then [`Worker::run`] (see the module
/// docs). Redis outages are waited out, never fatal; a shutdown request before Redis ever
/// answered returns `Ok` at once.
pub async fn run(
    settings: Settings,
    make_launcher: LauncherFactory,
    shutdown: Shutdown,
) -> Result<(), RefusedToStart> {
    if let Some(worker) = Worker::build(settings, make_launcher, &shutdown).await? {
        worker.run().await;
    }
    Ok(())
}
