//! Reading an agent's stdout and stderr: line by line, continuously, never waiting on anyone.
//!
//! A full pipe blocks the agent that writes to it, so the readers must never stop reading:
//! - every line goes to `agent:<id>:logs` through a queue that drops beyond its byte budget
//!   ([`crate::agent::log_list::OutputSink`]), and to the session's log file through the writer thread
//!   ([`crate::agent::log_files::LogFiles`]); neither waits;
//! - the worker's own log (target `agent_output`, at INFO) gets at most
//!   `agent.log_lines_per_second` lines per agent (with a burst of twice that), each cut at
//!   [`LOG_EVENT_BYTES`]; beyond the rate one `agent_output_suppressed` line per second says
//!   how many were left out. An agent printing millions of lines costs the worker's log a few
//!   kilobytes a second, and a slow stderr costs log lines, never the agent's progress (the log
//!   writer itself is non-blocking: see [`crate::telemetry`]);
//! - a line longer than `agent.max_line_bytes` is cut, with a marker saying how much was cut,
//!   and the rest is dropped as it arrives, so a line without a newline never grows memory.
//!
//! The readers also judge start-up: the first line containing an alive pattern moves the
//! agent's `Phase` to `Alive`, the first with a ready pattern to `Ready` (the rules are
//! [`crate::agent::phase`]'s), which the launch awaits (event-driven, no polling).
//!
//! The readers take pipe ends, whoever made them: `OutputReader::read_both` is all a start
//! mode calls, for a child of [`crate::agent::spawn`] as for one whose pipes the worker made
//! itself (a zygote's). So [`OutputStream`] and [`OutputLimits`] are this module's own types:
//! nothing above it needs them but to build a reader. Below it are only the phase rules and
//! where lines go (the log list, the log files).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agent_jobs::SessionId;
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    net::unix::pipe,
    sync::watch,
};

use super::{
    log_files::{LogFile, LogFiles},
    log_list::{AgentLine, OutputSink},
    phase::{Phase, Readiness},
};
use crate::settings::AgentSettings;

/// Bytes of one agent line shown in the worker's own log; the whole line (up to
/// `agent.max_line_bytes`) goes to Redis and the log file.
pub const LOG_EVENT_BYTES: usize = 2048;

/// Where an output line came from (the `stream` field of its log event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// The agent's stdout.
    Stdout,
    /// The agent's stderr.
    Stderr,
}

/// How much of an agent's output is kept (from `[agent]`).
#[derive(Debug, Clone, Copy)]
pub struct OutputLimits {
    /// Longest output line kept; the rest of a longer line is cut, with a marker.
    pub max_line_bytes: usize,
    /// A log file stops growing at this size.
    pub log_file_max_bytes: u64,
    /// Lines per second (burst: twice that) of each agent shown in the worker's own log.
    pub log_lines_per_second: u32,
}

impl OutputLimits {
    /// From `[agent]` settings.
    pub fn from_settings(agent: &AgentSettings) -> Self {
        Self {
            max_line_bytes: agent.max_line_bytes,
            log_file_max_bytes: agent.log_file_max_bytes,
            log_lines_per_second: agent.log_lines_per_second,
        }
    }
}

impl Default for OutputLimits {
    /// The defaults of `config/default.toml`.
    fn default() -> Self {
        Self {
            max_line_bytes: 64 * 1024,
            log_file_max_bytes: 64 * 1024 * 1024,
            log_lines_per_second: 50,
        }
    }
}

/// The worker-log budget of one agent: a token bucket refilled at `rate` lines per second,
/// holding at most twice that.
#[derive(Debug)]
struct LogBudget {
    rate: f64,
    tokens: f64,
    refilled: Instant,
    suppressed: u64,
    reported: Instant,
}

impl LogBudget {
    fn new(lines_per_second: u32) -> Self {
        let rate = f64::from(lines_per_second);
        Self {
            rate,
            tokens: rate * 2.0,
            refilled: Instant::now(),
            suppressed: 0,
            reported: Instant::now(),
        }
    }

    /// Whether the next line may be logged; and, at most once a second while lines are being
    /// left out, how many were since the last report.
    fn take(&mut self) -> (bool, Option<u64>) {
        if self.rate == 0.0 {
            // `agent.log_lines_per_second = 0`: none shown, and nothing to report.
            return (false, None);
        }
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate * 2.0);
        self.refilled = now;
        let allowed = self.tokens >= 1.0;
        if allowed {
            self.tokens -= 1.0;
        } else {
            self.suppressed += 1;
        }
        (allowed, self.report(now, false))
    }

    /// The count to report now (`force`: at the end of the output).
    fn report(&mut self, now: Instant, force: bool) -> Option<u64> {
        if self.suppressed == 0
            || (!force && now.duration_since(self.reported) < Duration::from_secs(1))
        {
            return None;
        }
        self.reported = now;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Whose output the readers are reading: a session's agent, or a warm process not yet given a
/// session (see [`crate::agent::warm`]), which [`OutputReader::rebind`] turns into a session's.
pub(crate) struct Binding {
    /// The session id in log events (a warm process's own label until it has a session).
    pub(crate) label: SessionId,
    /// Whether lines go to `agent:<id>:logs` (a warm process has no session to log to).
    pub(crate) to_session: bool,
    /// What the phases are judged by.
    pub(crate) readiness: Readiness,
    /// The phase reached, as seen in the output.
    pub(crate) phase: watch::Sender<Phase>,
    /// The session's log file, if it has one.
    pub(crate) log_file: Option<(LogFiles, Arc<LogFile>)>,
    /// The last line read while this binding held (for error messages, and to tell whether a
    /// warm process printed anything once handed its session).
    pub(crate) last_line: Arc<Mutex<Option<String>>>,
}

impl Binding {
    /// The output of the process labelled `label`, judged by `readiness` from the start
    /// (`Spawned`), going to the session's logs if `to_session` and to `log_file` if any; with
    /// the receiving end of its phase, which the readiness wait awaits.
    pub(crate) fn new(
        label: SessionId,
        to_session: bool,
        readiness: Readiness,
        log_file: Option<(LogFiles, Arc<LogFile>)>,
    ) -> (Self, watch::Receiver<Phase>) {
        let (phase, phase_rx) = watch::channel(Phase::Spawned);
        let binding = Self {
            label,
            to_session,
            readiness,
            phase,
            log_file,
            last_line: Arc::new(Mutex::new(None)),
        };
        (binding, phase_rx)
    }
}

/// Reads one agent's output (both streams share one, cloned).
#[derive(Clone)]
pub(crate) struct OutputReader {
    binding: Arc<Mutex<Arc<Binding>>>,
    max_line_bytes: usize,
    sink: OutputSink,
    budget: Arc<Mutex<LogBudget>>,
}

impl OutputReader {
    /// A reader for the output of `binding`'s process, keeping it within `limits`, sending its
    /// lines for Redis to `sink`.
    pub(crate) fn new(binding: Binding, limits: &OutputLimits, sink: OutputSink) -> Self {
        Self {
            binding: Arc::new(Mutex::new(Arc::new(binding))),
            max_line_bytes: limits.max_line_bytes,
            sink,
            budget: Arc::new(Mutex::new(LogBudget::new(limits.log_lines_per_second))),
        }
    }

    /// Reads the process's stdout and stderr (those it has) to their ends, each on a task of
    /// its own. The tasks hold clones of this reader: once both reached end-of-file and every
    /// other clone is gone, the phase channel closes, which is how the readiness wait learns
    /// the output ended.
    pub(crate) fn read_both(&self, stdout: Option<pipe::Receiver>, stderr: Option<pipe::Receiver>) {
        if let Some(stdout) = stdout {
            tokio::spawn(self.clone().read(stdout, OutputStream::Stdout));
        }
        if let Some(stderr) = stderr {
            tokio::spawn(self.clone().read(stderr, OutputStream::Stderr));
        }
    }

    /// From the next line on, the output is `binding`'s (a warm process handed its session, or
    /// lost at the handoff). A line being emitted right now still goes to the old binding,
    /// last line included: the new one's `last_line` holds only what came after.
    pub(crate) fn rebind(&self, binding: Binding) {
        *self.binding.lock().expect("binding lock") = Arc::new(binding);
    }

    /// Reads `pipe` to its end (or a read error, which ends it like EOF: the agent's exit is
    /// reported by its owner task).
    async fn read(self, pipe: impl AsyncRead + Unpin, stream: OutputStream) {
        let max = self.max_line_bytes;
        let mut reader = BufReader::with_capacity(8 * 1024, pipe);
        let mut line = Vec::with_capacity(256);
        // Bytes of the current line beyond `max`, dropped as they arrive.
        let mut cut = 0usize;
        while let Ok(chunk) = reader.fill_buf().await {
            if chunk.is_empty() {
                if !line.is_empty() || cut > 0 {
                    self.emit(&line, cut, stream);
                }
                break;
            }
            let (take, complete) = match chunk.iter().position(|&b| b == b'\n') {
                Some(newline) => (newline, true),
                None => (chunk.len(), false),
            };
            let room = max.saturating_sub(line.len());
            line.extend_from_slice(&chunk[..take.min(room)]);
            cut += take.saturating_sub(room);
            reader.consume(take + usize::from(complete));
            if complete {
                self.emit(&line, cut, stream);
                line.clear();
                cut = 0;
            }
        }
        let left_out = self
            .budget
            .lock()
            .expect("budget lock")
            .report(Instant::now(), true);
        if let Some(count) = left_out {
            let label = self.binding.lock().expect("binding lock").label.clone();
            self.suppressed(&label, count, stream);
        }
    }

    fn emit(&self, raw: &[u8], cut: usize, stream: OutputStream) {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let mut text = String::from_utf8_lossy(raw).into_owned();
        if cut > 0 {
            text.push_str(&format!(
                " [agent-worker: {cut} more bytes of this line cut at agent.max_line_bytes]"
            ));
        }
        let binding = self.binding.lock().expect("binding lock").clone();
        let (log, left_out) = self.budget.lock().expect("budget lock").take();
        if let Some(count) = left_out {
            self.suppressed(&binding.label, count, stream);
        }
        if log {
            tracing::info!(
                target: "agent_output",
                session_id = %binding.label,
                stream = ?stream,
                line = %shown(&text),
            );
        }
        advance(&binding, &text);
        if let Some((files, file)) = &binding.log_file {
            files.write(file, &text);
        }
        *binding.last_line.lock().expect("last_line lock") = Some(text.clone());
        if binding.to_session {
            // Beyond its budget the queue drops the line rather than block the agent.
            self.sink.offer(AgentLine {
                session_id: binding.label.clone(),
                line: text,
            });
        }
    }

    fn suppressed(&self, label: &SessionId, count: u64, stream: OutputStream) {
        tracing::info!(
            target: "agent_output",
            session_id = %label,
            stream = ?stream,
            suppressed = count,
            "agent_output_suppressed"
        );
    }
}

/// Moves `binding`'s phase forward when `text` matches a pattern of a later one.
fn advance(binding: &Binding, text: &str) {
    let phase = *binding.phase.borrow();
    if let Some(reached) = binding.readiness.reached(phase, text) {
        // Only forward: stdout's reader must not undo a phase stderr's reader just set.
        binding.phase.send_if_modified(|current| {
            let forward = reached > *current;
            if forward {
                *current = reached;
            }
            forward
        });
    }
}

/// At most [`LOG_EVENT_BYTES`] of a line, cut at a character boundary.
fn shown(text: &str) -> &str {
    if text.len() <= LOG_EVENT_BYTES {
        return text;
    }
    let mut end = LOG_EVENT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_budget_allows_a_burst_then_the_rate_and_reports_what_it_left_out() {
        let mut budget = LogBudget::new(10);
        let allowed = (0..100).filter(|_| budget.take().0).count();
        assert_eq!(allowed, 20, "a burst of twice the rate");
        assert_eq!(budget.report(Instant::now(), true), Some(80));
        assert_eq!(budget.report(Instant::now(), true), None);
    }

    #[test]
    fn long_lines_are_shown_cut_at_a_character_boundary() {
        let text = "é".repeat(LOG_EVENT_BYTES);
        let cut = shown(&text);
        assert!(cut.len() <= LOG_EVENT_BYTES && cut.len() >= LOG_EVENT_BYTES - 1);
        assert_eq!(shown("short"), "short");
    }
}
