//! One start's phase times, collected in one place: enqueued, claimed, spawned (or handed
//! off), alive, ready. From them come the phase histograms (`/metrics`), the fields of the
//! `ready` event and of the session record's `startTimeline` (which the console draws), and
//! the phase spans of the start's trace ([`crate::telemetry::start_trace`]).
//!
//! Every instant is unix milliseconds on Redis's clock, so timelines written by different
//! replicas line up with each other and with the event stream's own `ts`:
//! - `enqueued`: the producer's record (`enqueued_at` in the job's meta hash, written by the
//!   enqueue script from Redis `TIME`), never a replica's clock; absent for producers that do
//!   not write it, and then there is no queue wait;
//! - `claimed`: the claim, on [`crate::clock::now`] (the local clock plus its measured offset
//!   to Redis);
//! - `spawned`, `alive`, `ready`: the claim plus what this process measured on its monotonic
//!   clock since, so a clock step during a start cannot bend the phases.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{agent::launcher::RunningAgent, metrics as observability};

/// The session record's field holding a ready agent's timeline, as JSON.
pub const TIMELINE_FIELD: &str = "startTimeline";

/// The claim of a start: when, on both clocks, and the producer's enqueue time.
#[derive(Debug, Clone, Copy)]
pub struct Claimed {
    /// The claim on this process's monotonic clock.
    pub at: tokio::time::Instant,
    /// The claim on Redis's clock, unix ms.
    pub unix_ms: u64,
    /// The producer's enqueue time, unix ms on Redis's clock, if it recorded one.
    pub enqueued_ms: Option<u64>,
}

impl Claimed {
    /// A claim now, of a job enqueued at `enqueued_ms`.
    pub fn now(enqueued_ms: Option<u64>) -> Self {
        Self {
            at: tokio::time::Instant::now(),
            unix_ms: unix_ms(crate::clock::now()),
            enqueued_ms,
        }
    }
}

/// One ready start's phases, unix ms on Redis's clock (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartTimeline {
    /// How the agent started: `cold`, `warm` or `forked`.
    pub start: String,
    /// The producer enqueued the job, if it recorded when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enqueued: Option<u64>,
    /// This worker claimed the session (the attempt that started the agent).
    pub claimed: u64,
    /// The agent was spawned, or a warm process handed its session.
    pub spawned: u64,
    /// Its output showed it alive (its ready line, without an alive line).
    pub alive: u64,
    /// Its ready line.
    pub ready: u64,
}

impl StartTimeline {
    /// The timeline of `agent`, started after `claimed`.
    pub fn of(claimed: &Claimed, agent: &RunningAgent) -> Self {
        let since_claim = |at: tokio::time::Instant| {
            let offset = at.saturating_duration_since(claimed.at).as_millis() as u64;
            claimed.unix_ms + offset
        };
        let spawned = since_claim(agent.spawned_at);
        let alive = since_claim(agent.alive_at).max(spawned);
        let ready = (spawned + agent.startup.as_millis() as u64).max(alive);
        Self {
            start: agent.start.as_str().to_owned(),
            enqueued: claimed.enqueued_ms,
            claimed: claimed.unix_ms,
            spawned,
            alive,
            ready,
        }
    }

    /// Enqueue to claim (none without an enqueue time, or when Redis's clock seemed to go
    /// back between the two).
    pub fn queue_wait(&self) -> Option<Duration> {
        let enqueued = self.enqueued?;
        (self.claimed >= enqueued).then(|| ms(self.claimed - enqueued))
    }

    /// Claim to spawn (or handoff).
    pub fn claim_to_spawned(&self) -> Duration {
        ms(self.spawned.saturating_sub(self.claimed))
    }

    /// Spawn to alive.
    pub fn spawned_to_alive(&self) -> Duration {
        ms(self.alive.saturating_sub(self.spawned))
    }

    /// Alive to ready.
    pub fn alive_to_ready(&self) -> Duration {
        ms(self.ready.saturating_sub(self.alive))
    }

    /// The first instant of the timeline: the enqueue, else the claim.
    pub fn first(&self) -> u64 {
        self.enqueued.unwrap_or(self.claimed).min(self.claimed)
    }

    /// Records the phase histograms, labelled by how the agent started.
    pub fn record_metrics(&self) {
        observability::start_phases(
            &self.start,
            self.queue_wait(),
            [
                self.claim_to_spawned(),
                self.spawned_to_alive(),
                self.alive_to_ready(),
            ],
        );
    }

    /// The `ready` event's extra fields: `start` and each instant as `<phase>_ms`.
    pub fn event_fields(&self) -> Vec<(&'static str, String)> {
        let mut fields = vec![("start", self.start.clone())];
        if let Some(enqueued) = self.enqueued {
            fields.push(("enqueued_ms", enqueued.to_string()));
        }
        fields.extend([
            ("claimed_ms", self.claimed.to_string()),
            ("spawned_ms", self.spawned.to_string()),
            ("alive_ms", self.alive.to_string()),
            ("ready_ms", self.ready.to_string()),
        ]);
        fields
    }

    /// The record's [`TIMELINE_FIELD`] value.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a timeline always serializes")
    }

    /// A record's [`TIMELINE_FIELD`] value, if it is one (it comes from Redis: untrusted).
    pub fn from_json(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }
}

/// Unix milliseconds of `time`.
pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeline(enqueued: Option<u64>) -> StartTimeline {
        StartTimeline {
            start: "warm".into(),
            enqueued,
            claimed: 1_000,
            spawned: 1_020,
            alive: 1_500,
            ready: 1_900,
        }
    }

    #[test]
    fn phases_are_the_differences_of_the_instants() {
        let t = timeline(Some(400));
        assert_eq!(t.queue_wait(), Some(Duration::from_millis(600)));
        assert_eq!(t.claim_to_spawned(), Duration::from_millis(20));
        assert_eq!(t.spawned_to_alive(), Duration::from_millis(480));
        assert_eq!(t.alive_to_ready(), Duration::from_millis(400));
        assert_eq!(t.first(), 400);
        assert_eq!(timeline(None).queue_wait(), None);
        assert_eq!(timeline(None).first(), 1_000);
        // An enqueue "after" the claim (a producer's bad record) is no queue wait.
        assert_eq!(timeline(Some(2_000)).queue_wait(), None);
    }

    #[test]
    fn the_record_field_round_trips_and_junk_is_refused() {
        let t = timeline(Some(400));
        assert_eq!(StartTimeline::from_json(&t.to_json()), Some(t.clone()));
        assert_eq!(StartTimeline::from_json("{\"start\":1}"), None);
        let fields = t.event_fields();
        assert_eq!(fields[0], ("start", "warm".to_owned()));
        assert!(fields.contains(&("enqueued_ms", "400".to_owned())));
        assert!(fields.contains(&("ready_ms", "1900".to_owned())));
    }
}
