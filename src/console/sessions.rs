//! `GET /sessions?status=live|starting|ready&worker=<id>&cursor=<c>`: one page of live
//! sessions (a bounded read, see [`crate::inspect::sessions`]), with "stop" for an admin.

use crate::connection::RedisConn;
use axum::response::Response;
use maud::{Markup, html};

use super::{
    format::{ago, duration, query_value},
    layout,
    visit::{QueryFailed, Visit},
};
use crate::{
    clock::unix_now,
    inspect::sessions::{self, Cursor, PAGE_SIZE, SessionPage, SessionRow, StatusFilter},
};

/// What the page shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionsView {
    /// The sessions listed.
    pub filter: StatusFilter,
    /// Only this worker's sessions, if given.
    pub worker: Option<String>,
    /// The page read.
    pub page: SessionPage,
    /// Unix seconds the ages are counted to.
    pub now: u64,
    /// The CSRF token of an admin: each session gets a stop button.
    pub csrf: Option<String>,
}

/// The handler.
pub async fn page(visit: Visit) -> Response {
    let Some(conn) = visit.conn() else {
        return visit.not_connected();
    };
    let filter = StatusFilter::parse(visit.param("status"));
    let worker = Some(visit.param("worker").trim()).filter(|w| !w.is_empty());
    let cursor = Cursor::parse(visit.param("cursor"));
    let view = fetch(conn, filter, worker, cursor, visit.csrf_owned()).await;
    visit.show("Live sessions", view.map(|view| render(&view)))
}

/// Reads the page of sessions from `cursor`.
pub async fn fetch(
    conn: &RedisConn,
    filter: StatusFilter,
    worker: Option<&str>,
    cursor: Cursor,
    csrf: Option<String>,
) -> Result<SessionsView, QueryFailed> {
    let page = sessions::session_page(conn, filter, worker, cursor, PAGE_SIZE)
        .await
        .map_err(QueryFailed::reading("the sessions"))?;
    Ok(SessionsView {
        filter,
        worker: worker.map(str::to_owned),
        page,
        now: unix_now(),
        csrf,
    })
}

/// The page's body: the filter form, the table, the paging links.
pub fn render(view: &SessionsView) -> Markup {
    let worker = view.worker.as_deref().unwrap_or_default();
    let base = format!(
        "/sessions?status={}&worker={}",
        view.filter.as_str(),
        query_value(worker)
    );
    let csrf = view.csrf.as_deref();
    let rows: Vec<Vec<Markup>> = view
        .page
        .rows
        .iter()
        .map(|row| cells(row, view.now, csrf))
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
    html! {
        form method="get" action="/sessions" {
            "Status "
            select name="status" {
                @for option in [StatusFilter::Live, StatusFilter::Starting, StatusFilter::Ready] {
                    option value=(option.as_str()) selected[option == view.filter] {
                        (option.as_str())
                    }
                }
            }
            " Worker "
            input name="worker" value=(worker) size="40";
            " "
            button { "Filter" }
        }
        (layout::table(&headers, &rows, "No live sessions on this page."))
        p {
            (view.page.scanned) " session(s) read from the index for this page, "
            (view.page.rows.len()) " shown. "
            a href=(base) { "First page" }
            @if let Some(next) = view.page.next {
                " · "
                a href={ (base) "&cursor=" (next.format()) } { "Next page" }
            }
        }
    }
}

/// One session's cells; with `csrf`, its stop button.
fn cells(row: &SessionRow, now: u64, csrf: Option<&str>) -> Vec<Markup> {
    let status =
        row.status
            .as_deref()
            .unwrap_or(if row.has_record { "-" } else { "(record gone)" });
    let mut cells = vec![
        html! { a href={ "/sessions/" (row.id) } { (row.id) } },
        html! { span class={ "status-" (status) } { (status) } },
        html! { (row.voice.as_deref().unwrap_or("-")) },
        html! { (row.user.as_deref().unwrap_or("-")) },
        html! {
            @if let Some(worker) = &row.worker {
                a href={ "/sessions?worker=" (query_value(worker)) } { (worker) }
            } @else {
                "-"
            }
        },
        html! { (row.created_at.map_or("-".into(), |t| duration(now.saturating_sub(t)))) },
        html! { (row.startup_time.as_deref().map_or("-".into(), |s| format!("{s} s"))) },
        html! { (ago(row.last_active, now)) },
    ];
    if let Some(csrf) = csrf {
        cells.push(stop_button(&row.id, csrf));
    }
    cells
}

/// The button that ends session `id` as the orchestrator does.
pub fn stop_button(id: &str, csrf: &str) -> Markup {
    layout::action("/actions/stop", csrf, Some(("session_id", id)), "stop")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::layout::tests::assert_has;

    const HOSTILE: &str = "<script>alert('voice')</script>";

    fn view(csrf: Option<&str>, next: Option<Cursor>) -> SessionsView {
        SessionsView {
            filter: StatusFilter::Ready,
            worker: Some("w&\"1\"".into()),
            page: SessionPage {
                rows: vec![
                    SessionRow {
                        id: "s-1".into(),
                        status: Some("ready".into()),
                        voice: Some(HOSTILE.into()),
                        user: Some("u&1".into()),
                        worker: Some("w&\"1\"".into()),
                        created_at: Some(900),
                        startup_time: Some("0.5".into()),
                        last_active: Some(990),
                        has_record: true,
                    },
                    SessionRow {
                        id: "s-2".into(),
                        ..SessionRow::default()
                    },
                ],
                scanned: 3,
                next,
            },
            now: 1000,
            csrf: csrf.map(str::to_owned),
        }
    }

    #[test]
    fn hostile_values_are_text_in_the_table_and_the_form() {
        let html = render(&view(None, None)).into_string();
        assert!(!html.contains("<script"), "{html}");
        assert_has(
            &html,
            &[
                "<td>&lt;script&gt;alert('voice')&lt;/script&gt;</td>",
                "<td>u&amp;1</td>",
                "<a href=\"/sessions?worker=w%26%221%22\">w&amp;&quot;1&quot;</a>",
                "<input name=\"worker\" value=\"w&amp;&quot;1&quot;\" size=\"40\">",
                "<option value=\"ready\" selected>ready</option>",
                "<option value=\"live\">live</option>",
                "<a href=\"/sessions/s-1\">s-1</a>",
                "<span class=\"status-ready\">ready</span>",
                "<td>1 m 40 s</td><td>0.5 s</td><td>10 s ago</td>",
                "<span class=\"status-(record gone)\">(record gone)</span>",
            ],
        );
        assert!(
            !html.contains("method=\"post\"") && !html.contains("Next page"),
            "{html}"
        );
        assert!(
            html.contains("<p>3 session(s) read from the index for this page, 2 shown. "),
            "{html}"
        );
    }

    #[test]
    fn paging_links_keep_the_filters_and_an_admin_gets_stop_buttons() {
        let next = Cursor::parse("1.42.7");
        let html = render(&view(Some("c"), Some(next))).into_string();
        assert!(
            html.contains(
                "<a href=\"/sessions?status=ready&amp;worker=w%26%221%22&amp;cursor=1.42.7\">Next page</a>"
            ),
            "{html}"
        );
        assert!(html.contains("<th></th>"), "{html}");
        assert_eq!(
            html.matches("action=\"/actions/stop\"").count(),
            2,
            "{html}"
        );
        assert!(html.contains("name=\"session_id\" value=\"s-1\""), "{html}");
    }
}
