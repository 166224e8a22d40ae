//! One request for a console page: who asks (their [`Access`]), whether the page reloads
//! itself, its query parameters, and the responses every page shares: the page itself, "not
//! connected yet", and "Redis failed".
//!
//! A page handler is three steps: a [`Visit`] of the request, the page's fetch (through
//! [`crate::inspect`]) into its view, and its render; a failed read becomes
//! [`Visit::failed`]'s page, whose text names what was read, never Redis's error.

use std::{collections::HashMap, convert::Infallible};

use crate::connection::RedisConn;
use axum::{
    extract::FromRequestParts,
    http::{HeaderMap, StatusCode, request::Parts},
    response::Response,
};
use maud::{Markup, html};

use super::{
    Console,
    layout::{self, Access, Frame},
    respond,
};

/// A read for a page that Redis refused or did not answer.
#[derive(Debug, thiserror::Error)]
#[error("reading {what} failed: {error}")]
pub struct QueryFailed {
    /// What was read, as the page says it ("the status", "the dead jobs").
    pub what: &'static str,
    /// Redis's error (logged, not shown).
    #[source]
    pub error: redis::RedisError,
}

impl QueryFailed {
    /// The `map_err` of a read of `what`.
    pub fn reading(what: &'static str) -> impl FnOnce(redis::RedisError) -> Self {
        move |error| Self { what, error }
    }
}

/// What a page handler needs to answer: who asks, what they asked for, whether to refresh.
/// Extracted from the request by axum, as a handler argument.
pub struct Visit {
    console: Console,
    access: Access,
    /// The navigation entry of the page: the path's first segment (`/sessions` for
    /// `/sessions/<id>`).
    active: String,
    /// The query's parameters but `refresh` (the last value of a repeated one wins).
    params: HashMap<String, String>,
    /// The page's own URL with `refresh=0`, while it refreshes.
    pause: Option<String>,
}

impl FromRequestParts<Console> for Visit {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, console: &Console) -> Result<Self, Infallible> {
        Ok(Self::new(
            console,
            &parts.headers,
            parts.uri.path(),
            parts.uri.query(),
        ))
    }
}

impl Visit {
    /// A visit of `path` with the query `raw`.
    fn new(console: &Console, headers: &HeaderMap, path: &str, raw: Option<&str>) -> Self {
        let mut params: HashMap<String, String> =
            form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
                .into_owned()
                .collect();
        let refresh = params.remove("refresh").as_deref() != Some("0");
        let pause = refresh.then(|| {
            let mut query = form_urlencoded::Serializer::new(String::new());
            let mut kept: Vec<_> = params.iter().collect();
            kept.sort();
            query.extend_pairs(kept).append_pair("refresh", "0");
            format!("{path}?{}", query.finish())
        });
        let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
        Self {
            console: console.clone(),
            access: console.access(headers),
            active: format!("/{first}"),
            params,
            pause,
        }
    }

    /// The query parameter `name` (`""` when absent).
    pub fn param(&self, name: &str) -> &str {
        self.params.get(name).map_or("", String::as_str)
    }

    /// The CSRF token, when the visitor may act (their pages get action buttons).
    pub fn csrf(&self) -> Option<&str> {
        self.console.csrf_for(self.access)
    }

    /// The CSRF token as a view holds it.
    pub fn csrf_owned(&self) -> Option<String> {
        self.csrf().map(str::to_owned)
    }

    /// The page `title` with `body`. Only a successful page refreshes itself.
    pub fn page(&self, status: StatusCode, title: &str, body: Markup) -> Response {
        let frame = Frame {
            title,
            active: &self.active,
            access: self.access,
            pause: self.pause.as_deref().filter(|_| status.is_success()),
            csrf: self.csrf(),
        };
        respond(status, layout::page(&frame, body).into_string())
    }

    /// The page `title` rendered from a fetch's `result`, or the page saying what failed.
    pub fn show(&self, title: &str, result: Result<Markup, QueryFailed>) -> Response {
        match result {
            Ok(body) => self.page(StatusCode::OK, title, body),
            Err(failed) => self.failed(failed),
        }
    }

    /// The worker's connection, once it has connected (else [`Visit::not_connected`]).
    pub fn conn(&self) -> Option<&RedisConn> {
        self.console.conn()
    }

    /// The page saying there is no connection yet.
    pub fn not_connected(&self) -> Response {
        self.page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Not connected",
            html! {
                p class="bad" { "The worker has not connected to Redis yet (see /readyz)." }
            },
        )
    }

    /// The page for a failed read; the error goes to the log, not to the page (it is Redis's
    /// text, and the page may be seen by more people than the log).
    pub fn failed(&self, failed: QueryFailed) -> Response {
        tracing::warn!(error = %failed.error, query = failed.what, "console_query_failed");
        crate::metrics::redis_error("console");
        self.page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Redis error",
            html! {
                p class="bad" {
                    "Reading " (failed.what) " from Redis failed; the worker's log has the \
                     error (console_query_failed)."
                }
            },
        )
    }
}
