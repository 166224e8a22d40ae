//! The page chrome every console page shares (head, navigation, access, footer, the style
//! sheet), the security policy it is sent with, and the fragments pages are built of (tables,
//! field lists, cards, action buttons).
//!
//! Everything is written with [`maud::html!`]: the markup is checked at compile time and every
//! spliced value is escaped (`& < > "`), so a value from Redis or from the request cannot become
//! markup, whichever page shows it. A single quote is left as it is: maud always writes
//! attribute values in double quotes, where `'` is plain text. There is no build step and no
//! external asset (the console must work on an air-gapped cluster), and no script at all. A
//! strict `Content-Security-Policy` ([`CSP`]) is the second line of defence: even markup that
//! got in could not run a script.

use maud::{DOCTYPE, Markup, PreEscaped, Render, html};

/// Sent with every console page: nothing but inline styles, forms to this origin only, no
/// framing (clickjacking of the action buttons), no scripts of any origin.
pub const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; \
                       form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Seconds between automatic reloads of a page (`<meta http-equiv="refresh">`).
pub const REFRESH_SECS: u32 = 5;

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

/// What surrounds a page's body.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// The page's title, also its heading.
    pub title: &'a str,
    /// The path of the navigation entry to highlight (`""`: none).
    pub active: &'a str,
    /// The visitor's rights.
    pub access: Access,
    /// While the page reloads itself every [`REFRESH_SECS`]: the "Pause" link (the page's own
    /// URL with `refresh=0`).
    pub pause: Option<&'a str>,
    /// The CSRF token of an authenticated visitor, for the logout form.
    pub csrf: Option<&'a str>,
}

/// A whole page: `body` inside the chrome of `frame`.
pub fn page(frame: &Frame<'_>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if frame.pause.is_some() {
                    meta http-equiv="refresh" content=(REFRESH_SECS);
                }
                title { (frame.title) " · agent-worker" }
                // A constant of this file, and CSS: a <style> element's content is raw text,
                // where escaping would not be undone.
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    strong { "agent-worker" }
                    nav {
                        @for (path, label) in NAV {
                            a href=(path) class=[(path == frame.active).then_some("active")] {
                                (label)
                            }
                        }
                    }
                    span class="access" { (access(frame.access, frame.csrf)) }
                }
                main {
                    h1 { (frame.title) }
                    (body)
                }
                footer {
                    @if let Some(pause) = frame.pause {
                        "Refreshes every " (REFRESH_SECS) " s. "
                        a href=(pause) { "Pause" }
                    } @else {
                        "Not refreshing."
                    }
                }
            }
        }
    }
}

/// The header's corner: read-only, a login link, or the admin's logout button.
fn access(access: Access, csrf: Option<&str>) -> Markup {
    html! {
        @match (access, csrf) {
            (Access::ReadOnly, _) => "read-only",
            (Access::LoggedOut, _) => a href="/login" { "log in for actions" },
            (Access::Admin, Some(csrf)) => {
                "admin " (action("/logout", csrf, None, "log out"))
            }
            (Access::Admin, None) => "admin",
        }
    }
}

/// A button that POSTs to `path` with the CSRF token and, if given, one named value (the task
/// or session it acts on).
pub fn action(path: &str, csrf: &str, target: Option<(&str, &str)>, button: &str) -> Markup {
    html! {
        form method="post" action=(path) class="inline" {
            input type="hidden" name="csrf" value=(csrf);
            @if let Some((name, value)) = target {
                input type="hidden" name=(name) value=(value);
            }
            button { (button) }
        }
    }
}

/// A table of `rows` under `headers`, or the `empty` sentence when there are none. A row has
/// one cell per header.
pub fn table(headers: &[&str], rows: &[Vec<Markup>], empty: &str) -> Markup {
    html! {
        @if rows.is_empty() {
            p class="empty" { (empty) }
        } @else {
            table {
                thead { tr { @for header in headers { th { (header) } } } }
                tbody {
                    @for row in rows {
                        tr { @for cell in row { td { (cell) } } }
                    }
                }
            }
        }
    }
}

/// A definition list of `(name, value)` pairs.
pub fn fields(pairs: &[(String, String)]) -> Markup {
    html! {
        dl {
            @for (name, value) in pairs {
                dt { (name) }
                dd { (value) }
            }
        }
    }
}

/// A card: a big `value` (a link to `link`, if given) over its `label`.
pub fn card(label: &str, value: impl Render, link: Option<&str>) -> Markup {
    html! {
        div class="card" {
            b {
                @if let Some(link) = link {
                    a href=(link) { (value) }
                } @else {
                    (value)
                }
            }
            (label)
        }
    }
}

/// The console's only style sheet, inline (no external asset).
const STYLE: &str = "\
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
figure{margin:0;background:#fff;padding:.6em 1em;display:inline-block}svg{max-width:100%;height:auto}\
svg text{font-size:11px;fill:#1d2330}.phase-queue rect{fill:#8c959f}.phase-claim rect{fill:#54aeff}\
.phase-alive rect{fill:#d4a72c}.phase-ready rect{fill:#2da44e}.p50{stroke:#0969da}.p99{stroke:#cf222e}\
svg .axis{stroke:#d0d7de}figcaption{color:#687083;font-size:.9em}\
";

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Asserts that `html` holds each of `expected` (naming the first missing one).
    pub(crate) fn assert_has(html: &str, expected: &[&str]) {
        for fragment in expected {
            assert!(html.contains(fragment), "{fragment}: {html}");
        }
    }

    const HOSTILE: &str = r#"<script>alert("x&'y")</script>"#;

    #[test]
    fn spliced_values_are_escaped_in_text_and_attributes() {
        assert_eq!(
            html! { (HOSTILE) }.into_string(),
            "&lt;script&gt;alert(&quot;x&amp;'y&quot;)&lt;/script&gt;"
        );
        let button = action(
            "/actions/stop",
            HOSTILE,
            Some(("session_id", HOSTILE)),
            HOSTILE,
        )
        .into_string();
        assert!(!button.contains("<script"), "{button}");
        assert_eq!(
            button.matches("value=\"&lt;script&gt;").count(),
            2,
            "{button}"
        );
    }

    #[test]
    fn the_chrome_escapes_its_title_and_refreshes_only_with_a_pause_link() {
        let frame = Frame {
            title: "<title>",
            active: "/",
            access: Access::ReadOnly,
            pause: Some("/?refresh=0&x=\"y\""),
            csrf: None,
        };
        let page = page(&frame, fields(&[("<k>".into(), "<v>".into())])).into_string();
        assert!(!page.contains("<title>·") && !page.contains("<k>") && !page.contains("<v>"));
        assert!(
            page.contains("<title>&lt;title&gt; · agent-worker</title>"),
            "{page}"
        );
        assert!(page.contains("http-equiv=\"refresh\""));
        assert!(
            page.contains("href=\"/?refresh=0&amp;x=&quot;y&quot;\">Pause</a>"),
            "{page}"
        );
        assert!(
            page.contains("<a href=\"/\" class=\"active\">Overview</a>"),
            "{page}"
        );
        assert!(page.contains("read-only") && !page.contains("method=\"post\""));
        assert!(!page.contains("<script"));
        let still = page_of(Frame {
            pause: None,
            ..frame
        });
        assert!(!still.contains("http-equiv") && still.contains("Not refreshing."));
    }

    #[test]
    fn an_admin_gets_a_logout_form_with_the_csrf_token() {
        let admin = page_of(Frame {
            title: "t",
            active: "",
            access: Access::Admin,
            pause: None,
            csrf: Some("c0ffee"),
        });
        assert!(
            admin.contains(
                "admin <form method=\"post\" action=\"/logout\" class=\"inline\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"c0ffee\"><button>log out</button></form>"
            ),
            "{admin}"
        );
        let out = page_of(Frame {
            access: Access::LoggedOut,
            csrf: None,
            title: "t",
            active: "",
            pause: None,
        });
        assert!(
            out.contains("<a href=\"/login\">log in for actions</a>"),
            "{out}"
        );
    }

    #[test]
    fn tables_have_one_cell_per_header_or_say_they_are_empty() {
        let rows = vec![vec![html! { "<a>" }, html! { b { "x" } }]];
        assert_eq!(
            table(&["A", "B"], &rows, "none").into_string(),
            "<table><thead><tr><th>A</th><th>B</th></tr></thead>\
             <tbody><tr><td>&lt;a&gt;</td><td><b>x</b></td></tr></tbody></table>"
        );
        assert_eq!(
            table(&["A"], &[], "<none>").into_string(),
            "<p class=\"empty\">&lt;none&gt;</p>"
        );
    }

    #[test]
    fn the_style_sheet_cannot_end_its_element() {
        assert!(!STYLE.contains('<') && !STYLE.contains('&'));
    }

    fn page_of(frame: Frame<'_>) -> String {
        page(&frame, html! {}).into_string()
    }
}
