//! # agent-worker
//!
//! Takes agent-start jobs from Redis (apalis-redis), loads each session's own configuration
//! from `session:<id>:config`, launches one voice agent process per session and supervises it.
//! The Redis keys and the agent's command line are a contract shared with the orchestrator:
//! see the README's "Redis contract" section.
//!
//! ## Layout
//! - [`settings`]: typed settings from `config/default.toml`, `--config FILE` and
//!   `AGENT_WORKER__*` variables, validated at start-up.
//! - [`telemetry`]: the tracing subscriber (`json` or `pretty`).
//! - [`clock`]: Redis's clock, so replicas with skewed clocks agree on what is stale.
//! - [`connection`]: the shared Redis `ConnectionManager`, with our timeouts and start-up retry.
//! - [`dataset`]: whether Redis may evict our keys or lost data (eviction policy, `run_id`,
//!   `evicted_keys`), so data loss is never taken for the end of a session.
//! - [`session`]: the session store: config lookup by session id, session state writes.
//! - [`launcher`]: the [`launcher::Launcher`] interface and the real process launcher (no shell,
//!   own process group, death signal, continuous output reading, event-driven readiness).
//! - [`agent_output`]: reading an agent's output: never blocking, rate-limited in the worker's
//!   log, cut at `agent.max_line_bytes`, judging the start-up phases.
//! - [`containment`]: an agent's whole process tree ends with its session (cgroup v2 per agent,
//!   or a subreaper marker scan).
//! - [`spawn`]: starting that process without forking the worker (a `vfork`-style clone that
//!   still arms the death signal), waited for on a pidfd.
//! - [`capacity`]: `agent.max_agents`: a full replica fetches no jobs.
//! - [`supervisor`]: owns the agents of this process: launch with retries, one agent per
//!   session, exit handling, shutdown.
//! - [`agent_start`]: the agent-start job: tolerant decoding and the retry-or-abort decision.
//! - [`sweep`]: the stale-session sweep (heartbeat index, atomic re-checked removal, legacy
//!   `SCAN` migration) and the one-replica-per-tick lease.
//! - [`worker`]: wiring of the apalis worker and the loop that restarts it after backend errors.
//! - [`wake`]: pub/sub wake-ups so idle workers fetch a new job at once.
//! - [`queue`]: our own maintenance scripts on the apalis-redis queue.
//! - [`logs`]: batched shipping of agent output to `agent:<id>:logs`, bounded in bytes.
//! - [`log_files`]: per-session log files (`agent.log_dir`), written off the output readers.
//! - [`retention`]: trimming finished jobs (apalis-redis keeps them forever).
//! - [`operator`]: what `status` and `dead list|retry` read and do.
//! - [`observability`]: metric names and helpers, the Prometheus recorder, the `/metrics`
//!   `/healthz` `/readyz` listener, the Redis probe.
//! - [`demo`]: the `demo` command.
//! - [`local_redis`]: a private `redis-server` for the demo when none answers.
//! - [`test_agent`]: the stand-in agent (`agent-worker test-agent`) of the demo and the tests.

pub mod agent_output;
pub mod agent_start;
pub mod capacity;
pub mod clock;
pub mod connection;
pub mod containment;
pub mod dataset;
pub mod demo;
pub mod launcher;
pub mod local_redis;
pub mod log_files;
pub mod logs;
pub mod observability;
pub mod operator;
pub mod queue;
pub mod retention;
pub mod session;
pub mod settings;
pub mod spawn;
pub mod supervisor;
pub mod sweep;
pub mod telemetry;
pub mod test_agent;
pub mod wake;
pub mod worker;
