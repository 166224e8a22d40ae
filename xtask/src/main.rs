//! `cargo xtask <task>`: the project's own tasks.
//!
//! - `cargo xtask test [ARGS...]`: makes sure everything the test suite needs is present,
//!   installing what is missing, then runs `cargo test --workspace --no-fail-fast [ARGS...]`
//!   (every test binary runs, so one failure never hides the rest of the suite).
//!
//! What the tests need besides Rust, and how a missing piece is installed:
//!
//! | need | used by | installed with |
//! |---|---|---|
//! | `redis-server` on `PATH` | every integration test (each starts its own) | Debian's `redis-server` |
//! | libfaketime | the skewed-clock test (`tests/lifecycle.rs`) | Debian's `libfaketime` |
//! | `python3` with redis-py, jsonschema, FastAPI, uvicorn, httpx, setuptools, wheel | the Python client, producer, example and agent tests | pip |
//!
//! Where it can, it installs without root, under `target/xtask/`: Python packages with
//! `pip install --target`, Debian packages with `apt-get download` and `dpkg-deb -x` (a
//! `redis-server` wrapper there finds its libraries). As root it uses `apt-get install`
//! instead. Nothing outside `target/` changes unless it runs as root. The tests learn where
//! things are from the environment it passes on: `PATH`, `PYTHONPATH` and
//! `AGENT_WORKER_TEST_LIBFAKETIME`.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

/// Where libfaketime lives when Debian's package is installed.
const LIBFAKETIME_PATHS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
];

/// The variable the skewed-clock test reads libfaketime's path from.
const LIBFAKETIME_VAR: &str = "AGENT_WORKER_TEST_LIBFAKETIME";

/// The Python packages the tests import (pip names equal to module names): redis-py and
/// jsonschema for the producer tests; FastAPI, uvicorn and httpx for the FastAPI example's
/// test; setuptools and wheel, the build backend `pip install ./python` uses offline (older
/// setuptools build wheels only with the wheel package).
const PYTHON_PACKAGES: &[&str] = &[
    "redis",
    "jsonschema",
    "fastapi",
    "uvicorn",
    "httpx",
    "setuptools",
    "wheel",
];

/// Debian packages of a private redis-server: the server, the binary it links to, and the
/// libraries a minimal system may lack.
const REDIS_DEBS: &[&str] = &["redis-server", "redis-tools", "libjemalloc2", "liblzf1"];

fn main() -> ExitCode {
    let mut args = env::args_os().skip(1);
    match args.next().and_then(|a| a.into_string().ok()).as_deref() {
        Some("test") => match test(args.collect()) {
            Ok(code) => code,
            Err(error) => {
                eprintln!("xtask: {error}");
                ExitCode::FAILURE
            }
        },
        _ => {
            eprintln!(
                "usage: cargo xtask test [CARGO TEST ARGS...]\n  \
                 installs what the tests need when it is missing, then runs\n  \
                 cargo test --workspace --no-fail-fast [CARGO TEST ARGS...]"
            );
            ExitCode::from(2)
        }
    }
}

/// Prepares the test environment and runs the suite; the suite's exit code is ours.
fn test(cargo_args: Vec<OsString>) -> Result<ExitCode, String> {
    let root = workspace_root();
    let deps = DepsDir::new(&root);
    let mut env: Vec<(String, OsString)> = Vec::new();

    let mut path_dirs: Vec<PathBuf> = Vec::new();
    if !on_path("redis-server") {
        path_dirs.push(install_redis(&deps)?);
    }
    say("redis-server", &version_of(&path_dirs, "redis-server"));

    let faketime = match find_libfaketime() {
        Some(path) => path,
        None => install_libfaketime(&deps)?,
    };
    say("libfaketime", &faketime.display().to_string());
    env.push((LIBFAKETIME_VAR.into(), faketime.into_os_string()));

    if !on_path("python3") {
        return Err("python3 is not on PATH: install Python 3.10 or later \
             (Debian/Ubuntu: apt-get install python3 python3-pip)"
            .into());
    }
    let mut python_path: Vec<PathBuf> = Vec::new();
    if !python_has(PYTHON_PACKAGES, &[]) {
        let target = deps.python();
        install_python_packages(&target)?;
        python_path.push(target);
    }
    say(
        "python3",
        &format!(
            "{} with {}",
            version_of(&[], "python3"),
            PYTHON_PACKAGES.join(", ")
        ),
    );

    chromium();

    if !path_dirs.is_empty() {
        env.push(("PATH".into(), joined(&path_dirs, env::var_os("PATH"))?));
    }
    if !python_path.is_empty() {
        env.push((
            "PYTHONPATH".into(),
            joined(&python_path, env::var_os("PYTHONPATH"))?,
        ));
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&root)
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(&cargo_args)
        .envs(env.iter().map(|(k, v)| (k, v)));
    eprintln!(
        "xtask: cargo test --workspace --no-fail-fast {}",
        shown(&cargo_args)
    );
    let status = command
        .status()
        .map_err(|e| format!("could not run cargo: {e}"))?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(code.clamp(1, 255) as u8),
        None => ExitCode::FAILURE,
    })
}

/// Where the console's browser test (`tests/console.rs`) looks for headless Chromium.
const CHROMIUM: &str = "/usr/bin/chromium";

/// Makes Debian's `chromium` available for the console's browser test: as root it is
/// installed with `apt-get install -y chromium`; otherwise (it is too large and too entangled
/// to unpack under `target/`) this says what to run, and that test fails saying the same.
fn chromium() {
    if Path::new(CHROMIUM).exists() {
        say("chromium", &version_of(&[], "chromium"));
        return;
    }
    let installed = is_root()
        && on_path("apt-get")
        && run(
            "apt-get update",
            Command::new("apt-get").args(["update", "-qq"]),
        )
        .and_then(|()| {
            eprintln!("xtask: the console's browser test needs chromium: apt-get install chromium");
            run(
                "apt-get install",
                Command::new("apt-get")
                    .args(["install", "-y", "-qq", "chromium"])
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )
        })
        .map_err(|e| eprintln!("xtask: {e}"))
        .is_ok();
    if installed && Path::new(CHROMIUM).exists() {
        say("chromium", &version_of(&[], "chromium"));
    } else {
        eprintln!(
            "xtask: chromium is missing ({CHROMIUM}); the console's browser test will fail. \
             Install it with: sudo apt-get install -y chromium"
        );
    }
}

/// `target/xtask/`, where rootless installs go.
struct DepsDir(PathBuf);

impl DepsDir {
    fn new(root: &Path) -> Self {
        let target = env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        Self(target.join("xtask"))
    }

    /// Where Debian packages are unpacked (their `usr/...` trees).
    fn debs(&self) -> PathBuf {
        self.0.join("debs")
    }

    /// Wrappers put first on `PATH`.
    fn bin(&self) -> PathBuf {
        self.0.join("bin")
    }

    /// `pip install --target` directory.
    fn python(&self) -> PathBuf {
        self.0.join("python")
    }
}

fn workspace_root() -> PathBuf {
    // xtask/ sits in the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ has a parent")
        .to_path_buf()
}

fn say(what: &str, detail: &str) {
    eprintln!("xtask: {what}: {detail}");
}

fn shown(args: &[OsString]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn is_root() -> bool {
    // The effective uid, without a libc dependency: /proc/self/status "Uid: real effective …".
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn on_path(program: &str) -> bool {
    runs(Path::new(program))
}

/// The first line `program --version` prints, looked up in `dirs` first.
fn version_of(dirs: &[PathBuf], program: &str) -> String {
    let path = dirs
        .iter()
        .map(|d| d.join(program))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(program));
    Command::new(path)
        .arg("--version")
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default()
}

fn run(what: &str, command: &mut Command) -> Result<(), String> {
    let status = command
        .status()
        .map_err(|e| format!("{what}: could not run {:?}: {e}", command.get_program()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({status})"))
    }
}

/// Installs Debian packages system-wide (as root) or unpacks them under `target/xtask/debs`
/// (otherwise). Returns the directory the packages' `usr/` tree is in (`/` when installed).
fn install_debs(deps: &DepsDir, packages: &[&str], why: &str) -> Result<PathBuf, String> {
    if !on_path("apt-get") {
        return Err(format!(
            "{why}, and this system has no apt-get: install {} with your package manager",
            packages.join(" ")
        ));
    }
    if is_root() {
        eprintln!("xtask: {why}: apt-get install {}", packages.join(" "));
        run(
            "apt-get update",
            Command::new("apt-get").args(["update", "-qq"]),
        )?;
        run(
            "apt-get install",
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(packages)
                .stdout(Stdio::null()),
        )?;
        return Ok(PathBuf::from("/"));
    }
    // Not root: apt-get can still download, and dpkg-deb unpack, into a directory of ours.
    eprintln!(
        "xtask: {why}: unpacking {} under {} (no root needed)",
        packages.join(" "),
        deps.debs().display()
    );
    let downloads = deps.0.join("downloads");
    fs::create_dir_all(&downloads).map_err(|e| format!("creating {}: {e}", downloads.display()))?;
    run(
        "apt-get download",
        Command::new("apt-get")
            .arg("download")
            .args(packages)
            .current_dir(&downloads)
            .stdout(Stdio::null()),
    )
    .map_err(|e| {
        format!(
            "{e}; as root, `apt-get install {}` does the same",
            packages.join(" ")
        )
    })?;
    let debs = deps.debs();
    for entry in fs::read_dir(&downloads).map_err(|e| e.to_string())? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            run(
                "dpkg-deb -x",
                Command::new("dpkg-deb").arg("-x").arg(&path).arg(&debs),
            )?;
        }
    }
    Ok(debs)
}

/// Makes `redis-server` available; returns the directory to put first on `PATH`.
fn install_redis(deps: &DepsDir) -> Result<PathBuf, String> {
    if runs(&deps.bin().join("redis-server")) {
        // Unpacked by an earlier run.
        return Ok(deps.bin());
    }
    let tree = install_debs(deps, REDIS_DEBS, "redis-server is not on PATH")?;
    if tree == Path::new("/") {
        return Ok(PathBuf::from("/usr/bin"));
    }
    // A wrapper, so the unpacked binary finds the unpacked libraries without LD_LIBRARY_PATH
    // leaking into every process the tests start.
    let binary = tree.join("usr/bin/redis-server");
    let libs: Vec<String> = [
        "usr/lib",
        "usr/lib/x86_64-linux-gnu",
        "usr/lib/aarch64-linux-gnu",
    ]
    .iter()
    .map(|d| tree.join(d).display().to_string())
    .collect();
    let bin = deps.bin();
    fs::create_dir_all(&bin).map_err(|e| e.to_string())?;
    let wrapper = bin.join("redis-server");
    let script = format!(
        "#!/bin/sh\nLD_LIBRARY_PATH='{}'${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}} exec '{}' \"$@\"\n",
        libs.join(":"),
        binary.display()
    );
    fs::write(&wrapper, script).map_err(|e| e.to_string())?;
    make_executable(&wrapper)?;
    if !runs(&wrapper) {
        return Err(format!(
            "the unpacked redis-server ({}) does not run; install redis-server as root",
            binary.display()
        ));
    }
    Ok(bin)
}

/// True when `program --version` succeeds.
fn runs(program: &Path) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn make_executable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())
}

fn find_libfaketime() -> Option<PathBuf> {
    env::var_os(LIBFAKETIME_VAR)
        .map(PathBuf::from)
        .into_iter()
        .chain(LIBFAKETIME_PATHS.iter().map(PathBuf::from))
        .find(|p| p.exists())
}

fn install_libfaketime(deps: &DepsDir) -> Result<PathBuf, String> {
    if let Some(unpacked) = find_file(&deps.debs(), "libfaketime.so.1") {
        return Ok(unpacked);
    }
    let tree = install_debs(deps, &["libfaketime"], "libfaketime is missing")?;
    if tree == Path::new("/") {
        return find_libfaketime().ok_or_else(|| "libfaketime installed but not found".into());
    }
    find_file(&tree, "libfaketime.so.1")
        .ok_or_else(|| format!("libfaketime.so.1 is not in the unpacked {}", tree.display()))
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
        if path.is_dir()
            && let Some(found) = find_file(&path, name)
        {
            return Some(found);
        }
    }
    None
}

/// True when `python3` imports every module, with `extra` prepended to its path.
fn python_has(modules: &[&str], extra: &[PathBuf]) -> bool {
    let mut command = Command::new("python3");
    command
        .args(["-c", &format!("import {}", modules.join(", "))])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if !extra.is_empty()
        && let Ok(path) = joined(extra, env::var_os("PYTHONPATH"))
    {
        command.env("PYTHONPATH", path);
    }
    command.status().is_ok_and(|s| s.success())
}

/// `pip install --target`: no root, no virtualenv, and allowed even where the system Python
/// is marked externally managed.
fn install_python_packages(target: &Path) -> Result<(), String> {
    if python_has(PYTHON_PACKAGES, &[target.to_path_buf()]) {
        return Ok(());
    }
    eprintln!(
        "xtask: python3 lacks {}: pip install --target {}",
        PYTHON_PACKAGES.join(", "),
        target.display()
    );
    run(
        "pip install",
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg("--target")
            .arg(target)
            .args(PYTHON_PACKAGES),
    )
    .map_err(|e| format!("{e}; python3 needs pip (Debian/Ubuntu: apt-get install python3-pip)"))?;
    if python_has(PYTHON_PACKAGES, &[target.to_path_buf()]) {
        Ok(())
    } else {
        Err(format!(
            "pip installed {} into {} but python3 still cannot import them",
            PYTHON_PACKAGES.join(", "),
            target.display()
        ))
    }
}

/// `dirs` then the current value of a `PATH`-like variable, joined with `:`.
fn joined(dirs: &[PathBuf], current: Option<OsString>) -> Result<OsString, String> {
    let current = current.unwrap_or_default();
    env::join_paths(dirs.iter().cloned().chain(env::split_paths(&current)))
        .map_err(|e| e.to_string())
}
