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
//! | `python3` with redis-py, jsonschema, FastAPI, uvicorn, httpx, opentelemetry-sdk, setuptools, wheel | the Python client, producer, example, agent and trace tests | pip |
//! | headless Chromium | the console's browser test (`tests/console.rs`) | Debian's `chromium` and what it depends on |
//!
//! Where it can, it installs without root, under `target/xtask/`: Python packages with
//! `pip install --target`, Debian packages with `apt-get download` and `dpkg-deb -x` (a
//! `redis-server` wrapper there finds its libraries; for Chromium, `apt-get -s install`
//! first lists every package this system lacks, and a `chromium` wrapper points it at the
//! unpacked libraries and fonts). As root it uses `apt-get install` instead
//! (`AGENT_WORKER_XTASK_ROOTLESS=1` takes the rootless way even then). Nothing outside
//! `target/` changes unless it runs as root. The tests learn where things are from the
//! environment it passes on: `PATH`, `PYTHONPATH`, `AGENT_WORKER_TEST_LIBFAKETIME` and
//! `AGENT_WORKER_TEST_CHROMIUM`.
//!
//! - `cargo xtask chromium`: only the Chromium step; prints the path to use as
//!   `AGENT_WORKER_TEST_CHROMIUM`.

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

/// The Python packages the tests import, as pip names and the module that shows each is there:
/// redis-py and jsonschema for the producer tests; FastAPI, uvicorn and httpx for the FastAPI
/// example's test; the OpenTelemetry SDK for the trace test (the client's span, whose context
/// the client injects); setuptools and wheel, the build backend `pip install ./python` uses
/// offline (older setuptools build wheels only with the wheel package).
const PYTHON_PACKAGES: &[(&str, &str)] = &[
    ("redis", "redis"),
    ("jsonschema", "jsonschema"),
    ("fastapi", "fastapi"),
    ("uvicorn", "uvicorn"),
    ("httpx", "httpx"),
    ("opentelemetry-sdk", "opentelemetry.sdk.trace"),
    ("setuptools", "setuptools"),
    ("wheel", "wheel"),
];

/// The pip names of [`PYTHON_PACKAGES`].
fn pip_names() -> Vec<&'static str> {
    PYTHON_PACKAGES.iter().map(|(pip, _)| *pip).collect()
}

/// The modules of [`PYTHON_PACKAGES`].
fn python_modules() -> Vec<&'static str> {
    PYTHON_PACKAGES.iter().map(|(_, module)| *module).collect()
}

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
        Some("chromium") => {
            // Only the browser test's Chromium: prepares it and prints its path.
            match chromium(&DepsDir::new(&workspace_root())) {
                Some(path) => {
                    println!("{}", path.display());
                    ExitCode::SUCCESS
                }
                None => ExitCode::FAILURE,
            }
        }
        _ => {
            eprintln!(
                "usage: cargo xtask test [CARGO TEST ARGS...]\n  \
                 installs what the tests need when it is missing, then runs\n  \
                 cargo test --workspace --no-fail-fast [CARGO TEST ARGS...]\n\
                 \x20      cargo xtask chromium\n  \
                 makes headless Chromium available for the console's browser test (rootless\n  \
                 under target/xtask/ when not root) and prints its path"
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
    if !python_has(&python_modules(), &[]) {
        let target = deps.python();
        install_python_packages(&target)?;
        python_path.push(target);
    }
    say(
        "python3",
        &format!(
            "{} with {}",
            version_of(&[], "python3"),
            pip_names().join(", ")
        ),
    );

    if let Some(chromium) = chromium(&deps) {
        env.push((CHROMIUM_VAR.into(), chromium.into_os_string()));
    }

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

/// Where Debian's `chromium` puts its launcher when installed system-wide.
const SYSTEM_CHROMIUM: &str = "/usr/bin/chromium";

/// The variable the console's browser test (`tests/console.rs`) reads headless Chromium's
/// path from (it falls back to [`SYSTEM_CHROMIUM`]).
const CHROMIUM_VAR: &str = "AGENT_WORKER_TEST_CHROMIUM";

/// Set to `1`: install Chromium the rootless way even as root or when it is installed
/// system-wide (to try that path; CI runs as root).
const ROOTLESS_VAR: &str = "AGENT_WORKER_XTASK_ROOTLESS";

/// The packages of Chromium itself: always unpacked by the rootless install, whatever of
/// their dependencies the system already has.
const CHROMIUM_DEBS: &[&str] = &["chromium", "chromium-common"];

/// Makes headless Chromium available to the console's browser test and returns its path
/// (for [`CHROMIUM_VAR`]), or None after saying what to install (that test then fails saying
/// the same). As root: `apt-get install chromium`. Otherwise (or with [`ROOTLESS_VAR`]=1) it
/// is unpacked under `target/xtask/chromium/` the way `redis-server` is, with every package
/// it needs that the system lacks, and run through a wrapper that points it at the unpacked
/// libraries.
fn chromium(deps: &DepsDir) -> Option<PathBuf> {
    let rootless = env::var_os(ROOTLESS_VAR).is_some_and(|v| v == "1");
    if let Some(given) = env::var_os(CHROMIUM_VAR).map(PathBuf::from) {
        if runs(&given) {
            say("chromium", &format!("{} ({CHROMIUM_VAR})", given.display()));
            return Some(given);
        }
        eprintln!(
            "xtask: {CHROMIUM_VAR}={} does not run; looking for chromium elsewhere",
            given.display()
        );
    }
    let system = Path::new(SYSTEM_CHROMIUM);
    if !rootless && system.exists() {
        match chromium_renders(system) {
            Ok(()) => {
                say("chromium", &version_of(&[], SYSTEM_CHROMIUM));
                return Some(system.to_path_buf());
            }
            // Installed but broken (a library missing): the unpacked one may still work.
            Err(error) => eprintln!("xtask: {error}"),
        }
    }
    let wrapper = deps.bin().join("chromium");
    if wrapper.exists() && chromium_renders(&wrapper).is_ok() {
        // Unpacked by an earlier run.
        say("chromium", &format!("{} (unpacked)", wrapper.display()));
        return Some(wrapper);
    }
    let installed = if is_root() && !rootless {
        install_debs(
            deps,
            &["chromium"],
            "the console's browser test needs chromium",
        )
        .map(|_| system.to_path_buf())
    } else {
        install_chromium_rootless(deps, &wrapper).map(|()| wrapper)
    };
    match installed.and_then(|path| chromium_renders(&path).map(|()| path)) {
        Ok(path) => {
            say(
                "chromium",
                &format!(
                    "{} ({})",
                    path.display(),
                    version_of(&[], &path.display().to_string())
                ),
            );
            Some(path)
        }
        Err(error) => {
            eprintln!(
                "xtask: {error}\nxtask: chromium is missing; the console's browser test will \
                 fail. Install it with: sudo apt-get install -y chromium"
            );
            None
        }
    }
}

/// Unpacks `chromium`, `chromium-common` and every package `apt-get install chromium` would
/// add to this system under `target/xtask/chromium/root`, and writes `wrapper`, which runs
/// the unpacked binary with the unpacked libraries and fonts. No root needed: apt-get only
/// simulates the install (to resolve the dependencies against what is installed) and
/// downloads.
fn install_chromium_rootless(deps: &DepsDir, wrapper: &Path) -> Result<(), String> {
    if !on_path("apt-get") {
        return Err("chromium is missing, and this system has no apt-get".into());
    }
    let home = deps.0.join("chromium");
    let (downloads, tree) = (home.join("downloads"), home.join("root"));
    // A fresh tree: a half-unpacked one from an interrupted run must not be reused.
    for dir in [&downloads, &tree] {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let mut packages: Vec<String> = CHROMIUM_DEBS.iter().map(|p| (*p).to_owned()).collect();
    for package in missing_dependencies("chromium")? {
        if !packages.contains(&package) {
            packages.push(package);
        }
    }
    eprintln!(
        "xtask: the console's browser test needs chromium: unpacking {} packages under {} (no \
         root needed)",
        packages.len(),
        tree.display()
    );
    apt_download(&packages, &downloads)?;
    unpack_debs(&downloads, &tree)?;
    let _ = fs::remove_dir_all(&downloads);
    let binary = tree.join("usr/lib/chromium/chromium");
    if !binary.exists() {
        return Err(format!(
            "{} is not in the unpacked chromium",
            binary.display()
        ));
    }
    // The library path: Chromium's own directory, the multiarch ones, then every other
    // unpacked directory holding shared libraries. Those are otherwise reached through an
    // absolute RUNPATH (libpulse's pulseaudio/ directory) that a fresh system lacks.
    let mut libs: Vec<PathBuf> = [
        "usr/lib/chromium",
        "usr/lib/x86_64-linux-gnu",
        "lib/x86_64-linux-gnu",
        "usr/lib/aarch64-linux-gnu",
        "lib/aarch64-linux-gnu",
        "usr/lib",
    ]
    .iter()
    .map(|d| tree.join(d))
    .collect();
    for dir in library_dirs(&tree) {
        if !libs.contains(&dir) {
            libs.push(dir);
        }
    }
    let library_path = env::join_paths(&libs)
        .map_err(|e| e.to_string())?
        .to_string_lossy()
        .into_owned();
    // Every library the binary links to must resolve, in the tree or the system.
    let ldd = Command::new("ldd")
        .arg(&binary)
        .env("LD_LIBRARY_PATH", &library_path)
        .output()
        .map_err(|e| format!("could not run ldd: {e}"))?;
    let listing = String::from_utf8_lossy(&ldd.stdout);
    let missing: Vec<&str> = listing
        .lines()
        .filter(|l| l.contains("not found"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    if !ldd.status.success() || !missing.is_empty() {
        return Err(format!(
            "the unpacked chromium lacks libraries: {} {}; as root, `apt-get install chromium` \
             installs them",
            missing.join(", "),
            String::from_utf8_lossy(&ldd.stderr).trim()
        ));
    }
    // Fonts: the unpacked ones and the system's (a page needs some to render); the system's
    // fontconfig rules when it has them.
    let fonts = home.join("fonts.conf");
    let fonts_conf = format!(
        "<?xml version=\"1.0\"?>\n<!DOCTYPE fontconfig SYSTEM \"urn:fontconfig:fonts.dtd\">\n\
         <fontconfig>\n  <include ignore_missing=\"yes\">/etc/fonts/fonts.conf</include>\n  \
         <dir>{}</dir>\n  <dir>/usr/share/fonts</dir>\n  <cachedir>{}</cachedir>\n</fontconfig>\n",
        tree.join("usr/share/fonts").display(),
        home.join("fontconfig-cache").display()
    );
    fs::write(&fonts, fonts_conf).map_err(|e| e.to_string())?;
    let bin = deps.bin();
    fs::create_dir_all(&bin).map_err(|e| e.to_string())?;
    // A wrapper, as for redis-server: the libraries are found without LD_LIBRARY_PATH
    // leaking into the tests' other processes.
    let script = format!(
        "#!/bin/sh\nLD_LIBRARY_PATH='{library_path}'${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}} \
         FONTCONFIG_FILE='{}' exec '{}' \"$@\"\n",
        fonts.display(),
        binary.display()
    );
    fs::write(wrapper, script).map_err(|e| e.to_string())?;
    make_executable(wrapper)
}

/// The directories under `dir` that hold shared libraries (`*.so`, `*.so.N`), in a stable
/// order.
fn library_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return found;
    };
    let mut entries: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    let mut here = false;
    for path in entries {
        // symlink_metadata: a symlinked directory is not walked twice.
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            found.extend(library_dirs(&path));
        } else if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".so") || n.contains(".so."))
        {
            here = true;
        }
    }
    if here {
        found.insert(0, dir.to_path_buf());
    }
    found
}

/// The packages `apt-get install --no-install-recommends <package>` would install on this
/// system besides those already installed: a simulation, which needs no root.
fn missing_dependencies(package: &str) -> Result<Vec<String>, String> {
    let out = Command::new("apt-get")
        .args(["-s", "-qq", "install", "--no-install-recommends", package])
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| format!("could not run apt-get: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "apt-get -s install {package} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    // "Inst libfoo1 (1.2-3 Debian:12/stable [amd64])", or "Inst chromium [old] (new ...)".
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("Inst "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Runs `chromium` headless on a blank page: proof it starts and renders, not only that the
/// file exists.
fn chromium_renders(chromium: &Path) -> Result<(), String> {
    let profile = env::temp_dir().join(format!("xtask-chromium-{}", std::process::id()));
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("data:text/html,<p>xtask-chromium-ok</p>")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("could not run {}: {e}", chromium.display()));
    let _ = fs::remove_dir_all(&profile);
    let out = out?;
    if out.status.success() && String::from_utf8_lossy(&out.stdout).contains("xtask-chromium-ok") {
        Ok(())
    } else {
        Err(format!(
            "{} does not render a page ({}): {}",
            chromium.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
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
                // No question may wait for an answer nobody gives.
                .env("DEBIAN_FRONTEND", "noninteractive")
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
    apt_download(packages, &downloads).map_err(|e| {
        format!(
            "{e}; as root, `apt-get install {}` does the same",
            packages.join(" ")
        )
    })?;
    let debs = deps.debs();
    unpack_debs(&downloads, &debs)?;
    Ok(debs)
}

/// `apt-get download` of `packages` into `downloads` (no root needed).
fn apt_download(packages: &[impl AsRef<std::ffi::OsStr>], downloads: &Path) -> Result<(), String> {
    run(
        "apt-get download",
        Command::new("apt-get")
            .arg("download")
            .args(packages)
            .current_dir(downloads)
            .stdout(Stdio::null()),
    )
}

/// Unpacks every `.deb` in `downloads` into `tree` (`dpkg-deb -x`: files only, no scripts).
fn unpack_debs(downloads: &Path, tree: &Path) -> Result<(), String> {
    for entry in fs::read_dir(downloads).map_err(|e| e.to_string())? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            run(
                "dpkg-deb -x",
                Command::new("dpkg-deb").arg("-x").arg(&path).arg(tree),
            )?;
        }
    }
    Ok(())
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
    if python_has(&python_modules(), &[target.to_path_buf()]) {
        return Ok(());
    }
    eprintln!(
        "xtask: python3 lacks {}: pip install --target {}",
        pip_names().join(", "),
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
                // Replace what an earlier install left in the target: without it pip skips a
                // directory that exists, and a namespace package (opentelemetry) stays half
                // installed.
                "--upgrade",
            ])
            .arg("--target")
            .arg(target)
            .args(pip_names()),
    )
    .map_err(|e| format!("{e}; python3 needs pip (Debian/Ubuntu: apt-get install python3-pip)"))?;
    if python_has(&python_modules(), &[target.to_path_buf()]) {
        Ok(())
    } else {
        Err(format!(
            "pip installed {} into {} but python3 still cannot import them",
            pip_names().join(", "),
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
