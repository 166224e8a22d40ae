"""A forked agent's own process, before its script runs: what it must not inherit from the
zygote (``agent_worker.zygote``) and what the worker gives every agent.

The zygote forks each agent from a process that has run for a while and imported things: its
signal handlers and mask, its collector's settings, its environment additions and its open
files are not what a fresh ``python3 SCRIPT`` starts with. :class:`Inherited` records what the
zygote itself was started with (by the worker, like any agent) and gives it back to each agent;
the functions below place the agent (its cgroups, its stdio, the death signal once it is the
worker's child, its ``oom_score_adj``) the way the worker places a cold one.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import socket
import sys
import time

REPARENT_TIMEOUT = 1.0
"""How long an agent waits to become the worker's child once its intermediate parent exited."""

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4


class Inherited:
    """What the zygote was started with and an agent must start with too, although the
    preloaded modules (or the zygote) may have changed it since: signal handlers and mask, the
    collector's settings, and the variables the zygote added to the environment."""

    def __init__(self) -> None:
        # As the worker starts any agent: the handlers a fresh interpreter installs (SIGINT's
        # KeyboardInterrupt, SIGPIPE and SIGXFSZ ignored), everything else at its default.
        self.handlers = {s: signal.getsignal(s) for s in signal.valid_signals()}
        self.mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())
        self.gc_enabled = gc.isenabled()
        self.gc_threshold = gc.get_threshold()
        self.added_vars: list[str] = []

    def restore(self) -> None:
        """In an agent: gives it back what the zygote was started with."""
        for signum, handler in self.handlers.items():
            if handler is None:  # not Python's: the zygote started with it, so has the agent
                continue
            try:
                signal.signal(signum, handler)
            except (OSError, ValueError):  # SIGKILL, SIGSTOP
                pass
        signal.set_wakeup_fd(-1)
        signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
        (gc.enable if self.gc_enabled else gc.disable)()
        gc.set_threshold(*self.gc_threshold)
        # random re-seeds itself after a fork too (os.register_at_fork); explicit here.
        if "random" in sys.modules:
            sys.modules["random"].seed()
        for name in self.added_vars:
            os.environ.pop(name, None)
        # stdout is line-buffered when it is a terminal, as the interpreter decides at start-up;
        # the zygote's stdout decided it for the zygote's own fd 1.
        if not getattr(sys.stdout, "write_through", True):
            sys.stdout.reconfigure(line_buffering=os.isatty(1))


def join_cgroups(procs: list[int]) -> str | None:
    """Moves this process into each cgroup whose ``cgroup.procs`` fd is in ``procs`` and closes
    them; what failed, if anything (the agent runs anyway, as a cold one does)."""
    errors = []
    for fd in procs:
        try:
            os.write(fd, b"0")
        except OSError as error:
            errors.append(f"cgroup.procs ({fd_target(fd)}): {error.strerror}")
        os.close(fd)
    return "; ".join(errors) or None


def take_stdio(stdout: int, stderr: int, sock: socket.socket, preload_fds: set[int]) -> None:
    """Puts the worker's pipes on stdout and stderr and ``/dev/null`` on stdin, and drops every
    other fd the zygote had: closes its own (its socket, the request's), and puts ``/dev/null``
    in place of those the preloaded modules opened, so that no agent shares their open files
    and their Python objects, closing them one day, cannot close a file of the agent's that
    got the same number."""
    # The socket is fd 0, replaced below: its object must never close fd 0 again.
    sock.detach()
    null_in = os.open(os.devnull, os.O_RDONLY)
    null_rw = os.open(os.devnull, os.O_RDWR)
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    os.dup2(null_in, 0)
    own = {null_in, null_rw, stdout, stderr}
    for fd in open_fds():
        if fd <= 2 or fd in own:
            continue
        if fd in preload_fds:
            os.dup2(null_rw, fd, inheritable=os.get_inheritable(fd))
        else:
            os.close(fd)
    close_fds(sorted(fd for fd in own if fd > 2))


def await_parent(worker_pid: int) -> None:
    """Waits until this process is the worker's child: the intermediate child is exiting, and
    the kernel re-parents its orphan to the nearest subreaper."""
    deadline = time.monotonic() + REPARENT_TIMEOUT
    while os.getppid() != worker_pid:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"not the worker's child (pid {worker_pid}) after {REPARENT_TIMEOUT} s: the "
                f"parent is pid {os.getppid()}"
            )
        # No event to wait for: a re-parenting is not notified. It takes microseconds.
        time.sleep(0.0001)


def arm_death_signal(worker_pid: int) -> None:
    """SIGKILL when the worker dies, as every agent gets."""
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"arming the death signal: {os.strerror(errno)}")
    # The worker may have died before prctl: then no signal will ever come.
    if os.getppid() != worker_pid:
        raise RuntimeError("the worker exited while the agent started")


def set_oom_score_adj(value: str) -> None:
    """Writes the session's ``oom_score_adj``; a failure is the agent's stderr's, not fatal."""
    try:
        with open("/proc/self/oom_score_adj", "w") as adj:
            adj.write(str(int(value)))
    except (OSError, ValueError) as error:
        print(
            f"agent_worker.zygote: oom_score_adj {value!r} not applied: {error}",
            file=sys.stderr,
            flush=True,
        )


def open_fds() -> list[int]:
    """This process's open fds (the listing's own fd, closed again by then, left out)."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        fds.append(int(name))
    return fds


def fd_target(fd: int) -> str:
    """What ``fd`` is open on, for a log line."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def close_fds(fds: list[int]) -> None:
    """Closes each of ``fds``."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def parent_of(pid: int) -> int | None:
    """The parent of ``pid`` (``/proc/<pid>/stat``), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The command name is in parentheses and may contain anything: after the last ")".
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None
