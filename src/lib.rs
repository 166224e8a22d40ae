//! # agent-worker
//!
//! Takes agent-start jobs from Redis (apalis-redis), loads each session's own configuration
//! from `session:<id>:config`, launches one voice agent process per session and supervises it
//! until it exits. The Redis keys, the statuses and the agent's command line are a contract
//! shared with the orchestrator and the agent: see the README's "Redis contract" section and
//! `ARCHITECTURE.md` for the path of one job.
//!
//! ## Layout
//! The process:
//! - [`worker`]: the worker process, wired once (what `run`, the demo and the tests run): a
//!   build step that binds, connects and refuses ([`worker::Worker::build`]), and a run step
//!   that starts the loops and stops them in order ([`worker::Worker::run`]).
//! - [`shutdown`]: the two-step stop request, and the signals that make it.
//! - [`settings`]: typed settings from `config/default.toml`, `--config FILE` and
//!   `AGENT_WORKER__*` variables, validated at start-up: one file per section, each checking
//!   its own keys; the loader, secrets (redaction) and TLS in files of their own.
//! - [`telemetry`]: the tracing subscriber (`json` or `pretty`), never blocking on stderr;
//!   OpenTelemetry traces of each start when the standard `OTEL_*` variables ask for them.
//! - [`cli`]: the command line's commands (`status`, `dead`, `sweep`, `enqueue`, `demo`, the
//!   stand-in agent).
//!
//! Redis:
//! - [`connection`]: the shared `RedisConn`, TLS, start-up retry, refused credentials.
//! - [`clock`]: Redis's clock, so replicas with skewed clocks agree on what is stale.
//! - [`dataset`]: whether Redis may evict our keys or lost data, so that loss is never taken
//!   for the end of a session.
//! - [`queue`]: our own scripts on the apalis-redis queue (promotion, recovery, depth).
//! - [`wake`]: pub/sub wake-ups so idle workers fetch a new job at once.
//!
//! Sessions:
//! - [`session`]: the session store, one file per step of a session's life: the claim (config
//!   and ownership in one step), the ready transition, the heartbeat and restore, the log lists,
//!   the end record, the removal; [`session::config`] validates a config.
//! - [`heartbeat`]: the liveness of this process's agents, and what the heartbeat finds.
//! - [`presence`]: which worker processes are alive, for claims and `status`.
//!
//! Jobs:
//! - [`job_worker`]: the apalis worker of agent-start jobs and the loop that restarts it.
//! - [`jobs`]: the agent-start job, the stale-session sweep, retention.
//! - [`schedule`]: scheduled jobs on exactly one replica per tick.
//!
//! Agents:
//! - [`agent`]: one agent process, from its command line to its reaped exit, in modules that
//!   read bottom-up: shared leaves (exit, phase, spawn, cgroup, subreaper), command, output,
//!   log list and files, containment and its cgroup guard; the launcher interface, the
//!   readiness wait and the process owner that every start mode is built from; the cold and
//!   warm modes with the warm pool (`agent.warm_pool`); capacity; the supervisor.
//!
//! Observability:
//! - [`metrics`]: every series and the helpers that record them.
//! - [`start_timeline`]: one start's phase times (enqueued, claimed, spawned, alive, ready),
//!   for the phase histograms, the `ready` event, the record and the console.
//! - [`health`]: readiness and the Redis probe.
//! - [`http`]: the `/metrics`, `/healthz`, `/readyz` listener, which also serves the console.
//! - [`console`]: the operator console at `/`: server-rendered pages (one file each, read
//!   through `inspect`, written with maud) of the queue, sessions, workers and dead jobs; with
//!   an admin token, retry and stop actions.
//! - [`inspect`]: what an operator reads and does, shared by the CLI and the console.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
pub mod cli;
pub mod clock;
pub mod connection;
pub mod console;
pub mod dataset;
pub mod health;
pub mod heartbeat;
pub mod http;
pub mod inspect;
pub mod job_worker;
pub mod jobs;
pub mod metrics;
pub mod presence;
pub mod queue;
pub mod schedule;
pub mod session;
pub mod settings;
pub mod shutdown;
pub mod start_timeline;
pub mod telemetry;
pub mod wake;
pub mod worker;
