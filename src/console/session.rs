//! `GET /sessions/{id}`: one session in full: its record, its config (field names only, unless
//! `http.console_show_config`), its place in the heartbeat index, its job and the agent's last
//! log lines; "stop" for an admin while it is starting or ready.
//!
//! [`SessionView::of`] applies the [`Mask`] while building the view, so the view (and whatever
//! renders it) never holds a prompt that may not be shown.

use crate::connection::RedisConn;
use agent_jobs::{QueueKeys, SessionId, session_state::fields};
use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::Response,
};
use maud::{Markup, html};

use super::{
    Console,
    format::{ago, time, truncate},
    layout,
    mask::{MAX_SHOWN_CHARS, Mask},
    sessions::stop_button,
    timeline,
    visit::{QueryFailed, Visit},
};
use crate::{
    clock::unix_now,
    inspect::session::{SessionDetail, session_detail},
    settings::ByteSize,
    start_timeline::{StartTimeline, TIMELINE_FIELD},
};

/// Characters of an invalid id repeated on its "not a session id" page.
const MAX_ECHOED_ID_CHARS: usize = 200;

/// What the page shows; every value already masked and cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionView {
    /// The session id.
    pub id: String,
    /// The CSRF token for the stop button: an admin's, while the session is starting or ready.
    pub stop: Option<String>,
    /// `session:<id>`, field by field (stored times with their date and age).
    pub record: Vec<(String, String)>,
    /// Its last heartbeat in the heartbeat index, if it is there.
    pub heartbeat: Option<u64>,
    /// What its agent's tree uses, as its worker last wrote it to `agent:<id>:health`.
    pub resources: Option<Resources>,
    /// `session:<id>:config`.
    pub config: ConfigView,
    /// The job's task id and meta (stored times with their date and age).
    pub job: Option<(String, Vec<(String, String)>)>,
    /// The agent's last output lines, oldest first.
    pub logs: Vec<String>,
    /// Its start's phases (the record's `startTimeline`), once its agent was ready.
    pub timeline: Option<StartTimeline>,
    /// Unix seconds the ages are counted to.
    pub now: u64,
}

/// An agent's resource use, from its health hash (numbers from Redis: unparseable is absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    /// Memory of its whole tree now, in bytes.
    pub memory_bytes: u64,
    /// The most it has used, in bytes.
    pub peak_bytes: Option<u64>,
    /// CPU time so far, in milliseconds.
    pub cpu_ms: Option<u64>,
}

impl Resources {
    fn of(detail: &SessionDetail) -> Option<Self> {
        Some(Self {
            memory_bytes: detail.health_field("memory_bytes")?.parse().ok()?,
            peak_bytes: detail
                .health_field("memory_peak_bytes")
                .and_then(|v| v.parse().ok()),
            cpu_ms: detail
                .health_field("cpu_seconds")
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v >= 0.0)
                .map(|v| (v * 1000.0) as u64),
        })
    }
}

/// What the page shows of the session's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigView {
    /// There is no config hash.
    Missing,
    /// Field names only (the default).
    Names(Vec<String>),
    /// Fields and values (`http.console_show_config`).
    Values(Vec<(String, String)>),
}

impl SessionView {
    /// The view of session `id` from what was read; `show`: `http.console_show_config`;
    /// `csrf`: the visitor's, if they may act.
    pub fn of(id: &str, detail: &SessionDetail, show: bool, csrf: Option<&str>, now: u64) -> Self {
        let mask = Mask::of(detail, show);
        let timed = |pairs: &[(String, String)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.clone(), with_time(k, mask.value(k, v), now)))
                .collect()
        };
        let stoppable = matches!(detail.field(fields::STATUS), Some("starting" | "ready"));
        let config = match (&detail.config[..], show) {
            ([], _) => ConfigView::Missing,
            (config, true) => ConfigView::Values(
                config
                    .iter()
                    .map(|(k, v)| (k.clone(), mask.value(k, v)))
                    .collect(),
            ),
            (config, false) => ConfigView::Names(config.iter().map(|(k, _)| k.clone()).collect()),
        };
        Self {
            id: id.to_owned(),
            stop: csrf.filter(|_| stoppable).map(str::to_owned),
            record: timed(&detail.record),
            heartbeat: detail.heartbeat,
            resources: Resources::of(detail),
            config,
            job: detail
                .job
                .as_ref()
                .map(|(task, meta)| (task.clone(), timed(meta))),
            logs: detail
                .logs
                .iter()
                .map(|line| truncate(&mask.text(line), MAX_SHOWN_CHARS))
                .collect(),
            timeline: detail
                .field(TIMELINE_FIELD)
                .and_then(StartTimeline::from_json),
            now,
        }
    }
}

/// The handler.
pub async fn page(
    State(console): State<Console>,
    Path(id): Path<String>,
    visit: Visit,
) -> Response {
    let Ok(id) = SessionId::parse(&id) else {
        return visit.page(StatusCode::NOT_FOUND, "Not a session id", not_an_id(&id));
    };
    let Some(conn) = visit.conn() else {
        return visit.not_connected();
    };
    let title = format!("Session {id}");
    let show = console.0.show_config;
    match fetch(conn, &console.0.keys, &id, show, visit.csrf()).await {
        Ok(Some(view)) => visit.page(StatusCode::OK, &title, render(&view)),
        Ok(None) => visit.page(StatusCode::NOT_FOUND, &title, gone()),
        Err(failed) => visit.failed(failed),
    }
}

/// Reads session `id`; `None` when nothing of it is left in Redis.
pub async fn fetch(
    conn: &RedisConn,
    keys: &QueueKeys,
    id: &SessionId,
    show: bool,
    csrf: Option<&str>,
) -> Result<Option<SessionView>, QueryFailed> {
    let detail = session_detail(conn, keys, id)
        .await
        .map_err(QueryFailed::reading("the session"))?;
    Ok((!detail.is_empty()).then(|| SessionView::of(id.as_str(), &detail, show, csrf, unix_now())))
}

/// The page's body.
pub fn render(view: &SessionView) -> Markup {
    html! {
        @if let Some(csrf) = &view.stop {
            p {
                (stop_button(&view.id, csrf))
                " Ends the session as the orchestrator does: its keys are deleted, and its worker \
                 stops the agent at its next heartbeat."
            }
        }
        h2 { "Start-up " small { "startTimeline" } }
        @if let Some(timeline) = &view.timeline {
            (timeline::svg(timeline))
        } @else {
            p class="empty" { "No start-up timeline (not ready yet, or started by an older worker)." }
        }
        h2 { "Record " small { "session:<id>" } }
        (layout::fields(&view.record))
        p {
            "Heartbeat index: "
            @if let Some(t) = view.heartbeat {
                (ago(Some(t), view.now)) " (" (time(Some(t))) ")"
            } @else {
                "not in the index (not live on any worker)"
            }
        }
        h2 { "Resources " small { "agent:<id>:health" } }
        @if let Some(r) = &view.resources {
            p {
                "Memory " (ByteSize(r.memory_bytes))
                @if let Some(peak) = r.peak_bytes { " (peak " (ByteSize(peak)) ")" }
                @if let Some(cpu) = r.cpu_ms { ", CPU " (format!("{:.1}", cpu as f64 / 1000.0)) " s" }
                " (the agent's whole process tree)"
            }
        } @else {
            p class="empty" { "Not measured (yet, or no longer: the agent is not running)." }
        }
        h2 { "Config " small { "session:<id>:config" } }
        @match &view.config {
            ConfigView::Missing => p class="empty" {
                "No config hash (the session runs on defaults, or it was removed)."
            },
            ConfigView::Values(values) => (layout::fields(values)),
            ConfigView::Names(names) => p {
                "Field names (values are not shown; " code { "http.console_show_config" } "): "
                (names.join(", "))
            },
        }
        h2 { "Job" }
        @if let Some((task, meta)) = &view.job {
            p { "Task " (task) }
            (layout::fields(meta))
        } @else {
            p class="empty" {
                "No job recorded (no taskId, or its meta was trimmed by retention)."
            }
        }
        h2 { "Last " (view.logs.len()) " log lines " small { "agent:<id>:logs" } }
        @if view.logs.is_empty() {
            p class="empty" { "No output recorded." }
        } @else {
            pre class="logs" { @for line in &view.logs { (line) "\n" } }
        }
    }
}

/// The body of the page of an `id` that is not a session id.
fn not_an_id(id: &str) -> Markup {
    html! {
        p class="bad" {
            (truncate(id, MAX_ECHOED_ID_CHARS))
            " is not a session id (1-128 of A-Z a-z 0-9 . _ -)."
        }
    }
}

/// The body of the page of a session nothing is left of.
fn gone() -> Markup {
    html! {
        p {
            "Nothing of this session is in Redis: it ended and was cleaned up, or never existed."
        }
    }
}

/// A stored unix time (`createdAt`, `lastActive`, `endedAt`, `done_at`, ...) with its date
/// and age beside it; any other value as it is.
fn with_time(name: &str, shown: String, now: u64) -> String {
    let named_as_time = name.ends_with("At")
        || name.ends_with("_at")
        || name.ends_with("StartTime")
        || matches!(name, "startTime" | "lastActive" | "last_check");
    // Seconds, possibly with a fraction; 2001 to 5138: not a duration or a count.
    let seconds = shown
        .split('.')
        .next()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|s| (1_000_000_000..100_000_000_000).contains(s));
    match seconds {
        Some(t) if named_as_time => format!("{shown} ({}, {})", time(Some(t)), ago(Some(t), now)),
        _ => shown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::layout::tests::assert_has;

    const HOSTILE: &str = "<script>alert('s')</script>";
    const PROMPT: &str = "the customer's <secret> prompt";

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn detail() -> SessionDetail {
        SessionDetail {
            record: pairs(&[
                ("createdAt", "1700000000"),
                (
                    "startTimeline",
                    r#"{"start":"cold","enqueued":1700000000000,"claimed":1700000000200,"spawned":1700000000210,"alive":1700000000900,"ready":1700000001400}"#,
                ),
                ("status", "ready"),
                ("systemPrompt", PROMPT),
                ("voiceId", HOSTILE),
            ]),
            config: pairs(&[("systemPrompt", PROMPT), (HOSTILE, "v")]),
            logs: vec![format!("argv --voice={HOSTILE} --system-prompt={PROMPT}")],
            heartbeat: Some(1_700_000_005),
            health: pairs(&[
                ("cpu_seconds", "4.25"),
                ("memory_bytes", "134217728"),
                ("memory_peak_bytes", "201326592"),
            ]),
            job: Some((
                "task-1".into(),
                pairs(&[("attempts", "1"), ("done_at", HOSTILE)]),
            )),
        }
    }

    #[test]
    fn stored_times_get_a_date_and_other_values_stay() {
        assert_eq!(
            with_time("createdAt", "1700000000".into(), 1_700_000_010),
            "1700000000 (2023-11-14 22:13:20 UTC, 10 s ago)"
        );
        assert_eq!(with_time("startupTime", "0.5".into(), 0), "0.5");
        assert_eq!(with_time("agentPid", "1700000000".into(), 0), "1700000000");
        assert_eq!(with_time("endedAt", "soon".into(), 0), "soon");
    }

    #[test]
    fn hostile_values_are_text_and_prompts_never_reach_the_view() {
        let view = SessionView::of("s-1", &detail(), false, None, 1_700_000_010);
        assert_eq!(view.stop, None, "no button without a CSRF token");
        let html = render(&view).into_string();
        assert!(
            !html.contains("<script") && !html.contains("secret"),
            "{html}"
        );
        assert_has(
            &html,
            &[
                "<dd>&lt;script&gt;alert('s')&lt;/script&gt;</dd>",
                &format!("(hidden, {} bytes)", PROMPT.len()),
                "--system-prompt=[systemPrompt hidden]",
                "Memory 128 MiB (peak 192 MiB), CPU 4.2 s",
                "values are not shown",
                "systemPrompt, &lt;script&gt;",
                "<small>session:&lt;id&gt;</small>",
                "1700000000 (2023-11-14 22:13:20 UTC, 10 s ago)",
                "Heartbeat index: 5 s ago (2023-11-14 22:13:25 UTC)",
                "<p>Task task-1</p>",
                "<dt>attempts</dt><dd>1</dd>",
                "<dt>done_at</dt><dd>&lt;script&gt;",
                "Last 1 log lines",
                "<figure class=\"timeline\"><svg",
                "cold start, enqueue to ready in 1400 ms",
            ],
        );
        assert!(!html.contains("method=\"post\""), "{html}");
    }

    #[test]
    fn config_values_only_when_shown_and_stop_only_while_live() {
        let view = SessionView::of("s-1", &detail(), true, Some("c"), 1_700_000_010);
        let html = render(&view).into_string();
        assert!(
            html.contains("the customer's &lt;secret&gt; prompt"),
            "{html}"
        );
        assert!(
            !html.contains("(hidden") && !html.contains("hidden]"),
            "{html}"
        );
        assert!(!html.contains("values are not shown"), "{html}");
        assert!(html.contains("name=\"session_id\" value=\"s-1\""), "{html}");
        assert!(
            html.contains("Ends the session as the orchestrator does"),
            "{html}"
        );

        let mut ended = detail();
        ended.record.retain(|(k, _)| k != "status");
        ended.config.clear();
        ended.logs.clear();
        ended.heartbeat = None;
        ended.job = None;
        // A timeline that is not one (it comes from Redis) is not drawn.
        ended.record.retain(|(k, _)| k != "startTimeline");
        ended.record.push(("startTimeline".into(), HOSTILE.into()));
        let html = render(&SessionView::of("s-1", &ended, false, Some("c"), 0)).into_string();
        assert!(!html.contains("method=\"post\""), "{html}");
        for empty in [
            "No config hash",
            "not in the index (not live on any worker)",
            "No job recorded",
            "No output recorded.",
            "No start-up timeline",
        ] {
            assert!(html.contains(empty), "{empty}: {html}");
        }
    }

    #[test]
    fn an_invalid_id_is_echoed_as_text_and_cut() {
        let html = not_an_id(&format!("{HOSTILE}{}", "x".repeat(300))).into_string();
        assert!(
            !html.contains("<script") && html.contains("x… is not a session id"),
            "{html}"
        );
    }
}
