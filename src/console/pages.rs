//! The console's read-only pages. Each handler reads what it shows in a bounded number of
//! Redis commands (see [`super::queries`] and [`crate::inspect`]) and renders it with
//! [`super::html`]; every value is escaped there or here.

use std::fmt::Write;

use agent_jobs::{SessionId, keys::SESSION_HEARTBEATS, session_state::fields};
use axum::{
    extract::{Path, RawQuery, State},
    http::{HeaderMap, StatusCode},
    response::Response,
};
use redis::aio::ConnectionManager;

use super::{
    Console,
    html::{self, Access, esc, query_value},
    params,
    queries::{self, Cursor, PRIVATE_FIELDS, SessionDetail, StatusFilter},
    respond,
};
use crate::{
    clock::unix_now,
    inspect::{self, WorkerRow},
};

/// Dead jobs the overview lists as recent failures.
const RECENT_FAILURES: usize = 10;
/// Dead jobs the dead-job page lists.
const DEAD_PAGE: usize = 50;
/// Characters of one log line or stored value shown (lines can be 64 KiB).
const MAX_SHOWN_CHARS: usize = 2000;
/// A clock this far from Redis's is flagged (the same threshold as `clock_offset_from_redis`).
const OFF_CLOCK_MS: i64 = 2000;

/// What a page handler needs to render: who asks, and whether to refresh.
struct Visit<'a> {
    console: &'a Console,
    access: Access,
    /// The page's own URL with `refresh=0`, while it refreshes.
    pause: Option<String>,
}

impl<'a> Visit<'a> {
    /// A visit of `path` with the query `raw`.
    fn new(console: &'a Console, headers: &HeaderMap, path: &str, raw: Option<&str>) -> Self {
        let mut params = params(raw);
        let refresh = params.remove("refresh").as_deref() != Some("0");
        let pause = refresh.then(|| {
            let mut query = form_urlencoded::Serializer::new(String::new());
            let mut kept: Vec<_> = params.iter().collect();
            kept.sort();
            query.extend_pairs(kept).append_pair("refresh", "0");
            format!("{path}?{}", query.finish())
        });
        Self {
            console,
            access: console.access(headers),
            pause,
        }
    }

    fn csrf(&self) -> Option<&str> {
        self.console.csrf_for(self.access)
    }

    fn page(&self, status: StatusCode, title: &str, active: &str, body: &str) -> Response {
        let pause = self.pause.as_deref().filter(|_| status.is_success());
        let page = html::page(title, active, self.access, pause, self.csrf(), body);
        respond(status, page)
    }

    /// The connection, or the page saying there is none yet.
    fn conn(&self, active: &str) -> Result<&'a ConnectionManager, Box<Response>> {
        self.console.conn().ok_or_else(|| {
            Box::new(self.page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Not connected",
                active,
                "<p class=\"bad\">The worker has not connected to Redis yet (see /readyz).</p>",
            ))
        })
    }

    /// The page for a failed query; the error goes to the log, not to the page (it is Redis's
    /// text, and the page may be seen by more people than the log).
    fn failed(&self, active: &str, what: &'static str, error: &redis::RedisError) -> Response {
        tracing::warn!(error = %error, query = what, "console_query_failed");
        metrics_error();
        self.page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Redis error",
            active,
            &format!(
                "<p class=\"bad\">Reading {} from Redis failed; the worker's log has the error \
                 (console_query_failed).</p>",
                esc(what)
            ),
        )
    }
}

fn metrics_error() {
    crate::metrics::redis_error("console");
}

/// `GET /`: the queue, sessions by status, rates, workers at a glance, recent failures.
pub async fn overview(
    State(console): State<Console>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let visit = Visit::new(&console, &headers, "/", raw.as_deref());
    let conn = match visit.conn("/") {
        Ok(conn) => conn,
        Err(page) => return *page,
    };
    let now = unix_now();
    let status = match inspect::status(conn, &console.0.keys, now, console.0.orphan_timeout).await {
        Ok(status) => status,
        Err(error) => return visit.failed("/", "the status", &error),
    };
    let dead = match inspect::dead_jobs(conn, &console.0.keys, RECENT_FAILURES).await {
        Ok(dead) => dead,
        Err(error) => return visit.failed("/", "the dead jobs", &error),
    };
    let heartbeats: u64 = redis::cmd("ZCARD")
        .arg(SESSION_HEARTBEATS)
        .query_async(&mut conn.clone())
        .await
        .unwrap_or(0);

    let mut body = String::new();
    let j = &status.jobs;
    body.push_str("<h2>Queue <small>");
    body.push_str(&esc(&status.queue));
    body.push_str("</small></h2><div class=\"cards\">");
    for (label, value) in [
        ("ready", j.ready),
        ("scheduled", j.scheduled),
        ("inflight", j.inflight),
        ("done", j.done),
        ("dead", j.dead),
    ] {
        card(&mut body, label, &value.to_string(), "");
    }
    body.push_str("</div><h2>Sessions</h2><div class=\"cards\">");
    card(
        &mut body,
        "starting",
        &status.sessions.starting.to_string(),
        "/sessions?status=starting",
    );
    card(
        &mut body,
        "ready",
        &status.sessions.ready.to_string(),
        "/sessions?status=ready",
    );
    card(&mut body, "heartbeating", &heartbeats.to_string(), "");
    body.push_str("</div><h2>This replica, per minute</h2><div class=\"cards\">");
    match console.0.rates.per_minute() {
        Some(per) => {
            let over = format!(" (over {} s)", per.over.as_secs());
            for (label, value) in [
                ("starts", per.rates.starts),
                ("failed attempts", per.rates.failed_attempts),
                ("dead jobs", per.rates.dead),
            ] {
                card(
                    &mut body,
                    &format!("{label}{over}"),
                    &format!("{value:.1}"),
                    "",
                );
            }
        }
        None => body.push_str("<p class=\"empty\">Measuring (needs two readings 10 s apart).</p>"),
    }
    body.push_str("</div>");
    body.push_str(&warm_pool(&status.workers));

    let alive = status.workers.iter().filter(|w| w.alive).count();
    let (agents, max): (u64, u64) =
        status
            .workers
            .iter()
            .filter(|w| w.alive)
            .fold((0, 0), |(a, m), w| {
                (
                    a + w.agents,
                    m + w.info.as_ref().map_or(0, |i| i.max_agents),
                )
            });
    body.push_str("<h2>Workers</h2><div class=\"cards\">");
    card(
        &mut body,
        "alive / listed",
        &format!("{alive} / {}", status.workers.len()),
        "/workers",
    );
    card(
        &mut body,
        "agents / capacity",
        &format!("{agents} / {max}"),
        "/workers",
    );
    body.push_str("</div>");
    let problems: Vec<String> = status.workers.iter().flat_map(worker_problems).collect();
    if !problems.is_empty() {
        body.push_str("<ul class=\"warn\">");
        for p in problems {
            let _ = write!(body, "<li>{p}</li>");
        }
        body.push_str("</ul>");
    }
    if let Some(policy) = &status.maxmemory_policy
        && policy != crate::dataset::NO_EVICTION
    {
        let _ = write!(
            body,
            "<p class=\"bad\">Redis maxmemory-policy is {}: it may evict session records; set \
             noeviction.</p>",
            esc(policy)
        );
    }

    let _ = write!(
        body,
        "<h2>Recent failures <small>({} dead in all, <a href=\"/dead\">all dead jobs</a>)</small></h2>",
        dead.total
    );
    body.push_str(&dead_table(&dead.jobs, None));
    visit.page(StatusCode::OK, "Overview", "/", &body)
}

/// The warm pool on the overview: idle warm processes (agents that have done their imports
/// and wait for a session, `agent.warm_pool`) of the live workers that keep one.
fn warm_pool(workers: &[inspect::WorkerRow]) -> String {
    let pooled: Vec<&inspect::WorkerRow> = workers
        .iter()
        .filter(|w| w.alive && w.warm_idle.is_some())
        .collect();
    let mut body = String::from("<h2>Warm pool</h2><div class=\"cards\">");
    if pooled.is_empty() {
        body.push_str(
            "<div class=\"card placeholder\">off (agent.warm_pool = 0): every session starts \
             a new agent</div>",
        );
    } else {
        let idle: u64 = pooled.iter().filter_map(|w| w.warm_idle).sum();
        let empty = pooled.iter().filter(|w| w.warm_idle == Some(0)).count();
        card(&mut body, "idle warm agents", &idle.to_string(), "/workers");
        card(
            &mut body,
            "workers with a pool / with none idle",
            &format!("{} / {empty}", pooled.len()),
            "/workers",
        );
    }
    body.push_str("</div>");
    body
}

fn card(out: &mut String, label: &str, value: &str, link: &str) {
    let value = if link.is_empty() {
        esc(value)
    } else {
        format!("<a href=\"{}\">{}</a>", esc(link), esc(value))
    };
    let _ = write!(
        out,
        "<div class=\"card\"><b>{value}</b>{}</div>",
        esc(label)
    );
}

/// What is wrong with a worker: full, silent, off-clock (HTML, escaped).
fn worker_problems(w: &WorkerRow) -> Vec<String> {
    let mut out = Vec::new();
    let id = esc(&w.id);
    if !w.alive {
        out.push(format!(
            "{id} is silent: no presence for {}",
            html::duration(w.last_seen_secs)
        ));
    }
    if let Some(info) = &w.info {
        if w.alive && info.max_agents > 0 && w.agents >= info.max_agents {
            out.push(format!(
                "{id} is full: {} / {} agents",
                w.agents, info.max_agents
            ));
        }
        if info.clock_offset_ms.abs() >= OFF_CLOCK_MS {
            out.push(format!(
                "{id} is off-clock: {} ms from Redis",
                info.clock_offset_ms
            ));
        }
    }
    out
}

/// `GET /sessions?status=live|starting|ready&worker=<id>&cursor=<c>`: one page of live
/// sessions.
pub async fn sessions(
    State(console): State<Console>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let visit = Visit::new(&console, &headers, "/sessions", raw.as_deref());
    let conn = match visit.conn("/sessions") {
        Ok(conn) => conn,
        Err(page) => return *page,
    };
    let params = params(raw.as_deref());
    let filter = StatusFilter::parse(params.get("status").map_or("", String::as_str));
    let worker = params
        .get("worker")
        .map(|w| w.trim())
        .filter(|w| !w.is_empty());
    let cursor = Cursor::parse(params.get("cursor").map_or("", String::as_str));
    let page = match queries::session_page(conn, filter, worker, cursor, queries::PAGE_SIZE).await {
        Ok(page) => page,
        Err(error) => return visit.failed("/sessions", "the sessions", &error),
    };
    let now = unix_now();
    let mut body =
        String::from("<form method=\"get\" action=\"/sessions\">Status <select name=\"status\">");
    for option in [
        StatusFilter::Live,
        StatusFilter::Starting,
        StatusFilter::Ready,
    ] {
        let selected = if option == filter { " selected" } else { "" };
        let _ = write!(
            body,
            "<option value=\"{0}\"{selected}>{0}</option>",
            option.as_str()
        );
    }
    let _ = write!(
        body,
        "</select> Worker <input name=\"worker\" value=\"{}\" size=\"40\"> <button>Filter</button></form>",
        esc(worker.unwrap_or_default())
    );
    let csrf = visit.csrf();
    let rows: Vec<Vec<String>> = page
        .rows
        .iter()
        .map(|row| {
            let status =
                row.status
                    .as_deref()
                    .unwrap_or(if row.has_record { "-" } else { "(record gone)" });
            let mut cells = vec![
                format!("<a href=\"/sessions/{0}\">{0}</a>", esc(&row.id)),
                format!("<span class=\"status-{0}\">{0}</span>", esc(status)),
                esc(row.voice.as_deref().unwrap_or("-")),
                esc(row.user.as_deref().unwrap_or("-")),
                match &row.worker {
                    Some(w) => format!(
                        "<a href=\"/sessions?worker={}\">{}</a>",
                        esc(&query_value(w)),
                        esc(w)
                    ),
                    None => "-".into(),
                },
                esc(&row
                    .created_at
                    .map_or("-".into(), |t| html::duration(now.saturating_sub(t)))),
                esc(&row
                    .startup_time
                    .as_deref()
                    .map_or("-".into(), |s| format!("{s} s"))),
                esc(&html::ago(row.last_active, now)),
            ];
            if let Some(csrf) = csrf {
                cells.push(stop_button(&row.id, csrf));
            }
            cells
        })
        .collect();
    let mut headers = vec![
        "Session",
        "Status",
        "Voice",
        "User",
        "Worker",
        "Age",
        "Start-up",
        "Last heartbeat",
    ];
    if csrf.is_some() {
        headers.push("");
    }
    body.push_str(&html::table(
        &headers,
        &rows,
        "No live sessions on this page.",
    ));
    let base = format!(
        "/sessions?status={}&worker={}",
        filter.as_str(),
        query_value(worker.unwrap_or_default())
    );
    let _ = write!(
        body,
        "<p>{} session(s) read from the index for this page, {} shown. <a href=\"{}\">First page</a>",
        page.scanned,
        page.rows.len(),
        esc(&base)
    );
    if let Some(next) = page.next {
        let _ = write!(
            body,
            " · <a href=\"{}\">Next page</a>",
            esc(&format!("{base}&cursor={}", next.format()))
        );
    }
    body.push_str("</p>");
    visit.page(StatusCode::OK, "Live sessions", "/sessions", &body)
}

fn stop_button(id: &str, csrf: &str) -> String {
    format!(
        "<form method=\"post\" action=\"/actions/stop\" class=\"inline\">{}\
         <input type=\"hidden\" name=\"session_id\" value=\"{}\"><button>stop</button></form>",
        html::csrf_field(csrf),
        esc(id)
    )
}

/// `GET /sessions/{id}`: the record, the config's field names, the job, the last log lines.
pub async fn session(
    State(console): State<Console>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let here = format!("/sessions/{}", html::query_value(&id));
    let visit = Visit::new(&console, &headers, &here, raw.as_deref());
    let Ok(id) = SessionId::parse(&id) else {
        return visit.page(
            StatusCode::NOT_FOUND,
            "Not a session id",
            "/sessions",
            &format!(
                "<p class=\"bad\">{} is not a session id (1-128 of A-Z a-z 0-9 . _ -).</p>",
                esc(&html::truncate(&id, 200))
            ),
        );
    };
    let conn = match visit.conn("/sessions") {
        Ok(conn) => conn,
        Err(page) => return *page,
    };
    let detail = match queries::session_detail(conn, &console.0.keys, &id).await {
        Ok(detail) => detail,
        Err(error) => return visit.failed("/sessions", "the session", &error),
    };
    let title = format!("Session {id}");
    if detail.is_empty() {
        return visit.page(
            StatusCode::NOT_FOUND,
            &title,
            "/sessions",
            "<p>Nothing of this session is in Redis: it ended and was cleaned up, or never \
             existed.</p>",
        );
    }
    let show = console.0.show_config;
    let mask = Mask::of(&detail, show);
    let now = unix_now();
    let mut body = String::new();
    let status = detail
        .record
        .iter()
        .find(|(k, _)| k == fields::STATUS)
        .map(|(_, v)| v.as_str());
    if let Some(csrf) = visit.csrf()
        && matches!(status, Some("starting" | "ready"))
    {
        let _ = write!(
            body,
            "<p>{} Ends the session as the orchestrator does: its keys are deleted, and its \
             worker stops the agent at its next heartbeat.</p>",
            stop_button(id.as_str(), csrf)
        );
    }
    body.push_str("<h2>Record <small>session:&lt;id&gt;</small></h2>");
    let record: Vec<(String, String)> = detail
        .record
        .iter()
        .map(|(k, v)| (k.clone(), with_time(k, mask.value(k, v), now)))
        .collect();
    body.push_str(&html::fields(&record));
    let _ = write!(
        body,
        "<p>Heartbeat index: {}</p>",
        esc(&match detail.heartbeat {
            Some(t) => format!("{} ({})", html::ago(Some(t), now), html::time(Some(t))),
            None => "not in the index (not live on any worker)".into(),
        })
    );
    body.push_str("<h2>Config <small>session:&lt;id&gt;:config</small></h2>");
    if detail.config.is_empty() {
        body.push_str("<p class=\"empty\">No config hash (the session runs on defaults, or it was removed).</p>");
    } else if show {
        let config: Vec<(String, String)> = detail
            .config
            .iter()
            .map(|(k, v)| (k.clone(), mask.value(k, v)))
            .collect();
        body.push_str(&html::fields(&config));
    } else {
        body.push_str(
            "<p>Field names (values are not shown; <code>http.console_show_config</code>): ",
        );
        let names: Vec<String> = detail.config.iter().map(|(k, _)| esc(k)).collect();
        body.push_str(&names.join(", "));
        body.push_str("</p>");
    }
    body.push_str("<h2>Job</h2>");
    match &detail.job {
        Some((task, meta)) => {
            let _ = write!(body, "<p>Task {}</p>", esc(task));
            let meta: Vec<(String, String)> = meta
                .iter()
                .map(|(k, v)| (k.clone(), with_time(k, mask.value(k, v), now)))
                .collect();
            body.push_str(&html::fields(&meta));
        }
        None => body.push_str("<p class=\"empty\">No job recorded (no taskId, or its meta was trimmed by retention).</p>"),
    }
    let _ = write!(
        body,
        "<h2>Last {} log lines <small>agent:&lt;id&gt;:logs</small></h2>",
        detail.logs.len()
    );
    if detail.logs.is_empty() {
        body.push_str("<p class=\"empty\">No output recorded.</p>");
    } else {
        body.push_str("<pre class=\"logs\">");
        for line in &detail.logs {
            body.push_str(&esc(&html::truncate(&mask.text(line), MAX_SHOWN_CHARS)));
            body.push('\n');
        }
        body.push_str("</pre>");
    }
    visit.page(StatusCode::OK, &title, "/sessions", &body)
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
        Some(t) if named_as_time => {
            format!(
                "{shown} ({}, {})",
                html::time(Some(t)),
                html::ago(Some(t), now)
            )
        }
        _ => shown,
    }
}

/// Hides the values of [`PRIVATE_FIELDS`] on a session's page: as a field, a size only; inside
/// any other text (a log line of an agent that prints its arguments, a stored error), the
/// value, raw or JSON-escaped, is replaced by a marker. A defence in depth, not a filter of
/// everything: an agent printing part of its prompt is not caught.
struct Mask {
    show: bool,
    secrets: Vec<(String, String)>,
}

/// Shorter values are not masked inside texts (a two-letter opening line would blank out
/// every log line containing those letters, and hides nothing).
const MIN_MASKED_CHARS: usize = 6;

impl Mask {
    fn of(detail: &SessionDetail, show: bool) -> Self {
        let mut secrets = Vec::new();
        if !show {
            for (name, value) in detail.config.iter().chain(&detail.record) {
                if PRIVATE_FIELDS.contains(&name.as_str())
                    && value.chars().count() >= MIN_MASKED_CHARS
                {
                    let marker = format!("[{name} hidden]");
                    let json = serde_json::to_string(value).unwrap_or_default();
                    let json = json.trim_matches('"').to_owned();
                    if json != *value {
                        secrets.push((json, marker.clone()));
                    }
                    secrets.push((value.clone(), marker));
                }
            }
            // Longest first, so a value containing another is replaced whole.
            secrets.sort_by_key(|(value, _)| std::cmp::Reverse(value.len()));
        }
        Self { show, secrets }
    }

    /// A stored field's value as shown.
    fn value(&self, name: &str, value: &str) -> String {
        if !self.show && PRIVATE_FIELDS.contains(&name) {
            return format!("(hidden, {} bytes)", value.len());
        }
        html::truncate(&self.text(value), MAX_SHOWN_CHARS)
    }

    /// Any other text as shown.
    fn text(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for (secret, marker) in &self.secrets {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), marker);
            }
        }
        out
    }
}

/// `GET /workers`: every worker in the presence index.
pub async fn workers(
    State(console): State<Console>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let visit = Visit::new(&console, &headers, "/workers", raw.as_deref());
    let conn = match visit.conn("/workers") {
        Ok(conn) => conn,
        Err(page) => return *page,
    };
    let now = unix_now();
    let status = match inspect::status(conn, &console.0.keys, now, console.0.orphan_timeout).await {
        Ok(status) => status,
        Err(error) => return visit.failed("/workers", "the workers", &error),
    };
    let rows: Vec<Vec<String>> = status
        .workers
        .iter()
        .map(|w| {
            let info = w.info.as_ref();
            let max = info.map_or("?".into(), |i| i.max_agents.to_string());
            let state = match (w.alive, info) {
                (false, _) => "<span class=\"bad\">silent</span>".to_owned(),
                (true, Some(i)) if i.max_agents > 0 && w.agents >= i.max_agents => {
                    "<span class=\"warn\">full</span>".into()
                }
                (true, _) => "alive".into(),
            };
            let offset = info.map_or("-".into(), |i| {
                let class = if i.clock_offset_ms.abs() >= OFF_CLOCK_MS {
                    "bad"
                } else {
                    ""
                };
                format!("<span class=\"{class}\">{} ms</span>", i.clock_offset_ms)
            });
            vec![
                esc(&w.id),
                esc(info.map_or("-", |i| i.host.as_str())),
                esc(info.map_or("-", |i| i.version.as_str())),
                format!(
                    "<a href=\"/sessions?worker={}\">{} / {}</a>",
                    esc(&query_value(&w.id)),
                    w.agents,
                    esc(&max)
                ),
                esc(&html::ago(Some(now.saturating_sub(w.last_seen_secs)), now)),
                state,
                offset,
                esc(&html::ago(info.map(|i| i.started_at), now)),
                w.warm_idle.map_or("-".into(), |n| n.to_string()),
            ]
        })
        .collect();
    let body = html::table(
        &[
            "Worker",
            "Host",
            "Version",
            "Agents / max",
            "Last presence",
            "State",
            "Clock offset",
            "Started",
            "Warm idle",
        ],
        &rows,
        "No worker has reported its presence.",
    );
    visit.page(StatusCode::OK, "Workers", "/workers", &body)
}

/// `GET /dead`: the newest dead jobs, with "retry" for an admin.
pub async fn dead(
    State(console): State<Console>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let visit = Visit::new(&console, &headers, "/dead", raw.as_deref());
    let conn = match visit.conn("/dead") {
        Ok(conn) => conn,
        Err(page) => return *page,
    };
    let dead = match inspect::dead_jobs(conn, &console.0.keys, DEAD_PAGE).await {
        Ok(dead) => dead,
        Err(error) => return visit.failed("/dead", "the dead jobs", &error),
    };
    let mut body = format!(
        "<p>{} dead job(s); the newest {} are shown (all of them: <code>agent-worker dead list \
         --limit N</code>).</p>",
        dead.total,
        dead.jobs.len().min(DEAD_PAGE)
    );
    body.push_str(&dead_table(&dead.jobs, visit.csrf()));
    visit.page(StatusCode::OK, "Dead jobs", "/dead", &body)
}

fn dead_table(jobs: &[inspect::DeadJob], csrf: Option<&str>) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|job| {
            let mut cells = vec![
                esc(&html::time(job.failed_at)),
                esc(&job.task_id),
                match &job.session_id {
                    Some(s) => format!("<a href=\"/sessions/{0}\">{0}</a>", esc(s)),
                    None => "-".into(),
                },
                esc(&html::truncate(&job.error, 500)),
            ];
            if let Some(csrf) = csrf {
                cells.push(format!(
                    "<form method=\"post\" action=\"/actions/retry\" class=\"inline\">{}\
                     <input type=\"hidden\" name=\"task_id\" value=\"{}\"><button>retry</button></form>",
                    html::csrf_field(csrf),
                    esc(&job.task_id)
                ));
            }
            cells
        })
        .collect();
    let mut headers = vec!["Failed", "Task", "Session", "Reason"];
    if csrf.is_some() {
        headers.push("");
    }
    html::table(&headers, &rows, "No dead jobs.")
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn prompts_are_masked_in_texts_raw_and_json_escaped() {
        let prompt = "say \"hi\" to <everyone>";
        let detail = SessionDetail {
            config: vec![
                ("systemPrompt".into(), prompt.into()),
                ("openingLine".into(), "Hi".into()),
            ],
            ..SessionDetail::default()
        };
        let mask = Mask::of(&detail, false);
        let json = serde_json::to_string(prompt).unwrap();
        assert_eq!(
            mask.text(&format!("argv --system-prompt={prompt} and {json}")),
            "argv --system-prompt=[systemPrompt hidden] and \"[systemPrompt hidden]\""
        );
        assert_eq!(mask.value("systemPrompt", prompt), "(hidden, 22 bytes)");
        // Too short to mask inside texts (it would blank out ordinary words), hidden as a field.
        assert_eq!(mask.text("Hi there"), "Hi there");
        assert_eq!(mask.value("openingLine", "Hi"), "(hidden, 2 bytes)");
        let shown = Mask::of(&detail, true);
        assert_eq!(shown.value("systemPrompt", prompt), prompt);
    }
}
