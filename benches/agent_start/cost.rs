//! Part 4: Redis commands per agent start.
//!
//! N sessions (configs written first, not counted) are enqueued through our producer on its
//! own connection, with no worker running; then the real worker starts and handles them.
//! `INFO commandstats` is read before, between and after, and the differences divided by N.
//! Two scenarios: the whole life of a session with the real launcher and an agent that exits
//! right after its ready line (enqueue, fetch, config, claim, ready, ack, exit, removal), and
//! the queue path alone with the instant launcher (no exit).
//!
//! commandstats counts the commands run inside Lua scripts as well as the script call itself.
//! A `MONITOR` connection tells the two apart (it shows script commands as coming from
//! `lua`) and names each script call after its file; the bench's own commands (polling,
//! `INFO`) are recognised by their connection and left out of both.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_jobs::AgentStart;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::{
    harness::{Ctx, InProcessWorker, InstantLauncher, Probe, RecordingLauncher, ids, wait_until},
    report::Row,
};

const PART: &str = "4 redis cost";
/// The target: half of BullMQ's 24 commands per job.
const TARGET: f64 = 12.0;

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Row>> {
    let n = ctx.size(1000);
    let life = measure(ctx, n, true).await?;
    let queue = measure(ctx, n, false).await?;
    let total = life.total();
    let mut rows = vec![
        Row::target(
            PART,
            format!("commands per agent start, whole session life (INFO commandstats ÷ {n})"),
            format!("{total:.1}"),
            format!("≤ {TARGET:.0}"),
            total <= TARGET,
        )
        .spread(format!(
            "producer {:.1} + worker {:.1}",
            life.enqueue.values().sum::<f64>(),
            life.worker.values().sum::<f64>()
        )),
        Row::info(
            PART,
            "  of which sent by clients / run inside Lua scripts (MONITOR)",
            format!("{:.1} / {:.1}", life.sent, life.in_scripts),
        ),
        Row::info(
            PART,
            "  worker round trips per start (Redis reads on its connections)",
            format!("{:.1}", life.reads),
        ),
        Row::info(PART, "  by command (enqueue + worker)", life.by_command()),
        Row::info(PART, "  script calls per start", life.scripts()),
        Row::info(
            PART,
            "commands per job, queue path only (instant launcher, no exit)",
            format!("{:.1}", queue.total()),
        )
        .spread(format!(
            "sent {:.1} / in scripts {:.1}; {:.1} worker round trips",
            queue.sent, queue.in_scripts, queue.reads
        )),
    ];
    rows.push(Row::info(PART, "  by command", queue.by_command()));
    Ok(rows)
}

/// Commands per job, by name, and the split seen by MONITOR.
struct Cost {
    enqueue: HashMap<String, f64>,
    worker: HashMap<String, f64>,
    /// Reads Redis did on the worker's connections per job: its round trips, give or take
    /// the requests of concurrent tasks that share one write.
    reads: f64,
    sent: f64,
    in_scripts: f64,
    scripts: BTreeMap<String, f64>,
}

impl Cost {
    fn total(&self) -> f64 {
        self.enqueue.values().sum::<f64>() + self.worker.values().sum::<f64>()
    }

    fn by_command(&self) -> String {
        let mut all: HashMap<&str, f64> = HashMap::new();
        for (name, count) in self.enqueue.iter().chain(&self.worker) {
            *all.entry(name).or_default() += count;
        }
        let mut all: Vec<_> = all.into_iter().filter(|(_, c)| *c >= 0.05).collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1));
        all.iter()
            .map(|(name, count)| format!("{name} {count:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn scripts(&self) -> String {
        self.scripts
            .iter()
            .filter(|(_, c)| **c >= 0.01)
            .map(|(key, count)| format!("{key} {count:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

async fn measure(ctx: &Ctx, n: usize, whole_life: bool) -> anyhow::Result<Cost> {
    ctx.flush().await?;
    let ids = ids("cost", n);
    ctx.write_configs(&ids).await?;
    let monitor = Monitor::start(ctx).await?;

    let before = ctx.commandstats().await?;
    monitor.mark(ctx, "enqueue").await?;
    let producer = ctx.producer(ctx.connect().await?);
    for chunk in ids.chunks(1000) {
        let jobs: Vec<AgentStart> = chunk.iter().cloned().map(AgentStart::new).collect();
        producer.enqueue_many(&jobs).await?;
    }
    let enqueued = ctx.commandstats().await?;
    monitor.mark(ctx, "worker").await?;
    let reads_before = ctx.reads_processed().await?;
    let polls = std::sync::atomic::AtomicUsize::new(0);

    let probe = Probe::new();
    let (settings, factory) = if whole_life {
        let settings = ctx.settings("exit-after-ready", &[]);
        let factory = RecordingLauncher::factory(&settings, probe.clone(), None);
        (settings, factory)
    } else {
        (
            ctx.settings("ready", &[]),
            InstantLauncher::factory(probe.clone()),
        )
    };
    let worker = InProcessWorker::start(settings, factory);
    let result = async {
        probe.wait_launched(n, Duration::from_secs(120)).await?;
        // The last command of a job: its ack, or for a whole life the session's removal.
        wait_until(
            "the last job to finish",
            Duration::from_secs(120),
            || async {
                polls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let acked = ctx.acked().await.ok()?;
                let live = ctx.live_sessions().await.ok()?;
                (acked >= n && (!whole_life || live == 0)).then_some(())
            },
        )
        .await
    }
    .await;
    let reads = ctx.reads_processed().await;
    let after = ctx.commandstats().await;
    let seen = monitor.finish(ctx).await;
    probe.take();
    worker.stop().await?;
    result?;
    let (after, seen) = (after?, seen?);
    // Each poll above was two reads (a pipeline, then ZCARD) on the bench's connection.
    let own_reads = 2 * polls.into_inner() as u64 + 2;
    let reads = (reads?.saturating_sub(reads_before + own_reads)) as f64 / n as f64;

    let per_job = |from: &HashMap<String, u64>, to: &HashMap<String, u64>, phase: &str| {
        to.iter()
            .filter_map(|(name, &calls)| {
                let bench = seen
                    .bench
                    .get(&(phase.to_owned(), name.clone()))
                    .copied()
                    .unwrap_or(0);
                let calls = calls - from.get(name).copied().unwrap_or(0);
                // Each difference holds the INFO of the snapshot before and one phase ECHO.
                let own = bench + u64::from(name == "info" || name == "echo");
                let calls = calls.saturating_sub(own);
                (calls > 0).then(|| (name.clone(), calls as f64 / n as f64))
            })
            .collect::<HashMap<_, _>>()
    };
    Ok(Cost {
        enqueue: per_job(&before, &enqueued, "enqueue"),
        worker: per_job(&enqueued, &after, "worker"),
        reads,
        sent: seen.sent as f64 / n as f64,
        in_scripts: seen.in_scripts as f64 / n as f64,
        scripts: seen
            .scripts
            .into_iter()
            .map(|(key, count)| (key, count as f64 / n as f64))
            .collect(),
    })
}

/// What MONITOR saw, between the first and the last phase marker.
#[derive(Default)]
struct Seen {
    phase: String,
    sent: u64,
    in_scripts: u64,
    /// Script calls by script file name.
    scripts: BTreeMap<String, u64>,
    /// The bench's own commands by (phase, command), to subtract from commandstats.
    bench: HashMap<(String, String), u64>,
}

/// A `MONITOR` connection counting commands by phase. Phases are switched by an `ECHO` the
/// bench sends, which MONITOR shows in order with everything else.
struct Monitor {
    seen: Arc<Mutex<Seen>>,
    reader: tokio::task::JoinHandle<anyhow::Result<()>>,
}

const MARK: &str = "bench-phase:";

impl Monitor {
    async fn start(ctx: &Ctx) -> anyhow::Result<Self> {
        // The bench's own connection, whose commands are not the worker's.
        let info: String = redis::cmd("CLIENT")
            .arg("INFO")
            .query_async(&mut ctx.conn.clone())
            .await?;
        let bench_addr = info
            .split_whitespace()
            .find_map(|f| f.strip_prefix("addr="))
            .unwrap_or_default()
            .to_owned();
        let names = script_names();
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", ctx.port)).await?;
        stream.write_all(b"MONITOR\r\n").await?;
        let mut lines = BufReader::new(stream).lines();
        anyhow::ensure!(
            lines.next_line().await?.as_deref() == Some("+OK"),
            "MONITOR refused"
        );
        let seen = Arc::new(Mutex::new(Seen::default()));
        let reader = {
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Some(line) = lines.next_line().await? {
                    count(
                        &mut seen.lock().expect("seen lock"),
                        &line,
                        &bench_addr,
                        &names,
                    );
                }
                Ok(())
            })
        };
        Ok(Self { seen, reader })
    }

    async fn mark(&self, ctx: &Ctx, phase: &str) -> anyhow::Result<()> {
        redis::cmd("ECHO")
            .arg(format!("{MARK}{phase}"))
            .query_async::<()>(&mut ctx.conn.clone())
            .await?;
        Ok(())
    }

    /// Marks the end and waits until the reader got there.
    async fn finish(self, ctx: &Ctx) -> anyhow::Result<Seen> {
        self.mark(ctx, "end").await?;
        wait_until("MONITOR to catch up", Duration::from_secs(30), || async {
            (self.seen.lock().expect("seen lock").phase == "end").then_some(())
        })
        .await?;
        self.reader.abort();
        Ok(std::mem::take(&mut *self.seen.lock().expect("seen lock")))
    }
}

/// Counts one MONITOR line: `+<time> [<db> <client addr | lua>] "cmd" "arg" …`.
fn count(seen: &mut Seen, line: &str, bench_addr: &str, names: &HashMap<String, String>) {
    let Some((source, args)) = line
        .split_once(" [")
        .and_then(|(_, rest)| rest.split_once("] "))
    else {
        return;
    };
    let source = source.split_once(' ').map_or(source, |(_, s)| s);
    let args = quoted(args);
    let Some(name) = args.first().map(|n| n.to_lowercase()) else {
        return;
    };
    if name == "echo"
        && let Some(phase) = args.get(1).and_then(|a| a.strip_prefix(MARK))
    {
        seen.phase = phase.to_owned();
        return;
    }
    if !matches!(seen.phase.as_str(), "enqueue" | "worker") {
        return;
    }
    if source == bench_addr {
        *seen.bench.entry((seen.phase.clone(), name)).or_default() += 1;
    } else if source == "lua" {
        seen.in_scripts += 1;
    } else {
        seen.sent += 1;
        if name == "evalsha" {
            let sha = args.get(1).map_or("", String::as_str);
            let script = names
                .get(sha)
                .cloned()
                .unwrap_or_else(|| format!("sha {sha:.8}"));
            *seen.scripts.entry(script).or_default() += 1;
        }
    }
}

/// The double-quoted tokens of a MONITOR line, with escapes undone well enough for names.
fn quoted(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue;
        }
        let mut token = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => token.extend(chars.next()),
                '"' => break,
                c => token.push(c),
            }
        }
        tokens.push(token);
    }
    tokens
}

/// Script SHA1 → file name, for our scripts and apalis-redis's (read from the cargo registry
/// the build used), so script calls are reported by name.
fn script_names() -> HashMap<String, String> {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut dirs = vec![
        std::path::PathBuf::from(root).join("src/lua"),
        std::path::PathBuf::from(root).join("jobs/lua"),
    ];
    let cargo_home = std::env::var("CARGO_HOME")
        .or_else(|_| std::env::var("HOME").map(|home| format!("{home}/.cargo")))
        .unwrap_or_default();
    let apalis = format!(
        "apalis-redis-{}",
        crate::env::locked_version("apalis-redis")
    );
    if let Ok(registries) = std::fs::read_dir(format!("{cargo_home}/registry/src")) {
        dirs.extend(
            registries
                .flatten()
                .map(|r| r.path().join(&apalis).join("lua")),
        );
    }
    dirs.iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flat_map(|entries| entries.flatten())
        .filter_map(|entry| {
            let code = std::fs::read_to_string(entry.path()).ok()?;
            let name = entry.file_name().to_string_lossy().into_owned();
            Some((redis::Script::new(&code).get_hash().to_owned(), name))
        })
        .collect()
}
