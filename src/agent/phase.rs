//! An agent's start-up phases (`Phase`) and what they are judged by ([`Readiness`]), as
//! contract §4 has them: *alive* when a line contains an alive pattern (imports done), *ready*
//! when a line contains a ready pattern (connected), each within its own deadline from the
//! spawn. A ready line implies alive.
//!
//! A leaf: the output readers move the phase forward as lines arrive, the readiness wait
//! awaits it, and every start mode (cold, warm, and whatever comes next) judges its process by
//! the same rules, so none of them depends on another for these types.

use std::{sync::Arc, time::Duration};

use crate::settings::AgentSettings;

/// How far an agent's start-up got, as seen in its output. Ordered: ready implies alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    Spawned,
    Alive,
    Ready,
}

/// What the launcher judges start-up by (from `[agent]`).
#[derive(Debug, Clone)]
pub struct Readiness {
    /// A line containing one of these means alive (imports done); empty: no alive phase.
    pub alive_patterns: Arc<[String]>,
    /// Time allowed from spawn to the first alive (or ready) line.
    pub alive_timeout: Duration,
    /// A line containing one of these means ready (connected).
    pub ready_patterns: Arc<[String]>,
    /// Time allowed from spawn to the first ready line.
    pub startup_timeout: Duration,
}

impl Readiness {
    /// From `[agent]` settings.
    pub fn from_settings(agent: &AgentSettings) -> Self {
        Self {
            alive_patterns: agent.alive_patterns.clone().into(),
            alive_timeout: agent.alive_timeout,
            ready_patterns: agent.ready_patterns.clone().into(),
            startup_timeout: agent.startup_timeout,
        }
    }

    /// Only a ready phase: ready when a line contains one of `patterns` within `timeout`.
    pub fn ready_only(patterns: Vec<String>, timeout: Duration) -> Self {
        Self {
            alive_patterns: Arc::from([]),
            alive_timeout: timeout,
            ready_patterns: patterns.into(),
            startup_timeout: timeout,
        }
    }

    /// When the alive phase must have ended, if it ends before the ready deadline.
    pub(crate) fn alive_deadline(
        &self,
        spawned: tokio::time::Instant,
    ) -> Option<tokio::time::Instant> {
        (!self.alive_patterns.is_empty() && self.alive_timeout < self.startup_timeout)
            .then(|| spawned + self.alive_timeout)
    }

    /// The later phase `line` shows, if it shows one beyond `current`.
    pub(crate) fn reached(&self, current: Phase, line: &str) -> Option<Phase> {
        let matches = |patterns: &[String]| patterns.iter().any(|p| line.contains(p.as_str()));
        if current < Phase::Ready && matches(&self.ready_patterns) {
            Some(Phase::Ready)
        } else if current < Phase::Alive && matches(&self.alive_patterns) {
            Some(Phase::Alive)
        } else {
            None
        }
    }
}
