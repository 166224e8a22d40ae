//! How an agent process ended: [`AgentExit`], its exit code or the signal that killed it, and
//! whether its memory limit ended it.
//!
//! Near a leaf (it names [`MemoryLimitHit`] from the limits leaf): the process owner produces
//! it, the launcher interface and the supervisor pass it on, and the session store records it
//! (`exitCode` / `exitSignal`). It depends on nothing else of the agent's, so all of them can
//! name it without depending on each other.

use std::{fmt, os::unix::process::ExitStatusExt, process::ExitStatus};

use super::limits::MemoryLimitHit;

/// How an agent process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentExit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// Its tree reached its memory limit: the agent was killed (`signal`), or it exited
    /// (`code`, not 0) after the limit killed a process of its.
    MemoryLimit {
        /// The limit and who enforced it.
        hit: MemoryLimitHit,
        /// The exit code, if it exited.
        code: Option<i32>,
        /// The signal, if it was killed.
        signal: Option<i32>,
    },
}

impl AgentExit {
    /// This exit, marked as caused by `hit`.
    pub fn limited_by(self, hit: MemoryLimitHit) -> Self {
        match self {
            Self::Code(code) => Self::MemoryLimit {
                hit,
                code: Some(code),
                signal: None,
            },
            Self::Signal(signal) => Self::MemoryLimit {
                hit,
                code: None,
                signal: Some(signal),
            },
            limited @ Self::MemoryLimit { .. } => limited,
        }
    }

    /// Whether it exited with code 0 (a normal end).
    pub fn is_clean(self) -> bool {
        self == Self::Code(0)
    }
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
            Self::MemoryLimit { hit, .. } => write!(f, "{hit}"),
        }
    }
}
