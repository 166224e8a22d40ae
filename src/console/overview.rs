//! `GET /`: the queue, sessions by state, this replica's rates, the warm pool, workers at a
//! glance with what is wrong with them, Redis's eviction policy when it is risky, the last
//! hour's start-up p50/p99 as a chart ([`startup_chart`]), and the newest dead jobs.
//!
//! [`fetch`] reads through [`inspect`] (the `status` read, the heartbeat index's size, the
//! newest dead jobs) and [`OverviewView::of`] sums them up: what [`render`] shows is already
//! counted, so a new card is a field here and a line there.

use crate::connection::RedisConn;
use agent_jobs::QueueKeys;
use axum::{extract::State, response::Response};
use maud::{Markup, html};

use super::{
    Console, dead,
    format::duration,
    layout::card,
    rates::PerMinute,
    startup_chart::{self, StartupChart},
    visit::{QueryFailed, Visit},
    workers::{WorkerState, off_clock},
};
use crate::{
    clock::{self, unix_now},
    dataset::NO_EVICTION,
    inspect::{self, DeadJobs, QueueCounts, SessionCounts, Status, WorkerRow},
    start_timeline::unix_ms,
};

/// Dead jobs the overview lists as recent failures.
const RECENT_FAILURES: usize = 10;

/// What the overview shows, counted.
#[derive(Debug, Clone, PartialEq)]
pub struct OverviewView {
    /// The queue's name.
    pub queue: String,
    /// Its job counts.
    pub jobs: QueueCounts,
    /// Sessions by state.
    pub sessions: SessionCounts,
    /// Sessions in the workers' heartbeat index.
    pub heartbeating: u64,
    /// This replica's starts and failures per minute (`None` while measuring).
    pub rates: Option<PerMinute>,
    /// The warm pools of the live workers (`None`: no live worker keeps one).
    pub warm_pool: Option<WarmPool>,
    /// Workers alive, of those listed.
    pub alive: usize,
    /// Workers listed.
    pub listed: usize,
    /// Agents on the live workers.
    pub agents: u64,
    /// The `agent.max_agents` of the live workers that take new calls, summed.
    pub capacity: u64,
    /// Live workers that drain (a deploy): they take no new calls.
    pub draining: usize,
    /// Calls still running on them.
    pub draining_calls: u64,
    /// What is wrong with which worker.
    pub problems: Vec<Problem>,
    /// Redis's `maxmemory-policy` when it lets Redis evict keys.
    pub evicting: Option<String>,
    /// The newest dead jobs, and the count of all.
    pub recent: DeadJobs,
    /// The last hour's start-up percentiles (`None` when they could not be read).
    pub startups: Option<StartupChart>,
}

/// Idle warm processes (agents that did their imports and wait for a session,
/// `agent.warm_pool`) of the live workers that keep a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmPool {
    /// Idle warm agents in all.
    pub idle: u64,
    /// Live workers with a pool.
    pub workers: usize,
    /// Of those, the ones with no idle process.
    pub empty: usize,
}

/// Something an operator should look at on one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// No presence for `secs`.
    Silent {
        /// The worker id.
        worker: String,
        /// Seconds since its last presence.
        secs: u64,
    },
    /// As many agents as it may run.
    Full {
        /// The worker id.
        worker: String,
        /// Its agents.
        agents: u64,
        /// Its `agent.max_agents`.
        max: u64,
    },
    /// Its clock is far from Redis's.
    OffClock {
        /// The worker id.
        worker: String,
        /// The offset, in milliseconds.
        offset_ms: i64,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Silent { worker, secs } => {
                write!(f, "{worker} is silent: no presence for {}", duration(*secs))
            }
            Self::Full {
                worker,
                agents,
                max,
            } => write!(f, "{worker} is full: {agents} / {max} agents"),
            Self::OffClock { worker, offset_ms } => {
                write!(f, "{worker} is off-clock: {offset_ms} ms from Redis")
            }
        }
    }
}

impl Problem {
    /// What is wrong with `worker`: silent or full, and off-clock.
    fn of(worker: &WorkerRow) -> Vec<Self> {
        let id = || worker.id.clone();
        let mut out = Vec::new();
        match WorkerState::of(worker) {
            WorkerState::Silent => out.push(Self::Silent {
                worker: id(),
                secs: worker.last_seen_secs,
            }),
            WorkerState::Full { max } => out.push(Self::Full {
                worker: id(),
                agents: worker.agents,
                max,
            }),
            // Not a problem: a deploy. The workers card counts it.
            WorkerState::Draining { .. } | WorkerState::Alive => {}
        }
        if let Some(offset_ms) = off_clock(worker) {
            out.push(Self::OffClock {
                worker: id(),
                offset_ms,
            });
        }
        out
    }
}

impl OverviewView {
    /// The overview of what was read.
    pub fn of(
        status: Status,
        heartbeating: u64,
        rates: Option<PerMinute>,
        recent: DeadJobs,
    ) -> Self {
        let live = || status.workers.iter().filter(|w| w.alive);
        let pooled: Vec<u64> = live().filter_map(|w| w.warm_idle).collect();
        let warm_pool = (!pooled.is_empty()).then(|| WarmPool {
            idle: pooled.iter().sum(),
            workers: pooled.len(),
            empty: pooled.iter().filter(|&&n| n == 0).count(),
        });
        Self {
            heartbeating,
            rates,
            warm_pool,
            alive: live().count(),
            listed: status.workers.len(),
            agents: live().map(|w| w.agents).sum(),
            capacity: live()
                .filter(|w| !is_draining(w))
                .map(|w| w.info.as_ref().map_or(0, |i| i.max_agents))
                .sum(),
            draining: live().filter(|w| is_draining(w)).count(),
            draining_calls: live().filter(|w| is_draining(w)).map(|w| w.agents).sum(),
            problems: status.workers.iter().flat_map(Problem::of).collect(),
            evicting: status.maxmemory_policy.filter(|p| p != NO_EVICTION),
            recent,
            startups: None,
            queue: status.queue,
            jobs: status.jobs,
            sessions: status.sessions,
        }
    }
}

/// Whether `worker` drains (asked to stop; it takes no new calls).
fn is_draining(worker: &WorkerRow) -> bool {
    matches!(WorkerState::of(worker), WorkerState::Draining { .. })
}

/// The handler.
pub async fn page(State(console): State<Console>, visit: Visit) -> Response {
    let Some(conn) = visit.conn() else {
        return visit.not_connected();
    };
    let rates = console.0.rates.per_minute();
    let view = fetch(conn, &console.0.keys, console.0.orphan_timeout, rates).await;
    visit.show("Overview", view.map(|view| render(&view)))
}

/// Reads the overview through [`inspect`]; `rates` are this replica's, measured apart.
pub async fn fetch(
    conn: &RedisConn,
    keys: &QueueKeys,
    orphan_timeout: std::time::Duration,
    rates: Option<PerMinute>,
) -> Result<OverviewView, QueryFailed> {
    let status = inspect::status(conn, keys, unix_now(), orphan_timeout)
        .await
        .map_err(QueryFailed::reading("the status"))?;
    let recent = inspect::dead_jobs(conn, keys, RECENT_FAILURES)
        .await
        .map_err(QueryFailed::reading("the dead jobs"))?;
    // A count beside the others: the page still says everything else when it fails.
    let heartbeating = inspect::heartbeating(conn).await.unwrap_or(0);
    let mut view = OverviewView::of(status, heartbeating, rates, recent);
    let now_ms = unix_ms(clock::now());
    let since = now_ms.saturating_sub(startup_chart::WINDOW_MS);
    view.startups = inspect::startups::recent_starts(conn, since)
        .await
        .ok()
        .map(|samples| StartupChart::of(&samples, now_ms));
    Ok(view)
}

/// The page's body.
pub fn render(view: &OverviewView) -> Markup {
    let j = &view.jobs;
    html! {
        h2 { "Queue " small { (view.queue) } }
        div class="cards" {
            (card("ready", j.ready, None))
            (card("scheduled", j.scheduled, None))
            (card("inflight", j.inflight, None))
            (card("done", j.done, None))
            (card("dead", j.dead, None))
        }
        h2 { "Sessions" }
        div class="cards" {
            (card("starting", view.sessions.starting, Some("/sessions?status=starting")))
            (card("ready", view.sessions.ready, Some("/sessions?status=ready")))
            (card("heartbeating", view.heartbeating, None))
        }
        h2 { "Start-up, last hour " small { "all workers" } }
        @match &view.startups {
            Some(chart) => (startup_chart::svg(chart)),
            None => p class="empty" { "The event stream could not be read." },
        }
        h2 { "This replica, per minute" }
        div class="cards" { (rates(view.rates.as_ref())) }
        h2 { "Warm pool" }
        div class="cards" { (warm_pool(view.warm_pool.as_ref())) }
        h2 { "Workers" }
        div class="cards" {
            (card("alive / listed", format!("{} / {}", view.alive, view.listed), Some("/workers")))
            (card("agents / capacity", format!("{} / {}", view.agents, view.capacity), Some("/workers")))
            @if view.draining > 0 {
                (card("draining / calls left", format!("{} / {}", view.draining, view.draining_calls), Some("/workers")))
            }
        }
        @if !view.problems.is_empty() {
            ul class="warn" { @for problem in &view.problems { li { (problem) } } }
        }
        @if let Some(policy) = &view.evicting {
            p class="bad" {
                "Redis maxmemory-policy is " (policy) ": it may evict session records; set \
                 noeviction."
            }
        }
        h2 {
            "Recent failures "
            small { "(" (view.recent.total) " dead in all, " a href="/dead" { "all dead jobs" } ")" }
        }
        (dead::table(&view.recent.jobs, None))
    }
}

/// The rate cards, or why there are none yet.
fn rates(per: Option<&PerMinute>) -> Markup {
    let Some(per) = per else {
        return html! { p class="empty" { "Measuring (needs two readings 10 s apart)." } };
    };
    let over = per.over.as_secs();
    html! {
        @for (label, value) in [
            ("starts", per.rates.starts),
            ("failed attempts", per.rates.failed_attempts),
            ("dead jobs", per.rates.dead),
        ] {
            (card(&format!("{label} (over {over} s)"), format!("{value:.1}"), None))
        }
    }
}

/// The warm pool's cards, or a placeholder when no live worker keeps one.
fn warm_pool(pool: Option<&WarmPool>) -> Markup {
    html! {
        @if let Some(pool) = pool {
            (card("idle warm agents", pool.idle, Some("/workers")))
            (card(
                "workers with a pool / with none idle",
                format!("{} / {}", pool.workers, pool.empty),
                Some("/workers"),
            ))
        } @else {
            div class="card placeholder" {
                "off (agent.warm_pool = 0): every session starts a new agent"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        console::{layout::tests::assert_has, rates::Counts},
        presence::WorkerInfo,
    };

    const HOSTILE: &str = "<script>alert('o')</script>";

    fn worker(id: &str, alive: bool, agents: u64, max: u64, offset: i64) -> WorkerRow {
        WorkerRow {
            id: id.into(),
            last_seen_secs: if alive { 2 } else { 125 },
            agents,
            alive,
            info: Some(WorkerInfo {
                host: "h".into(),
                version: "v".into(),
                max_agents: max,
                clock_offset_ms: offset,
                started_at: 0,
                draining_since: None,
                agents: Vec::new(),
                zygote: None,
            }),
            warm_idle: alive.then_some(agents % 2),
        }
    }

    fn status() -> Status {
        Status {
            queue: format!("q{HOSTILE}"),
            jobs: QueueCounts {
                ready: 1,
                scheduled: 2,
                inflight: 3,
                done: 4,
                dead: 5,
            },
            sessions: SessionCounts {
                starting: 6,
                ready: 7,
            },
            workers: vec![
                worker(HOSTILE, true, 3, 3, 0),
                worker("roomy", true, 2, 10, 3000),
                worker("gone", false, 0, 10, 0),
            ],
            maxmemory_policy: Some(format!("allkeys-lru{HOSTILE}")),
        }
    }

    #[test]
    fn the_view_counts_live_workers_and_names_their_problems() {
        let view = OverviewView::of(status(), 8, None, DeadJobs::default());
        assert_eq!((view.alive, view.listed), (2, 3));
        assert_eq!((view.agents, view.capacity), (5, 13));
        assert_eq!(
            view.warm_pool,
            Some(WarmPool {
                idle: 1,
                workers: 2,
                empty: 1
            })
        );
        let problems: Vec<String> = view.problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            problems,
            [
                format!("{HOSTILE} is full: 3 / 3 agents"),
                "roomy is off-clock: 3000 ms from Redis".to_owned(),
                "gone is silent: no presence for 2 m 5 s".to_owned(),
            ]
        );
        let mut quiet = status();
        quiet.maxmemory_policy = Some(NO_EVICTION.into());
        quiet.workers.retain(|w| !w.alive);
        let view = OverviewView::of(quiet, 0, None, DeadJobs::default());
        assert_eq!((view.evicting, view.warm_pool), (None, None));
    }

    #[test]
    fn hostile_values_are_text_on_the_overview() {
        let rates = PerMinute {
            rates: Counts {
                starts: 24.0,
                failed_attempts: 0.5,
                dead: 0.0,
            },
            over: Duration::from_secs(30),
        };
        let recent = DeadJobs {
            jobs: vec![inspect::DeadJob {
                task_id: "t1".into(),
                session_id: None,
                error: HOSTILE.into(),
                failed_at: None,
            }],
            total: 12,
        };
        let html = render(&OverviewView::of(status(), 8, Some(rates), recent)).into_string();
        assert!(!html.contains("<script"), "{html}");
        assert_has(
            &html,
            &[
                "<li>&lt;script&gt;alert('o')&lt;/script&gt; is full: 3 / 3 agents</li>",
                "<small>q&lt;script&gt;",
                "maxmemory-policy is allkeys-lru&lt;script&gt;",
                "<div class=\"card\"><b><a href=\"/sessions?status=ready\">7</a></b>ready</div>",
                "<b>24.0</b>starts (over 30 s)",
                "<b><a href=\"/workers\">5 / 13</a></b>agents / capacity",
                "(12 dead in all, ",
                "<td>t1</td>",
                "<b><a href=\"/workers\">1</a></b>idle warm agents",
            ],
        );
        assert!(!html.contains("placeholder"), "{html}");
    }

    #[test]
    fn without_rates_or_a_pool_the_overview_says_why() {
        let mut quiet = status();
        quiet.workers.clear();
        let html = render(&OverviewView::of(quiet, 0, None, DeadJobs::default())).into_string();
        assert_has(
            &html,
            &[
                "Measuring (needs two readings 10 s apart).",
                "card placeholder\">off (agent.warm_pool = 0)",
                "<p class=\"empty\">No dead jobs.</p>",
            ],
        );
        assert!(!html.contains("<ul"), "{html}");
    }
}
