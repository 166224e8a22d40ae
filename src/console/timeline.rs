//! One start's timeline as a small inline SVG (no script, as the console's CSP requires): a
//! bar per phase (queue wait, claim to spawn, spawn to alive, alive to ready), placed on one
//! time axis from the first instant to the ready line, each labelled with its duration.
//! Drawn from the session record's `startTimeline` ([`StartTimeline`]), which a replica wrote
//! on Redis's clock; a record without one (an older worker, a start not ready yet) has none.

use maud::{Markup, html};

use crate::start_timeline::StartTimeline;

/// The drawing's width and one row's height, in SVG units (it scales with the page).
const WIDTH: u64 = 640;
const ROW: u64 = 18;
/// Room on the left for the phase names.
const LABELS: u64 = 150;

/// One bar: its name, class (its colour in the page's style), start and end (ms).
struct Bar {
    name: &'static str,
    class: &'static str,
    from: u64,
    to: u64,
}

/// The phases of `timeline` as bars, in order.
fn bars(timeline: &StartTimeline) -> Vec<Bar> {
    let mut bars = Vec::with_capacity(4);
    if let Some(enqueued) = timeline.enqueued.filter(|e| *e <= timeline.claimed) {
        bars.push(Bar {
            name: "queue wait",
            class: "phase-queue",
            from: enqueued,
            to: timeline.claimed,
        });
    }
    bars.extend([
        Bar {
            name: "claim → spawned",
            class: "phase-claim",
            from: timeline.claimed,
            to: timeline.spawned,
        },
        Bar {
            name: "spawned → alive",
            class: "phase-alive",
            from: timeline.spawned,
            to: timeline.alive,
        },
        Bar {
            name: "alive → ready",
            class: "phase-ready",
            from: timeline.alive,
            to: timeline.ready,
        },
    ]);
    bars
}

/// The SVG of `timeline` (see the module docs), with a caption of the whole and the mode.
pub fn svg(timeline: &StartTimeline) -> Markup {
    let bars = bars(timeline);
    let first = timeline.first();
    let span = timeline.ready.saturating_sub(first).max(1);
    let scale = |ms: u64| LABELS + ms.saturating_sub(first) * (WIDTH - LABELS - 60) / span;
    let height = ROW * bars.len() as u64 + 4;
    html! {
        figure class="timeline" {
            svg xmlns="http://www.w3.org/2000/svg" role="img"
                viewBox=(format!("0 0 {WIDTH} {height}")) width=(WIDTH) height=(height)
                aria-label="start-up timeline" {
                @for (row, bar) in bars.iter().enumerate() {
                    @let y = row as u64 * ROW + 2;
                    @let (x, end) = (scale(bar.from), scale(bar.to.max(bar.from)));
                    g class=(bar.class) {
                        text x="0" y=(y + 12) { (bar.name) }
                        rect x=(x) y=(y) width=((end - x).max(1)) height=(ROW - 4) {
                            title { (bar.name) ": " (millis(bar.to.saturating_sub(bar.from))) }
                        }
                        text x=(end + 4) y=(y + 12) { (millis(bar.to.saturating_sub(bar.from))) }
                    }
                }
            }
            figcaption {
                (timeline.start) " start, "
                @if timeline.enqueued.is_some() { "enqueue" } @else { "claim" }
                " to ready in " (millis(span))
            }
        }
    }
}

/// `ms` as the console shows a short duration.
fn millis(ms: u64) -> String {
    if ms < 10_000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phase_is_a_bar_on_one_axis() {
        let timeline = StartTimeline {
            start: "warm".into(),
            enqueued: Some(1_000),
            claimed: 1_400,
            spawned: 1_420,
            alive: 1_420,
            ready: 2_000,
        };
        let html = svg(&timeline).into_string();
        for expected in [
            "<svg xmlns=\"http://www.w3.org/2000/svg\"",
            "queue wait",
            "claim → spawned",
            "spawned → alive",
            "alive → ready",
            "<title>queue wait: 400 ms</title>",
            "<title>alive → ready: 580 ms</title>",
            "warm start, enqueue to ready in 1000 ms",
            // The queue wait starts at the left edge; the ready bar ends at the right.
            "<rect x=\"150\" y=\"2\" width=\"172\"",
        ] {
            assert!(html.contains(expected), "{expected}: {html}");
        }
        assert!(!html.contains("<script"));
        let no_enqueue = StartTimeline {
            enqueued: None,
            ..timeline
        };
        let html = svg(&no_enqueue).into_string();
        assert!(!html.contains("queue wait") && html.contains("claim to ready in 600 ms"));
    }
}
