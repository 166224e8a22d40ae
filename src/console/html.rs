//! The console's HTML: escaping, the page layout, and the small formatters every page uses.
//!
//! Pages are plain strings built server-side: no template engine, no build step, no external
//! asset (the console must work on an air-gapped cluster), no script at all. Every value that
//! comes from Redis or from the request (session ids, voices, user names, log lines, errors,
//! query parameters) goes through [`esc`] before it reaches a page; a strict
//! `Content-Security-Policy` ([`CSP`]) is the second line of defence, so even a value that
//! slipped through could not run a script.

use std::fmt::Write;

/// Sent with every console page: nothing but inline styles, forms to this origin only, no
/// framing (clickjacking of the action buttons), no scripts of any origin.
pub const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; \
                       form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Seconds between automatic reloads of a page (`<meta http-equiv="refresh">`).
pub const REFRESH_SECS: u32 = 5;

/// `text` with `& < > " '` replaced by entities: safe in element content and in quoted
/// attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `text` percent-encoded for a query string value (then still [`esc`]aped in an attribute).
pub fn query_value(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// The navigation entries: path and label.
const NAV: [(&str, &str); 4] = [
    ("/", "Overview"),
    ("/sessions", "Sessions"),
    ("/workers", "Workers"),
    ("/dead", "Dead jobs"),
];

/// What the page header says about the visitor's rights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No admin token is configured: read-only, no login.
    ReadOnly,
    /// Actions exist, the visitor is not authenticated.
    LoggedOut,
    /// Authenticated: action buttons are shown.
    Admin,
}

/// A whole page around `body` (already HTML). `refresh`: reload every [`REFRESH_SECS`], with
/// a "Pause" link to this URL (the page's own, with `refresh=0`). `csrf`: the CSRF token, for
/// the logout form of an authenticated visitor.
pub fn page(
    title: &str,
    active: &str,
    access: Access,
    refresh: Option<&str>,
    csrf: Option<&str>,
    body: &str,
) -> String {
    let mut out = String::with_capacity(body.len() + 2048);
    out.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">");
    if refresh.is_some() {
        let _ = write!(
            out,
            "<meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">"
        );
    }
    let _ = write!(out, "<title>{} · agent-worker</title>", esc(title));
    out.push_str(STYLE);
    out.push_str("</head><body><header><strong>agent-worker</strong><nav>");
    for (path, label) in NAV {
        let class = if path == active {
            " class=\"active\""
        } else {
            ""
        };
        let _ = write!(out, "<a href=\"{path}\"{class}>{label}</a>");
    }
    out.push_str("</nav><span class=\"access\">");
    match (access, csrf) {
        (Access::ReadOnly, _) => out.push_str("read-only"),
        (Access::LoggedOut, _) => out.push_str("<a href=\"/login\">log in for actions</a>"),
        (Access::Admin, Some(csrf)) => {
            let _ = write!(
                out,
                "admin <form method=\"post\" action=\"/logout\" class=\"inline\">{}\
                 <button>log out</button></form>",
                csrf_field(csrf)
            );
        }
        (Access::Admin, None) => out.push_str("admin"),
    }
    out.push_str("</span></header><main>");
    let _ = write!(out, "<h1>{}</h1>", esc(title));
    out.push_str(body);
    out.push_str("</main><footer>");
    if let Some(pause) = refresh {
        let _ = write!(
            out,
            "Refreshes every {REFRESH_SECS} s. <a href=\"{}\">Pause</a>",
            esc(pause)
        );
    } else {
        out.push_str("Not refreshing.");
    }
    out.push_str("</footer></body></html>\n");
    out
}

/// The hidden CSRF field of a form.
pub fn csrf_field(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(csrf)
    )
}

/// A table: `headers` as they are (static text), `rows` cells already HTML.
pub fn table(headers: &[&str], rows: &[Vec<String>], empty: &str) -> String {
    if rows.is_empty() {
        return format!("<p class=\"empty\">{}</p>", esc(empty));
    }
    let mut out = String::from("<table><thead><tr>");
    for h in headers {
        let _ = write!(out, "<th>{h}</th>");
    }
    out.push_str("</tr></thead><tbody>");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            let _ = write!(out, "<td>{cell}</td>");
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    out
}

/// A definition list of `(name, value)` pairs, both escaped here.
pub fn fields(pairs: &[(String, String)]) -> String {
    let mut out = String::from("<dl>");
    for (name, value) in pairs {
        let _ = write!(out, "<dt>{}</dt><dd>{}</dd>", esc(name), esc(value));
    }
    out.push_str("</dl>");
    out
}

/// A duration in seconds as `42 s`, `3 m 20 s`, `2 h 5 m`, `3 d 4 h`.
pub fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} m {} s", s / 60, s % 60),
        s if s < 86_400 => format!("{} h {} m", s / 3600, (s % 3600) / 60),
        s => format!("{} d {} h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// How long ago unix time `then` was at `now`: `12 s ago`; `-` when unknown.
pub fn ago(then: Option<u64>, now: u64) -> String {
    match then {
        Some(then) if then <= now => format!("{} ago", duration(now - then)),
        Some(_) => "in the future (clock skew)".into(),
        None => "-".into(),
    }
}

/// Unix seconds as an RFC 3339 UTC time; `-` when unknown.
pub fn time(unix: Option<u64>) -> String {
    unix.and_then(|t| chrono::DateTime::from_timestamp(t as i64, 0))
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| "-".into())
}

/// At most `max` characters of `text`, with `…` when cut (log lines can be 64 KiB).
pub fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

const STYLE: &str = "<style>\
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}\
header{display:flex;gap:1.5em;align-items:center;padding:.6em 1.2em;background:#1d2330;color:#fff}\
header a{color:#cfd6e4;text-decoration:none;margin-right:1em}header a.active{color:#fff;font-weight:600}\
header .access{margin-left:auto;color:#cfd6e4}main{padding:1em 1.2em}h1{font-size:1.3em;margin:.2em 0 .8em}\
h2{font-size:1.05em;margin:1.4em 0 .5em}table{border-collapse:collapse;background:#fff;width:100%}\
th,td{text-align:left;padding:.3em .6em;border-bottom:1px solid #e3e6eb;vertical-align:top}\
th{background:#eef0f4;font-weight:600}td.num,th.num{text-align:right}\
.cards{display:flex;flex-wrap:wrap;gap:.8em}.card{background:#fff;border:1px solid #e3e6eb;padding:.6em 1em;min-width:9em}\
.card b{display:block;font-size:1.5em}.status-ready{color:#1a7f37}.status-starting{color:#9a6700}\
.status-error,.bad{color:#cf222e}.warn{color:#9a6700}pre.logs{background:#0f1420;color:#d8dee9;padding:.8em;overflow:auto;max-height:40em}\
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em;background:#fff;padding:.6em 1em}\
dt{font-weight:600}dd{margin:0;word-break:break-all}form.inline{display:inline}\
.empty{color:#687083}footer{padding:1em 1.2em;color:#687083}.placeholder{border-style:dashed;color:#687083}\
</style>";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            esc(r#"<script>alert("x&'y")</script>"#),
            "&lt;script&gt;alert(&quot;x&amp;&#39;y&quot;)&lt;/script&gt;"
        );
        assert_eq!(query_value("a b&c=<d>"), "a+b%26c%3D%3Cd%3E");
        let page = page(
            "<title>",
            "/",
            Access::ReadOnly,
            Some("/?refresh=0"),
            None,
            &fields(&[("<k>".into(), "<v>".into())]),
        );
        assert!(!page.contains("<title>·") && !page.contains("<k>") && !page.contains("<v>"));
        assert!(page.contains("http-equiv=\"refresh\""));
        assert!(!page.contains("<script"));
    }

    #[test]
    fn formatters() {
        assert_eq!(duration(59), "59 s");
        assert_eq!(duration(200), "3 m 20 s");
        assert_eq!(duration(7500), "2 h 5 m");
        assert_eq!(ago(Some(90), 100), "10 s ago");
        assert_eq!(ago(None, 100), "-");
        assert_eq!(time(Some(0)), "1970-01-01 00:00:00 UTC");
        assert_eq!(truncate("abcdef", 3), "abc…");
        assert_eq!(truncate("ab", 3), "ab");
    }
}
