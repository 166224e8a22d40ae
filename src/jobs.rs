//! The work a worker does on its own: the agent-start job, and the two scheduled ones.
//!
//! - [`agent_start`]: an agent-start job: tolerant decoding, the start, and the one
//!   retry-or-abort decision.
//! - [`sweep`]: the stale-session sweep (heartbeat index, atomic re-checked removal, the legacy
//!   `SCAN` migration), once per tick on one replica.
//! - [`retention`]: trimming finished jobs (apalis-redis keeps them forever), once per tick.

pub mod agent_start;
pub mod retention;
pub mod sweep;
