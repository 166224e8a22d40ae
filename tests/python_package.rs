//! The Python package (`python/agent_worker`) is built from the contract's one source of each
//! artefact rather than from copies:
//! - its Lua scripts are the repository's `jobs/lua/*.lua`: read from there in a checkout,
//!   copied into the package when `pip install ./python` builds it, and carried by an sdist;
//! - its key names (`agent_worker/keys.py`) are those of `jobs/src/keys.rs`, every builder on
//!   both sides accounted for;
//! - what a build leaves in the checkout is ignored by git.
//!
//! They need `python3` with redis-py, setuptools and wheel (`cargo xtask test` installs them);
//! missing, the tests fail rather than skip.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use agent_jobs::{QueueKeys, SessionId, SessionKeys, keys, session_id::MAX_SESSION_ID_LEN};
use common::*;
use serde_json::{Value, json};
use tokio::process::Command;

/// The one source of the shared Lua scripts.
const SCRIPTS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/jobs/lua");

/// The repository's shared scripts: file name → text.
fn repository_scripts() -> BTreeMap<String, String> {
    let scripts: BTreeMap<String, String> = std::fs::read_dir(SCRIPTS_DIR)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "lua"))
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&path).unwrap())
        })
        .collect();
    assert!(scripts.contains_key("enqueue.lua"), "{scripts:?}");
    scripts
}

/// Where `agent_worker._scripts` finds each of `scripts` and what it reads there (name →
/// `[path, text]`), run by `python3` with `path` first on `PYTHONPATH` (the checkout's
/// `python/` when `None`).
async fn scripts_seen(path: Option<&Path>, scripts: &BTreeMap<String, String>) -> Value {
    const PRINT: &str = r#"
import json, sys
import agent_worker._scripts as s
print(json.dumps({n: [str(s.path(n)), s.lua(n)] for n in sys.argv[1:]}))
"#;
    let mut command = python();
    if let Some(path) = path {
        command.env(
            "PYTHONPATH",
            format!("{}:{}", path.display(), python_path()),
        );
    }
    command.arg("-c").arg(PRINT).args(scripts.keys());
    printed_json("agent_worker._scripts", &command.output().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_a_checkout_the_package_runs_the_repositorys_scripts() {
    require_python(&["redis"]).await;
    let scripts = repository_scripts();
    // No committed copy to go stale.
    let copies = Path::new(PYTHON_DIR).join("agent_worker/lua");
    assert!(!copies.exists(), "{} must not exist", copies.display());
    // Every script the package runs is a shared one, in jobs/lua/ (none stays in src/lua/).
    let mut named = BTreeSet::new();
    for entry in std::fs::read_dir(Path::new(PYTHON_DIR).join("agent_worker")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "py") {
            let text = std::fs::read_to_string(&path).unwrap();
            named.extend(
                text.split('"')
                    .filter(|s| s.ends_with(".lua"))
                    .map(str::to_owned),
            );
        }
    }
    assert!(named.contains("retry_dead.lua"), "{named:?}");
    for name in &named {
        assert!(scripts.contains_key(name), "{name} is not in jobs/lua/");
    }
    let worker_scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lua");
    for name in scripts.keys() {
        assert!(
            !worker_scripts.join(name).exists(),
            "src/lua/{name} copies a shared script"
        );
    }
    let seen = scripts_seen(None, &scripts).await;
    for (name, text) in &scripts {
        let expected = json!([format!("{SCRIPTS_DIR}/{name}"), text]);
        assert_eq!(seen[name], expected, "{name}");
    }
}

/// Copies the files of `from` to `to`, leaving out the top-level entries named in `skip` and
/// Python's caches.
fn copy_tree(from: &Path, to: &Path, skip: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if skip.iter().any(|s| name == *s) || name == "__pycache__" {
            continue;
        }
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &to.join(&name), &[]);
        } else {
            std::fs::copy(entry.path(), to.join(&name)).unwrap();
        }
    }
}

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("agent-worker-pip-{}", ulid::Ulid::generate()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// A copy of the checkout's `python/` (without its tests) and `jobs/lua/`, in the same
    /// layout: setuptools builds in the source tree (`build/`, `*.egg-info`), which must not be
    /// the checkout. Returns the copy's `python/`.
    fn checkout(&self) -> PathBuf {
        let python = self.0.join("checkout/python");
        copy_tree(Path::new(PYTHON_DIR), &python, &["tests", "build", "dist"]);
        copy_tree(
            Path::new(SCRIPTS_DIR),
            &self.0.join("checkout/jobs/lua"),
            &[],
        );
        python
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `pip install` of `source` into `target`, as `cargo xtask test` sets it up: offline and
/// without build isolation (the installed setuptools builds it).
async fn pip_install(source: &Path, target: &Path) {
    let out = python()
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args([
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
        ])
        .arg(target)
        .arg(source)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "pip install {}: {}",
        source.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The package installed in `target` has the repository's scripts and its type marker, and
/// reads its scripts from there.
async fn assert_installed_with_scripts(target: &Path) {
    let package = target.join("agent_worker");
    for file in ["py.typed", "client.py", "aio.py", "_scripts.py"] {
        assert!(package.join(file).is_file(), "{file} installed");
    }
    let scripts = repository_scripts();
    let installed: BTreeSet<String> = std::fs::read_dir(package.join("lua"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        installed,
        scripts.keys().cloned().collect(),
        "installed scripts"
    );
    let seen = scripts_seen(Some(target), &scripts).await;
    for (name, text) in &scripts {
        let expected = json!([package.join("lua").join(name).display().to_string(), text]);
        assert_eq!(seen[name], expected, "{name} as installed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pip_installs_the_package_with_the_repositorys_scripts_and_type_marker() {
    require_python(&["redis", "setuptools", "wheel"]).await;
    let scratch = Scratch::new();
    let python_dir = scratch.checkout();
    let before: BTreeSet<_> = std::fs::read_dir(&python_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let target = scratch.0.join("site");
    pip_install(&python_dir, &target).await;
    assert_installed_with_scripts(&target).await;

    // What the build left in the source tree is ignored in the checkout.
    let left: Vec<String> = std::fs::read_dir(&python_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|name| !before.contains(name))
        .map(|name| format!("python/{}/", name.to_string_lossy()))
        .collect();
    assert!(left.contains(&"python/build/".to_owned()), "{left:?}");
    let out = Command::new("git")
        .args(["check-ignore", "--no-index", "--verbose", "--non-matching"])
        .args(&left)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .await
        .expect("git runs");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !report.lines().any(|l| l.starts_with("::")),
        "a build leaves untracked files in python/ that .gitignore misses:\n{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdist_carries_the_scripts_and_installs_without_the_repository() {
    require_python(&["redis", "setuptools", "wheel"]).await;
    let scratch = Scratch::new();
    let python_dir = scratch.checkout();
    // The PEP 517 hook pip's `build` frontend would call, offline; then the sdist unpacked
    // where no jobs/lua/ is beside it.
    const SDIST: &str = r#"
import contextlib, json, sys, tarfile
import setuptools.build_meta as backend
dist, unpacked = sys.argv[1:3]  # (the backend rewrites sys.argv)
with contextlib.redirect_stdout(sys.stderr):  # setuptools reports its steps on stdout
    archive = dist + "/" + backend.build_sdist(dist)
# The "data" filter where this Python has it (3.12, and 3.10/3.11 security releases).
safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
with tarfile.open(archive) as tar:
    names = tar.getnames()
    tar.extractall(unpacked, **safe)
print(json.dumps(names))
"#;
    let (dist, unpacked) = (scratch.0.join("dist"), scratch.0.join("unpacked"));
    let out = python()
        .arg("-c")
        .arg(SDIST)
        .arg(&dist)
        .arg(&unpacked)
        .current_dir(&python_dir)
        .output()
        .await
        .unwrap();
    let names: Vec<String> = printed_json("build_sdist", &out);
    let root = "agent_worker-0.1.0";
    for script in repository_scripts().keys() {
        let name = format!("{root}/agent_worker/lua/{script}");
        assert!(names.contains(&name), "{name} in {names:?}");
    }
    let target = scratch.0.join("site");
    pip_install(&unpacked.join(root), &target).await;
    assert_installed_with_scripts(&target).await;
}

/// Every public item of `jobs/src/keys.rs`, as `NAME` or `Type::method`, found by reading its
/// source (items of `pub mod`s count as their module).
fn rust_key_items() -> BTreeSet<String> {
    let source = include_str!("../jobs/src/keys.rs");
    let mut items = BTreeSet::new();
    let mut owner: Option<&str> = None;
    for line in source
        .lines()
        .take_while(|l| !l.starts_with("#[cfg(test)]"))
    {
        if let Some(rest) = line.strip_prefix("impl ") {
            owner = rest.strip_suffix(" {");
            continue;
        }
        if line == "}" {
            owner = None;
            continue;
        }
        let item = ["pub const ", "pub fn ", "pub mod "]
            .iter()
            .find_map(|keyword| line.trim_start().strip_prefix(keyword));
        let Some(rest) = item else { continue };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        match owner {
            Some("mod") => {}
            Some(ty) => {
                items.insert(format!("{ty}::{name}"));
            }
            None => {
                if line.starts_with("pub mod ") {
                    owner = Some("mod");
                }
                items.insert(name);
            }
        }
    }
    items
}

/// Items of keys.rs the Python package has no twin of: the worker's own keys and the
/// constructors and accessors.
const RUST_ONLY: &[&str] = &[
    "APALIS_QUEUES_LIST",
    "NO_JOB_META",
    "SESSION_STATE_PATTERN",
    "TICK_LEASE_PREFIX",
    "WORKERS",
    "WORKER_AGENTS",
    "WORKER_INFO",
    "WORKER_WARM",
    "legacy_metrics",
    "session_of_state_key",
    "tick_lease",
    "QueueKeys::new",
    "QueueKeys::queue",
    "QueueKeys::scheduled",
    "QueueKeys::workers",
    "QueueKeys::worker_metadata",
    "QueueKeys::inflight_prefix",
    "QueueKeys::inflight",
    "QueueKeys::done",
    "QueueKeys::done_at",
    "SessionKeys::new",
    "SessionKeys::id",
];

/// What the builders both sides have return for one session, queue and task, by their name
/// in keys.py (`SessionKeys.state`): the Rust side's values.
fn shared_keys(id: &SessionId, queue: &QueueKeys, task: &str) -> BTreeMap<&'static str, Value> {
    let s = SessionKeys::new(id);
    // keys.py builds a session's idempotency key from its job's key, keys.rs from the id too.
    assert_eq!(
        queue.session_idempotency(id),
        queue.idempotency(&s.job_idempotency_key())
    );
    BTreeMap::from([
        ("DEFAULT_QUEUE", keys::DEFAULT_QUEUE.into()),
        ("EVENTS", keys::EVENTS.into()),
        ("SESSIONS_READY", keys::SESSIONS_READY.into()),
        ("SESSIONS_STARTING", keys::SESSIONS_STARTING.into()),
        ("SESSION_HEARTBEATS", keys::SESSION_HEARTBEATS.into()),
        ("MAX_SESSION_ID_LEN", MAX_SESSION_ID_LEN.into()),
        ("idempotency_key", s.job_idempotency_key().into()),
        ("SessionKeys.state", s.state().into()),
        ("SessionKeys.config", s.config().into()),
        ("SessionKeys.agent_pid", s.agent_pid().into()),
        ("SessionKeys.agent_logs", s.agent_logs().into()),
        ("SessionKeys.agent_health", s.agent_health().into()),
        ("SessionKeys.agent_logfile", s.agent_logfile().into()),
        ("SessionKeys.all", json!(s.all())),
        ("QueueKeys.data", queue.data().into()),
        ("QueueKeys.meta_prefix", queue.meta_prefix().into()),
        ("QueueKeys.meta", queue.meta(task).into()),
        ("QueueKeys.active", queue.active().into()),
        ("QueueKeys.dead", queue.dead().into()),
        ("QueueKeys.dead_at", queue.dead_at().into()),
        (
            "QueueKeys.idempotency_prefix",
            queue.idempotency_prefix().into(),
        ),
        (
            "QueueKeys.idempotency",
            queue.session_idempotency(id).into(),
        ),
        ("QueueKeys.wake_channel", queue.wake_channel().into()),
    ])
}

/// The items of keys.rs that keys.py's `name` is compared with: the same name (`::` for
/// `.`) but where the two differ.
fn rust_twins(name: &str) -> Vec<String> {
    match name {
        // In session_id.rs, not keys.rs.
        "MAX_SESSION_ID_LEN" => vec![],
        "idempotency_key" => vec!["SessionKeys::job_idempotency_key".into()],
        "QueueKeys.idempotency" => vec![
            "QueueKeys::idempotency".into(),
            "QueueKeys::session_idempotency".into(),
        ],
        _ => vec![name.replace('.', "::")],
    }
}

/// Every key name `agent_worker.keys` builds for `session`, `queue` and `task`, found by
/// introspection: its public constants and builder functions, and every property and method
/// of `SessionKeys` and `QueueKeys`. A builder whose parameter the printer has no sample
/// for fails it.
async fn python_keys(session: &str, queue: &str, task: &str) -> BTreeMap<String, Value> {
    const PRINT: &str = r#"
import inspect, json, sys
from agent_worker import keys as k
session_id, queue, task_id = sys.argv[1:4]
samples = {"session_id": session_id, "task_id": task_id, "key": k.idempotency_key(session_id)}
def call(f):
    return f(*(samples[p] for p in inspect.signature(f).parameters))
out = {}
for name, value in vars(k).items():
    if name.startswith("_"):
        continue
    if name.isupper() and isinstance(value, (str, int)):
        out[name] = value
    elif inspect.isfunction(value) and value.__module__ == k.__name__ and not name.startswith("validate_"):
        out[name] = call(value)
for obj in (k.SessionKeys.of(session_id), k.QueueKeys.of(queue)):
    for name, member in vars(type(obj)).items():
        if name.startswith("_"):
            continue
        if isinstance(member, property) or inspect.isfunction(member):
            value = getattr(obj, name)
            out[f"{type(obj).__name__}.{name}"] = value if isinstance(member, property) else call(value)
print(json.dumps(out))
"#;
    let mut command = python();
    command.args(["-c", PRINT, session, queue, task]);
    printed_json("agent_worker.keys", &command.output().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_name_of_the_package_is_that_of_keys_rs() {
    require_python(&["redis"]).await;
    let longest = "x".repeat(MAX_SESSION_ID_LEN);
    let samples = [
        ("s-1.x_Y", "agent-start", "01JTASKAAAAAAAAAAAAAAAAAAA"),
        (longest.as_str(), "q:1.b_c-d", "T1"),
    ];
    for (session, queue, task) in samples {
        let id = SessionId::parse(session).unwrap();
        let expected = shared_keys(&id, &QueueKeys::new(queue).unwrap(), task);
        let got = python_keys(session, queue, task).await;
        assert_eq!(
            got.iter()
                .map(|(k, v)| (k.as_str(), v))
                .collect::<BTreeMap<_, _>>(),
            expected
                .iter()
                .map(|(k, v)| (*k, v))
                .collect::<BTreeMap<_, _>>(),
            "keys.py and keys.rs for {session:?} on {queue:?}"
        );
    }
    let compared: BTreeSet<String> = shared_keys(&sid("s"), &QueueKeys::new("q").unwrap(), "t")
        .keys()
        .flat_map(|name| rust_twins(name))
        .collect();
    // Every item of keys.rs is either compared above or has no Python twin, deliberately:
    // a new one must be put on one side or the other.
    assert!(
        compared
            .iter()
            .all(|item| !RUST_ONLY.contains(&item.as_str()))
    );
    let accounted: BTreeSet<String> = compared
        .into_iter()
        .chain(RUST_ONLY.iter().map(|item| item.to_string()))
        .collect();
    assert_eq!(
        rust_key_items(),
        accounted,
        "keys.rs's public items, each compared with keys.py or listed in RUST_ONLY"
    );
}
