//! Percentiles of one run, and the spread of repeated runs.

/// Samples of one measurement, sorted.
pub struct Dist(Vec<f64>);

impl Dist {
    pub fn new(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        Self(samples)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Nearest-rank percentile (`p` in 0..=100): a value that was actually observed.
    pub fn pct(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }

    pub fn max(&self) -> f64 {
        self.0.last().copied().unwrap_or(f64::NAN)
    }
}

/// Median and range of a figure measured in several runs.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl Spread {
    pub fn of(values: &[f64]) -> Self {
        let d = Dist::new(values.to_vec());
        Self {
            median: d.pct(50.0),
            min: d.0.first().copied().unwrap_or(f64::NAN),
            max: d.max(),
            runs: d.len(),
        }
    }

    /// `min–max over n runs (±x %)`, the half-range relative to the median.
    pub fn describe(&self, unit: &str, decimals: usize) -> String {
        let half = (self.max - self.min) / 2.0 / self.median * 100.0;
        format!(
            "{:.*}–{:.*}{unit} over {} runs (±{half:.0} %)",
            decimals, self.min, decimals, self.max, self.runs
        )
    }
}

/// Thousands separators for counts and rates: 12,345.
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.round());
    let (sign, digits) = digits
        .strip_prefix('-')
        .map_or(("", digits.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}
