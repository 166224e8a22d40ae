//! The results table: every figure with its target beside it. A report, never an assertion.

use std::fmt::Write as _;

use crate::{
    harness::CpuSplit,
    stats::{Spread, thousands},
};

/// One line of the results table.
pub struct Row {
    pub part: &'static str,
    pub metric: String,
    pub value: String,
    pub spread: String,
    pub target: String,
    /// `Some(true)` met, `Some(false)` missed, `None` for figures without a target.
    pub met: Option<bool>,
}

impl Row {
    /// A figure reported for context, without a target.
    pub fn info(part: &'static str, metric: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            part,
            metric: metric.into(),
            value: value.into(),
            spread: String::new(),
            target: String::new(),
            met: None,
        }
    }

    /// A figure with its target; `met` says whether the measured value reaches it.
    pub fn target(
        part: &'static str,
        metric: impl Into<String>,
        value: impl Into<String>,
        target: impl Into<String>,
        met: bool,
    ) -> Self {
        Self::info(part, metric, value).against(target, met)
    }

    /// A rate measured in several runs: its median (per second), its spread beside it.
    pub fn rate(part: &'static str, metric: impl Into<String>, rate: &Spread) -> Self {
        Self::info(part, metric, thousands(rate.median)).spread(rate.describe("", 0))
    }

    /// Where the CPU of a run went, and per unit of its `n` units of work.
    pub fn cpu(
        part: &'static str,
        metric: impl Into<String>,
        split: &CpuSplit,
        n: usize,
        unit: &str,
    ) -> Self {
        Self::info(part, metric, split.describe()).spread(split.per(n, unit))
    }

    /// This figure with its target; `met` says whether the measured value reaches it.
    pub fn against(mut self, target: impl Into<String>, met: bool) -> Self {
        self.target = target.into();
        self.met = Some(met);
        self
    }

    pub fn spread(mut self, spread: impl Into<String>) -> Self {
        self.spread = spread.into();
        self
    }

    /// A part that could not run: its error takes the place of the figures.
    pub fn failed(part: &'static str, error: &anyhow::Error) -> Self {
        Self::info(part, "failed", format!("{error:#}"))
    }
}

/// The table as Markdown, ready for BENCHMARKS.md.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str("| part | metric | result | spread | target | |\n");
    out.push_str("|---|---|---|---|---|---|\n");
    for row in rows {
        let verdict = match row.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            row.part, row.metric, row.value, row.spread, row.target, verdict
        );
    }
    out
}
