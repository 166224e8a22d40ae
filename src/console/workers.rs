//! `GET /workers`: every worker in the presence index, with its host, version, load, state
//! (alive, full, silent) and clock offset. The same read as `agent-worker status`
//! ([`inspect::status`]).

use std::time::Duration;

use crate::connection::RedisConn;
use axum::{extract::State, response::Response};
use maud::{Markup, html};

use super::{
    Console,
    format::{ago, query_value},
    layout,
    visit::{QueryFailed, Visit},
};
use crate::{
    clock::unix_now,
    inspect::{self, WorkerRow},
    presence::WorkerInfo,
};

/// A clock this far from Redis's is flagged (the same threshold as `clock_offset_from_redis`).
pub const OFF_CLOCK_MS: i64 = 2000;

/// What the page shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkersView {
    /// The workers, most recently seen first.
    pub workers: Vec<WorkerRow>,
    /// Unix seconds the ages are counted to.
    pub now: u64,
}

/// How a worker is doing, judged from its presence and what it reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// No presence within the orphan timeout.
    Silent,
    /// Asked to stop (a deploy): fetches nothing, and exits when its last call ends.
    Draining {
        /// Since when (unix seconds).
        since: u64,
    },
    /// Alive with as many agents as its `agent.max_agents`.
    Full {
        /// Its `agent.max_agents`.
        max: u64,
    },
    /// Alive, with room (or of a version that does not report its maximum).
    Alive,
}

impl WorkerState {
    /// The state of `worker`.
    pub fn of(worker: &WorkerRow) -> Self {
        match (worker.alive, &worker.info) {
            (false, _) => Self::Silent,
            (
                true,
                Some(WorkerInfo {
                    draining_since: Some(since),
                    ..
                }),
            ) => Self::Draining { since: *since },
            (true, Some(i)) if i.max_agents > 0 && worker.agents >= i.max_agents => {
                Self::Full { max: i.max_agents }
            }
            (true, _) => Self::Alive,
        }
    }
}

/// The clock offset of `worker` when it is flagged ([`OFF_CLOCK_MS`] or more).
pub fn off_clock(worker: &WorkerRow) -> Option<i64> {
    let offset = worker.info.as_ref()?.clock_offset_ms;
    (offset.abs() >= OFF_CLOCK_MS).then_some(offset)
}

/// The handler.
pub async fn page(State(console): State<Console>, visit: Visit) -> Response {
    let Some(conn) = visit.conn() else {
        return visit.not_connected();
    };
    let view = fetch(conn, &console.0.keys, console.0.orphan_timeout).await;
    visit.show("Workers", view.map(|view| render(&view)))
}

/// Reads the workers (as `status` does).
pub async fn fetch(
    conn: &RedisConn,
    keys: &agent_jobs::QueueKeys,
    orphan_timeout: Duration,
) -> Result<WorkersView, QueryFailed> {
    let now = unix_now();
    let status = inspect::status(conn, keys, now, orphan_timeout)
        .await
        .map_err(QueryFailed::reading("the workers"))?;
    Ok(WorkersView {
        workers: status.workers,
        now,
    })
}

/// The page's body.
pub fn render(view: &WorkersView) -> Markup {
    let rows: Vec<Vec<Markup>> = view.workers.iter().map(|w| row(w, view.now)).collect();
    layout::table(
        &[
            "Worker",
            "Host",
            "Version",
            "Agents / max",
            "Last presence",
            "State",
            "Clock offset",
            "Started",
            "Warm idle / zygote",
        ],
        &rows,
        "No worker has reported its presence.",
    )
}

/// One worker's cells.
fn row(w: &WorkerRow, now: u64) -> Vec<Markup> {
    let info = w.info.as_ref();
    let max = info.map_or("?".into(), |i| i.max_agents.to_string());
    vec![
        html! { (w.id) },
        html! { (info.map_or("-", |i| i.host.as_str())) },
        html! { (info.map_or("-", |i| i.version.as_str())) },
        html! {
            a href={ "/sessions?worker=" (query_value(&w.id)) } { (w.agents) " / " (max) }
        },
        html! { (ago(Some(now.saturating_sub(w.last_seen_secs)), now)) },
        html! {
            @match WorkerState::of(w) {
                WorkerState::Silent => span class="bad" { "silent" },
                WorkerState::Draining { since } => span class="warn" {
                    "draining, " (w.agents) " calls left (began " (ago(Some(since), now)) ")"
                },
                WorkerState::Full { .. } => span class="warn" { "full" },
                WorkerState::Alive => "alive",
            }
        },
        html! {
            @if let Some(info) = info {
                span class=[off_clock(w).map(|_| "bad")] { (info.clock_offset_ms) " ms" }
            } @else {
                "-"
            }
        },
        html! { (ago(info.map(|i| i.started_at), now)) },
        html! {
            @if let Some(z) = info.and_then(|i| i.zygote.as_ref()) {
                span class=[(z.state != "ready").then_some("warn")] title=[z.reason.as_deref()] {
                    "zygote " (z.state)
                    @if let Some(pid) = z.pid { " (pid " (pid) ", " (z.forked) " forked)" }
                }
            } @else {
                (w.warm_idle.map_or("-".into(), |n| n.to_string()))
            }
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::layout::tests::assert_has;
    use crate::presence::WorkerInfo;

    const HOSTILE: &str = "<script>alert('w')</script>";

    fn worker(id: &str, alive: bool, agents: u64, info: Option<WorkerInfo>) -> WorkerRow {
        WorkerRow {
            id: id.into(),
            last_seen_secs: 3,
            agents,
            alive,
            info,
            warm_idle: None,
        }
    }

    fn info(max_agents: u64, clock_offset_ms: i64) -> WorkerInfo {
        WorkerInfo {
            host: HOSTILE.into(),
            version: "\"1.0\" & more".into(),
            max_agents,
            clock_offset_ms,
            started_at: 900,
            draining_since: None,
            agents: Vec::new(),
            zygote: None,
        }
    }

    #[test]
    fn hostile_values_are_text_and_states_are_marked() {
        let view = WorkersView {
            workers: vec![
                worker(HOSTILE, true, 2, Some(info(20, 5))),
                worker("full-one", true, 4, Some(info(4, -2500))),
                worker("quiet", false, 0, None),
            ],
            now: 1000,
        };
        let html = render(&view).into_string();
        assert!(!html.contains("<script"), "{html}");
        assert_has(
            &html,
            &[
                "<td>&lt;script&gt;alert('w')&lt;/script&gt;</td>",
                "&quot;1.0&quot; &amp; more",
                "href=\"/sessions?worker=%3Cscript%3Ealert%28%27w%27%29%3C%2Fscript%3E\">2 / 20</a>",
                "<span>5 ms</span>",
                "<span class=\"bad\">-2500 ms</span>",
                "<span class=\"warn\">full</span>",
                "<span class=\"bad\">silent</span>",
                ">0 / ?</a>",
            ],
        );
        assert!(html.contains("1 m 40 s ago"), "started: {html}");
    }

    #[test]
    fn a_draining_worker_shows_its_calls_left_and_is_not_full() {
        let draining = WorkerInfo {
            draining_since: Some(940),
            ..info(3, 0)
        };
        let view = WorkersView {
            workers: vec![worker("old-replica", true, 3, Some(draining))],
            now: 1000,
        };
        assert_has(
            &render(&view).into_string(),
            &["<span class=\"warn\">draining, 3 calls left (began 1 m 0 s ago)</span>"],
        );
        assert_eq!(
            WorkerState::of(&view.workers[0]),
            WorkerState::Draining { since: 940 }
        );
    }

    #[test]
    fn no_worker_says_so() {
        let html = render(&WorkersView {
            workers: Vec::new(),
            now: 0,
        })
        .into_string();
        assert_eq!(
            html,
            "<p class=\"empty\">No worker has reported its presence.</p>"
        );
    }
}
