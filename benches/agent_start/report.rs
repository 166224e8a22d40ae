//! The results table: every figure with its target beside it. A report, never an assertion.

use std::fmt::Write as _;

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
        Self {
            target: target.into(),
            met: Some(met),
            ..Self::info(part, metric, value)
        }
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
