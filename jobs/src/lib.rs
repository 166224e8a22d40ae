//! # agent-jobs: the agent-start job contract
//!
//! What every producer of agent-start jobs shares with agent-worker. A Rust orchestrator can
//! depend on this crate alone; producers in other languages follow `jobs/README.md`.
//!
//! ## Layout
//! - [`session_id`]: [`SessionId`], the validated id that becomes part of Redis key names.
//! - [`payload`]: [`AgentStart`], its canonical wire form and a decoder that names what is
//!   wrong with a bad payload.
//! - [`keys`]: every Redis key name, for the apalis-redis queue ([`QueueKeys`]) and for a
//!   session ([`SessionKeys`]).
//! - [`producer`]: [`Producer`], which enqueues jobs straight onto the ready list, once per
//!   session, and wakes idle workers.
//! - [`session_config`]: writing `session:<id>:config` as the orchestrator does.
//! - [`session_state`]: the session record's statuses ([`SessionStatus`]) and field names.
//! - [`trace_context`]: the shape checks of a job's W3C `traceparent` and `tracestate`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

/// Version of the wire contract described in `jobs/README.md`. Bumped on any change a producer
/// in another language must follow. Version 2 added the payload's optional `traceparent`,
/// `tracestate` and `start_by` and the meta's `enqueued_at`; version 1 payloads and records
/// still work.
pub const CONTRACT_VERSION: u32 = 2;

pub mod keys;
pub mod payload;
pub mod producer;
pub mod session_config;
pub mod session_id;
pub mod session_state;
pub mod trace_context;

pub use keys::{QueueKeys, SessionKeys};
pub use payload::{AgentStart, PayloadError, PayloadWarning};
pub use producer::{Enqueued, ProduceError, Producer};
pub use session_config::{SessionConfigInput, write_session_config};
pub use session_id::{SessionId, SessionIdError};
pub use session_state::SessionStatus;
pub use trace_context::TraceContextError;
