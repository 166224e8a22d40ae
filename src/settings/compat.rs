//! `[compat]`: what the original system wrote that its orchestrator still reads.

use serde::Deserialize;

/// `[compat]`: what the original system wrote that its orchestrator still reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompatSettings {
    /// Write the original worker's `metrics:agent:*` keys (served by the orchestrator's
    /// `/api/metrics/agent`), in the same script calls that record starts.
    pub legacy_metrics: bool,
}
