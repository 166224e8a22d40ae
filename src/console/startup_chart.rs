//! The overview's start-up chart: the last hour's starts of the whole fleet (read through
//! [`crate::inspect::startups`]), in twelve five-minute buckets, each bucket's p50 and p99 of
//! the time a caller waited (the producer's enqueue, or the claim when it recorded none, to
//! the ready line), drawn as two lines of a small inline SVG (no script).

use maud::{Markup, html};

use crate::inspect::startups::StartSample;

/// The chart's window and its buckets.
pub const WINDOW_MS: u64 = 3_600_000;
const BUCKETS: usize = 12;
const BUCKET_MS: u64 = WINDOW_MS / BUCKETS as u64;

/// Drawing size, in SVG units.
const WIDTH: u64 = 480;
const HEIGHT: u64 = 120;
/// Room for the axis labels.
const LEFT: u64 = 60;
const BOTTOM: u64 = 16;

/// One five-minute bucket: its starts' p50 and p99 (ms), when it had any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bucket {
    /// Starts in the bucket.
    pub starts: usize,
    /// Their median wait.
    pub p50: Option<u64>,
    /// Their 99th percentile.
    pub p99: Option<u64>,
}

/// The chart's numbers, oldest bucket first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupChart {
    /// The twelve buckets.
    pub buckets: Vec<Bucket>,
    /// The hour's p50 and p99 over every start in it.
    pub hour: Bucket,
}

impl StartupChart {
    /// The chart of `samples` for the hour up to `now_ms`.
    pub fn of(samples: &[StartSample], now_ms: u64) -> Self {
        let since = now_ms.saturating_sub(WINDOW_MS);
        let mut per: Vec<Vec<u64>> = vec![Vec::new(); BUCKETS];
        for sample in samples.iter().filter(|s| s.ready_ms > since) {
            let index = ((sample.ready_ms - since - 1) / BUCKET_MS) as usize;
            per[index.min(BUCKETS - 1)].push(sample.took_ms);
        }
        let mut all: Vec<u64> = per.iter().flatten().copied().collect();
        Self {
            hour: bucket(&mut all),
            buckets: per.iter_mut().map(|b| bucket(b)).collect(),
        }
    }
}

fn bucket(took: &mut [u64]) -> Bucket {
    took.sort_unstable();
    Bucket {
        starts: took.len(),
        p50: percentile(took, 50),
        p99: percentile(took, 99),
    }
}

/// The nearest-rank percentile `p` of sorted `values`.
fn percentile(sorted: &[u64], p: usize) -> Option<u64> {
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

/// The chart's SVG, or a line saying there was no start in the hour.
pub fn svg(chart: &StartupChart) -> Markup {
    if chart.hour.starts == 0 {
        return html! { p class="empty" { "No start in the last hour (or only by older workers)." } };
    }
    let top = chart
        .hour
        .p99
        .unwrap_or(1)
        .max(
            chart
                .buckets
                .iter()
                .filter_map(|b| b.p99)
                .max()
                .unwrap_or(1),
        )
        .max(1);
    let plot_h = HEIGHT - BOTTOM - 4;
    let x = |i: usize| LEFT + (i as u64 * (WIDTH - LEFT - 8)) / (BUCKETS as u64 - 1);
    let y = |ms: u64| 4 + plot_h - ms.min(top) * plot_h / top;
    let line = |pick: fn(&Bucket) -> Option<u64>| -> String {
        let points = chart.buckets.iter().enumerate();
        let points = points.filter_map(|(i, b)| Some(format!("{},{}", x(i), y(pick(b)?))));
        points.collect::<Vec<_>>().join(" ")
    };
    html! {
        figure class="startup-chart" {
            svg xmlns="http://www.w3.org/2000/svg" role="img"
                viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) width=(WIDTH) height=(HEIGHT)
                aria-label="start-up p50 and p99, last hour" {
                line class="axis" x1=(LEFT) y1=(4 + plot_h) x2=(WIDTH - 8) y2=(4 + plot_h) {}
                line class="axis" x1=(LEFT) y1="4" x2=(LEFT) y2=(4 + plot_h) {}
                text x="0" y="14" { (seconds(top)) }
                text x="0" y=(4 + plot_h) { "0" }
                text x=(LEFT) y=(HEIGHT - 2) { "−60 min" }
                text x=(WIDTH - 40) y=(HEIGHT - 2) { "now" }
                polyline class="p99" fill="none" stroke-width="2" points=(line(|b| b.p99)) {}
                polyline class="p50" fill="none" stroke-width="2" points=(line(|b| b.p50)) {}
            }
            figcaption {
                (chart.hour.starts) " starts in the last hour, enqueue to ready: p50 "
                (seconds(chart.hour.p50.unwrap_or(0))) ", p99 " (seconds(chart.hour.p99.unwrap_or(0)))
                " (blue p50, red p99, per 5 minutes)"
            }
        }
    }
}

/// `ms` as seconds with a fraction.
fn seconds(ms: u64) -> String {
    format!("{:.2} s", ms as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ready_ms: u64, took_ms: u64) -> StartSample {
        StartSample { ready_ms, took_ms }
    }

    #[test]
    fn starts_fall_in_five_minute_buckets_with_their_percentiles() {
        let now = 10 * WINDOW_MS;
        let mut samples: Vec<StartSample> = (1..=100).map(|n| at(now - 1, n * 10)).collect();
        samples.push(at(now - WINDOW_MS + 1, 5_000));
        // Older than the hour: left out.
        samples.push(at(now - WINDOW_MS, 99_999));
        let chart = StartupChart::of(&samples, now);
        assert_eq!(chart.buckets.len(), 12);
        assert_eq!(chart.buckets[0].starts, 1);
        assert_eq!(chart.buckets[11].p50, Some(500));
        assert_eq!(chart.buckets[11].p99, Some(990));
        assert_eq!(chart.hour.starts, 101);
        assert_eq!(chart.hour.p99, Some(1000));
        let html = svg(&chart).into_string();
        for expected in [
            "<polyline class=\"p99\"",
            "<polyline class=\"p50\"",
            "101 starts in the last hour",
            "p50 0.51 s",
        ] {
            assert!(html.contains(expected), "{expected}: {html}");
        }
        let empty = svg(&StartupChart::of(&[], now)).into_string();
        assert!(empty.contains("No start in the last hour"), "{empty}");
    }
}
