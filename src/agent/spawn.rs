//! Starting an agent process without forking the worker.
//!
//! `std::process::Command` (and tokio's, built on it) starts a child with `posix_spawn`, a
//! `vfork`-style clone that copies nothing, unless the command has a `pre_exec` hook: then it
//! falls back to `fork`, which copies the worker's page tables and makes both processes take
//! copy-on-write faults afterwards. Our agents need such a hook, because the death signal
//! (`PR_SET_PDEATHSIG`) can only be armed by the child itself. In the benchmark's burst profile
//! that fork was about half of the worker's CPU per session (copy_process and ~170 page faults).
//!
//! So [`spawn`] does what `posix_spawn` does, plus the death signal:
//! - Everything that allocates happens first, in the worker: the program's path, `argv`,
//!   `envp`, the pipes.
//! - `clone(CLONE_VM | CLONE_VFORK | CLONE_PIDFD)`: the child runs on a small stack of its own
//!   inside the worker's memory, and the calling thread sleeps until it has exec'd or exited.
//!   The child only makes system calls (no allocation, no locks): it resets signal handlers,
//!   leads a new process group, arms the death signal, checks that the worker is still its
//!   parent, points stdin/stdout/stderr at `/dev/null` and the pipes, unblocks signals and
//!   execs. A failing step leaves its errno in memory the worker reads once the clone returns.
//! - The worker waits for the exit on a pidfd (epoll, then `waitid(P_PIDFD)`): no `SIGCHLD`
//!   handler, and no pid that could be reused before the reap.
//!
//! Linux only (it already was: the death signal is Linux's), kernel 5.4 or later for
//! `CLONE_PIDFD` and `waitid(P_PIDFD)`.
//!
//! This file is the worker side (what is prepared, the [`Child`] that is waited for); the
//! clone and what the child runs before `execve` are `spawn/child.rs`. A [`Child`] need not
//! come from here: [`Child::from_fds`] takes one started elsewhere, which is all the process
//! owner ([`crate::agent::process`]) needs to own it.

// The one module that needs unsafe code (with its child side): a vfork-style clone and what
// the child does before it execs (raw system calls on memory it shares with the worker), and
// the pidfd and fds that come back. Every block says why it is sound.
#![allow(unsafe_code)]

use std::{
    ffi::{CString, OsStr, OsString},
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::{
            ffi::{OsStrExt, OsStringExt},
            process::ExitStatusExt,
        },
    },
    path::Path,
    process::ExitStatus,
    ptr,
    sync::{LazyLock, OnceLock},
};

mod child;

use nix::sys::signal::Signal;
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::unix::pipe,
};

/// `PATH` when the worker has none: glibc's default for `execvp`.
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// Prefix of the worker's own settings variables, which may carry the Redis password: they
/// never reach an agent.
const OWN_SETTINGS_PREFIX: &[u8] = b"AGENT_WORKER__";

/// A process started by [`spawn`]: it must be waited for ([`Child::wait`]) to be reaped.
#[derive(Debug)]
pub struct Child {
    pid: u32,
    pidfd: AsyncFd<OwnedFd>,
    /// Why the child could not move itself into the cgroup it was given, if it could not (it
    /// runs anyway, outside it).
    pub cgroup_error: Option<io::Error>,
    /// Write end of the child's stdin, when it was asked for ([`Stdin::Piped`]).
    pub stdin: Option<pipe::Sender>,
    /// Read end of the child's stdout.
    pub stdout: Option<pipe::Receiver>,
    /// Read end of the child's stderr.
    pub stderr: Option<pipe::Receiver>,
}

impl Child {
    /// A child from its parts, however it was started: its pid, a pidfd for it, and the
    /// worker's ends of its stdio pipes (stdin only if it reads a pipe). [`spawn_into`] builds
    /// one from what its clone returned; a child this process did not clone itself (one a
    /// zygote forked and handed over, re-parented to this subreaper) is built from a pidfd of
    /// `pidfd_open(2)` and pipes the worker made. It must be a child of this process, leading
    /// its own process group: [`Child::wait`] reaps it with `waitid`. Inside a tokio runtime
    /// (the pipes and the pidfd register with its reactor).
    pub fn from_fds(
        pid: u32,
        pidfd: OwnedFd,
        stdin: Option<OwnedFd>,
        stdout: OwnedFd,
        stderr: OwnedFd,
    ) -> io::Result<Self> {
        let stdout = pipe::Receiver::from_owned_fd(stdout)?;
        let stderr = pipe::Receiver::from_owned_fd(stderr)?;
        let stdin = stdin.map(pipe::Sender::from_owned_fd).transpose()?;
        // SAFETY: an OwnedFd keeps its one fd open until the AsyncFd drops it.
        let pidfd = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Self {
            pid,
            pidfd,
            cgroup_error: None,
            stdin,
            stdout: Some(stdout),
            stderr: Some(stderr),
        })
    }

    /// The process `pid`, a child of this process started elsewhere (a zygote's agent,
    /// re-parented to this subreaper), as a [`Child`] with the read ends of its output pipes.
    /// A pid that is not this process's child (any more) is refused with `ECHILD`: reaped by
    /// someone else, it may be another process's number by now. Inside a tokio runtime.
    pub fn adopt(pid: u32, stdout: OwnedFd, stderr: OwnedFd) -> io::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd, or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd (close-on-exec, as pidfd_open makes them), ours alone.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        // Ours to wait for, or ECHILD. WNOWAIT leaves an exit for Child::wait to reap.
        try_reap(pidfd.as_raw_fd(), libc::WNOHANG | libc::WNOWAIT)?;
        Self::from_fds(pid, pidfd, None, stdout, stderr)
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// Waits for the child to exit and reaps it. Cancel-safe: a dropped wait can be resumed.
    pub async fn wait(&self) -> io::Result<ExitStatus> {
        loop {
            let mut ready = self.pidfd.readable().await?;
            match try_reap(self.pidfd.get_ref().as_raw_fd(), libc::WNOHANG)? {
                Some(status) => return Ok(status),
                // Woken without an exit (the fd is level-triggered only on exit, but be safe).
                None => ready.clear_ready(),
            }
        }
    }
}

/// Starts `program` with `args` (each one argv element, verbatim: no shell), the worker's
/// environment minus its own `AGENT_WORKER__*` settings plus `env` (which wins over inherited
/// values), stdin on `/dev/null` and stdout/stderr on pipes. The child leads a new process
/// group (its pgid is its pid) and is SIGKILLed by the kernel when the calling thread dies.
///
/// `program` without a `/` is looked up on the worker's `PATH`. Must run on a thread that
/// lives as long as the child should (the death signal follows the thread), inside a tokio
/// runtime (the pipes and pidfd register with its reactor).
pub fn spawn(program: &str, args: &[String], env: &[(&str, &str)]) -> io::Result<Child> {
    spawn_into(program, args, env, &Placement::default(), Stdin::Null)
}

/// Where a child goes before it execs: its cgroups and its OOM score. Fds open in the worker,
/// kept open until the spawn returns.
#[derive(Debug, Clone, Copy, Default)]
pub struct Placement {
    /// A cgroup v2 directory, open: the child is cloned straight into it (`clone3` with
    /// `CLONE_INTO_CGROUP`), or, where that is not available, moves itself with
    /// `cgroup_procs`.
    pub cgroup_dir: Option<RawFd>,
    /// `cgroup.procs` of that cgroup, open for writing.
    pub cgroup_procs: Option<RawFd>,
    /// `cgroup.procs` of the agent's cgroups in the v1 hierarchies (memory, pids), which the
    /// child writes itself into (v1 has no `CLONE_INTO_CGROUP`).
    pub v1_procs: [Option<RawFd>; 2],
    /// The child's `/proc/self/oom_score_adj`.
    pub oom_score_adj: Option<i32>,
}

/// What the child's stdin is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdin {
    /// `/dev/null`, as for every agent started for a session.
    Null,
    /// A pipe whose write end is [`Child::stdin`]: how a warm process receives its session
    /// (see [`crate::agent::warm`]).
    Piped,
    /// This fd of the worker's, open until the spawn returns: the zygote's end of its socket
    /// (see [`crate::agent::zygote`]).
    Fd(RawFd),
}

/// [`spawn`], the child placed as `placement` says before it execs (in its cgroups, with its
/// OOM score): so everything the agent ever starts is born inside those cgroups. Failing to
/// move into one is not fatal: the child runs outside it and [`Child::cgroup_error`] says why.
/// `stdin` says what the child reads.
pub fn spawn_into(
    program: &str,
    args: &[String],
    env: &[(&str, &str)],
    placement: &Placement,
    stdin: Stdin,
) -> io::Result<Child> {
    spawn_raw(program, args, env, placement, stdin)?.into_child()
}

/// A child just started, not yet registered with a runtime: what [`spawn_raw`] returns on a
/// thread without one (see [`crate::agent::containment`]'s placed spawners), turned into a
/// [`Child`] by [`RawChild::into_child`] inside the runtime.
#[derive(Debug)]
pub struct RawChild {
    pid: u32,
    pidfd: OwnedFd,
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: OwnedFd,
    cgroup_error: Option<io::Error>,
}

impl RawChild {
    /// The [`Child`] to wait for; inside a tokio runtime. A child that cannot be registered
    /// is killed and reaped: nothing could wait for it.
    pub fn into_child(self) -> io::Result<Child> {
        let pid = self.pid as libc::pid_t;
        let mut child = Child::from_fds(self.pid, self.pidfd, self.stdin, self.stdout, self.stderr)
            .inspect_err(|_| kill_and_reap(pid))?;
        child.cgroup_error = self.cgroup_error;
        Ok(child)
    }
}

/// [`spawn_into`] without a runtime: the clone and the pipes, on the calling thread (whose
/// life the death signal follows).
pub fn spawn_raw(
    program: &str,
    args: &[String],
    env: &[(&str, &str)],
    placement: &Placement,
    stdin: Stdin,
) -> io::Result<RawChild> {
    let strings = ExecStrings::new(program, args, env)?;
    let dev_null = dev_null()?;
    let stdin_pipe = match stdin {
        Stdin::Null | Stdin::Fd(_) => None,
        Stdin::Piped => Some(pipe_cloexec()?),
    };
    let stdin_fd = match (stdin, &stdin_pipe) {
        (_, Some((read, _))) => read.as_raw_fd(),
        (Stdin::Fd(fd), None) => fd,
        _ => dev_null.as_raw_fd(),
    };
    let (stdout_read, stdout_write) = pipe_cloexec()?;
    let (stderr_read, stderr_write) = pipe_cloexec()?;
    let cloned = child::start(&child::Exec {
        path: strings.path.as_ptr(),
        argv: strings.argv_ptrs.as_ptr(),
        envp: strings.envp_ptrs.as_ptr(),
        sh_argv: strings.sh_argv.as_ptr(),
        stdin: stdin_fd,
        stdout: stdout_write.as_raw_fd(),
        stderr: stderr_write.as_raw_fd(),
        placement: *placement,
    })?;
    let pid = cloned.pid;
    if cloned.pidfd < 0 {
        // A kernel older than 5.2 ignores CLONE_PIDFD: nothing could wait for this child.
        // (5.2 and 5.3 return one but lack waitid(P_PIDFD): Linux 5.4 is the stated minimum.)
        kill_and_reap(pid);
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the kernel returned no pidfd: Linux 5.4 or later is required",
        ));
    }
    // SAFETY: with CLONE_PIDFD the kernel stored a new pidfd (close-on-exec) here, ours alone.
    let pidfd = unsafe { OwnedFd::from_raw_fd(cloned.pidfd) };
    // The child holds its own copies (or is gone): ours must close, or the readers would
    // never see end-of-file.
    let stdin_write = stdin_pipe.map(|(read, write)| {
        drop(read);
        write
    });
    drop((stdout_write, stderr_write));

    if let Some(failure) = cloned.failure {
        // The child has exited (with 127): reap it, then say which step failed.
        let _ = try_reap(pidfd.as_raw_fd(), 0);
        return Err(failure);
    }
    Ok(RawChild {
        pid: pid as u32,
        pidfd,
        stdin: stdin_write,
        stdout: stdout_read,
        stderr: stderr_read,
        cgroup_error: cloned.cgroup_error,
    })
}

/// What `execve` gets, all allocated in the worker before the clone (the child may not
/// allocate): the program's resolved path, `argv` and `envp` as C strings with the
/// null-terminated pointer arrays into them, and execvp's `/bin/sh` fallback argv. The
/// pointers point into the strings' heap buffers, which stay put as long as this lives.
struct ExecStrings {
    path: CString,
    _argv: Vec<CString>,
    _envp: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    envp_ptrs: Vec<*const libc::c_char>,
    sh_argv: Vec<*const libc::c_char>,
}

impl ExecStrings {
    fn new(program: &str, args: &[String], env: &[(&str, &str)]) -> io::Result<Self> {
        let path = resolve(program, std::env::var_os("PATH").as_deref())?;
        let argv: Vec<CString> = std::iter::once(program)
            .chain(args.iter().map(String::as_str))
            .map(c_string)
            .collect::<io::Result<_>>()?;
        let envp = environment(env)?;
        let argv_ptrs = null_terminated(&argv);
        let envp_ptrs = null_terminated(&envp);
        // execvp's fallback for a file the kernel cannot execute (a script without `#!`): the
        // same arguments through /bin/sh.
        let sh_argv: Vec<*const libc::c_char> = [child::SH.as_ptr(), path.as_ptr()]
            .into_iter()
            .chain(argv_ptrs[1..].iter().copied())
            .collect();
        Ok(Self {
            path,
            _argv: argv,
            _envp: envp,
            argv_ptrs,
            envp_ptrs,
            sh_argv,
        })
    }
}

/// SIGKILL and reap, by pid, a child we cannot wait for through a pidfd.
fn kill_and_reap(pid: libc::pid_t) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    let mut status = 0;
    // SAFETY: reaping our own child by pid; nothing else waits for it.
    unsafe { libc::waitpid(pid, &mut status, 0) };
}

/// Reaps the child behind `pidfd` if it has exited (`WNOHANG`), or waits for it (`0`).
fn try_reap(pidfd: RawFd, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
    loop {
        // SAFETY: an all-zero siginfo_t is valid; waitid fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let result = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                pidfd as libc::id_t,
                &mut info,
                libc::WEXITED | flags,
            )
        };
        if result == -1 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        // SAFETY: after a successful waitid for WEXITED these are the SIGCHLD fields.
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        // Back to the wait(2) status encoding ExitStatus understands.
        let raw = match info.si_code {
            libc::CLD_EXITED => (status & 0xff) << 8,
            libc::CLD_DUMPED => status | 0x80,
            _ => status,
        };
        return Ok(Some(ExitStatus::from_raw(raw)));
    }
}

/// Where `program` is: itself if it names a path, else the first executable file of that name
/// in a `PATH` directory (an empty entry is the current directory, as for `execvp`).
fn resolve(program: &str, path_var: Option<&OsStr>) -> io::Result<CString> {
    if program.contains('/') {
        return c_string(program);
    }
    let path_var = path_var.unwrap_or(OsStr::new(DEFAULT_PATH));
    for dir in std::env::split_paths(path_var) {
        let candidate = dir.join(program);
        let Ok(candidate) = CString::new(candidate.into_os_string().into_vec()) else {
            continue;
        };
        if is_executable_file(&candidate) {
            return Ok(candidate);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no executable file of that name in any PATH directory",
    ))
}

fn is_executable_file(path: &CString) -> bool {
    // SAFETY: a valid C string.
    let executable = unsafe { libc::access(path.as_ptr(), libc::X_OK) } == 0;
    executable && Path::new(OsStr::from_bytes(path.as_bytes())).is_file()
}

fn c_string(value: &str) -> io::Result<CString> {
    CString::new(value).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "an argument contains a NUL byte",
        )
    })
}

fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(ptr::null()))
        .collect()
}

/// The worker's environment without its own settings, as `KEY=value` entries with their keys,
/// read once, at the first spawn: the worker never changes its environment, and scanning it
/// for every spawn showed up in burst profiles.
static INHERITED_ENV: LazyLock<Vec<(OsString, CString)>> = LazyLock::new(|| {
    std::env::vars_os()
        .filter(|(key, _)| !key.as_bytes().starts_with(OWN_SETTINGS_PREFIX))
        .filter_map(|(key, value)| {
            let mut entry = key.as_bytes().to_vec();
            entry.push(b'=');
            entry.extend_from_slice(value.as_bytes());
            Some((key, CString::new(entry).ok()?))
        })
        .collect()
});

fn environment(overrides: &[(&str, &str)]) -> io::Result<Vec<CString>> {
    let mut entries: Vec<CString> = INHERITED_ENV
        .iter()
        .filter(|(key, _)| {
            !overrides
                .iter()
                .any(|(k, _)| key.as_bytes() == k.as_bytes())
        })
        .map(|(_, entry)| entry.clone())
        .collect();
    for (key, value) in overrides {
        entries.push(c_string(&format!("{key}={value}"))?);
    }
    Ok(entries)
}

/// A pipe (read end, write end), both close-on-exec.
pub fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: pipe2 writes two new fds into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are new and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Opened once; every agent's stdin is a duplicate of it. A failed open is not kept: the
/// next spawn tries again (a brief EMFILE must not fail every later start).
static DEV_NULL: OnceLock<OwnedFd> = OnceLock::new();

fn dev_null() -> io::Result<&'static OwnedFd> {
    if let Some(fd) = DEV_NULL.get() {
        return Ok(fd);
    }
    let fd = std::fs::File::open("/dev/null")
        .map(OwnedFd::from)
        .map_err(|e| io::Error::new(e.kind(), format!("opening /dev/null: {e}")))?;
    // Two threads may race here; the loser's fd is closed.
    let _ = DEV_NULL.set(fd);
    Ok(DEV_NULL.get().expect("just set"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn output(mut child: Child) -> (String, ExitStatus) {
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .await
            .unwrap();
        let status = child.wait().await.unwrap();
        (out, status)
    }

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// A fresh directory `<name>-<pid>` in the temp dir; the test removes it.
    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Writes `text` to `path`, executable (0755).
    fn write_executable(path: &std::path::Path, text: &str) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }

    #[tokio::test]
    async fn exit_codes_signals_and_stdout_come_back() {
        let child = spawn(
            "/bin/sh",
            &args(&["-c", "echo out; echo err >&2; exit 7"]),
            &[],
        );
        let (out, status) = output(child.unwrap()).await;
        assert_eq!(out, "out\n");
        assert_eq!(status.code(), Some(7));

        let child = spawn("/bin/sh", &args(&["-c", "kill -KILL $$"]), &[]).unwrap();
        let status = child.wait().await.unwrap();
        assert_eq!(
            (status.code(), status.signal()),
            (None, Some(libc::SIGKILL))
        );
    }

    #[tokio::test]
    async fn the_child_leads_its_own_group_with_stdin_on_dev_null() {
        // Field 5 of /proc/<pid>/stat is the process group.
        let script = "cut -d' ' -f5 /proc/$$/stat; readlink /proc/$$/fd/0";
        let child = spawn("/bin/sh", &args(&["-c", script]), &[]).unwrap();
        let pid = child.id();
        let (out, _) = output(child).await;
        let lines: Vec<&str> = out.lines().collect();
        assert_ne!(pid, std::process::id());
        assert_eq!(lines, [pid.to_string().as_str(), "/dev/null"]);
    }

    #[tokio::test]
    async fn signals_start_unblocked_and_at_their_defaults() {
        // This test process ignores SIGPIPE (Rust does) and the clone runs with every signal
        // blocked: neither may reach the agent.
        let child = spawn(
            "grep",
            &args(&["-E", "^Sig(Blk|Ign)", "/proc/self/status"]),
            &[],
        );
        let (out, _) = output(child.unwrap()).await;
        // What this process ignores besides SIGPIPE (under `nohup`: SIGHUP) stays ignored
        // across exec, as POSIX has it and the child does: the rest must be at the default.
        let own = std::fs::read_to_string("/proc/self/status").unwrap();
        let own_ignored = own
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:"))
            .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
            .unwrap();
        let sigpipe = 1u64 << (libc::SIGPIPE - 1);
        // Only the standard signals: glibc keeps 32 and 33 for itself (never an agent's).
        let own_ignored = own_ignored & ((1u64 << 31) - 1);
        for line in out.lines() {
            let (name, mask) = line.split_once(':').unwrap();
            let mask = u64::from_str_radix(mask.trim(), 16).unwrap();
            let expected = if name == "SigIgn" {
                own_ignored & !sigpipe
            } else {
                0
            };
            assert_eq!(mask, expected, "{line}");
        }
        assert_eq!(out.lines().count(), 2, "{out}");
    }

    #[tokio::test]
    async fn overrides_replace_inherited_variables_once() {
        let home = std::env::var("HOME").unwrap_or_default();
        let child = spawn(
            "/usr/bin/env",
            &[],
            &[("HOME", "/agent-home"), ("ONLY_AGENT", "1")],
        );
        let (out, _) = output(child.unwrap()).await;
        let homes: Vec<&str> = out.lines().filter(|l| l.starts_with("HOME=")).collect();
        assert_eq!(homes, ["HOME=/agent-home"], "was {home:?}");
        assert!(out.lines().any(|l| l == "ONLY_AGENT=1"), "{out}");
        assert!(
            out.lines().any(|l| l.starts_with("PATH=")),
            "inherits the rest"
        );
    }

    #[tokio::test]
    async fn exec_failures_name_the_os_error() {
        let dir = temp_dir("spawn-test");
        let not_executable = dir.join("not-executable");
        std::fs::write(&not_executable, "#!/bin/sh\n").unwrap();
        let err = spawn(not_executable.to_str().unwrap(), &[], &[]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");

        let err = spawn("/nonexistent/agent", &[], &[]).unwrap_err();
        assert_eq!(err.to_string(), "No such file or directory (os error 2)");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_script_without_a_shebang_runs_through_sh_as_with_execvp() {
        let dir = temp_dir("spawn-sh");
        let script = dir.join("agent");
        write_executable(&script, "echo from-script \"$1\" \"$2\"\n");
        let child = spawn(script.to_str().unwrap(), &args(&["a b", "$(c)"]), &[]).unwrap();
        let (out, status) = output(child).await;
        assert_eq!(out, "from-script a b $(c)\n");
        assert_eq!(status.code(), Some(0));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn nul_bytes_are_refused_before_anything_starts() {
        let err = spawn("/bin/true", &args(&["a\0b"]), &[]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = spawn("/bin/true", &[], &[("K", "v\0")]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn programs_without_a_slash_are_found_on_path() {
        let root = temp_dir("spawn-path");
        let (first, second) = (root.join("a"), root.join("b"));
        for dir in [&first, &second] {
            std::fs::create_dir_all(dir).unwrap();
        }
        // Not executable in the first directory, a directory of that name... then the real one.
        std::fs::write(first.join("agent"), "").unwrap();
        std::fs::create_dir_all(first.join("tool")).unwrap();
        let real = second.join("agent");
        write_executable(&real, "#!/bin/sh\n");
        std::fs::create_dir_all(second.join("tool")).unwrap();
        let path = std::env::join_paths([&first, &second]).unwrap();

        let found = resolve("agent", Some(&path)).unwrap();
        assert_eq!(found.to_bytes(), real.as_os_str().as_bytes());
        let missing = resolve("tool", Some(&path)).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        assert!(missing.to_string().contains("PATH"), "{missing}");
        // A path is used as given, found or not: execve reports what is wrong with it.
        assert_eq!(
            resolve("./x/agent", Some(&path)).unwrap().to_bytes(),
            b"./x/agent"
        );
        std::fs::remove_dir_all(root).unwrap();
    }
}
