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
    /// Where the child goes before it execs.
    pub(super) placement: super::Placement,
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
///
/// With a cgroup v2 directory to go to, the child is cloned straight into it
/// (`clone3(CLONE_INTO_CGROUP)`, Linux 5.7): it never has to move itself, and moving (a write
/// to `cgroup.procs`) takes a global lock whose writers wait for an RCU grace period, which
/// was most of the tail of a start with containment. Where `clone3` is not there (an older
/// kernel, another architecture than x86-64), the child moves itself as before.
pub(super) fn start(exec: &Exec) -> io::Result<Cloned> {
    let placement = &exec.placement;
    let into_cgroup = placement.cgroup_dir.filter(|_| clone3::available());
    // The v1 hierarchies' cgroups, and the v2 one unless cloned into it.
    let mut procs = [-1; 3];
    let v2_procs = if into_cgroup.is_some() {
        None
    } else {
        placement.cgroup_procs
    };
    for (slot, fd) in procs
        .iter_mut()
        .zip([v2_procs, placement.v1_procs[0], placement.v1_procs[1]])
    {
        *slot = fd.unwrap_or(-1);
    }
    let mut oom_score_adj = [0u8; 12];
    let oom_len = placement.oom_score_adj.map_or(0, |adj| {
        use std::io::Write;
        let mut cursor = std::io::Cursor::new(&mut oom_score_adj[..]);
        let _ = write!(cursor, "{adj}");
        cursor.position() as usize
    });
    let plan = ChildPlan {
        path: exec.path,
        argv: exec.argv,
        envp: exec.envp,
        stdin: exec.stdin,
        stdout: exec.stdout,
        stderr: exec.stderr,
        worker_pid: std::process::id() as libc::pid_t,
        sh_argv: exec.sh_argv,
        procs,
        oom_score_adj,
        oom_len,
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
        let arg = ptr::from_ref(&plan).cast_mut().cast();
        // SAFETY: `child_main` only reads `plan` and the memory it points to, all of which
        // outlives the call: with CLONE_VFORK this thread sleeps until the child has exec'd
        // or exited, and only then is the stack free again. The child makes only
        // async-signal-safe system calls (see `child_main`).
        let cloned = into_cgroup.and_then(|dir| unsafe {
            clone3::vfork_into(dir, stack.as_ref().expect("made above"), &mut pidfd, arg)
        });
        let pid = match cloned {
            Some(pid) => pid,
            // SAFETY: as above.
            None => unsafe {
                libc::clone(
                    child_main,
                    top,
                    libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
                    arg,
                    &mut pidfd as *mut RawFd,
                )
            },
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

    /// The lowest usable address (above the guard page), for `clone3`.
    fn bottom(&self) -> *mut libc::c_void {
        // SAFETY: within our own mapping.
        unsafe { self.top().cast::<u8>().sub(CHILD_STACK_BYTES).cast() }
    }

    /// The usable size, for `clone3`.
    fn size(&self) -> usize {
        CHILD_STACK_BYTES
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
    /// `cgroup.procs` of each cgroup the child moves itself into, open for writing, or -1.
    procs: [RawFd; 3],
    /// The child's `oom_score_adj`, as text (`oom_len` bytes; none when 0).
    oom_score_adj: [u8; 12],
    oom_len: usize,
    /// The errno of a failed move into a cgroup (not fatal), or 0.
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
        for fd in plan.procs {
            if fd >= 0 && libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                plan.cgroup_failure
                    .store(*libc::__errno_location(), Ordering::Release);
            }
        }
        // Above the worker's, so that a host out of memory kills an agent before the
        // replica. Raising one's own score needs no privilege; a failure is harmless.
        if plan.oom_len > 0 {
            let fd = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd >= 0 {
                libc::write(fd, plan.oom_score_adj.as_ptr().cast(), plan.oom_len);
                libc::close(fd);
            }
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

/// `clone3` with `CLONE_INTO_CGROUP`, on the child stack (see [`start`]).
mod clone3 {
    use std::{
        os::fd::RawFd,
        sync::atomic::{AtomicBool, Ordering},
    };

    use super::{ChildStack, child_main};

    /// `CLONE_INTO_CGROUP` (Linux 5.7).
    const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

    /// Cleared at the first `clone3` that fails: the kernel lacks it (or the flag), and the
    /// classic clone is used from then on.
    static AVAILABLE: AtomicBool = AtomicBool::new(cfg!(target_arch = "x86_64"));

    /// Whether to try it.
    pub(super) fn available() -> bool {
        AVAILABLE.load(Ordering::Relaxed)
    }

    /// The kernel's `struct clone_args`, as of Linux 5.7 (`cgroup` is its last field).
    #[repr(C)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }

    /// Clones a vfork-style child into the cgroup directory `dir` that runs
    /// `child_main(arg)` on `stack`; its pidfd goes to `pidfd`. `None` if `clone3` failed
    /// (nothing was started; it is not tried again).
    ///
    /// # Safety
    ///
    /// As for `libc::clone` with `child_main`: `arg` must stay valid until the child has
    /// exec'd or exited (CLONE_VFORK makes the caller wait), and signals must be blocked.
    pub(super) unsafe fn vfork_into(
        dir: RawFd,
        stack: &ChildStack,
        pidfd: &mut RawFd,
        arg: *mut libc::c_void,
    ) -> Option<libc::pid_t> {
        let args = CloneArgs {
            flags: (libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD) as u64
                | CLONE_INTO_CGROUP,
            pidfd: std::ptr::from_mut(pidfd) as u64,
            child_tid: 0,
            parent_tid: 0,
            exit_signal: libc::SIGCHLD as u64,
            stack: stack.bottom() as u64,
            stack_size: stack.size() as u64,
            tls: 0,
            set_tid: 0,
            set_tid_size: 0,
            cgroup: dir as u64,
        };
        // SAFETY: the caller's contract; `args` outlives the call (the child is done with it
        // once the system call returned in it).
        let pid = unsafe { raw(&args, arg) };
        if pid < 0 {
            AVAILABLE.store(false, Ordering::Relaxed);
            tracing::debug!(errno = -pid, "clone3_unavailable");
            return None;
        }
        Some(pid as libc::pid_t)
    }

    /// The system call. In the child it never returns: on its own stack (the kernel points the
    /// stack pointer at `stack + stack_size`), it calls `child_main(arg)`, which execs or
    /// exits, and exits with its value should it ever return. Returns the child's pid, or
    /// `-errno`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn raw(args: &CloneArgs, arg: *mut libc::c_void) -> i64 {
        let ret: i64;
        // SAFETY: the clone3 system call; the parent's path touches no memory and only the
        // registers declared clobbered; the child's path switches to the child stack the
        // kernel set up and never comes back here.
        unsafe {
            std::arch::asm!(
                "syscall",
                "test rax, rax",
                "jnz 2f",
                // The child: a fresh frame on the child stack (16-byte aligned: page aligned).
                "xor ebp, ebp",
                "mov rdi, r12",
                "call r13",
                "mov edi, eax",
                "mov eax, 60", // exit
                "syscall",
                "ud2",
                "2:",
                inlateout("rax") libc::SYS_clone3 => ret,
                in("rdi") std::ptr::from_ref(args),
                in("rsi") std::mem::size_of::<CloneArgs>(),
                in("r12") arg,
                in("r13") child_main as extern "C" fn(*mut libc::c_void) -> libc::c_int,
                lateout("rcx") _,
                lateout("r11") _,
            );
        }
        ret
    }

    /// Elsewhere the classic clone is used (see [`AVAILABLE`]).
    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn raw(_: &CloneArgs, _: *mut libc::c_void) -> i64 {
        -(libc::ENOSYS as i64)
    }
}
