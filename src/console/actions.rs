//! The console's write routes, mounted only with `http.admin_token` (without it they do not
//! exist: a POST anywhere is 404 or 405).
//!
//! Every action checks, in this order: authentication (`Authorization: Bearer` or the login
//! cookie; else 401), the CSRF token of the form (else 403), then its input (else 400). The
//! actions are the CLI's and the orchestrator's own operations, not new ones:
//! - `POST /actions/retry` (`task_id`): [`crate::inspect::retry_dead`], as
//!   `agent-worker dead retry <id>`.
//! - `POST /actions/stop` (`session_id`): [`crate::inspect::stop_session`], the orchestrator's
//!   end of session: the keys go, the owning worker stops the agent at its next heartbeat.
//!
//! Each one is logged (`console_dead_retried`, `console_session_stopped`) with what it acted
//! on, never with a token.

use std::collections::HashMap;

use agent_jobs::SessionId;
use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::Response,
};

use maud::html;

use super::{
    Console,
    auth::AdminAuth,
    layout::{self, Access, Frame},
    login, respond,
};
use crate::inspect::{self, dead::is_task_id};

fn form(body: &Bytes) -> HashMap<String, String> {
    form_urlencoded::parse(body).into_owned().collect()
}

fn message(
    console: &Console,
    status: StatusCode,
    access: Access,
    title: &str,
    text: &str,
) -> Response {
    respond(status, page(console, access, title, html! { p { (text) } }))
}

/// A page without navigation highlight or refresh: an action's outcome, the login form.
fn page(console: &Console, access: Access, title: &str, body: maud::Markup) -> String {
    let frame = Frame {
        title,
        active: "",
        access,
        pause: None,
        csrf: console.csrf_for(access),
    };
    layout::page(&frame, body).into_string()
}

/// `GET /login`: the token form.
pub async fn login_form(State(console): State<Console>, headers: HeaderMap) -> Response {
    let access = console.access(&headers);
    respond(StatusCode::OK, login_page(&console, access, None))
}

fn login_page(console: &Console, access: Access, error: Option<&str>) -> String {
    page(console, access, "Log in", login::render(error))
}

/// `POST /login` (`token`): sets the login cookie and goes to the overview, or 401.
pub async fn login(State(console): State<Console>, headers: HeaderMap, body: Bytes) -> Response {
    let auth = console.0.auth.as_ref().expect("mounted with a token only");
    let token = form(&body).remove("token").unwrap_or_default();
    if !auth.is_token(token.trim()) {
        tracing::warn!("console_login_failed");
        let access = console.access(&headers);
        let mut response = respond(
            StatusCode::UNAUTHORIZED,
            login_page(&console, access, Some("Wrong token.")),
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"agent-worker console\""),
        );
        return response;
    }
    tracing::info!("console_login");
    redirect_with_cookie("/", &auth.login_cookie())
}

/// `POST /logout` (`csrf`): clears the cookie.
pub async fn logout(State(console): State<Console>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(refused) = check(&console, &headers, &form(&body)) {
        return *refused;
    }
    redirect_with_cookie("/", &AdminAuth::logout_cookie())
}

fn redirect_with_cookie(to: &'static str, cookie: &str) -> Response {
    let mut response = respond(StatusCode::SEE_OTHER, String::new());
    let headers = response.headers_mut();
    headers.insert(header::LOCATION, HeaderValue::from_static(to));
    if let Ok(cookie) = HeaderValue::from_str(cookie) {
        headers.insert(header::SET_COOKIE, cookie);
    }
    response
}

/// Authentication (401), then the form's CSRF token (403).
fn check(
    console: &Console,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> Result<(), Box<Response>> {
    let auth = console.0.auth.as_ref().expect("mounted with a token only");
    if !auth.is_authenticated(headers) {
        let mut refused = message(
            console,
            StatusCode::UNAUTHORIZED,
            Access::LoggedOut,
            "Not logged in",
            "This action needs the admin token: log in, or send Authorization: Bearer <token>.",
        );
        refused.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"agent-worker console\""),
        );
        return Err(Box::new(refused));
    }
    if !auth.is_csrf(form.get("csrf").map_or("", String::as_str)) {
        tracing::warn!("console_csrf_refused");
        return Err(Box::new(message(
            console,
            StatusCode::FORBIDDEN,
            Access::Admin,
            "Refused",
            "The form's CSRF token is missing or wrong: reload the page and try again.",
        )));
    }
    Ok(())
}

/// `POST /actions/retry` (`task_id`, `csrf`): puts the dead job back on the ready list.
pub async fn retry(State(console): State<Console>, headers: HeaderMap, body: Bytes) -> Response {
    let form = form(&body);
    if let Err(refused) = check(&console, &headers, &form) {
        return *refused;
    }
    let task = form.get("task_id").map_or("", String::as_str);
    let say = |status, title, text: &str| message(&console, status, Access::Admin, title, text);
    if !is_task_id(task) {
        return say(StatusCode::BAD_REQUEST, "Refused", "That is not a task id.");
    }
    let Some(conn) = console.conn() else {
        return say(
            StatusCode::SERVICE_UNAVAILABLE,
            "Not connected",
            "The worker has not connected to Redis yet.",
        );
    };
    match inspect::retry_dead(conn, &console.0.keys, Some(vec![task.to_owned()])).await {
        Ok(requeued) if requeued.is_empty() => say(
            StatusCode::NOT_FOUND,
            "Not retried",
            &format!("Task {task} is not in the dead set (already retried, or trimmed)."),
        ),
        Ok(_) => {
            tracing::info!(task_id = task, "console_dead_retried");
            say(
                StatusCode::OK,
                "Retried",
                &format!("Task {task} is back on the ready list as a new job."),
            )
        }
        Err(error) => {
            tracing::warn!(error = %error, task_id = task, "console_action_failed");
            say(
                StatusCode::SERVICE_UNAVAILABLE,
                "Failed",
                "Redis refused the retry; the worker's log has the error.",
            )
        }
    }
}

/// `POST /actions/stop` (`session_id`, `csrf`): ends the session as the orchestrator does.
pub async fn stop(State(console): State<Console>, headers: HeaderMap, body: Bytes) -> Response {
    let form = form(&body);
    if let Err(refused) = check(&console, &headers, &form) {
        return *refused;
    }
    let say = |status, title, text: &str| message(&console, status, Access::Admin, title, text);
    let Ok(id) = SessionId::parse(form.get("session_id").map_or("", String::as_str)) else {
        return say(
            StatusCode::BAD_REQUEST,
            "Refused",
            "That is not a session id.",
        );
    };
    let Some(conn) = console.conn() else {
        return say(
            StatusCode::SERVICE_UNAVAILABLE,
            "Not connected",
            "The worker has not connected to Redis yet.",
        );
    };
    match inspect::stop_session(conn, &id).await {
        Ok(false) => say(
            StatusCode::NOT_FOUND,
            "Not stopped",
            &format!("Session {id} has no record: it has ended already."),
        ),
        Ok(true) => {
            tracing::info!(session_id = %id, "console_session_stopped");
            say(
                StatusCode::OK,
                "Stopped",
                &format!(
                    "Session {id}'s keys are deleted; its worker stops the agent at its next \
                     heartbeat."
                ),
            )
        }
        Err(error) => {
            tracing::warn!(error = %error, session_id = %id, "console_action_failed");
            say(
                StatusCode::SERVICE_UNAVAILABLE,
                "Failed",
                "Redis refused the stop; the worker's log has the error.",
            )
        }
    }
}
