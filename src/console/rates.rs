//! Starts and failures per minute for the overview, from the same counters `/metrics` exports.
//!
//! A counter's rate needs two readings some time apart. [`sample_loop`] reads this process's
//! exposition (the recorder's own render, no Redis) every [`SAMPLE_EVERY`] and keeps the
//! readings of the last [`WINDOW`]; [`Rates::per_minute`] is the increase between the oldest
//! and the newest reading, scaled to a minute. These are this replica's numbers: the fleet's
//! are Grafana's (`deploy/grafana/agent-worker.json`), which sums the same series.

use std::{
    collections::VecDeque,
    sync::Mutex,
    time::{Duration, Instant},
};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::{AGENT_SPAWN_FAILURES_TOTAL, AGENT_STARTUP_SECONDS, JOBS_TOTAL};

/// How often the counters are read.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// How far back the rate looks.
pub const WINDOW: Duration = Duration::from_secs(60);

/// One reading of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    /// Agents that became ready (the start-up histogram's count).
    pub starts: f64,
    /// Failed launch attempts.
    pub failed_attempts: f64,
    /// Jobs that went dead (starts that failed for good).
    pub dead: f64,
}

impl Counts {
    /// The counters in a Prometheus text exposition (absent series read as 0).
    pub fn parse(exposition: &str) -> Self {
        let dead = format!("{JOBS_TOTAL}{{outcome=\"dead\"}}");
        Self {
            starts: value(exposition, &format!("{AGENT_STARTUP_SECONDS}_count")),
            failed_attempts: value(exposition, AGENT_SPAWN_FAILURES_TOTAL),
            dead: value(exposition, &dead),
        }
    }
}

/// The value of the unlabelled (or exactly labelled) sample `series`.
fn value(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|line| {
            line.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// Per-minute rates over the last [`WINDOW`] (or less, right after start).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerMinute {
    /// The rates.
    pub rates: Counts,
    /// The time they were measured over.
    pub over: Duration,
}

/// The readings of the last [`WINDOW`].
#[derive(Debug, Default)]
pub struct Rates {
    samples: Mutex<VecDeque<(Instant, Counts)>>,
}

impl Rates {
    /// Records a reading taken at `at`, dropping those older than [`WINDOW`] before it.
    pub fn record(&self, at: Instant, counts: Counts) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.push_back((at, counts));
        while samples
            .front()
            .is_some_and(|(t, _)| at.duration_since(*t) > WINDOW)
        {
            samples.pop_front();
        }
    }

    /// The rates, once two readings at least [`SAMPLE_EVERY`] apart exist.
    pub fn per_minute(&self) -> Option<PerMinute> {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let (first, last) = (samples.front()?, samples.back()?);
        let over = last.0.duration_since(first.0);
        if over < SAMPLE_EVERY {
            return None;
        }
        // A counter only falls when the process restarts, which also empties this window.
        let per_minute = |a: f64, b: f64| (b - a).max(0.0) * 60.0 / over.as_secs_f64();
        Some(PerMinute {
            rates: Counts {
                starts: per_minute(first.1.starts, last.1.starts),
                failed_attempts: per_minute(first.1.failed_attempts, last.1.failed_attempts),
                dead: per_minute(first.1.dead, last.1.dead),
            },
            over,
        })
    }
}

/// Every [`SAMPLE_EVERY`] until `shutdown`: read the counters from `handle` into `rates`.
pub async fn sample_loop(
    handle: PrometheusHandle,
    rates: std::sync::Arc<Rates>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(SAMPLE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        rates.record(Instant::now(), Counts::parse(&handle.render()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_from_two_readings_of_the_exposition() {
        let text = "agent_worker_agent_startup_seconds_count 12\n\
                    agent_worker_agent_spawn_failures_total 3\n\
                    agent_worker_jobs_total{outcome=\"done\"} 12\n\
                    agent_worker_jobs_total{outcome=\"dead\"} 1\n";
        let counts = Counts::parse(text);
        assert_eq!(
            counts,
            Counts {
                starts: 12.0,
                failed_attempts: 3.0,
                dead: 1.0
            }
        );
        let rates = Rates::default();
        let t0 = Instant::now();
        rates.record(t0, Counts::default());
        assert_eq!(rates.per_minute(), None);
        rates.record(t0 + Duration::from_secs(30), counts);
        let per = rates.per_minute().unwrap();
        assert_eq!(per.over, Duration::from_secs(30));
        assert_eq!(per.rates.starts, 24.0);
        assert_eq!(per.rates.dead, 2.0);
        // Readings older than the window are dropped.
        rates.record(t0 + Duration::from_secs(80), counts);
        let per = rates.per_minute().unwrap();
        assert_eq!((per.over, per.rates.starts), (Duration::from_secs(50), 0.0));
    }
}
