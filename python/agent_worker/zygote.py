"""Fork server (zygote): imports an agent's modules once, then forks each session's agent.

    python3 -m agent_worker.zygote [--preload mod1,mod2|mod1:mod2] -- SCRIPT [LEADING ARGS...]

The worker starts it (``agent.zygote_command``) with its stdin on a Unix ``SOCK_SEQPACKET``
socket and ``AGENT_WORKER_PID`` in its environment, and speaks protocol version 1 with it
(docs/zygote.md, written for agent authors in other languages). In short:

1. Start-up: puts the script's directory first on ``sys.path``, imports the ``--preload``
   modules with the known thread pools kept to one thread, and freezes them (``gc.freeze()``:
   their pages stay shared copy-on-write with every agent).
2. Fork safety (:mod:`agent_worker._fork_safety`): an OS thread besides the main one, or an
   asyncio event loop set or running, refuses the start (``{"v":1,"refused":...}`` naming each
   and the import that started it, exit code 3).
3. Ready: prints a line with ``AGENT_WORKER_ZYGOTE`` and sends ``{"v":1,"ready":true,"pid":…}``.
4. Each request ``{"v":1,"id":…,"args":[…],"env":{…},"cgroups":n}`` with the fds
   ``[stdout, stderr, n × cgroup.procs]`` is served by a double fork, so that the agent is
   re-parented to the worker (a child subreaper) and never is the zygote's child. The reply
   ``{"v":1,"id":…,"pid":…}`` comes once the agent leads its process group and sits in its
   cgroups; a failure replies ``{"v":1,"id":…,"error":…}``.
5. The agent settles (:mod:`agent_worker._agent_process`: stdio on the worker's pipes, stdin
   at end-of-file, the zygote's fds closed, the death signal armed once it is the worker's
   child, signal handlers, mask and gc as the zygote found them at its start) and then runs
   the unchanged script exactly as the warm shim does (:mod:`agent_worker._main_script`): what
   ``python3 SCRIPT [LEADING ARGS] <session args>`` would see.
6. End of file on the socket (the worker is gone, or recycles it): the zygote exits. Its agents
   are the worker's children and keep running.

The zygote never runs agent code, serves one request at a time (a fork takes milliseconds),
installs no signal handler and prints nothing per request except errors. Standard library only
(``ctypes`` for ``prctl``).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import time

from ._agent_process import (
    Inherited,
    arm_death_signal,
    await_parent,
    close_fds,
    fd_target,
    join_cgroups,
    open_fds,
    parent_of,
    set_oom_score_adj,
    take_stdio,
)
from ._fork_safety import Refused, preload, single_thread_pools
from ._main_script import module_list, parse_options, prepare_script, run_as_session

PROTOCOL_VERSION = 1
READY_MARK = "AGENT_WORKER_ZYGOTE"
USAGE = "usage: python3 -m agent_worker.zygote [--preload mod1,mod2] -- SCRIPT [LEADING ARGS...]"

MAX_REQUEST_BYTES = 1 << 20
"""The longest request (1 MiB: a 120 KB prompt fits several times)."""
MAX_CGROUPS = 16
"""The most ``cgroup.procs`` fds one request may pass (one per mounted hierarchy)."""

EXIT_AGENT_NOT_STARTED = 70
"""A forked agent's exit code when it could not settle (it never ran the script)."""

WORKER_PID_VAR = "AGENT_WORKER_PID"
"""The worker's pid: the agent waits until it is the worker's child before the death signal."""
OOM_SCORE_VAR = "AGENT_WORKER_OOM_SCORE_ADJ"
"""A session variable the agent writes to ``/proc/self/oom_score_adj`` instead of keeping."""
SETTLE_TIMEOUT = 5.0
"""How long the zygote waits for a forked agent to report that it is in its group and cgroups."""


class RequestError(Exception):
    """A request that cannot be served, and its session id if it could be read."""

    def __init__(self, session_id: str | None, reason: str) -> None:
        super().__init__(reason)
        self.session_id = session_id


class WorkerGone(Exception):
    """The worker's end of the socket is closed."""


class Request:
    """One session's request: its id, the warm handoff's ``args`` and ``env``, and the fds it
    passed (owned by the zygote until it closes them)."""

    def __init__(self, session_id: str, args: list[str], env: dict[str, str], fds: list[int]):
        self.id = session_id
        self.args = args
        self.env = env
        self.stdout, self.stderr, *self.cgroup_procs = fds
        self.fds = fds

    @staticmethod
    def parse(data: bytes, fds: list[int], flags: int) -> Request:
        """Reads a request message; :class:`RequestError` says what is wrong with it."""
        if flags & socket.MSG_TRUNC:
            raise RequestError(None, f"request longer than {MAX_REQUEST_BYTES} bytes")
        if flags & socket.MSG_CTRUNC:
            raise RequestError(None, f"more than {2 + MAX_CGROUPS} fds passed")
        try:
            message = json.loads(data)
        except ValueError as error:
            raise RequestError(None, f"request is not JSON: {error}") from None
        if not isinstance(message, dict):
            raise RequestError(None, "request is not a JSON object")
        session_id = message.get("id") if isinstance(message.get("id"), str) else None
        if message.get("v") != PROTOCOL_VERSION:
            raise RequestError(
                session_id,
                f"unsupported protocol version {message.get('v')!r} (this zygote speaks "
                f"version {PROTOCOL_VERSION})",
            )
        if session_id is None:
            raise RequestError(None, "id must be a string")
        args, env, cgroups = message.get("args"), message.get("env", {}), message.get("cgroups", 0)
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise RequestError(session_id, "args must be a list of strings")
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise RequestError(session_id, "env must map strings to strings")
        if type(cgroups) is not int or not 0 <= cgroups <= MAX_CGROUPS:
            raise RequestError(session_id, f"cgroups must be an integer from 0 to {MAX_CGROUPS}")
        if len(fds) != 2 + cgroups:
            raise RequestError(
                session_id,
                f"expected {2 + cgroups} fds (stdout, stderr and {cgroups} cgroup.procs), "
                f"got {len(fds)}",
            )
        return Request(session_id, args, env, fds)


def main(argv: list[str] | None = None) -> None:
    """Starts the zygote and serves; in a forked agent, runs the script as ``__main__``."""
    options, script, leading = parse_options(
        sys.argv[1:] if argv is None else argv, USAGE, ("--preload",)
    )
    zygote = Zygote.start(script, module_list(options.get("--preload", [])))
    session = zygote.serve()
    if session is None:
        return  # end of file: the worker is gone or recycles the zygote
    # Only a forked agent gets here, with nothing of the zygote's on its stack: the script's
    # SystemExit and exceptions end the interpreter as they end `python3 SCRIPT`.
    run_as_session(script, leading, *session)


class Zygote:
    """The running fork server: its socket and what each agent needs from it."""

    def __init__(self, sock: socket.socket, worker_pid: int, inherited: Inherited) -> None:
        self.sock = sock
        self.worker_pid = worker_pid
        self.inherited = inherited
        self.preload_fds: set[int] = set()

    @classmethod
    def start(cls, script: str, modules: list[str]) -> Zygote:
        """Preloads ``modules`` and announces readiness, or refuses and exits."""
        inherited = Inherited()
        value = os.environ.pop(WORKER_PID_VAR, None)  # not the agents': cold ones lack it
        try:
            worker_pid = int(value) if value is not None else os.getppid()
        except ValueError:
            raise SystemExit(
                f"agent_worker.zygote: {WORKER_PID_VAR} is not a pid: {value!r}"
            ) from None
        zygote = cls(open_socket(), worker_pid, inherited)
        try:
            prepare_script(script, "zygote")
        except SystemExit as missing:
            zygote.refuse(Refused(str(missing.code), code=1))
        inherited.added_vars = single_thread_pools()
        try:
            preload(modules)
        except Refused as refused:
            zygote.refuse(refused)
        zygote.preload_fds = set(open_fds()) - {0, 1, 2}
        if zygote.preload_fds:
            names = ", ".join(f"{fd} ({fd_target(fd)})" for fd in sorted(zygote.preload_fds))
            print(
                f"agent_worker.zygote: the preloaded modules left fds open: {names}; each "
                "agent gets /dev/null in their place",
                file=sys.stderr,
                flush=True,
            )
        print(f"{READY_MARK} pid={os.getpid()} preloaded={','.join(modules)}", flush=True)
        try:
            zygote.send({"ready": True, "pid": os.getpid()})
        except WorkerGone:
            raise SystemExit(0) from None
        return zygote

    def refuse(self, refused: Refused) -> None:
        """Tells the worker why the zygote cannot serve, and exits."""
        print(f"agent_worker.zygote: refused: {refused}", file=sys.stderr, flush=True)
        try:
            self.send({"refused": str(refused)})
        except WorkerGone:
            pass
        raise SystemExit(refused.code)

    def send(self, message: dict) -> None:
        """Sends one protocol message."""
        try:
            self.sock.send(json.dumps({"v": PROTOCOL_VERSION, **message}).encode())
        except (BrokenPipeError, ConnectionResetError) as error:
            raise WorkerGone() from error

    def serve(self) -> tuple[list[str], dict[str, str]] | None:
        """Serves requests until end of file (then returns None). In a forked agent, returns
        its session's ``args`` and ``env``."""
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(
                    self.sock, MAX_REQUEST_BYTES + 1, 2 + MAX_CGROUPS
                )
            except ConnectionResetError:
                return None
            if not data and not fds:
                return None
            try:
                session = self.handle(data, fds, flags)
            except WorkerGone:
                return None
            if session is not None:
                return session

    def handle(
        self, data: bytes, fds: list[int], flags: int
    ) -> tuple[list[str], dict[str, str]] | None:
        """Serves one request: replies, or (in the forked agent) returns its session."""
        try:
            request = Request.parse(data, fds, flags)
        except RequestError as error:
            close_fds(fds)
            self.fail(error.session_id, str(error))
            return None
        outcome = self.fork(request)
        if isinstance(outcome, tuple):
            return outcome
        if "error" in outcome:
            self.fail(request.id, outcome.pop("error"), **outcome)
        else:
            self.send({"id": request.id, **outcome})
        return None

    def fail(self, session_id: str | None, reason: str, **extra: object) -> None:
        """Replies with an error, which the zygote's log (stderr) also gets."""
        print(f"agent_worker.zygote: request {session_id}: {reason}", file=sys.stderr, flush=True)
        self.send({"id": session_id, "error": reason, **extra})

    def fork(self, request: Request) -> dict | tuple[list[str], dict[str, str]]:
        """Forks the session's agent through an intermediate child. In the zygote: the reply's
        fields (``pid``, or ``error``). In the agent: its session's ``args`` and ``env``."""
        report_r, report_w = os.pipe()
        # Buffered output would be written again by each child.
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            first = os.fork()
        except OSError as error:
            close_fds([report_r, report_w, *request.fds])
            return {"error": f"fork: {error}"}
        if first == 0:
            return self.intermediate(request, report_r, report_w)
        close_fds([report_w, *request.fds])
        # It exits right after its own fork: by then the agent is the worker's child.
        os.waitpid(first, 0)
        report = read_report(report_r, SETTLE_TIMEOUT)
        os.close(report_r)
        return self.outcome(report)

    def intermediate(
        self, request: Request, report_r: int, report_w: int
    ) -> tuple[list[str], dict[str, str]]:
        """The intermediate child: forks the agent, reports its pid, exits. Returns only in the
        agent."""
        try:
            os.close(report_r)
            agent = os.fork()
            if agent == 0:
                return self.settle(request, report_w)
            os.write(report_w, json.dumps({"pid": agent}).encode() + b"\n")
        except BaseException as error:
            try:
                os.write(report_w, json.dumps({"error": f"fork: {error}"}).encode() + b"\n")
            finally:
                os._exit(1)
        os._exit(0)

    def outcome(self, report: dict) -> dict:
        """The reply's fields from what the intermediate child and the agent reported."""
        pid = report.get("pid")
        if "error" in report:
            return {"error": report["error"], **({"pid": pid} if pid else {})}
        if pid is None:
            return {"error": "the intermediate child exited without forking the agent"}
        if not report.get("settled"):
            kill(pid)
            return {"error": f"the agent did not settle within {SETTLE_TIMEOUT} s", "pid": pid}
        parent = parent_of(pid)
        if parent is not None and parent != self.worker_pid:
            kill(pid)
            return {
                "error": f"the agent was re-parented to pid {parent}, not to the worker (pid "
                f"{self.worker_pid}): the worker must be a child subreaper",
                "pid": pid,
            }
        reply: dict = {"pid": pid}
        if report.get("cgroup_error"):
            reply["cgroup_error"] = report["cgroup_error"]
        return reply

    def settle(self, request: Request, report_w: int) -> tuple[list[str], dict[str, str]]:
        """The agent, before the script: placed, reported, made the worker's, cleaned of the
        zygote. Never raises: an agent that cannot settle exits with
        :data:`EXIT_AGENT_NOT_STARTED`."""
        try:
            # Leads its own group (the worker stops it with killpg) and is in its cgroups
            # before the zygote replies, so whatever the worker does next reaches it.
            os.setpgid(0, 0)
            report: dict = {"pid": os.getpid(), "settled": True}
            cgroup_error = join_cgroups(request.cgroup_procs)
            if cgroup_error:
                report["cgroup_error"] = cgroup_error
            os.write(report_w, json.dumps(report).encode() + b"\n")
            os.close(report_w)
        except BaseException as error:
            try:
                os.write(report_w, json.dumps({"error": f"agent: {error}"}).encode() + b"\n")
            finally:
                os._exit(EXIT_AGENT_NOT_STARTED)
        try:
            take_stdio(request.stdout, request.stderr, self.sock, self.preload_fds)
            await_parent(self.worker_pid)
            arm_death_signal(self.worker_pid)
            env = dict(request.env)
            oom_score_adj = env.pop(OOM_SCORE_VAR, None)
            if oom_score_adj is not None:
                set_oom_score_adj(oom_score_adj)
            self.inherited.restore()
            return request.args, env
        except BaseException as error:
            print(
                f"agent_worker.zygote: the agent of session {request.id} could not start: {error}",
                file=sys.stderr,
                flush=True,
            )
            os._exit(EXIT_AGENT_NOT_STARTED)


def kill(pid: int) -> None:
    """SIGKILLs an agent that will not be the worker's (the worker reaps it, or init does)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def open_socket() -> socket.socket:
    """The zygote's stdin, which must be a Unix ``SOCK_SEQPACKET`` socket."""
    try:
        sock = socket.socket(fileno=0)
    except OSError as error:
        raise SystemExit(
            f"agent_worker.zygote: stdin must be a Unix SOCK_SEQPACKET socket ({error})\n{USAGE}"
        ) from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        sock.detach()
        raise SystemExit(
            f"agent_worker.zygote: stdin must be a Unix SOCK_SEQPACKET socket\n{USAGE}"
        )
    return sock


def read_report(fd: int, timeout: float) -> dict:
    """The JSON lines written to ``fd`` until end of file (or ``timeout``), merged."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    data = b""
    while (remaining := deadline - time.monotonic()) > 0:
        if not poller.poll(remaining * 1000):
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    report: dict = {}
    for line in data.splitlines():
        try:
            report.update(json.loads(line))
        except ValueError:
            pass
    return report


if __name__ == "__main__":
    main()
