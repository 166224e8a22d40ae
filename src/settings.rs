//! Typed settings: `config/default.toml`, then `--config FILE`, then the environment.
//!
//! Layers, later ones winning: the defaults compiled in from `config/default.toml`; the file
//! given with `--config`; `REDIS_URL` (for `redis.url` only, and only when the more specific
//! `AGENT_WORKER__REDIS__URL` is not set); `AGENT_WORKER__<SECTION>__<KEY>` variables.
//! Unknown keys are errors (a typo must not silently fall back to a default), and
//! [`Settings::validate`] checks every value at start-up with an error naming the key.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use agent_jobs::QueueKeys;
use config::{Config, Environment, File, FileFormat};
use serde::Deserialize;

/// The defaults, compiled in so the binary runs without its source tree.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

const ENV_PREFIX: &str = "AGENT_WORKER";

/// Bounds of `agent.max_line_bytes`: long enough for a log line with a stack frame, short
/// enough that a line never costs much memory per agent.
const MIN_LINE_BYTES: usize = 1024;
const MAX_LINE_BYTES: usize = 1024 * 1024;

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A file could not be read or parsed, or a value has the wrong type.
    #[error("invalid settings: {0}")]
    Load(#[from] config::ConfigError),
    /// A value is out of range; the message names the key.
    #[error("invalid setting {key}: {reason}")]
    Invalid {
        /// `section.key`.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// All settings of agent-worker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// `[redis]`
    pub redis: RedisSettings,
    /// `[worker]`
    pub worker: WorkerSettings,
    /// `[agent]`
    pub agent: AgentSettings,
    /// `[session]`
    pub session: SessionSettings,
    /// `[sweep]`
    pub sweep: SweepSettings,
    /// `[shutdown]`
    pub shutdown: ShutdownSettings,
    /// `[retention]`
    pub retention: RetentionSettings,
    /// `[http]`
    pub http: HttpSettings,
    /// `[telemetry]`
    pub telemetry: TelemetrySettings,
    /// `[compat]`
    pub compat: CompatSettings,
    /// `[events]`
    pub events: EventSettings,
}

/// `[redis]`: where the queue and the session keys live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// Server URL; may carry a password, so it only prints redacted.
    pub url: RedisUrl,
    /// apalis queue name of agent-start jobs.
    pub queue: String,
    /// Per-command response timeout.
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    /// Connection establishment timeout.
    #[serde(with = "humantime_serde")]
    pub connection_timeout: Duration,
    /// Run on a Redis whose `maxmemory-policy` evicts keys (refused otherwise).
    pub allow_eviction: bool,
    /// PEM bundle of the CAs trusted for a `rediss://` server's certificate, instead of the
    /// system's roots; none when unset.
    #[serde(deserialize_with = "empty_as_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM certificate (chain) presented to a server that asks for client certificates; set
    /// with [`RedisSettings::tls_key_file`].
    #[serde(deserialize_with = "empty_as_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of [`RedisSettings::tls_cert_file`].
    #[serde(deserialize_with = "empty_as_none")]
    pub tls_key_file: Option<PathBuf>,
    /// Accept any server certificate (no verification at all). An explicit opt-out, warned
    /// about at start-up.
    pub tls_insecure: bool,
}

/// How a connection to Redis is protected, as [`RedisSettings::tls_mode`] tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// `redis://`: plain TCP.
    Off,
    /// `rediss://`, the server's certificate checked against the system's roots.
    SystemRoots,
    /// `rediss://`, the server's certificate checked against `redis.tls_ca_file`.
    CaFile,
    /// `rediss://` without any verification (`redis.tls_insecure`).
    Insecure,
}

impl TlsMode {
    /// Its name in log lines and `status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::SystemRoots => "system-roots",
            Self::CaFile => "ca-file",
            Self::Insecure => "insecure",
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl RedisSettings {
    /// True for a `rediss://` (or `valkeys://`) URL.
    pub fn uses_tls(&self) -> bool {
        let url = self.url.expose().trim_start();
        ["rediss://", "valkeys://"].iter().any(|scheme| {
            url.len() >= scheme.len() && url[..scheme.len()].eq_ignore_ascii_case(scheme)
        })
    }

    /// How the connection is protected.
    pub fn tls_mode(&self) -> TlsMode {
        match (self.uses_tls(), self.tls_insecure, &self.tls_ca_file) {
            (false, _, _) => TlsMode::Off,
            (true, true, _) => TlsMode::Insecure,
            (true, false, Some(_)) => TlsMode::CaFile,
            (true, false, None) => TlsMode::SystemRoots,
        }
    }

    /// The CA bundle and client certificate to hand to the Redis client, read from their
    /// files now (so a rotated file is picked up by the next connection); `None` when neither
    /// is set. Errors name the setting.
    pub fn tls_certificates(&self) -> Result<Option<redis::TlsCertificates>, SettingsError> {
        let root_cert = match &self.tls_ca_file {
            Some(path) => Some(read_pem("redis.tls_ca_file", path, Pem::Certificates)?),
            None => None,
        };
        let client_tls = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                client_cert: read_pem("redis.tls_cert_file", cert, Pem::Certificates)?,
                client_key: read_pem("redis.tls_key_file", key, Pem::PrivateKey)?,
            }),
            (Some(_), None) => {
                return Err(SettingsError::Invalid {
                    key: "redis.tls_key_file",
                    reason: "must be set with redis.tls_cert_file (the client certificate's \
                             private key)"
                        .into(),
                });
            }
            (None, Some(_)) => {
                return Err(SettingsError::Invalid {
                    key: "redis.tls_cert_file",
                    reason: "must be set with redis.tls_key_file (the certificate of that key)"
                        .into(),
                });
            }
            (None, None) => None,
        };
        if root_cert.is_none() && client_tls.is_none() {
            return Ok(None);
        }
        Ok(Some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }))
    }
}

/// What a PEM file of the TLS settings must hold.
#[derive(Debug, Clone, Copy)]
enum Pem {
    /// One or more certificates.
    Certificates,
    /// One private key (PKCS#8, PKCS#1 or SEC1).
    PrivateKey,
}

/// Reads a PEM file of setting `key` and checks it holds what it should; the error names the
/// key and the path (never the contents: a key file is a secret).
fn read_pem(key: &'static str, path: &Path, want: Pem) -> Result<Vec<u8>, SettingsError> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let invalid = |reason: String| SettingsError::Invalid { key, reason };
    let bytes =
        std::fs::read(path).map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
    match want {
        Pem::Certificates => {
            let certs = CertificateDer::pem_slice_iter(&bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    invalid(format!(
                        "{} is not a PEM certificate file: {e}",
                        path.display()
                    ))
                })?;
            if certs.is_empty() {
                return Err(invalid(format!(
                    "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                    path.display()
                )));
            }
        }
        Pem::PrivateKey => {
            PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
                invalid(format!(
                    "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
                    path.display()
                ))
            })?;
        }
    }
    Ok(bytes)
}

/// `[worker]`: how jobs are fetched and how the job worker is supervised.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// Agent starts in progress at once.
    pub concurrency: usize,
    /// Jobs fetched per round trip.
    pub batch_size: usize,
    /// Fallback poll interval when no wake-up arrives.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// apalis-redis worker heartbeat.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Silence after which a worker's fetched jobs are re-queued by others.
    #[serde(with = "humantime_serde")]
    pub orphan_timeout: Duration,
    /// Upper bound of the back-off between job-worker restarts.
    #[serde(with = "humantime_serde")]
    pub restart_backoff_max: Duration,
}

/// `[agent]`: how the voice agent is launched and judged ready.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// Program and leading arguments.
    pub command: Vec<String>,
    /// Substrings of an output line that mean "ready".
    pub ready_patterns: Vec<String>,
    /// Time allowed to become ready.
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// Time between SIGTERM and SIGKILL when stopping.
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    /// Voice for sessions without a config hash.
    pub default_voice: String,
    /// Launch attempts per job.
    pub start_attempts: u32,
    /// Back-off before the second attempt (doubles, with jitter).
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Output lines kept in `agent:<id>:logs`.
    pub log_lines: usize,
    /// Agents (running plus starting) per replica.
    pub max_agents: usize,
    /// How options and their values are put on the agent's command line.
    pub arg_style: ArgStyle,
    /// Substrings of an output line that mean "alive" (imports done); empty: no alive phase.
    pub alive_patterns: Vec<String>,
    /// Time allowed to print an alive line (or a ready line, which implies it).
    #[serde(with = "humantime_serde")]
    pub alive_timeout: Duration,
    /// Directory of the per-session log files (`<dir>/<session id>.log`); none when unset.
    #[serde(deserialize_with = "empty_as_none")]
    pub log_dir: Option<PathBuf>,
    /// Longest output line kept; the rest of a longer line is cut with a marker.
    pub max_line_bytes: usize,
    /// A per-session log file stops growing at this size.
    pub log_file_max_bytes: u64,
    /// Lines per second of each agent shown in the worker's own log (burst: twice that).
    pub log_lines_per_second: u32,
    /// How an agent's whole process tree is kept from outliving its session.
    pub containment: crate::agent::containment::ContainmentSetting,
    /// Idle warm processes kept per replica (0: every agent starts cold).
    pub warm_pool: usize,
    /// Program and leading arguments of a warm process; empty: `command`.
    pub warm_command: Vec<String>,
    /// Substring of the line a warm process prints when it can take a session.
    pub warm_pattern: String,
    /// Warm-ups in progress at once.
    pub warm_concurrency: usize,
    /// Time allowed from a warm process's spawn to its warm line.
    #[serde(with = "humantime_serde")]
    pub warm_timeout: Duration,
    /// An idle warm process older than this is replaced by a fresh one.
    #[serde(with = "humantime_serde")]
    pub warm_max_idle: Duration,
}

impl AgentSettings {
    /// The command of warm processes: `warm_command`, or `command` when that is empty.
    pub fn warm_command(&self) -> &[String] {
        if self.warm_command.is_empty() {
            &self.command
        } else {
            &self.warm_command
        }
    }
}

/// How the session's options reach the agent's command line (`agent.arg_style`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArgStyle {
    /// One element per option: `--voice-id=Craig`. Safe with argparse whatever the value
    /// (a value starting with `-` is never read as an option).
    Equals,
    /// Two elements: `--voice-id`, `Craig`, as the original Celery worker did, for agents that
    /// cannot parse the `=` form. A value starting with `-` breaks argparse agents.
    Separate,
}

/// `[compat]`: what the original system wrote that its orchestrator still reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompatSettings {
    /// Write the original worker's `metrics:agent:*` keys (served by the orchestrator's
    /// `/api/metrics/agent`), in the same script calls that record starts.
    pub legacy_metrics: bool,
}

/// `[events]`: the session event stream (`agent-worker:events`) the session scripts append to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSettings {
    /// Approximate bound of the stream (`XADD MAXLEN ~`): older events are trimmed.
    pub max_len: u64,
}

/// The largest `events.max_len`: a bound that still keeps the stream's memory small (about
/// 100 bytes per event).
const MAX_EVENTS_MAX_LEN: u64 = 10_000_000;

/// An empty string (the way `config/default.toml` says "unset") as `None`.
fn empty_as_none<'de, D>(deserializer: D) -> Result<Option<PathBuf>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let value: Option<String> = Option::deserialize(deserializer)?;
    Ok(value.filter(|v| !v.is_empty()).map(PathBuf::from))
}

/// `[session]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSettings {
    /// TTL of the keys the worker writes for a session.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Liveness refresh of owned agents.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Age of the last heartbeat after which a session is stale.
    #[serde(with = "humantime_serde")]
    pub stale_after: Duration,
    /// Longest a session may live.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// How long an ended session's record stays for the orchestrator's end-of-session handler.
    #[serde(with = "humantime_serde")]
    pub ended_ttl: Duration,
}

/// `[sweep]`: removal of stale sessions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepSettings {
    /// Time between sweeps (one replica per tick).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Sessions per script call.
    pub batch_size: usize,
}

/// `[shutdown]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    /// How long agents may go on after SIGTERM before they are stopped.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

/// `[retention]`: trimming finished jobs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// Age after which done jobs are deleted.
    #[serde(with = "humantime_serde")]
    pub done: Duration,
    /// Age after which dead jobs are deleted.
    #[serde(with = "humantime_serde")]
    pub dead: Duration,
    /// Most dead jobs kept.
    pub dead_max: usize,
    /// Time between retention runs.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Listen address of the metrics and health endpoints and of the console.
    pub addr: std::net::SocketAddr,
    /// The console's write actions' token, given inline (prefer
    /// [`HttpSettings::admin_token_file`]); empty: unset. Only prints redacted.
    pub admin_token: Secret,
    /// File holding the console's admin token (a mounted secret); empty: unset.
    #[serde(deserialize_with = "empty_as_none")]
    pub admin_token_file: Option<PathBuf>,
    /// Show the values of `systemPrompt` and `openingLine` on the console's session page
    /// (they may hold customer data; off by default: only field names are shown).
    pub console_show_config: bool,
}

/// Shortest admin token accepted: anything shorter can be guessed by a script over a
/// port-forward.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

impl HttpSettings {
    /// The console's admin token: from `http.admin_token_file` (read now, surrounding
    /// whitespace and the trailing newline of a mounted secret trimmed) or `http.admin_token`;
    /// `None` when neither is set, which leaves the console without any write route. Errors
    /// name the key and never quote the token.
    pub fn admin_token(&self) -> Result<Option<Secret>, SettingsError> {
        let invalid = |key, reason: String| SettingsError::Invalid { key, reason };
        let (key, token) = match (&self.admin_token_file, self.admin_token.is_set()) {
            (Some(_), true) => {
                return Err(invalid(
                    "http.admin_token",
                    "is set together with http.admin_token_file; set only one of them".into(),
                ));
            }
            (Some(path), false) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    invalid(
                        "http.admin_token_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                ("http.admin_token_file", Secret::new(text.trim()))
            }
            (None, true) => (
                "http.admin_token",
                Secret::new(self.admin_token.expose().trim()),
            ),
            (None, false) => return Ok(None),
        };
        let len = token.expose().chars().count();
        if len < MIN_ADMIN_TOKEN_LEN {
            return Err(invalid(
                key,
                format!(
                    "the token has {len} characters; use at least {MIN_ADMIN_TOKEN_LEN} \
                     (e.g. `openssl rand -hex 32`)"
                ),
            ));
        }
        if token.expose().chars().any(|c| c.is_control() || c == ' ') {
            return Err(invalid(
                key,
                "the token holds spaces or control characters (it travels in an HTTP header)"
                    .into(),
            ));
        }
        Ok(Some(token))
    }
}

/// A secret setting (the console's admin token). `Debug` never shows it and there is no
/// `Display`: the raw value is only handed to the code that compares it.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// True unless empty (how `config/default.toml` says "unset").
    pub fn is_set(&self) -> bool {
        !self.0.is_empty()
    }

    /// The secret itself; for comparisons only, never for output.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_set() {
            "Secret(***)"
        } else {
            "Secret(unset)"
        })
    }
}

/// `[telemetry]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// Log line format.
    pub format: LogFormat,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Pretty,
}

/// A Redis URL. It may contain a password, so `Debug` and `Display` show it redacted; the raw
/// string is only handed to the Redis client.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its secret; for the Redis client only, never for logs.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any user info (`user:password@`) replaced by `***@`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({})", self.redacted())
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Replaces everything between `://` and the last `@` of a URL with `***`, so credentials
/// never reach a log line, whatever characters the password holds (`/`, `#`, `?`, `@`, `%`
/// all occur in generated secrets, and a parser would stop at the first of them). A URL
/// without `://` is not shown at all: it cannot be told apart from a bare secret.
///
/// ```
/// use agent_worker::settings::redact_url;
/// assert_eq!(redact_url("redis://:hunter2@cache:6379/0"), "redis://***@cache:6379/0");
/// assert_eq!(redact_url("redis://:a/b#c@cache:6379"), "redis://***@cache:6379");
/// assert_eq!(redact_url("redis://cache:6379"), "redis://cache:6379");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return "(a value that is not a URL, not shown)".to_owned();
    };
    let rest = &url[scheme_end + 3..];
    match rest.rfind('@') {
        Some(at) => format!("{}***{}", &url[..scheme_end + 3], &rest[at..]),
        None => url.to_owned(),
    }
}

impl Settings {
    /// Loads settings from the defaults, `file` and the process environment, then validates.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        Self::load_from(file, std::env::vars().collect())
    }

    /// Like [`Settings::load`], with the environment given explicitly (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: HashMap<String, String>,
    ) -> Result<Self, SettingsError> {
        let mut builder =
            Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(File::from(path).required(true));
        }
        let specific_url = format!("{ENV_PREFIX}__REDIS__URL");
        if let (Some(url), false) = (env.get("REDIS_URL"), env.contains_key(&specific_url)) {
            builder = builder.set_override("redis.url", url.clone())?;
        }
        let prefixed: HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .collect();
        builder = builder.add_source(
            Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("agent.command")
                .with_list_parse_key("agent.warm_command")
                .with_list_parse_key("agent.ready_patterns")
                .with_list_parse_key("agent.alive_patterns")
                .try_parsing(true)
                .source(Some(prefixed)),
        );
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks every value that deserialized but is out of range.
    pub fn validate(&self) -> Result<(), SettingsError> {
        fn invalid(key: &'static str, reason: impl Into<String>) -> SettingsError {
            SettingsError::Invalid {
                key,
                reason: reason.into(),
            }
        }
        // Neither the URL nor the parser's message (which may quote it) is shown: an
        // unparseable URL may hold its password anywhere.
        if redis::Client::open(self.redis.url.expose()).is_err() {
            return Err(invalid(
                "redis.url",
                "is not a valid Redis URL (redis://[user:password@]host[:port][/db] or \
                 rediss://...; not shown, it may contain a password; percent-encode \
                 reserved characters of the password)",
            ));
        }
        self.validate_tls()?;
        QueueKeys::new(&self.redis.queue).map_err(|e| invalid("redis.queue", e.to_string()))?;
        if self.redis.response_timeout < Duration::from_secs(1) {
            return Err(invalid(
                "redis.response_timeout",
                "must be at least 1s (slow scripts would fail workers)",
            ));
        }
        if self.redis.connection_timeout.is_zero() {
            return Err(invalid("redis.connection_timeout", "must be > 0"));
        }
        if self.worker.concurrency == 0 {
            return Err(invalid("worker.concurrency", "must be >= 1"));
        }
        if self.worker.batch_size == 0 {
            return Err(invalid("worker.batch_size", "must be >= 1"));
        }
        if self.worker.poll_interval.is_zero() {
            return Err(invalid("worker.poll_interval", "must be > 0"));
        }
        if self.worker.heartbeat_interval < Duration::from_secs(1) {
            return Err(invalid(
                "worker.heartbeat_interval",
                "must be at least 1s (apalis-redis counts whole seconds)",
            ));
        }
        if self.worker.orphan_timeout < self.worker.heartbeat_interval * 2 {
            return Err(invalid(
                "worker.orphan_timeout",
                "must be at least twice worker.heartbeat_interval",
            ));
        }
        if self.worker.restart_backoff_max.is_zero() {
            return Err(invalid("worker.restart_backoff_max", "must be > 0"));
        }
        match self.agent.command.first() {
            None => return Err(invalid("agent.command", "must name a program")),
            Some(program) if program.trim().is_empty() => {
                return Err(invalid("agent.command", "the program is empty"));
            }
            Some(_) => {}
        }
        if self.agent.ready_patterns.is_empty()
            || self.agent.ready_patterns.iter().any(|p| p.is_empty())
        {
            return Err(invalid(
                "agent.ready_patterns",
                "needs at least one non-empty pattern",
            ));
        }
        if self.agent.startup_timeout.is_zero() {
            return Err(invalid("agent.startup_timeout", "must be > 0"));
        }
        if self.agent.default_voice.is_empty() {
            return Err(invalid("agent.default_voice", "must not be empty"));
        }
        if self.agent.start_attempts == 0 {
            return Err(invalid("agent.start_attempts", "must be >= 1"));
        }
        if self.agent.log_lines == 0 {
            return Err(invalid("agent.log_lines", "must be >= 1"));
        }
        if self.session.ttl < Duration::from_secs(1) {
            return Err(invalid("session.ttl", "must be at least 1s"));
        }
        if self.session.heartbeat_interval < Duration::from_secs(1) {
            return Err(invalid("session.heartbeat_interval", "must be at least 1s"));
        }
        // A live agent must heartbeat at least twice per stale period, and a start attempt
        // (which refreshes the session's index entry) must end before the session looks stale.
        if self.session.stale_after < self.session.heartbeat_interval * 2 {
            return Err(invalid(
                "session.stale_after",
                "must be at least twice session.heartbeat_interval",
            ));
        }
        if self.session.stale_after <= self.agent.startup_timeout {
            return Err(invalid(
                "session.stale_after",
                "must be longer than agent.startup_timeout",
            ));
        }
        if self.session.max_age < self.session.stale_after {
            return Err(invalid(
                "session.max_age",
                "must be at least session.stale_after",
            ));
        }
        if self.sweep.interval < Duration::from_secs(1) {
            return Err(invalid("sweep.interval", "must be at least 1s"));
        }
        if self.sweep.batch_size == 0 {
            return Err(invalid("sweep.batch_size", "must be >= 1"));
        }
        if self.agent.max_agents == 0 {
            return Err(invalid("agent.max_agents", "must be >= 1"));
        }
        if self.retention.interval < Duration::from_secs(1) {
            return Err(invalid("retention.interval", "must be at least 1s"));
        }
        if self.retention.done.is_zero() || self.retention.dead.is_zero() {
            return Err(invalid("retention.done", "retention periods must be > 0"));
        }
        if self.agent.alive_patterns.iter().any(|p| p.is_empty()) {
            return Err(invalid(
                "agent.alive_patterns",
                "patterns must not be empty (an empty list turns the alive phase off)",
            ));
        }
        if self.agent.alive_timeout.is_zero() {
            return Err(invalid("agent.alive_timeout", "must be > 0"));
        }
        if self.agent.warm_pool > 0 {
            if self.agent.warm_pattern.is_empty() {
                return Err(invalid("agent.warm_pattern", "must not be empty"));
            }
            if self.agent.warm_concurrency == 0 {
                return Err(invalid("agent.warm_concurrency", "must be >= 1"));
            }
            if self.agent.warm_timeout.is_zero() {
                return Err(invalid("agent.warm_timeout", "must be > 0"));
            }
            if self.agent.warm_max_idle < Duration::from_secs(1) {
                return Err(invalid("agent.warm_max_idle", "must be at least 1s"));
            }
            if self
                .agent
                .warm_command
                .first()
                .is_some_and(|p| p.is_empty())
            {
                return Err(invalid(
                    "agent.warm_command",
                    "the program must not be empty",
                ));
            }
        }
        if !(MIN_LINE_BYTES..=MAX_LINE_BYTES).contains(&self.agent.max_line_bytes) {
            return Err(invalid(
                "agent.max_line_bytes",
                format!("must be between {MIN_LINE_BYTES} and {MAX_LINE_BYTES}"),
            ));
        }
        if let Some(dir) = &self.agent.log_dir
            && !dir.is_absolute()
        {
            return Err(invalid(
                "agent.log_dir",
                format!("{} is not an absolute path", dir.display()),
            ));
        }
        if self.agent.log_file_max_bytes < 1024 * 1024 {
            return Err(invalid(
                "agent.log_file_max_bytes",
                "must be at least 1 MiB",
            ));
        }
        if self.session.ended_ttl < Duration::from_secs(1) {
            return Err(invalid("session.ended_ttl", "must be at least 1s"));
        }
        self.http.admin_token()?;
        if !(1..=MAX_EVENTS_MAX_LEN).contains(&self.events.max_len) {
            return Err(invalid(
                "events.max_len",
                format!("must be between 1 and {MAX_EVENTS_MAX_LEN}"),
            ));
        }
        Ok(())
    }

    /// The `redis.tls_*` keys: consistent with the URL and each other, their files readable
    /// and holding what they should.
    fn validate_tls(&self) -> Result<(), SettingsError> {
        let redis = &self.redis;
        let invalid = |key, reason: &str| SettingsError::Invalid {
            key,
            reason: reason.to_owned(),
        };
        // redis-rs's own opt-out would skip the start-up warning of redis.tls_insecure.
        let info = redis::IntoConnectionInfo::into_connection_info(redis.url.expose());
        if let Ok(info) = info
            && let redis::ConnectionAddr::TcpTls { insecure: true, .. } = info.addr()
        {
            return Err(invalid(
                "redis.url",
                "ends in #insecure, which turns certificate verification off; remove it and set \
                 redis.tls_insecure = true if that is really meant",
            ));
        }
        if !redis.uses_tls() {
            let set = [
                ("redis.tls_ca_file", redis.tls_ca_file.is_some()),
                ("redis.tls_cert_file", redis.tls_cert_file.is_some()),
                ("redis.tls_key_file", redis.tls_key_file.is_some()),
                ("redis.tls_insecure", redis.tls_insecure),
            ];
            if let Some((key, _)) = set.iter().find(|(_, set)| *set) {
                return Err(invalid(
                    key,
                    "is set, but redis.url is not a rediss:// URL, so the connection would not \
                     use TLS at all; use rediss://host:port for TLS",
                ));
            }
            return Ok(());
        }
        if redis.tls_insecure && redis.tls_ca_file.is_some() {
            return Err(invalid(
                "redis.tls_insecure",
                "turns certificate verification off, so redis.tls_ca_file would be ignored; set \
                 only one of them",
            ));
        }
        redis.tls_certificates().map(drop)
    }

    /// Heartbeats a worker may miss before it is presumed dead: `orphan_timeout` in whole
    /// heartbeat intervals, rounded up (apalis-redis counts heartbeats).
    pub fn missed_heartbeats(&self) -> usize {
        let beat = self.worker.heartbeat_interval.as_millis().max(1);
        self.worker.orphan_timeout.as_millis().div_ceil(beat).max(2) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_and_validate() {
        let s = Settings::load_from(None, HashMap::new()).unwrap();
        assert_eq!(s.redis.queue, "agent-start");
        assert_eq!(s.session.ttl, Duration::from_secs(4 * 3600));
        assert_eq!(s.agent.default_voice, "Ashley");
        assert_eq!(s.telemetry.format, LogFormat::Pretty);
    }

    #[test]
    fn environment_overrides_with_lists_and_durations() {
        let s = Settings::load_from(
            None,
            env(&[
                ("AGENT_WORKER__AGENT__COMMAND", "python3,-m,voice_agent"),
                ("AGENT_WORKER__AGENT__STARTUP_TIMEOUT", "45s"),
                ("AGENT_WORKER__WORKER__CONCURRENCY", "7"),
                ("AGENT_WORKER__TELEMETRY__FORMAT", "json"),
            ]),
        )
        .unwrap();
        assert_eq!(s.agent.command, ["python3", "-m", "voice_agent"]);
        assert_eq!(s.agent.startup_timeout, Duration::from_secs(45));
        assert_eq!(s.worker.concurrency, 7);
        assert_eq!(s.telemetry.format, LogFormat::Json);
    }

    #[test]
    fn agent_launch_settings() {
        let s = Settings::load_from(None, HashMap::new()).unwrap();
        assert_eq!(s.agent.arg_style, ArgStyle::Equals);
        assert_eq!(s.agent.startup_timeout, Duration::from_secs(90));
        assert_eq!(s.agent.alive_patterns.len(), 3);
        assert_eq!(s.agent.log_dir, None);
        assert!(s.compat.legacy_metrics);
        assert_eq!(s.events.max_len, 10_000);
        let s = Settings::load_from(
            None,
            env(&[
                ("AGENT_WORKER__AGENT__ARG_STYLE", "separate"),
                (
                    "AGENT_WORKER__AGENT__ALIVE_PATTERNS",
                    "READY_TO_IMPORT,imports done",
                ),
                ("AGENT_WORKER__AGENT__LOG_DIR", "/var/log/voice-agents"),
            ]),
        )
        .unwrap();
        assert_eq!(s.agent.arg_style, ArgStyle::Separate);
        assert_eq!(s.agent.alive_patterns, ["READY_TO_IMPORT", "imports done"]);
        assert_eq!(
            s.agent.log_dir.as_deref(),
            Some(Path::new("/var/log/voice-agents"))
        );
        let err = Settings::load_from(None, env(&[("AGENT_WORKER__AGENT__LOG_DIR", "logs")]))
            .unwrap_err();
        assert!(err.to_string().contains("agent.log_dir"), "{err}");
        let err = Settings::load_from(None, env(&[("AGENT_WORKER__AGENT__ARG_STYLE", "spaced")]))
            .unwrap_err();
        assert!(err.to_string().contains("arg_style"), "{err}");
    }

    #[test]
    fn redis_url_precedence() {
        let plain = Settings::load_from(None, env(&[("REDIS_URL", "redis://plain:1/")])).unwrap();
        assert_eq!(plain.redis.url.expose(), "redis://plain:1/");
        let both = Settings::load_from(
            None,
            env(&[
                ("REDIS_URL", "redis://plain:1/"),
                ("AGENT_WORKER__REDIS__URL", "redis://specific:2/"),
            ]),
        )
        .unwrap();
        assert_eq!(both.redis.url.expose(), "redis://specific:2/");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let err = Settings::load_from(None, env(&[("AGENT_WORKER__WORKER__CONCURRENCY", "0")]))
            .unwrap_err();
        assert!(err.to_string().contains("worker.concurrency"), "{err}");
        let err =
            Settings::load_from(None, env(&[("AGENT_WORKER__REDIS__QUEUE", "a b")])).unwrap_err();
        assert!(err.to_string().contains("redis.queue"), "{err}");
        let err = Settings::load_from(None, env(&[("AGENT_WORKER__AGENT__NO_SUCH_KEY", "1")]))
            .unwrap_err();
        assert!(err.to_string().contains("no_such_key"), "{err}");
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("redis://:s3cret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(
            redact_url("rediss://user:p@ss@host/1"),
            "rediss://***@host/1"
        );
        for secret in [
            "s3cr3t/PW",
            "s3cr3t#PW",
            "s3cr3t@PW",
            "s3cr3t%2FPW",
            "s3c?r3t",
        ] {
            let shown = redact_url(&format!("redis://:{secret}@127.0.0.1:6379/0"));
            assert_eq!(shown, "redis://***@127.0.0.1:6379/0", "{secret}");
        }
        assert!(!redact_url("s3cr3t").contains("s3cr3t"));
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
        let url = RedisUrl::new("redis://:s3cret@h:1");
        assert!(!format!("{url:?} {url}").contains("s3cret"));
        let err = Settings::load_from(None, env(&[("REDIS_URL", "http://:s3cret@h:1"), ("X", "")]))
            .unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn the_admin_token_comes_from_a_file_or_the_environment_and_never_prints() {
        let token = "t0ken-with-enough-characters";
        let none = Settings::load_from(None, HashMap::new()).unwrap();
        assert!(none.http.admin_token().unwrap().is_none());
        assert!(!none.http.console_show_config);

        let inline =
            Settings::load_from(None, env(&[("AGENT_WORKER__HTTP__ADMIN_TOKEN", token)])).unwrap();
        assert_eq!(inline.http.admin_token().unwrap().unwrap().expose(), token);
        assert!(!format!("{inline:?}").contains(token));

        let file = std::env::temp_dir().join(format!("admin-token-{}", ulid::Ulid::generate()));
        std::fs::write(&file, format!("{token}\n")).unwrap();
        let path = file.display().to_string();
        let from_file = Settings::load_from(
            None,
            env(&[("AGENT_WORKER__HTTP__ADMIN_TOKEN_FILE", path.as_str())]),
        )
        .unwrap();
        let secret = from_file.http.admin_token().unwrap().unwrap();
        assert_eq!(secret.expose(), token);
        assert!(!format!("{from_file:?} {secret:?}").contains(token));

        for (pairs, key) in [
            (
                vec![("AGENT_WORKER__HTTP__ADMIN_TOKEN", "short")],
                "http.admin_token",
            ),
            (
                vec![("AGENT_WORKER__HTTP__ADMIN_TOKEN_FILE", "/nonexistent/token")],
                "http.admin_token_file",
            ),
            (
                vec![
                    ("AGENT_WORKER__HTTP__ADMIN_TOKEN_FILE", path.as_str()),
                    ("AGENT_WORKER__HTTP__ADMIN_TOKEN", token),
                ],
                "http.admin_token",
            ),
        ] {
            let err = Settings::load_from(None, env(&pairs))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{pairs:?}: {err}");
            assert!(!err.contains(token) && !err.contains("short"), "{err}");
        }
        let _ = std::fs::remove_file(&file);
    }

    /// A directory with a self-signed certificate (`cert.pem`), its key (`key.pem`) and a file
    /// that is neither (`junk.pem`).
    fn tls_files() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "agent-worker-settings-tls-{}-{}",
            std::process::id(),
            ulid::Ulid::generate()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        std::fs::write(dir.join("cert.pem"), certified.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), certified.signing_key.serialize_pem()).unwrap();
        std::fs::write(dir.join("junk.pem"), "not a certificate\n").unwrap();
        dir
    }

    #[test]
    fn tls_settings_are_checked_with_errors_naming_the_key() {
        let dir = tls_files();
        let file = |name: &str| dir.join(name).display().to_string();
        let (cert, key, junk) = (file("cert.pem"), file("key.pem"), file("junk.pem"));
        let missing = file("missing.pem");
        let tls = "rediss://:s3cret@cache.example:6380/0";
        let load = |pairs: &[(&str, &str)]| {
            let mut all = vec![("AGENT_WORKER__REDIS__URL", tls)];
            all.extend_from_slice(pairs);
            Settings::load_from(None, env(&all))
        };

        let s = load(&[]).unwrap();
        assert_eq!(s.redis.tls_mode(), TlsMode::SystemRoots);
        assert!(s.redis.tls_certificates().unwrap().is_none());
        let s = load(&[
            ("AGENT_WORKER__REDIS__TLS_CA_FILE", &cert),
            ("AGENT_WORKER__REDIS__TLS_CERT_FILE", &cert),
            ("AGENT_WORKER__REDIS__TLS_KEY_FILE", &key),
        ])
        .unwrap();
        assert_eq!(s.redis.tls_mode(), TlsMode::CaFile);
        let certs = s.redis.tls_certificates().unwrap().unwrap();
        assert!(certs.root_cert.is_some() && certs.client_tls.is_some());
        let s = load(&[("AGENT_WORKER__REDIS__TLS_INSECURE", "true")]).unwrap();
        assert_eq!(s.redis.tls_mode(), TlsMode::Insecure);
        let plain = Settings::load_from(None, HashMap::new()).unwrap();
        assert_eq!(plain.redis.tls_mode(), TlsMode::Off);

        for (pairs, key_named, says) in [
            (
                vec![("AGENT_WORKER__REDIS__TLS_CA_FILE", missing.as_str())],
                "redis.tls_ca_file",
                missing.as_str(),
            ),
            (
                vec![("AGENT_WORKER__REDIS__TLS_CA_FILE", junk.as_str())],
                "redis.tls_ca_file",
                "holds no PEM certificate",
            ),
            (
                vec![("AGENT_WORKER__REDIS__TLS_CERT_FILE", cert.as_str())],
                "redis.tls_key_file",
                "must be set with redis.tls_cert_file",
            ),
            (
                vec![("AGENT_WORKER__REDIS__TLS_KEY_FILE", key.as_str())],
                "redis.tls_cert_file",
                "must be set with redis.tls_key_file",
            ),
            (
                vec![
                    ("AGENT_WORKER__REDIS__TLS_CERT_FILE", cert.as_str()),
                    ("AGENT_WORKER__REDIS__TLS_KEY_FILE", cert.as_str()),
                ],
                "redis.tls_key_file",
                "holds no PEM private key",
            ),
            (
                vec![
                    ("AGENT_WORKER__REDIS__TLS_INSECURE", "true"),
                    ("AGENT_WORKER__REDIS__TLS_CA_FILE", cert.as_str()),
                ],
                "redis.tls_insecure",
                "set only one",
            ),
        ] {
            let err = load(&pairs).unwrap_err().to_string();
            assert!(
                err.contains(key_named) && err.contains(says),
                "{pairs:?}: {err}"
            );
            assert!(!err.contains("s3cret"), "{err}");
        }

        // TLS keys with a redis:// URL would silently mean no TLS.
        for key in ["TLS_CA_FILE", "TLS_INSECURE"] {
            let value = if key == "TLS_INSECURE" { "true" } else { &cert };
            let err = Settings::load_from(
                None,
                env(&[(&format!("AGENT_WORKER__REDIS__{key}"), value)]),
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.contains(&format!("redis.{}", key.to_lowercase())),
                "{err}"
            );
            assert!(err.contains("not a rediss:// URL"), "{err}");
        }
        // redis-rs's own opt-out would bypass the warning.
        let err = Settings::load_from(
            None,
            env(&[(
                "AGENT_WORKER__REDIS__URL",
                "rediss://:s3cret@h:6380/#insecure",
            )]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("redis.url") && err.contains("#insecure"),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
