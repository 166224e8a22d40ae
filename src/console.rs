//! The operator console: server-rendered pages at `/` of the worker's HTTP listener
//! (`http.addr`, beside `/metrics`), answering what an operator asks at 3 a.m. per session:
//! which calls are live, on which worker, with which voice, since when; which starts failed
//! and why; what did that agent print; is a replica full, silent or off-clock?
//!
//! One file per page, each in three steps: a `fetch` that reads through [`crate::inspect`]
//! (the same queries as `status` and `dead list`, bounded per page), a view struct of plain
//! data, and a pure `render(&View) -> Markup`:
//! - [`overview`] (`/`), [`sessions`] (`/sessions`), [`session`] (`/sessions/{id}`),
//!   [`workers`] (`/workers`), [`dead`] (`/dead`), [`login`] (`/login`).
//! - [`layout`]: the chrome every page shares (head, navigation, style sheet, footer), the
//!   security policy, and the fragments pages are built of; [`mod@format`]: durations, times, cut
//!   texts; [`visit`]: one request (access, refresh, the "not connected" and "Redis failed"
//!   pages); [`mask`]: what a session's page may show of its prompts.
//! - [`actions`]: with `http.admin_token` only, the login form and the POST actions "retry
//!   dead job" (as `agent-worker dead retry`) and "stop session" (as the orchestrator's end of
//!   session). Without the setting those routes do not exist at all.
//! - [`auth`]: the token, cookie and CSRF checks (constant time); [`rates`]: starts and
//!   failures per minute.
//!
//! Every page is plain HTML with inline styles, no script, no external asset (air-gapped
//! clusters), reloading itself every few seconds with `<meta http-equiv="refresh">`. It is
//! written with `maud`, which escapes every value it splices in: a value from Redis or the
//! request cannot become markup. Prompt texts (`systemPrompt`, `openingLine`) are never shown
//! unless `http.console_show_config` (see docs/console.md).

pub mod actions;
pub mod auth;
pub mod dead;
pub mod format;
pub mod layout;
pub mod login;
pub mod mask;
pub mod overview;
pub mod rates;
pub mod session;
pub mod sessions;
pub mod startup_chart;
pub mod timeline;
pub mod visit;
pub mod workers;

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use crate::connection::RedisConn;
use agent_jobs::QueueKeys;
use axum::{
    Router,
    extract::DefaultBodyLimit,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use self::{auth::AdminAuth, layout::Access, rates::Rates};
use crate::settings::Settings;

/// Largest form body accepted (a task or session id and a token fit many times over).
const MAX_FORM_BYTES: usize = 16 * 1024;

/// The console: its settings, its Redis connection once there is one, its credentials.
/// Cheap to clone (shared).
#[derive(Clone)]
pub struct Console(Arc<Inner>);

struct Inner {
    /// Set once the worker has connected (the listener answers before Redis does).
    redis: OnceLock<RedisConn>,
    keys: QueueKeys,
    orphan_timeout: Duration,
    show_config: bool,
    auth: Option<AdminAuth>,
    rates: Arc<Rates>,
    handle: PrometheusHandle,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("queue", &self.0.keys.queue())
            .field("actions", &self.has_actions())
            .finish_non_exhaustive()
    }
}

impl Console {
    /// The console of `settings` (its queue, `worker.orphan_timeout`, the `http.*` console
    /// keys), reading rates from `handle`. An admin token that cannot be read now (its file
    /// vanished since the settings were validated) leaves the console read-only, logged.
    pub fn new(settings: &Settings, handle: PrometheusHandle) -> Self {
        let auth = match settings.http.admin_token() {
            Ok(token) => token.as_ref().map(AdminAuth::new),
            Err(error) => {
                tracing::error!(error = %error, "console_admin_token_unreadable");
                None
            }
        };
        Self(Arc::new(Inner {
            redis: OnceLock::new(),
            keys: QueueKeys::new(&settings.redis.queue).expect("redis.queue is validated"),
            orphan_timeout: settings.worker.orphan_timeout,
            show_config: settings.http.console_show_config,
            auth,
            rates: Arc::new(Rates::default()),
            handle,
        }))
    }

    /// Hands the console the worker's connection (pages say "not connected" until then).
    pub fn connected(&self, conn: RedisConn) {
        let _ = self.0.redis.set(conn);
    }

    /// Whether the write actions exist (`http.admin_token` is set).
    pub fn has_actions(&self) -> bool {
        self.0.auth.is_some()
    }

    /// Reads the rate counters until `shutdown` (see [`rates`]).
    pub async fn sample_rates(self, shutdown: CancellationToken) {
        rates::sample_loop(self.0.handle.clone(), self.0.rates.clone(), shutdown).await
    }

    /// The console's routes, to be merged into the listener's.
    pub fn router(&self) -> Router {
        let mut router = Router::new()
            .route("/", get(overview::page))
            .route("/sessions", get(sessions::page))
            .route("/sessions/{id}", get(session::page))
            .route("/workers", get(workers::page))
            .route("/dead", get(dead::page));
        if self.has_actions() {
            router = router
                .route("/login", get(actions::login_form).post(actions::login))
                .route("/logout", post(actions::logout))
                .route("/actions/retry", post(actions::retry))
                .route("/actions/stop", post(actions::stop));
        }
        router
            .layer(DefaultBodyLimit::max(MAX_FORM_BYTES))
            .with_state(self.clone())
    }

    fn conn(&self) -> Option<&RedisConn> {
        self.0.redis.get()
    }

    fn access(&self, headers: &HeaderMap) -> Access {
        match &self.0.auth {
            None => Access::ReadOnly,
            Some(auth) if auth.is_authenticated(headers) => Access::Admin,
            Some(_) => Access::LoggedOut,
        }
    }

    /// The CSRF token, for an authenticated visitor only.
    fn csrf_for(&self, access: Access) -> Option<&str> {
        match (access, &self.0.auth) {
            (Access::Admin, Some(auth)) => Some(auth.csrf_token()),
            _ => None,
        }
    }
}

/// An HTML response with the console's security headers: the [`layout::CSP`], no caching (the
/// pages are live and may be an admin's), no MIME sniffing, no referrer (ids in URLs).
fn respond(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CONTENT_SECURITY_POLICY, layout::CSP),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}
