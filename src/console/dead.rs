//! `GET /dead`: the newest dead jobs (of how many), with "retry" for an admin. The same read
//! as `agent-worker dead list` ([`inspect::dead_jobs`]); [`table`] is also the overview's
//! "recent failures".

use crate::connection::RedisConn;
use agent_jobs::QueueKeys;
use axum::{extract::State, response::Response};
use maud::{Markup, html};

use super::{
    Console,
    format::{time, truncate},
    layout,
    visit::{QueryFailed, Visit},
};
use crate::inspect::{self, DeadJob, DeadJobs};

/// Dead jobs the page lists.
pub const DEAD_PAGE: usize = 50;

/// Characters of a stored reason shown in a table.
const MAX_REASON_CHARS: usize = 500;

/// What the page shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadView {
    /// The newest dead jobs and the count of all.
    pub dead: DeadJobs,
    /// The CSRF token of an admin: each job gets a retry button.
    pub csrf: Option<String>,
}

/// The handler.
pub async fn page(State(console): State<Console>, visit: Visit) -> Response {
    let Some(conn) = visit.conn() else {
        return visit.not_connected();
    };
    let view = fetch(conn, &console.0.keys, visit.csrf_owned()).await;
    visit.show("Dead jobs", view.map(|view| render(&view)))
}

/// Reads the newest [`DEAD_PAGE`] dead jobs.
pub async fn fetch(
    conn: &RedisConn,
    keys: &QueueKeys,
    csrf: Option<String>,
) -> Result<DeadView, QueryFailed> {
    let dead = inspect::dead_jobs(conn, keys, DEAD_PAGE)
        .await
        .map_err(QueryFailed::reading("the dead jobs"))?;
    Ok(DeadView { dead, csrf })
}

/// The page's body.
pub fn render(view: &DeadView) -> Markup {
    html! {
        p {
            (view.dead.total) " dead job(s); the newest " (view.dead.jobs.len().min(DEAD_PAGE))
            " are shown (all of them: " code { "agent-worker dead list --limit N" } ")."
        }
        (table(&view.dead.jobs, view.csrf.as_deref()))
    }
}

/// The table of `jobs`; with `csrf`, a retry button on each.
pub fn table(jobs: &[DeadJob], csrf: Option<&str>) -> Markup {
    let rows: Vec<Vec<Markup>> = jobs
        .iter()
        .map(|job| {
            let mut cells = vec![
                html! { (time(job.failed_at)) },
                html! { (job.task_id) },
                html! {
                    @if let Some(session) = &job.session_id {
                        a href={ "/sessions/" (session) } { (session) }
                    } @else {
                        "-"
                    }
                },
                html! { (truncate(&job.error, MAX_REASON_CHARS)) },
            ];
            if let Some(csrf) = csrf {
                let target = ("task_id", job.task_id.as_str());
                cells.push(layout::action(
                    "/actions/retry",
                    csrf,
                    Some(target),
                    "retry",
                ));
            }
            cells
        })
        .collect();
    let mut headers = vec!["Failed", "Task", "Session", "Reason"];
    if csrf.is_some() {
        headers.push("");
    }
    layout::table(&headers, &rows, "No dead jobs.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::layout::tests::assert_has;

    const HOSTILE: &str = "<script>alert(\"d\")</script>";

    fn view(csrf: Option<&str>) -> DeadView {
        DeadView {
            dead: DeadJobs {
                jobs: vec![DeadJob {
                    task_id: "task-1".into(),
                    session_id: Some("s-1".into()),
                    error: format!("{HOSTILE} {}", "x".repeat(600)),
                    failed_at: Some(0),
                }],
                total: 7,
            },
            csrf: csrf.map(str::to_owned),
        }
    }

    #[test]
    fn reasons_are_escaped_and_cut_and_an_admin_gets_retry_buttons() {
        let html = render(&view(None)).into_string();
        assert!(!html.contains("<script"), "{html}");
        assert_has(
            &html,
            &[
                "&lt;script&gt;alert(&quot;d&quot;)&lt;/script&gt;",
                "x…</td>",
                "<p>7 dead job(s); the newest 1 are shown",
                "<a href=\"/sessions/s-1\">s-1</a>",
                "1970-01-01 00:00:00 UTC",
            ],
        );
        assert!(!html.contains("method=\"post\""), "{html}");
        assert!(!html.contains(&"x".repeat(500)), "cut: {html}");

        let admin = render(&view(Some("tok\"en"))).into_string();
        assert!(
            admin.contains(
                "<form method=\"post\" action=\"/actions/retry\" class=\"inline\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"tok&quot;en\">\
                 <input type=\"hidden\" name=\"task_id\" value=\"task-1\"><button>retry</button></form>"
            ),
            "{admin}"
        );
        assert!(admin.contains("<th></th>"), "{admin}");
    }

    #[test]
    fn no_dead_jobs_says_so() {
        let html = table(&[], None).into_string();
        assert_eq!(html, "<p class=\"empty\">No dead jobs.</p>");
    }
}
