//! Shared test harness: a private redis-server per test, an in-process worker with the real
//! process launcher and the test agent, the worker binary as a child process, and helpers
//! that wait for a condition with a deadline. One file per concept; all of it is re-exported
//! here, so a test reads `use common::*`.
#![allow(dead_code)]

mod commandstats;
mod failover;
mod http;
mod ledger;
mod output;
mod procfs;
mod python;
mod queue;
mod script_context;
mod session;
mod test_redis;
mod test_worker;
mod wait;
mod worker_command;
mod worker_process;

// Not every test binary uses every helper.
#[allow(unused_imports)]
pub use self::{
    commandstats::{command_calls, command_count, parse_commandstats},
    failover::{Endpoint, ReplicatedRedis, Sentinel, SentinelRedis, clients, direct},
    http::{free_port, get, http_get, http_get_within, request},
    ledger::Ledger,
    output::stdout_of,
    procfs::{alive, live_agents, proc_state, room_of, wait_gone, zombie_children},
    python::{PYTHON_DIR, printed_json, python, python_path, require_python, unittest},
    queue::{
        PENDING, active_jobs, assert_first_run, done_count, enqueue, enqueue_when_up, is_done,
        producer, push_raw, stage_job, wait_dead, wait_done, wait_idle, worker_runs,
    },
    script_context::{
        PROBE_SESSION_ENV, assert_probe_saw_cold, cold_probe, probe, probe_args, probe_report,
        probe_session_env, repo, stdout_lines,
    },
    session::{
        agent_logs, agent_pid, assert_agent_of, end_as_orchestrator, event_statuses,
        heartbeat_score, received, start_ready, status, wait_received, wait_status, write_config,
        write_full_config,
    },
    test_redis::{TestRedis, assert_fields, hget, is_member, settings, ttl_of},
    test_worker::TestWorker,
    wait::{poll, wait_for},
    worker_command::{assert_logged, events, worker_bin, worker_command},
    worker_process::WorkerProcess,
};

use agent_jobs::SessionId;

/// The queue every test uses (the default one).
pub const QUEUE: &str = "agent-start";
/// The `agent-worker` binary cargo built for these tests.
pub const WORKER_BIN: &str = env!("CARGO_BIN_EXE_agent-worker");
/// `agent.command` (comma-separated) of the stand-in agent built into the worker's binary;
/// append `,--behaviour,<b>` and other options.
pub const TEST_AGENT: &str = concat!(env!("CARGO_BIN_EXE_agent-worker"), ",test-agent");

/// A session heartbeat every second (`session.heartbeat_interval`), for tests that wait for
/// what a heartbeat finds.
pub const HEARTBEAT_EVERY_SECOND: (&str, &str) =
    ("AGENT_WORKER__SESSION__HEARTBEAT_INTERVAL", "1s");

/// One launch attempt per start (`agent.start_attempts`): a failing start fails its job at once.
pub const ONE_ATTEMPT: (&str, &str) = ("AGENT_WORKER__AGENT__START_ATTEMPTS", "1");

/// A session id the test knows to be valid.
pub fn sid(s: &str) -> SessionId {
    SessionId::parse(s).expect("valid test session id")
}
