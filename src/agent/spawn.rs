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

// The one module that needs unsafe code: a vfork-style clone and what the child does before
// it execs (raw system calls on memory it shares with the worker). Every block says why it is
// sound.
#![allow(unsafe_code)]

use std::{
    cell::RefCell,
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
    sync::{
        LazyLock, OnceLock,
        atomic::{AtomicI32, Ordering},
    },
};

use nix::sys::signal::Signal;
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::unix::pipe,
};

/// The child's stack. It only runs a handful of system call wrappers before `execve`.
const CHILD_STACK_BYTES: usize = 64 * 1024;

/// The shell of execvp's fallback.
const SH: &std::ffi::CStr = c"/bin/sh";

/// Size of the kernel's signal set (64 signals) for raw `rt_sigprocmask`/`rt_sigaction`.
const KERNEL_SIGSET_BYTES: usize = 8;

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
    spawn_into(program, args, env, None, Stdin::Null)
}

/// What the child's stdin is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdin {
    /// `/dev/null`, as for every agent started for a session.
    Null,
    /// A pipe whose write end is [`Child::stdin`]: how a warm process receives its session
    /// (see [`crate::agent::warm`]).
    Piped,
}

/// [`spawn`], the child first moving itself into the cgroup whose `cgroup.procs` is open as
/// `cgroup_procs` (writing `0` there moves the writer), before it execs: so everything the agent
/// ever starts is born inside that cgroup. Failing to move is not fatal: the child runs outside
/// it and [`Child::cgroup_error`] says why. `stdin` says what the child reads.
pub fn spawn_into(
    program: &str,
    args: &[String],
    env: &[(&str, &str)],
    cgroup_procs: Option<RawFd>,
    stdin: Stdin,
) -> io::Result<Child> {
    let path = resolve(program, std::env::var_os("PATH").as_deref())?;
    let argv: Vec<CString> = std::iter::once(program)
        .chain(args.iter().map(String::as_str))
        .map(c_string)
        .collect::<io::Result<_>>()?;
    let envp = environment(env)?;
    let argv_ptrs = null_terminated(&argv);
    let envp_ptrs = null_terminated(&envp);
    let dev_null = dev_null()?;
    let stdin_pipe = match stdin {
        Stdin::Null => None,
        Stdin::Piped => Some(pipe_cloexec()?),
    };
    let (stdout_read, stdout_write) = pipe_cloexec()?;
    let (stderr_read, stderr_write) = pipe_cloexec()?;
    // execvp's fallback for a file the kernel cannot execute (a script without `#!`): the
    // same arguments through /bin/sh.
    let sh_argv: Vec<*const libc::c_char> = [SH.as_ptr(), path.as_ptr()]
        .into_iter()
        .chain(argv_ptrs[1..].iter().copied())
        .collect();

    let plan = ChildPlan {
        path: path.as_ptr(),
        argv: argv_ptrs.as_ptr(),
        envp: envp_ptrs.as_ptr(),
        stdin: stdin_pipe
            .as_ref()
            .map_or(dev_null.as_raw_fd(), |(read, _)| read.as_raw_fd()),
        stdout: stdout_write.as_raw_fd(),
        stderr: stderr_write.as_raw_fd(),
        worker_pid: std::process::id() as libc::pid_t,
        sh_argv: sh_argv.as_ptr(),
        cgroup_procs: cgroup_procs.unwrap_or(-1),
        failure: AtomicI32::new(0),
        cgroup_failure: AtomicI32::new(0),
    };
    let mut pidfd: RawFd = -1;
    let pid = CHILD_STACK.with(|stack| -> io::Result<libc::pid_t> {
        let mut stack = stack.borrow_mut();
        let top = match stack.as_ref() {
            Some(stack) => stack.top(),
            None => stack.insert(ChildStack::new()?).top(),
        };
        // All signals stay blocked from before the clone until the child has reset their
        // handlers: a handler of ours running in the child would run in the worker's memory.
        let previous = set_signal_mask(!0);
        // SAFETY: `child_main` only reads `plan` and the memory it points to, all of which
        // outlives the call: with CLONE_VFORK this thread sleeps until the child has exec'd
        // or exited, and only then is the stack free again. The child makes only
        // async-signal-safe system calls (see `child_main`).
        let pid = unsafe {
            libc::clone(
                child_main,
                top,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
                ptr::from_ref(&plan).cast_mut().cast(),
                &mut pidfd as *mut RawFd,
            )
        };
        let clone_error = io::Error::last_os_error();
        set_signal_mask(previous);
        if pid == -1 {
            return Err(io::Error::new(
                clone_error.kind(),
                format!("clone: {clone_error}"),
            ));
        }
        Ok(pid)
    })?;
    if pidfd < 0 {
        // A kernel older than 5.2 ignores CLONE_PIDFD: nothing could wait for this child.
        // (5.2 and 5.3 return one but lack waitid(P_PIDFD): Linux 5.4 is the stated minimum.)
        kill_and_reap(pid);
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the kernel returned no pidfd: Linux 5.4 or later is required",
        ));
    }
    // SAFETY: with CLONE_PIDFD the kernel stored a new pidfd (close-on-exec) here, ours alone.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // The child holds its own copies (or is gone): ours must close, or the readers would
    // never see end-of-file.
    let stdin_write = stdin_pipe.map(|(read, write)| {
        drop(read);
        write
    });
    drop((stdout_write, stderr_write));

    let failure = plan.failure.load(Ordering::Acquire);
    if failure != 0 {
        // The child has exited (with 127): reap it, then say which step failed.
        let _ = try_reap(pidfd.as_raw_fd(), 0);
        return Err(ChildStep::describe(failure));
    }
    let cgroup_errno = plan.cgroup_failure.load(Ordering::Acquire);
    let child = (|| {
        let stdout = pipe::Receiver::from_owned_fd(stdout_read)?;
        let stderr = pipe::Receiver::from_owned_fd(stderr_read)?;
        let stdin = stdin_write.map(pipe::Sender::from_owned_fd).transpose()?;
        // SAFETY: an OwnedFd keeps its one fd open until the AsyncFd drops it.
        let pidfd = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Child {
            pid: pid as u32,
            pidfd,
            cgroup_error: (cgroup_errno != 0).then(|| io::Error::from_raw_os_error(cgroup_errno)),
            stdin,
            stdout: Some(stdout),
            stderr: Some(stderr),
        })
    })();
    // Nobody could wait for it: leave neither a running process nor a zombie.
    child.inspect_err(|_| kill_and_reap(pid))
}

/// SIGKILL and reap, by pid, a child we cannot wait for through a pidfd.
fn kill_and_reap(pid: libc::pid_t) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    let mut status = 0;
    // SAFETY: reaping our own child by pid; nothing else waits for it.
    unsafe { libc::waitpid(pid, &mut status, 0) };
}

/// Sets this thread's signal mask (bit n-1 for signal n) and returns the previous one. The raw
/// system call, because glibc's sigfillset/pthread_sigmask leave out its own signals (32 and
/// 33). Async-signal-safe: also used by the child.
fn set_signal_mask(mask: u64) -> u64 {
    let mut previous: u64 = 0;
    // SAFETY: rt_sigprocmask on 64-bit kernel sigsets we own.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &mask as *const u64,
            &mut previous as *mut u64,
            KERNEL_SIGSET_BYTES,
        );
    }
    previous
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

fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
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

thread_local! {
    /// One child stack per thread, reused: a thread starts one child at a time and its stack
    /// is free again once `clone` returns.
    static CHILD_STACK: RefCell<Option<ChildStack>> = const { RefCell::new(None) };
}

/// An anonymous mapping with a guard page below it, so an overflow faults instead of
/// overwriting the worker's memory.
struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
}

impl ChildStack {
    fn new() -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = CHILD_STACK_BYTES + page;
        // SAFETY: a new private anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = Self { base, len };
        // SAFETY: the lowest page of our own mapping.
        if unsafe { libc::mprotect(base, page, libc::PROT_NONE) } == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// The stack grows down from here (16-byte aligned: the mapping is page aligned).
    fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of our own mapping.
        unsafe { self.base.cast::<u8>().add(self.len).cast() }
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: our own mapping, not in use (no clone is running on this thread).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// What the child needs, prepared by the worker. Pointers stay valid while the worker's thread
/// sleeps in `clone`.
struct ChildPlan {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    worker_pid: libc::pid_t,
    /// `/bin/sh`, the program's path, then its arguments: for a program without `#!`.
    sh_argv: *const *const libc::c_char,
    /// `cgroup.procs` of the agent's cgroup, open for writing, or -1.
    cgroup_procs: RawFd,
    /// The errno of a failed move into that cgroup (not fatal), or 0.
    cgroup_failure: AtomicI32,
    /// `ChildStep::encode(step, errno)` if a step failed; 0 if the child reached `execve`
    /// successfully.
    failure: AtomicI32,
}

/// The child's steps that can fail, for the error message.
#[derive(Clone, Copy)]
enum ChildStep {
    ProcessGroup = 1,
    DeathSignal,
    WorkerGone,
    Redirect,
    Exec,
}

impl ChildStep {
    const fn encode(self, errno: i32) -> i32 {
        ((self as i32) << 16) | (errno & 0xffff)
    }

    fn describe(failure: i32) -> io::Error {
        let os = io::Error::from_raw_os_error(failure & 0xffff);
        let step = match failure >> 16 {
            1 => "leading a new process group",
            2 => "arming the death signal",
            3 => return io::Error::other("the worker exited while starting the agent"),
            4 => "redirecting stdin/stdout/stderr",
            // The message operators know from execve itself, e.g. "No such file or directory".
            _ => return os,
        };
        io::Error::new(os.kind(), format!("{step}: {os}"))
    }
}

/// Runs in the child, on the child stack, sharing the worker's memory until `execve`.
///
/// Only system calls from here on: no allocation, no locks, no panics (another worker thread
/// may hold the allocator's lock forever, as far as this process is concerned).
extern "C" fn child_main(plan: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `plan` points to the ChildPlan the worker's sleeping thread keeps alive.
    let plan = unsafe { &*plan.cast::<ChildPlan>() };
    let fail = |step: ChildStep| -> libc::c_int {
        // SAFETY: errno of this thread (the child shares the worker thread's TLS, which is
        // asleep in clone).
        let errno = unsafe { *libc::__errno_location() };
        plan.failure.store(step.encode(errno), Ordering::Release);
        // SAFETY: leaving the child without running anything of the worker's.
        unsafe { libc::_exit(127) }
    };
    // SAFETY (whole block): async-signal-safe system calls on values prepared by the worker.
    unsafe {
        // Handlers installed by the worker (tokio's, for instance) would run worker code in
        // the worker's memory: back to the default before signals are unblocked. Ignored
        // signals stay ignored across exec, except SIGPIPE, which Rust programs ignore and
        // agents expect at its default, as std's Command does.
        for signal in 1..=libc::SIGRTMAX() {
            let mut action: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, ptr::null(), &mut action) == 0
                && action.sa_sigaction != libc::SIG_DFL
                && (action.sa_sigaction != libc::SIG_IGN || signal == libc::SIGPIPE)
            {
                libc::signal(signal, libc::SIG_DFL);
            }
        }
        // glibc keeps its own signals (32 and 33, below SIGRTMIN) out of sigaction's reach,
        // and its posix_spawn leaves them ignored in every child: whoever started the worker
        // may have passed that on. An all-zero kernel sigaction is SIG_DFL.
        const KERNEL_SIGRTMIN: libc::c_int = 32;
        for signal in KERNEL_SIGRTMIN..libc::SIGRTMIN() {
            let default = [0u64; 4];
            libc::syscall(
                libc::SYS_rt_sigaction,
                signal,
                default.as_ptr(),
                ptr::null_mut::<u64>(),
                KERNEL_SIGSET_BYTES,
            );
        }
        if libc::setpgid(0, 0) == -1 {
            return fail(ChildStep::ProcessGroup);
        }
        if plan.cgroup_procs >= 0 && libc::write(plan.cgroup_procs, b"0".as_ptr().cast(), 1) != 1 {
            plan.cgroup_failure
                .store(*libc::__errno_location(), Ordering::Release);
        }
        // The death signal follows the thread that cloned us (see `spawn`).
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) == -1 {
            return fail(ChildStep::DeathSignal);
        }
        // The worker may have died before prctl: then we were re-parented and no signal will
        // ever come.
        if libc::getppid() != plan.worker_pid {
            return fail(ChildStep::WorkerGone);
        }
        for (from, to) in [(plan.stdin, 0), (plan.stdout, 1), (plan.stderr, 2)] {
            // dup2 clears close-on-exec on the copy; onto itself it would not, so clear it.
            let result = if from == to {
                libc::fcntl(to, libc::F_SETFD, 0)
            } else {
                libc::dup2(from, to)
            };
            if result == -1 {
                return fail(ChildStep::Redirect);
            }
        }
        set_signal_mask(0);
        libc::execve(plan.path, plan.argv, plan.envp);
        if *libc::__errno_location() == libc::ENOEXEC {
            libc::execve(SH.as_ptr(), plan.sh_argv, plan.envp);
            // Report why the program itself could not run, not why the shell could not.
            *libc::__errno_location() = libc::ENOEXEC;
        }
        fail(ChildStep::Exec)
    }
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
        for line in out.lines() {
            let mask = line.split_whitespace().nth(1).unwrap();
            assert!(mask.chars().all(|c| c == '0'), "{line}");
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
        let dir = std::env::temp_dir().join(format!("spawn-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
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
        let dir = std::env::temp_dir().join(format!("spawn-sh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("agent");
        std::fs::write(&script, "echo from-script \"$1\" \"$2\"\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
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
        let root = std::env::temp_dir().join(format!("spawn-path-{}", std::process::id()));
        let (first, second) = (root.join("a"), root.join("b"));
        for dir in [&first, &second] {
            std::fs::create_dir_all(dir).unwrap();
        }
        // Not executable in the first directory, a directory of that name... then the real one.
        std::fs::write(first.join("agent"), "").unwrap();
        std::fs::create_dir_all(first.join("tool")).unwrap();
        let real = second.join("agent");
        std::fs::write(&real, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&real, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
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
