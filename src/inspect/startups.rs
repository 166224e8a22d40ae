//! The last hour's starts, fleet-wide, for the console's start-up chart: the `ready` events
//! of the event stream (`agent-worker:events`), which carry each start's phase times on
//! Redis's clock ([`crate::start_timeline`]). One `XREVRANGE` from the newest entry back to
//! the window's start, bounded by a count (the stream itself is bounded by `events.max_len`).

use crate::connection::RedisConn;
use agent_jobs::keys::EVENTS;

/// Stream entries read at most (ready events and every other kind).
const MAX_ENTRIES: usize = 10_000;

/// One ready start: when it was ready, and how long the caller waited for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartSample {
    /// The ready line, unix ms on Redis's clock.
    pub ready_ms: u64,
    /// The producer's enqueue (or, without one, the claim) to the ready line, in ms.
    pub took_ms: u64,
}

/// The starts that were ready after `since_ms` (unix ms), newest first; events written by
/// workers without phase times are skipped.
pub async fn recent_starts(
    conn: &RedisConn,
    since_ms: u64,
) -> redis::RedisResult<Vec<StartSample>> {
    let entries: Vec<(String, Vec<String>)> = redis::cmd("XREVRANGE")
        .arg(EVENTS)
        .arg("+")
        .arg(since_ms)
        .arg("COUNT")
        .arg(MAX_ENTRIES)
        .query_async(&mut conn.clone())
        .await?;
    Ok(entries
        .iter()
        .filter_map(|(_, fields)| sample(fields))
        .collect())
}

/// A `ready` event's sample (fields as stored: untrusted).
fn sample(fields: &[String]) -> Option<StartSample> {
    let field = |name: &str| {
        fields
            .chunks_exact(2)
            .find(|pair| pair[0] == name)
            .map(|pair| pair[1].as_str())
    };
    let number = |name: &str| field(name)?.parse::<u64>().ok();
    if field("status") != Some("ready") {
        return None;
    }
    let ready_ms = number("ready_ms")?;
    let from = number("enqueued_ms").or_else(|| number("claimed_ms"))?;
    Some(StartSample {
        ready_ms,
        took_ms: ready_ms.checked_sub(from)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn ready_events_with_phase_times_are_samples() {
        let ready = strings(&[
            "status",
            "ready",
            "enqueued_ms",
            "1000",
            "claimed_ms",
            "1200",
            "ready_ms",
            "1900",
        ]);
        assert_eq!(
            sample(&ready),
            Some(StartSample {
                ready_ms: 1900,
                took_ms: 900
            })
        );
        let claimed_only = strings(&["status", "ready", "claimed_ms", "1200", "ready_ms", "1900"]);
        assert_eq!(sample(&claimed_only).map(|s| s.took_ms), Some(700));
        for other in [
            strings(&["status", "starting", "claimed_ms", "1", "ready_ms", "2"]),
            strings(&["status", "ready", "ts", "5"]),
            strings(&["status", "ready", "claimed_ms", "9", "ready_ms", "2"]),
            strings(&["status", "ready", "claimed_ms", "x", "ready_ms", "2"]),
        ] {
            assert_eq!(sample(&other), None, "{other:?}");
        }
    }
}
