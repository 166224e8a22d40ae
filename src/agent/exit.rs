//! How an agent process ended: [`AgentExit`], its exit code or the signal that killed it.
//!
//! A leaf: the process owner produces it, the launcher interface and the supervisor pass it
//! on, and the session store records it (`exitCode` / `exitSignal`). It depends on nothing of
//! the agent's, so all of them can name it without depending on each other.

use std::{fmt, os::unix::process::ExitStatusExt, process::ExitStatus};

/// How an agent process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentExit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl From<ExitStatus> for AgentExit {
    fn from(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => Self::Code(code),
            (None, Some(signal)) => Self::Signal(signal),
            (None, None) => Self::Code(-1),
        }
    }
}

impl fmt::Display for AgentExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code(code) => write!(f, "code {code}"),
            Self::Signal(signal) => write!(f, "signal {signal}"),
        }
    }
}
