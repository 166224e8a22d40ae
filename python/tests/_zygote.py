"""The worker's part of the zygote protocol (docs/zygote.md), played in Python for the tests:
start ``python3 -m agent_worker.zygote`` on one end of a socketpair, send requests with the
agent's pipes (and cgroup.procs files), read replies, read and reap the agents.

The process using it must be a child subreaper (:func:`become_subreaper`), as the worker is:
the zygote's agents are re-parented to it.

Run as a script it is the driver of tests/zygote_shim.rs: it reads ``{"args":[…],"env":{…}}``
on stdin, starts a zygote (``[--preload M] -- SCRIPT [LEADING ARGS]`` as its own arguments) in
its working directory, has it fork one agent with that session, prints the agent's stdout
and exits with the agent's status::

    python3 python/tests/_zygote.py --preload email.mime.text -- probe.py --leading=x < session.json

With ``--hold`` first it instead prints ``{"zygote": <pid>, "agent": <pid>}`` once the agent's
first line came, and waits to be killed (a worker that dies with an agent running).
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1

DEADLINE = 20.0
"""How long anything the tests wait for may take (the machine is shared and loaded)."""


def prctl(option: int, value: int) -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def become_subreaper() -> None:
    """Makes this process the subreaper of what it starts, as the worker is."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def read_until_eof(fds: list[int], deadline: float = DEADLINE) -> list[bytes]:
    """Everything written to each of ``fds`` until each reaches end of file (or the deadline:
    then AssertionError)."""
    data = {fd: b"" for fd in fds}
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    open_fds = set(fds)
    until = time.monotonic() + deadline
    while open_fds:
        remaining = until - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no end of file within {deadline} s; so far {data}")
        for fd, _ in poller.poll(remaining * 1000):
            chunk = os.read(fd, 65536)
            if chunk:
                data[fd] += chunk
            else:
                poller.unregister(fd)
                open_fds.discard(fd)
    return [data[fd] for fd in fds]


def wait_exit(pid: int, deadline: float = DEADLINE) -> int:
    """Reaps the child ``pid`` once it exits (a pidfd says when); its wait status."""
    pidfd = os.pidfd_open(pid)
    try:
        if not select.select([pidfd], [], [], deadline)[0]:
            raise AssertionError(f"pid {pid} did not exit within {deadline} s")
    finally:
        os.close(pidfd)
    return os.waitpid(pid, 0)[1]


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Agent:
    """A forked agent: the zygote's reply, and the read ends of its stdout and stderr."""

    def __init__(self, reply: dict, stdout: int, stderr: int) -> None:
        self.reply = reply
        self.pid: int = reply["pid"]
        self.stdout = stdout
        self.stderr = stderr
        self._buffer = b""

    def line(self, deadline: float = DEADLINE) -> str:
        """Its next stdout line."""
        until = time.monotonic() + deadline
        while b"\n" not in self._buffer:
            remaining = until - time.monotonic()
            if remaining <= 0 or not select.select([self.stdout], [], [], remaining)[0]:
                raise AssertionError(f"agent {self.pid}: no line within {deadline} s")
            chunk = os.read(self.stdout, 65536)
            if not chunk:
                raise AssertionError(f"agent {self.pid}: stdout ended: {self._buffer!r}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def context(self) -> dict:
        """Its ``context {json}`` report (tests/zygote_agents/context.py)."""
        return parse_context(self.line())

    def finish(self) -> tuple[int, str, str]:
        """Reads its output to the end and reaps it: wait status, stdout (what :meth:`line` has
        not taken), stderr."""
        out, err = read_until_eof([self.stdout, self.stderr])
        os.close(self.stdout)
        os.close(self.stderr)
        return wait_exit(self.pid), (self._buffer + out).decode(), err.decode()

    def kill(self) -> int:
        """Stops its group with SIGKILL and reaps it."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.finish()[0]


def parse_context(line: str) -> dict:
    assert line.startswith("context "), line
    return json.loads(line.removeprefix("context "))


class Zygote:
    """A ``python3 -m agent_worker.zygote`` this process started and talks to."""

    def __init__(
        self,
        script: str,
        leading: tuple[str, ...] = (),
        preload: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # A message may be as long as the sender's buffer (about 208 KiB by default).
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 << 20)
        options = ["--preload", ",".join(preload)] if preload else []
        environ = dict(os.environ if env is None else env)
        environ["AGENT_WORKER_PID"] = str(os.getpid())
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent_worker.zygote", *options, "--", script, *leading],
            stdin=theirs,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environ,
            cwd=cwd,
        )
        theirs.close()
        self.sock.settimeout(DEADLINE)
        self.closed: tuple[int, str, str] | None = None

    def receive(self) -> dict:
        """The zygote's next message."""
        data = self.sock.recv(65536)
        assert data, "the zygote closed its socket"
        return json.loads(data)

    def ready(self) -> dict:
        """Its first message, which must say ready (and its ready line)."""
        message = self.receive()
        assert message == {"v": 1, "ready": True, "pid": self.process.pid}, message
        first = self.process.stdout.readline().decode()
        assert "AGENT_WORKER_ZYGOTE" in first, first
        return message

    def send(self, message: dict | bytes, fds: list[int]) -> dict:
        """Sends a request (a dict is JSON-encoded as serde_json would: non-ASCII as is) and
        returns the reply."""
        data = message if isinstance(message, bytes) else json.dumps(message, ensure_ascii=False)
        socket.send_fds(self.sock, [data if isinstance(data, bytes) else data.encode()], fds)
        return self.receive()

    def request(
        self,
        session_id: str,
        args: list[str],
        env: dict[str, str] | None = None,
        cgroup_procs: list[int] = (),
    ) -> Agent:
        """Has the zygote fork the agent of a session; fails unless it replies with a pid."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        message = {
            "v": 1,
            "id": session_id,
            "args": args,
            "env": env or {},
            "cgroups": len(cgroup_procs),
        }
        try:
            reply = self.send(message, [out_w, err_w, *cgroup_procs])
        finally:
            os.close(out_w)
            os.close(err_w)
        assert reply.get("id") == session_id and "pid" in reply and "error" not in reply, reply
        return Agent(reply, out_r, err_r)

    def close(self) -> tuple[int, str, str]:
        """Closes the socket (end of file for the zygote) and waits for it to exit: its exit
        code, the rest of its stdout and its stderr. Again: the same."""
        if self.closed is None:
            self.sock.close()
            out, err = self.process.communicate(timeout=DEADLINE)
            self.closed = (self.process.returncode, out.decode(), err.decode())
        return self.closed


def drive(argv: list[str]) -> int:
    """The driver of tests/zygote_shim.rs (see the module docs)."""
    become_subreaper()
    hold = argv[:1] == ["--hold"]
    argv = argv[1:] if hold else argv
    split = argv.index("--")
    ours = argv[:split]
    preload = tuple(ours[ours.index("--preload") + 1].split(",")) if "--preload" in ours else ()
    script, *leading = argv[split + 1 :]
    session = json.load(sys.stdin)
    zygote = Zygote(script, tuple(leading), preload)
    zygote.ready()
    agent = zygote.request(session["env"]["SESSION_ID"], session["args"], session["env"])
    if hold:
        agent.line()
        print(json.dumps({"zygote": zygote.process.pid, "agent": agent.pid}), flush=True)
        while True:
            signal.pause()
    status, out, err = agent.finish()
    sys.stdout.write(out)
    sys.stderr.write(err)
    code, _, zygote_err = zygote.close()
    assert code == 0, zygote_err
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(drive(sys.argv[1:]))
