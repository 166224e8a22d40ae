//! The operator console against a private redis-server, real workers and real test-agent
//! sessions: what its pages show (and never show), what a page costs in Redis commands over
//! 10,000 sessions, that its write routes exist only with an admin token and then need both
//! the token and the CSRF token, and that a real browser renders it.

mod common;

use agent_worker::connection::RedisConn;
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    time::Duration,
};

use agent_jobs::{QueueKeys, SessionKeys, keys};
use agent_worker::{
    console::Console, health::Health, http, jobs::retention::Retention, metrics, settings::Settings,
};
use common::*;
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

/// A prompt no page may show (it may hold customer data).
const PROMPT: &str = "PROMPT-customer-secret-7f3a: you are a careful assistant";
const OPENING: &str = "OPENING-customer-secret-91bc hello";
/// A voice that would run a script if any page failed to escape it (it also reaches the
/// agent's log lines, which print their arguments).
const HOSTILE_VOICE: &str = "<script>alert('voice')</script>";
const ADMIN_TOKEN: &str = "console-test-admin-token-0123456789";

fn queue() -> QueueKeys {
    QueueKeys::new(QUEUE).unwrap()
}

/// A worker serving HTTP on a port of our choice (the in-process worker does not tell its
/// port), with the test agent `ready` and `overrides`.
fn start_worker(redis: &TestRedis, overrides: &[(&str, &str)]) -> (TestWorker, SocketAddr) {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let addr_text = addr.to_string();
    let mut all = vec![
        ("AGENT_WORKER__HTTP__ADDR", addr_text.as_str()),
        HEARTBEAT_EVERY_SECOND,
    ];
    all.extend_from_slice(overrides);
    let worker = TestWorker::start(redis.settings("ready", &all));
    (worker, addr)
}

/// The console alone (no worker) on `conn`, served on a free port.
struct ConsoleAlone {
    server: http::HttpServer,
    stop: CancellationToken,
}

impl ConsoleAlone {
    async fn start(settings: &Settings, conn: RedisConn) -> Self {
        let console = Console::new(settings, metrics::install_recorder());
        console.connected(conn);
        let stop = CancellationToken::new();
        let server = http::serve_with(
            "127.0.0.1:0".parse().unwrap(),
            metrics::install_recorder(),
            Health::new(),
            console.router(),
            stop.clone(),
        )
        .await
        .unwrap();
        Self { server, stop }
    }

    fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Stops serving and waits until the listener is gone.
    async fn stop(self) {
        self.stop.cancel();
        self.server.stopped().await.unwrap();
    }
}

/// Waits until the console answers with its overview (Redis connected).
async fn wait_console(addr: SocketAddr) {
    wait_for("the console", Duration::from_secs(15), || async {
        http_get(addr, "/")
            .await
            .filter(|(code, _)| *code == 200)
            .map(|_| ())
    })
    .await;
}

/// Starts a session through the queue and waits until its agent is ready.
async fn start_session(conn: &RedisConn, id: &str, voice: &str) -> String {
    let id = sid(id);
    write_full_config(conn, &id, voice, "test_user", Some(OPENING), Some(PROMPT)).await;
    let task = enqueue(conn, &id, Some("test_user")).await;
    wait_status(conn, &id, "ready", Duration::from_secs(20)).await;
    // The orchestrator writes its own fields into the record too, the prompt texts among them.
    let _: () = conn
        .clone()
        .hset_multiple(
            SessionKeys::new(&id).state(),
            &[("systemPrompt", PROMPT), ("openingLine", OPENING)],
        )
        .await
        .unwrap();
    task
}

/// A job that fails for good: its session's config key is a string, not a hash.
async fn dead_job(conn: &RedisConn, id: &str) -> String {
    let id = sid(id);
    let _: () = conn
        .clone()
        .set(SessionKeys::new(&id).config(), "not a hash")
        .await
        .unwrap();
    let task = enqueue(conn, &id, None).await;
    wait_dead(conn, &task).await;
    task
}

/// The value of the first `name="csrf" value="..."` field of a page.
fn csrf_of(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .unwrap_or_else(|| panic!("a CSRF field in {page}"));
    let rest = &page[at + "name=\"csrf\" value=\"".len()..];
    rest[..rest.find('"').unwrap()].to_owned()
}

/// Asserts that no page leaks the prompt texts or unescaped markup of the hostile voice.
fn assert_clean(path: &str, page: &str) {
    for secret in [PROMPT, OPENING, "customer-secret"] {
        assert!(!page.contains(secret), "{path} shows {secret:?}: {page}");
    }
    assert!(
        !page.contains("<script"),
        "{path} has a script element: {page}"
    );
}

/// The text of an HTML fragment: tags dropped, the entities the console writes decoded.
fn text_of(html: &str) -> String {
    let mut text = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
        .trim()
        .to_owned()
}

/// The rows of a page's (or a rendered DOM's) first table, each as column header → cell
/// text. Works on the console's markup and on Chromium's serialization of it.
fn table_rows(page: &str) -> Vec<HashMap<String, String>> {
    let section = |open: &str, close: &str| -> &str {
        let start = page
            .find(open)
            .unwrap_or_else(|| panic!("no {open} in {page}"));
        let rest = &page[start + open.len()..];
        &rest[..rest.find(close).unwrap_or_else(|| panic!("no {close}"))]
    };
    let headers: Vec<String> = section("<thead>", "</thead>")
        .split("<th")
        .skip(1)
        .map(|cell| text_of(&format!("<th{cell}")))
        .collect();
    section("<tbody>", "</tbody>")
        .split("<tr")
        .skip(1)
        .map(|row| {
            let cells: Vec<String> = row
                .split("<td")
                .skip(1)
                .map(|cell| text_of(&format!("<td{cell}")))
                .collect();
            assert_eq!(cells.len(), headers.len(), "a row of {headers:?}: {row}");
            headers.iter().cloned().zip(cells).collect()
        })
        .collect()
}

/// The sessions table of a page: session id → (status, voice, user, worker), one entry per
/// row (a session listed twice fails).
fn session_rows(page: &str) -> HashMap<String, (String, String, String, String)> {
    let rows = table_rows(page);
    let by_id: HashMap<String, (String, String, String, String)> = rows
        .iter()
        .map(|row| {
            let cell = |name: &str| {
                row.get(name)
                    .unwrap_or_else(|| panic!("no {name} column"))
                    .clone()
            };
            (
                cell("Session"),
                (cell("Status"), cell("Voice"), cell("User"), cell("Worker")),
            )
        })
        .collect();
    assert_eq!(by_id.len(), rows.len(), "each session once: {page}");
    by_id
}

/// The row a ready session of `voice` on `worker` has, user `test_user` ([`start_session`]).
fn ready_row(voice: &str, worker: &str) -> (String, String, String, String) {
    (
        "ready".into(),
        voice.into(),
        "test_user".into(),
        worker.into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_show_live_sessions_and_failures_but_never_prompts_and_have_no_write_routes() {
    let redis = TestRedis::start().await;
    let conn = &redis.conn;
    let (worker, addr) = start_worker(&redis, &[]);
    wait_console(addr).await;
    start_session(conn, "console-craig", "Craig").await;
    start_session(conn, "console-hostile", HOSTILE_VOICE).await;
    let dead = dead_job(conn, "console-broken").await;
    let worker_id = hget(conn, "session:console-craig", "workerId")
        .await
        .expect("the record names its worker");
    // The hostile voice reached the agent's log lines too (the test agent prints its argv).
    let logs: Vec<String> = conn
        .clone()
        .lrange("agent:console-hostile:logs", 0, -1)
        .await
        .unwrap();
    assert!(logs.iter().any(|l| l.contains(HOSTILE_VOICE)), "{logs:?}");
    assert!(logs.iter().any(|l| l.contains(PROMPT)), "{logs:?}");

    let (code, sessions) = get(addr, "/sessions").await;
    assert_eq!(code, 200, "{sessions}");
    assert_clean("/sessions", &sessions);
    // Row by row: each live session with its own voice, user and worker (and no dead one).
    let both = HashMap::from([
        ("console-craig".to_owned(), ready_row("Craig", &worker_id)),
        (
            "console-hostile".to_owned(),
            ready_row(HOSTILE_VOICE, &worker_id),
        ),
    ]);
    assert_eq!(session_rows(&sessions), both, "{sessions}");
    // The hostile voice is text, escaped, not markup: its whole cell (maud escapes `& < > "`;
    // a `'` is plain text in element content and in its double-quoted attributes).
    assert!(
        sessions.contains("<td>&lt;script&gt;alert('voice')&lt;/script&gt;</td>"),
        "{sessions}"
    );
    // Filters: by status and by worker.
    let (_, starting) = get(addr, "/sessions?status=starting").await;
    assert_clean("/sessions?status=starting", &starting);
    assert!(!starting.contains("console-craig"), "{starting}");
    let (_, other) = get(addr, "/sessions?worker=another-worker").await;
    assert_clean("/sessions?worker=another-worker", &other);
    assert!(!other.contains("console-craig"), "{other}");
    let (_, mine) = get(addr, &format!("/sessions?status=ready&worker={worker_id}")).await;
    assert_clean("/sessions?status=ready&worker=...", &mine);
    assert_eq!(session_rows(&mine), both, "{mine}");
    // Pages reload themselves; "Pause" keeps the filters, and a paused page stays still.
    assert!(mine.contains("http-equiv=\"refresh\""), "{mine}");
    let pause = format!("/sessions?status=ready&amp;worker={worker_id}&amp;refresh=0");
    assert!(mine.contains(&pause), "{mine}");
    let (_, paused) = get(addr, &pause.replace("&amp;", "&")).await;
    assert!(
        paused.contains("console-craig") && !paused.contains("http-equiv"),
        "{paused}"
    );
    assert_clean("a paused /sessions", &paused);

    let (code, one) = get(addr, "/sessions/console-hostile").await;
    assert_eq!(code, 200, "{one}");
    assert_clean("/sessions/console-hostile", &one);
    for expected in [
        "systemPrompt",
        "openingLine",
        "voiceId",
        "[systemPrompt hidden]",
        "Room joined",
        "attempts",
        &format!("(hidden, {} bytes)", PROMPT.len()),
    ] {
        assert!(
            one.contains(expected),
            "the session page lacks {expected}: {one}"
        );
    }
    let (code, gone) = get(addr, "/sessions/no-such-session").await;
    assert_eq!(code, 404, "{gone}");
    assert_clean("/sessions/no-such-session", &gone);
    let (code, unknown) = get(addr, "/no-such-page").await;
    assert_eq!(code, 404, "{unknown}");
    assert_clean("/no-such-page", &unknown);
    let (code, bad) = get(addr, "/sessions/%3Cscript%3E").await;
    assert_eq!(code, 404);
    assert_clean("/sessions/<script>", &bad);

    let (code, overview) = get(addr, "/").await;
    assert_eq!(code, 200);
    assert_clean("/", &overview);
    assert!(overview.contains("Warm pool"), "{overview}");
    assert!(
        overview.contains(&dead),
        "recent failures list {dead}: {overview}"
    );
    assert!(
        overview.contains("session:console-broken:config is a Redis string, not a hash"),
        "the reason: {overview}"
    );
    let (code, dead_page) = get(addr, "/dead").await;
    assert_eq!(code, 200);
    assert_clean("/dead", &dead_page);
    assert!(
        dead_page.contains(&dead) && dead_page.contains("console-broken"),
        "{dead_page}"
    );
    // Once retention has indexed it by time, it is read from that index instead: still there.
    let retention = Retention::from_settings(conn.clone(), queue(), &redis.settings("ready", &[]));
    retention
        .run(agent_worker::clock::unix_now())
        .await
        .unwrap();
    let indexed: Option<f64> = conn.clone().zscore(queue().dead_at(), &dead).await.unwrap();
    assert!(indexed.is_some());
    let (_, indexed_page) = get(addr, "/dead").await;
    assert_clean("/dead (indexed)", &indexed_page);
    assert!(
        indexed_page.contains(&dead) && indexed_page.contains("1 dead job"),
        "{indexed_page}"
    );
    // Agents / max as the worker's last presence tick reported them.
    let workers = wait_for(
        "the workers page to count 2 agents",
        Duration::from_secs(10),
        || async {
            let (code, page) = get(addr, "/workers").await;
            (code == 200 && page.contains(">2 / 20</a>")).then_some(page)
        },
    )
    .await;
    assert_clean("/workers", &workers);
    assert!(workers.contains(&worker_id), "{workers}");
    assert!(workers.contains(env!("CARGO_PKG_VERSION")), "{workers}");
    assert!(
        workers.contains(" ms</span>"),
        "the clock offset: {workers}"
    );

    // Read-only: no forms that write, and no write route at all.
    for page in [&sessions, &one, &overview, &dead_page, &workers] {
        assert!(!page.contains("method=\"post\""), "{page}");
        assert!(page.contains("read-only"), "{page}");
    }
    for path in [
        "/login",
        "/logout",
        "/actions/retry",
        "/actions/stop",
        "/",
        "/sessions",
    ] {
        let body = format!("task_id={dead}&session_id=console-craig&token={ADMIN_TOKEN}");
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let (code, _) = post(addr, path, &[("Authorization", &auth)], &body).await;
        assert!(code == 404 || code == 405, "POST {path}: {code}");
    }
    assert_eq!(get(addr, "/login").await.0, 404);

    // Every series the Grafana dashboard queries is one src/metrics.rs defines (a histogram's
    // by its _bucket, _count and _sum series).
    let dashboard = include_str!("../deploy/grafana/agent-worker.json");
    let defined = include_str!("../src/metrics.rs");
    let mut queried: Vec<&str> = dashboard
        .match_indices("agent_worker_")
        .map(|(at, _)| {
            let rest = &dashboard[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    queried.sort();
    queried.dedup();
    assert!(queried.len() >= 15, "{queried:?}");
    for series in queried {
        let name = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| series.strip_suffix(suffix))
            .unwrap_or(series);
        assert!(
            defined.contains(&format!("\"{name}\"")),
            "the dashboard queries {series}, which src/metrics.rs does not define"
        );
    }
    assert!(is_member(conn, &queue().dead(), &dead).await);
    assert_eq!(
        status(conn, &sid("console-craig")).await.as_deref(),
        Some("ready")
    );
    worker.stop().await;
}

/// Writes `n` ready sessions straight into the indexes and records the worker keeps, spread
/// over two workers, in pipelines of 1,000.
async fn write_sessions(conn: &RedisConn, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for i in chunk {
            let id = format!("bulk-{i:05}");
            let worker = if i % 2 == 0 {
                "worker-even"
            } else {
                "worker-odd"
            };
            pipe.sadd(keys::SESSIONS_READY, &id)
                .ignore()
                .hset_multiple(
                    format!("session:{id}"),
                    &[
                        ("status", "ready"),
                        ("voiceId", "Olivia"),
                        ("userId", "bulk_user"),
                        ("workerId", worker),
                        ("createdAt", "1700000000"),
                        ("startupTime", "0.5"),
                        ("lastActive", "1700000100"),
                    ],
                )
                .ignore();
        }
        pipe.query_async::<()>(&mut conn.clone()).await.unwrap();
    }
}

/// The commands `GET path` cost, by command (the `INFO` and `CONFIG` of the measurement
/// itself left out), and the page.
async fn measured(
    conn: &RedisConn,
    addr: SocketAddr,
    path: &str,
) -> (HashMap<String, u64>, String) {
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    let (code, page) = get(addr, path).await;
    assert_eq!(code, 200, "{path}: {page}");
    let mut calls = command_calls(conn).await;
    calls.remove("info");
    calls.remove("config|resetstat");
    (calls, page)
}

/// The `Next page` link of a sessions page.
fn next_link(page: &str) -> Option<String> {
    let end = page.find("\">Next page</a>")?;
    let start = page[..end].rfind("href=\"")? + "href=\"".len();
    Some(page[start..end].replace("&amp;", "&"))
}

fn ids_on(page: &str) -> Vec<String> {
    page.match_indices("<a href=\"/sessions/")
        .map(|(at, _)| {
            let rest = &page[at + "<a href=\"/sessions/".len()..];
            rest[..rest.find('"').unwrap()].to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_over_ten_thousand_sessions_costs_a_bounded_number_of_commands() {
    const SESSIONS: usize = 10_000;
    let redis = TestRedis::start().await;
    let conn = &redis.conn;
    write_sessions(conn, SESSIONS).await;
    // The console alone (no worker): then every command Redis counts is the page's.
    let settings = redis.settings("ready", &[]);
    let server = ConsoleAlone::start(&settings, conn.clone()).await;
    let addr = server.addr();

    // Page by page through all of them: each page is bounded, and every session shows up.
    let page_limit = (agent_worker::inspect::sessions::PAGE_SIZE
        + agent_worker::inspect::sessions::MAX_SCANS) as u64;
    let mut seen = HashSet::new();
    let mut path = "/sessions".to_owned();
    let mut pages = 0;
    let mut most = 0;
    loop {
        let (calls, page) = measured(conn, addr, &path).await;
        pages += 1;
        for forbidden in ["keys", "scan", "smembers", "hgetall"] {
            assert!(
                !calls.contains_key(forbidden),
                "{path}: {forbidden} in {calls:?}"
            );
        }
        let total: u64 = calls.values().sum();
        assert!(total <= page_limit, "{path}: {total} commands: {calls:?}");
        most = most.max(total);
        let ids = ids_on(&page);
        assert!(
            ids.len() <= agent_worker::inspect::sessions::PAGE_SIZE,
            "{}",
            ids.len()
        );
        seen.extend(ids);
        match next_link(&page) {
            Some(next) => path = next,
            None => break,
        }
        assert!(pages < SESSIONS, "paging does not end");
    }
    assert_eq!(
        seen.len(),
        SESSIONS,
        "every session on some page ({pages} pages)"
    );
    eprintln!(
        "sessions pages: {pages} pages over {SESSIONS} sessions, at most {most} commands per page"
    );

    // The worker filter applies per page: only that worker's sessions.
    let (calls, page) = measured(conn, addr, "/sessions?worker=worker-odd").await;
    assert!(calls.values().sum::<u64>() <= page_limit, "{calls:?}");
    assert!(
        page.contains("worker-odd") && !page.contains(">worker-even<"),
        "{page}"
    );

    // The overview's cost does not grow with the sessions either.
    let (calls, page) = measured(conn, addr, "/").await;
    let total: u64 = calls.values().sum();
    eprintln!("overview: {total} commands: {calls:?}");
    assert!(total <= 20, "overview: {calls:?}");
    assert!(page.contains(&SESSIONS.to_string()), "ready count: {page}");
    for forbidden in ["keys", "scan", "sscan"] {
        assert!(!calls.contains_key(forbidden), "{calls:?}");
    }
    let (calls, _) = measured(conn, addr, "/sessions/bulk-00042").await;
    assert!(calls.values().sum::<u64>() <= 6, "session page: {calls:?}");

    // 1,000 dead jobs, indexed by retention: the dead page reads 50 of them, not all.
    let q = queue();
    let mut pipe = redis::pipe();
    for i in 0..1000u64 {
        let task = format!("dead-{i:04}");
        pipe.sadd(q.dead(), &task)
            .ignore()
            .zadd(q.dead_at(), &task, 1_700_000_000 + i)
            .ignore()
            .hset_multiple(
                q.meta(&task),
                &[
                    ("result", "{\"Err\":\"AbortError: bulk\"}"),
                    ("done_at", "1700000000"),
                ],
            )
            .ignore();
    }
    pipe.query_async::<()>(&mut conn.clone()).await.unwrap();
    let (calls, page) = measured(conn, addr, "/dead").await;
    let total: u64 = calls.values().sum();
    eprintln!("dead jobs page over 1,000 dead jobs: {total} commands: {calls:?}");
    assert!(total <= 3 + 2 * 50, "{calls:?}");
    assert!(!calls.contains_key("smembers"), "{calls:?}");
    assert!(
        page.contains("1000 dead job(s)") && page.contains("dead-0999"),
        "{page}"
    );
    assert!(!page.contains("dead-0949"), "only the newest 50: {page}");
    server.stop().await;
}

/// `agent-worker run`, the real binary in its own process, serving HTTP on a port of our
/// choice; what it writes is read as it comes (a full pipe would block the worker) and kept,
/// to be checked at the end ([`stop_process`]).
fn start_process(redis: &TestRedis, env: &[(&str, &str)]) -> (WorkerProcess, SocketAddr) {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let addr_text = addr.to_string();
    let mut all = vec![("AGENT_WORKER__HTTP__ADDR", addr_text.as_str())];
    all.extend_from_slice(env);
    let worker = WorkerProcess::spawn(worker_command(&redis.url(), &["run"], "ready", &all));
    (worker, addr)
}

/// Stops the worker (SIGTERM), which must exit cleanly within 30 s; everything it wrote.
async fn stop_process(mut worker: WorkerProcess) -> String {
    worker.signal(nix::sys::signal::Signal::SIGTERM);
    worker.wait_exit(Duration::from_secs(30)).await;
    let out = worker.output().await;
    let logged = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the worker stops cleanly: {logged}");
    logged
}

/// `POST path` (form-encoded `body`) with the request `headers`: the status and the page.
async fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let (code, _, page) = request(addr, "POST", path, headers, body).await;
    (code, page)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_need_the_admin_token_and_the_csrf_token() {
    let redis = TestRedis::start().await;
    let conn = &redis.conn;
    let token_file = std::env::temp_dir().join(format!("console-token-{}", ulid::Ulid::generate()));
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).unwrap();
    let token_path = token_file.display().to_string();
    // Its own process, so that everything it logs can be checked for the token; at debug
    // level, the most it ever logs.
    let (worker, addr) = start_process(
        &redis,
        &[
            ("AGENT_WORKER__HTTP__ADMIN_TOKEN_FILE", token_path.as_str()),
            ("RUST_LOG", "debug"),
        ],
    );
    wait_console(addr).await;
    start_session(conn, "console-stop-me", "Craig").await;
    let pid: u32 = hget(conn, "session:console-stop-me", "agentPid")
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(alive(pid));
    let dead = dead_job(conn, "console-retry-me").await;
    let bearer = format!("Bearer {ADMIN_TOKEN}");

    // Logged out: pages offer a login, no action buttons and no CSRF token.
    let (_, page) = get(addr, "/dead").await;
    assert!(
        page.contains("log in for actions") && !page.contains("name=\"csrf\""),
        "{page}"
    );

    // The login form: a wrong token is 401, the right one sets an HttpOnly, SameSite=Strict
    // cookie that is not the token.
    let (code, _) = post(addr, "/login", &[], "token=wrong-token-0123456789").await;
    assert_eq!(code, 401);
    let (code, headers, _) =
        request(addr, "POST", "/login", &[], &format!("token={ADMIN_TOKEN}")).await;
    assert_eq!(code, 303);
    let set_cookie = headers.get("set-cookie").expect("a cookie").clone();
    assert!(set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"));
    assert!(!set_cookie.contains(ADMIN_TOKEN));
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let (by_cookie, by_bearer) = (
        [("Cookie", cookie.as_str())],
        [("Authorization", bearer.as_str())],
    );
    let (_, _, page) = request(addr, "GET", "/dead", &by_cookie, "").await;
    assert!(
        page.contains("retry") && !page.contains(ADMIN_TOKEN),
        "{page}"
    );
    let csrf = csrf_of(&page);
    // Logged in (by cookie or by the header), every page still hides the prompts.
    for credential in [
        ("Cookie", cookie.as_str()),
        ("Authorization", bearer.as_str()),
    ] {
        for (path, expected) in [
            ("/", 200),
            ("/sessions", 200),
            ("/sessions/console-stop-me", 200),
            ("/workers", 200),
            ("/dead", 200),
            ("/sessions/no-such-session", 404),
            ("/no-such-page", 404),
        ] {
            let (code, _, page) = request(addr, "GET", path, &[credential], "").await;
            assert_eq!(code, expected, "{path} with the {}: {page}", credential.0);
            assert_clean(&format!("{path} with the {}", credential.0), &page);
            assert!(!page.contains(ADMIN_TOKEN), "{path}: {page}");
            if expected == 200 {
                assert!(
                    page.contains("name=\"csrf\""),
                    "{path} is logged in: {page}"
                );
            }
        }
    }
    let (_, _, page) = request(addr, "GET", "/sessions", &by_cookie, "").await;
    assert!(page.contains("console-stop-me"), "{page}");

    // Retry: no token 401, a wrong or missing CSRF token 403, both: done.
    let retry = |csrf: &str| format!("task_id={dead}&csrf={csrf}");
    let (code, _) = post(addr, "/actions/retry", &[], &retry(&csrf)).await;
    assert_eq!(code, 401);
    let (code, _) = post(
        addr,
        "/actions/retry",
        &[("Authorization", "Bearer not-the-admin-token-at-all")],
        &retry(&csrf),
    )
    .await;
    assert_eq!(code, 401);
    let (code, _) = post(addr, "/actions/retry", &by_cookie, &retry("0000")).await;
    assert_eq!(code, 403);
    let body = format!("task_id={dead}");
    let (code, _) = post(addr, "/actions/retry", &by_bearer, &body).await;
    assert_eq!(code, 403);
    assert!(
        is_member(conn, &queue().dead(), &dead).await,
        "refused requests change nothing"
    );
    // Fix what failed it (the config key of the wrong type), so that the retried job can
    // succeed: it is then taken from the ready list and its agent starts.
    let _: () = conn
        .clone()
        .del("session:console-retry-me:config")
        .await
        .unwrap();
    let (code, page) = post(addr, "/actions/retry", &by_cookie, &retry(&csrf)).await;
    assert_eq!(code, 200, "{page}");
    assert!(!is_member(conn, &queue().dead(), &dead).await);
    wait_done(conn, &dead, Duration::from_secs(20)).await;
    wait_status(
        conn,
        &sid("console-retry-me"),
        "ready",
        Duration::from_secs(20),
    )
    .await;

    // Stop: the same checks, then the agent exits and the session's keys are gone.
    let stop = |csrf: &str| format!("session_id=console-stop-me&csrf={csrf}");
    let (code, _) = post(addr, "/actions/stop", &[], &stop(&csrf)).await;
    assert_eq!(code, 401);
    let (code, _) = post(addr, "/actions/stop", &by_bearer, &stop("x")).await;
    assert_eq!(code, 403);
    assert!(alive(pid));
    let (code, page) = post(addr, "/actions/stop", &by_bearer, &stop(&csrf)).await;
    assert_eq!(code, 200, "{page}");
    wait_gone("the stopped agent to exit", Duration::from_secs(15), pid).await;
    let keys = SessionKeys::new(&sid("console-stop-me"));
    wait_for(
        "the stopped session's keys to be gone",
        Duration::from_secs(10),
        || async {
            let mut c = conn.clone();
            let existing: u64 = c.exists(keys.all().as_slice()).await.unwrap();
            let ready = is_member(conn, keys::SESSIONS_READY, "console-stop-me").await;
            (existing == 0 && !ready).then_some(())
        },
    )
    .await;
    // The other session runs on.
    assert_eq!(
        status(conn, &sid("console-retry-me")).await.as_deref(),
        Some("ready")
    );

    // Logging out needs the CSRF token too, and clears the cookie.
    let (code, _) = post(addr, "/logout", &by_cookie, "").await;
    assert_eq!(code, 403);
    let (code, headers, _) =
        request(addr, "POST", "/logout", &by_cookie, &format!("csrf={csrf}")).await;
    assert_eq!(code, 303);
    assert!(headers["set-cookie"].contains("Max-Age=0"));

    // The token, read from its file and checked on every request above, was never logged,
    // nor were the wrong ones tried; the log does hold the actions and the refusals.
    let logged = stop_process(worker).await;
    let _ = std::fs::remove_file(&token_file);
    for secret in [
        ADMIN_TOKEN,
        "wrong-token-0123456789",
        "not-the-admin-token-at-all",
    ] {
        assert!(
            !logged.contains(secret),
            "the log shows {secret:?}: {logged}"
        );
    }
    for event in [
        "console_login_failed",
        "console_login",
        "console_csrf_refused",
        "console_dead_retried",
        "console_session_stopped",
    ] {
        assert!(logged.contains(event), "the log lacks {event}: {logged}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_values_are_shown_only_with_console_show_config() {
    let redis = TestRedis::start().await;
    let conn = &redis.conn;
    // The worker's console shows config values; a second console on the same Redis, with
    // the default settings, does not.
    let (worker, shown_addr) = start_worker(
        &redis,
        &[("AGENT_WORKER__HTTP__CONSOLE_SHOW_CONFIG", "true")],
    );
    let settings = redis.settings("ready", &[]);
    assert!(!settings.http.console_show_config, "off by default");
    let server = ConsoleAlone::start(&settings, conn.clone()).await;
    let hidden_addr = server.addr();
    wait_console(shown_addr).await;
    start_session(conn, "console-shown", "Olivia").await;

    let path = "/sessions/console-shown";
    let (code, shown) = get(shown_addr, path).await;
    assert_eq!(code, 200, "{shown}");
    for value in [PROMPT, OPENING] {
        assert!(
            shown.contains(value),
            "shown config lacks {value:?}: {shown}"
        );
    }
    assert!(
        !shown.contains("hidden") && !shown.contains("values are not shown"),
        "{shown}"
    );
    // Only the session page shows them: the others are as without the setting.
    for path in ["/", "/sessions", "/workers", "/dead"] {
        let (code, page) = get(shown_addr, path).await;
        assert_eq!(code, 200, "{path}: {page}");
        assert_clean(path, &page);
    }

    let (code, hidden) = get(hidden_addr, path).await;
    assert_eq!(code, 200, "{hidden}");
    assert_clean(path, &hidden);
    for expected in [
        "[systemPrompt hidden]",
        &format!("(hidden, {} bytes)", PROMPT.len()),
        "values are not shown",
        "systemPrompt",
        "openingLine",
    ] {
        assert!(
            hidden.contains(expected),
            "{path} lacks {expected}: {hidden}"
        );
    }
    server.stop().await;
    worker.stop().await;
}

/// Headless Chromium, or a failure that says how to get it: `AGENT_WORKER_TEST_CHROMIUM`
/// (which `cargo xtask test` sets, to the system's or to one it unpacked without root), else
/// Debian's `chromium`.
fn chromium() -> String {
    const HOW: &str = "run the tests with `cargo xtask test --test console`, which installs it \
         (as root with apt-get, otherwise unpacked under target/xtask/ without root), or \
         `sudo apt-get install -y chromium`";
    if let Some(given) = std::env::var_os("AGENT_WORKER_TEST_CHROMIUM") {
        let given = std::path::PathBuf::from(given);
        assert!(
            given.is_file(),
            "AGENT_WORKER_TEST_CHROMIUM={} does not exist; {HOW}",
            given.display()
        );
        return given.display().to_string();
    }
    for candidate in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if std::path::Path::new(candidate).exists() {
            return candidate.to_owned();
        }
    }
    panic!("chromium is not installed: {HOW}");
}

/// Runs headless Chromium on `url` with `args`; its stdout.
async fn run_chromium(url: &str, args: Vec<String>) -> String {
    let program = chromium();
    let profile = std::env::temp_dir().join(format!("console-chromium-{}", ulid::Ulid::generate()));
    let url = url.to_owned();
    let output = tokio::task::spawn_blocking(move || {
        let mut command = std::process::Command::new(program);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args)
            .arg(url)
            .stdin(std::process::Stdio::null());
        let out = command.output().expect("run chromium");
        let _ = std::fs::remove_dir_all(&profile);
        out
    });
    let output = tokio::time::timeout(Duration::from_secs(90), output)
        .await
        .expect("chromium finishes within 90 s")
        .unwrap();
    stdout_of("chromium", &output)
}

/// The session page's start-up timeline and the overview's start-up chart, as the browser
/// built them: inline SVG, one bar per phase of a cold start (the queue wait first), p50 and
/// p99 lines.
async fn assert_start_up_drawn(addr: SocketAddr) {
    let dom = run_chromium(
        &format!("http://{addr}/sessions/call-7a41-craig"),
        vec!["--dump-dom".into()],
    )
    .await;
    let svg = dom
        .split_once("<figure class=\"timeline\">")
        .and_then(|(_, rest)| rest.split_once("</figure>"))
        .map(|(figure, _)| figure)
        .unwrap_or_else(|| panic!("no start-up timeline on the session page: {dom}"));
    // The producer recorded its enqueue (Redis's clock): the queue wait is the first bar.
    assert!(
        svg.contains("<svg") && svg.contains("cold start, enqueue to ready in "),
        "{svg}"
    );
    let phases = [
        "queue wait",
        "claim → spawned",
        "spawned → alive",
        "alive → ready",
    ];
    for phase in phases {
        assert!(svg.contains(&format!("<title>{phase}: ")), "{phase}: {svg}");
    }
    assert_eq!(svg.matches("<rect ").count(), 4, "one bar per phase: {svg}");
    let overview = run_chromium(&format!("http://{addr}/"), vec!["--dump-dom".into()]).await;
    assert!(
        overview.contains("<figure class=\"startup-chart\">")
            && overview.contains("<polyline class=\"p50\"")
            && overview.contains("3 starts in the last hour"),
        "{overview}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headless_browser_renders_the_live_sessions() {
    let redis = TestRedis::start().await;
    let conn = &redis.conn;
    let (worker, addr) = start_worker(&redis, &[]);
    wait_console(addr).await;
    let mut expected = HashMap::new();
    for (id, voice) in [
        ("call-7a41-craig", "Craig"),
        ("call-7a42-olivia", "Olivia"),
        ("call-7a43-ashley", "Ashley"),
    ] {
        start_session(conn, id, voice).await;
        let worker_id = hget(conn, &format!("session:{id}"), "workerId")
            .await
            .expect("the record names its worker");
        expected.insert(id.to_owned(), ready_row(voice, &worker_id));
    }
    let url = format!("http://{addr}/sessions");
    let dom = run_chromium(&url, vec!["--dump-dom".into()]).await;
    assert!(
        dom.contains("<table>") && dom.contains("status-ready"),
        "{dom}"
    );
    // The table as the browser built it, row by row.
    assert_eq!(session_rows(&dom), expected, "the rendered DOM: {dom}");
    assert_clean("the DOM", &dom);
    assert_start_up_drawn(addr).await;

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console.png");
    let _ = std::fs::remove_file(&shot);
    run_chromium(
        &url,
        vec![
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,720".into(),
            "--hide-scrollbars".into(),
        ],
    )
    .await;
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    eprintln!("screenshot: {}", shot.display());
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_acl_rule_allows_every_page_and_action_of_the_console() {
    const PASSWORD: &str = "console-acl-secret";
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/redis/agent-worker.acl"
    ))
    .unwrap();
    let rule = shipped
        .trim()
        .replace(" >CHANGE-ME ", &format!(" >{PASSWORD} "));
    let file = std::env::temp_dir().join(format!("console-acl-{}.acl", ulid::Ulid::generate()));
    std::fs::write(
        &file,
        format!("user default on nopass ~* &* +@all\n{rule}\n"),
    )
    .unwrap();
    // Our own connection is the unrestricted default user (playing the orchestrator).
    let redis = TestRedis::start_with(&["--aclfile", file.to_str().unwrap()]).await;
    let admin = &redis.conn;
    write_sessions(admin, 3).await;
    let q = queue();
    // One dead job not yet indexed by retention: the dead page reads the whole set for it.
    let _: () = redis::pipe()
        .sadd(q.dead(), "dead-acl")
        .hset(
            q.meta("dead-acl"),
            "result",
            "{\"Err\":\"AbortError: acl\"}",
        )
        .hset(q.data(), "dead-acl", "{\"session_id\":\"bulk-00001\"}")
        .query_async(&mut admin.clone())
        .await
        .unwrap();

    let url = format!(
        "redis://agent-worker:{PASSWORD}@127.0.0.1:{}/",
        redis.redis.port()
    );
    let settings = common::settings(&url, &[("AGENT_WORKER__HTTP__ADMIN_TOKEN", ADMIN_TOKEN)]);
    let restricted = agent_worker::connection::connect(&settings.redis)
        .await
        .expect("the restricted user connects");
    let server = ConsoleAlone::start(&settings, restricted).await;
    let addr = server.addr();
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let by_bearer = [("Authorization", bearer.as_str())];
    let mut csrf = String::new();
    for path in [
        "/",
        "/sessions",
        "/sessions/bulk-00000",
        "/workers",
        "/dead",
    ] {
        let (code, _, page) = request(addr, "GET", path, &by_bearer, "").await;
        assert_eq!(code, 200, "{path} under the shipped rule: {page}");
        csrf = csrf_of(&page);
    }
    let body = format!("session_id=bulk-00000&csrf={csrf}");
    let (code, page) = post(addr, "/actions/stop", &by_bearer, &body).await;
    assert_eq!(code, 200, "{page}");
    assert!(!is_member(admin, keys::SESSIONS_READY, "bulk-00000").await);
    let body = format!("task_id=dead-acl&csrf={csrf}");
    let (code, page) = post(addr, "/actions/retry", &by_bearer, &body).await;
    assert_eq!(code, 200, "{page}");
    let ready: Vec<String> = admin.clone().lrange(q.active(), 0, -1).await.unwrap();
    assert_eq!(ready, ["dead-acl"]);
    // Nothing the console sent was refused.
    let refused: Vec<redis::Value> = redis::cmd("ACL")
        .arg("LOG")
        .query_async(&mut admin.clone())
        .await
        .unwrap();
    assert!(refused.is_empty(), "{refused:?}");
    server.stop().await;
    let _ = std::fs::remove_file(&file);
}
