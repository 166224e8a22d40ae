//! The child side of [`crate::agent::spawn`]: the vfork-style clone and what the child does
//! before it execs.
//!
//! Everything here runs on memory the child shares with the worker until `execve`, so the
//! child makes only async-signal-safe system calls: no allocation, no locks, no panics. Its
//! length is its comments: each step says why it is there and each `unsafe` block why it is
//! sound. Nothing in it is needed to read the worker side.

// Raw system calls on memory shared with the worker, as the parent module allows.
#![allow(unsafe_code)]

use std::{
    cell::RefCell,
    io,
    os::fd::RawFd,
    ptr,
    sync::atomic::{AtomicI32, Ordering},
};

/// The child's stack. It only runs a handful of system call wrappers before `execve`.
const CHILD_STACK_BYTES: usize = 64 * 1024;

/// The shell of execvp's fallback.
pub(super) const SH: &std::ffi::CStr = c"/bin/sh";

/// Size of the kernel's signal set (64 signals) for raw `rt_sigprocmask`/`rt_sigaction`.
const KERNEL_SIGSET_BYTES: usize = 8;

/// What the child execs and where its stdio goes, prepared by the worker: pointers into memory
/// the worker keeps alive until [`start`] returns, and fds open in the worker.
pub(super) struct Exec {
    /// The program's resolved path.
    pub(super) path: *const libc::c_char,
    /// Null-terminated `argv`.
    pub(super) argv: *const *const libc::c_char,
    /// Null-terminated `envp`.
    pub(super) envp: *const *const libc::c_char,
    /// `/bin/sh`, the program's path, then its arguments: for a program without `#!`.
    pub(super) sh_argv: *const *const libc::c_char,
    /// What becomes the child's stdin.
    pub(super) stdin: RawFd,
    /// What becomes the child's stdout.
    pub(super) stdout: RawFd,
    /// What becomes the child's stderr.
    pub(super) stderr: RawFd,
    /// `cgroup.procs` of the agent's cgroup, open for writing, or -1.
    pub(super) cgroup_procs: RawFd,
}

/// What a clone gave.
pub(super) struct Cloned {
    /// The child's pid.
    pub(super) pid: libc::pid_t,
    /// Its pidfd, or -1 if the kernel gave none (older than 5.2).
    pub(super) pidfd: RawFd,
    /// Why it did not reach `execve`, if it did not (it has exited with 127, unreaped).
    pub(super) failure: Option<io::Error>,
    /// Why it could not move into its cgroup, if it could not (not fatal).
    pub(super) cgroup_error: Option<io::Error>,
}

/// Clones a child that runs `exec` (see [`child_main`]), and returns once it has exec'd or
/// exited: the calling thread sleeps until then (`CLONE_VFORK`).
pub(super) fn start(exec: &Exec) -> io::Result<Cloned> {
    let plan = ChildPlan {
        path: exec.path,
        argv: exec.argv,
        envp: exec.envp,
        stdin: exec.stdin,
        stdout: exec.stdout,
        stderr: exec.stderr,
        worker_pid: std::process::id() as libc::pid_t,
        sh_argv: exec.sh_argv,
        cgroup_procs: exec.cgroup_procs,
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
    let failure = plan.failure.load(Ordering::Acquire);
    let cgroup_errno = plan.cgroup_failure.load(Ordering::Acquire);
    Ok(Cloned {
        pid,
        pidfd,
        failure: (failure != 0).then(|| ChildStep::describe(failure)),
        cgroup_error: (cgroup_errno != 0).then(|| io::Error::from_raw_os_error(cgroup_errno)),
    })
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

/// What the child needs: [`Exec`], and where it reports a failed step. Pointers stay valid
/// while the worker's thread sleeps in `clone`.
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

    /// The error of a failed step, from what the child stored.
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
