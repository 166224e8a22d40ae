"""The fork server (``python3 -m agent_worker.zygote``, docs/zygote.md) with real processes:
this test process plays the worker (a child subreaper that sends requests with the agents'
pipes and reaps them), and compares what a forked agent's script sees with what a cold
``python3 SCRIPT`` shows it. Run by tests/zygote_shim.rs; needs no Redis.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import unittest
import uuid

from ._zygote import (
    DEADLINE,
    PR_SET_PDEATHSIG,
    Agent,
    Zygote,
    alive,
    become_subreaper,
    parse_context,
    read_until_eof,
    wait_exit,
)

HERE = os.path.dirname(os.path.abspath(__file__))
AGENTS = os.path.join(HERE, "zygote_agents")
CONTEXT = os.path.join(AGENTS, "context.py")
REPO = os.path.dirname(os.path.dirname(HERE))

# What the benchmark's warm run preloads when pipecat is not installed
# (benches/agent_start/warm.rs, STDLIB_MODULES).
HEAVY_STDLIB = (
    "asyncio:email.mime.multipart:http.server:xml.etree.ElementTree:decimal:sqlite3:ssl:unittest:"
    "multiprocessing.pool:concurrent.futures:logging.handlers:urllib.request:zipfile:tarfile:csv:"
    "difflib:pydoc:inspect:typing:dataclasses:ctypes:uuid:statistics:fractions:pickle:tomllib:"
    "wave:shelve:mailbox:smtplib:imaplib:xmlrpc.server:http.cookiejar:configparser:pdb:doctest"
)

# Per process, or what only a preload can have set: not compared with cold.
PER_PROCESS = ("pid", "random", "pool_env_at_preload")


def setUpModule() -> None:
    become_subreaper()


def base_env() -> dict[str, str]:
    """The environment both start modes get from the worker: this one, an operator's thread
    pool size (which the zygote must keep), and a value of every kind of trouble."""
    env = dict(os.environ)
    env.pop("OPENBLAS_NUM_THREADS", None)
    env.pop("MKL_NUM_THREADS", None)
    env["OMP_NUM_THREADS"] = "4"
    env["AGENT_TEST_ODD"] = "line one\nline two $(id) `x` Grüße"
    return env


def session(name: str, voice: str = "-r oops", then: str = "exit") -> tuple[list[str], dict]:
    """A session's ``args`` and ``env``, as the worker's handoff has them: odd values and a
    100 KB non-ASCII prompt."""
    prompt = "-u nice " + "Grüße 你好 🎙️ " * (100 * 1000 // 23)
    args = [
        f"--room={name}",
        f"--voice-id={voice}",
        "--opening-line=line one\nline two $(id) `x` \"q\"",
        f"--system-prompt={prompt}",
        f"--then={then}",
    ]
    env = {"SESSION_ID": name, "VOICE_ID": voice, "SESSION_CONFIG": json.dumps({"voiceId": voice})}
    return args, env


def set_death_signal() -> None:
    """A cold start's child side, as the worker spawns it: its own group, the death signal."""
    os.setpgid(0, 0)
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def cold(script: str, args: list[str], env: dict, cwd: str = REPO) -> tuple[int, str, str]:
    """``python3 SCRIPT --leading=x <args>`` started as the worker starts a cold agent."""
    done = subprocess.run(
        [sys.executable, script, "--leading=x", *args],
        env={**base_env(), **env},
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        preexec_fn=set_death_signal,
        timeout=DEADLINE,
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def zygote(preload: tuple[str, ...] = (), script: str = CONTEXT, cwd: str = REPO) -> Zygote:
    """A ready zygote of ``script --leading=x``."""
    started = Zygote(script, ("--leading=x",), preload, env=base_env(), cwd=cwd)
    started.ready()
    return started


def comparable(context: dict) -> dict:
    return {k: v for k, v in context.items() if k not in PER_PROCESS}


class ZygoteTest(unittest.TestCase):
    def setUp(self) -> None:
        self.zygotes: list[Zygote] = []

    def tearDown(self) -> None:
        for started in self.zygotes:
            started.close()

    def track(self, started: Zygote) -> Zygote:
        """``started``, closed after the test whatever happens."""
        self.zygotes.append(started)
        return started

    def start(self, preload: tuple[str, ...] = (), **kwargs: str) -> Zygote:
        return self.track(zygote(preload, **kwargs))

    def assert_same(self, zygote_context: dict, cold_context: dict, what: str) -> None:
        differ = {
            key: (str(zygote_context.get(key))[:300], str(cold_context.get(key))[:300])
            for key in comparable(zygote_context).keys() | comparable(cold_context).keys()
            if zygote_context.get(key) != cold_context.get(key)
        }
        self.assertEqual(differ, {}, f"{what}: zygote and cold differ (zygote, cold)")

    def test_a_script_sees_what_a_cold_start_shows_it(self) -> None:
        relative = os.path.relpath(CONTEXT, REPO)
        for script, cwd in ((CONTEXT, REPO), (relative, REPO), ("context.py", AGENTS)):
            with self.subTest(script=script, cwd=cwd):
                started = self.start(("pool_env", "email.mime.text"), script=script, cwd=cwd)
                args, env = session("ctx-1")
                agent = started.request("ctx-1", args, env)
                forked = agent.context()
                self.assertEqual(agent.finish()[0], 0)
                code, out, err = cold(script, args, env, cwd)
                self.assertEqual(code, 0, err)
                cold_context = parse_context(out.splitlines()[0])
                self.assert_same(forked, cold_context, f"{script} from {cwd}")
                # Named, so that a change to both shows.
                self.assertEqual(forked["argv"], [script, "--leading=x", *args])
                self.assertEqual(forked["file"], CONTEXT)
                self.assertEqual(forked["path0"], AGENTS)
                self.assertEqual((forked["name"], forked["main_is_this"]), ("__main__", True))
                self.assertEqual(forked["args"]["system_prompt"], args[3].split("=", 1)[1])
                self.assertEqual(forked["stdin"], "")
                self.assertEqual(forked["open_files"], {"0": "/dev/null", "1": "pipe", "2": "pipe"})
                self.assertEqual(forked["signals"]["SIGINT"], "default_int_handler")
                self.assertEqual(forked["signals"]["SIGPIPE"], "SIG_IGN")
                self.assertEqual(forked["signals"]["SIGTERM"], "SIG_DFL")
                self.assertEqual(forked["signal_mask"], [])
                self.assertEqual((forked["leads_group"], forked["ppid"]), (True, os.getpid()))
                self.assertEqual(forked["death_signal"], signal.SIGKILL)
                environ = forked["environ"]
                self.assertEqual(environ["SESSION_ID"], "ctx-1")
                self.assertEqual(environ["AGENT_TEST_ODD"], base_env()["AGENT_TEST_ODD"])
                self.assertNotIn("AGENT_WORKER_PID", environ)
                # The zygote ran its preloads with one-thread pools, but the operator's value
                # won, and the agent's environment is the worker's, not the zygote's.
                self.assertEqual(
                    forked["pool_env_at_preload"],
                    {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "1"},
                )
                self.assertNotIn("OPENBLAS_NUM_THREADS", environ)
                self.assertEqual(environ["OMP_NUM_THREADS"], "4")
                self.assertEqual(started.close()[0], 0)

    def test_what_a_preload_changed_in_the_process_is_undone_in_each_agent(self) -> None:
        started = self.start(("changes_process",))
        args, env = session("undo")
        agents = [started.request(f"undo-{i}", args, env) for i in (1, 2)]
        contexts = [agent.context() for agent in agents]
        for agent in agents:
            self.assertEqual(agent.finish()[0], 0)
        _, out, _ = cold(CONTEXT, args, env)
        cold_context = parse_context(out.splitlines()[0])
        for context in contexts:
            # The files the module opened (a file, a socketpair) are /dev/null in the agents:
            # shared with nobody, and their numbers still taken, so closing their objects
            # cannot close a file of the agent's.
            files = context["open_files"]
            leftover = {fd: files.pop(fd) for fd in list(files) if fd not in ("0", "1", "2")}
            self.assertEqual(list(leftover.values()), ["/dev/null"] * 3, leftover)
            # Handlers, mask, wakeup fd and the collector as a cold start has them.
            self.assert_same(context, cold_context, "after changes_process")
        # Re-seeded per agent: the module's import drew from random in the zygote.
        self.assertNotEqual(contexts[0]["random"], contexts[1]["random"])
        _, _, err = started.close()
        self.assertIn("the preloaded modules left fds open", err)

    def test_each_agent_leads_its_group_and_sits_in_its_cgroups(self) -> None:
        started = self.start()
        cgroups = temporary_cgroups()
        try:
            procs = [os.open(f"{path}/cgroup.procs", os.O_WRONLY) for path, _ in cgroups]
            agent = started.request("cg-1", *session("cg-1", then="wait"), cgroup_procs=procs)
            for fd in procs:
                os.close(fd)
            self.assertNotIn("cgroup_error", agent.reply)
            # Placed before the zygote replied: the pid, its group and its cgroups are final.
            self.assertEqual(os.getpgid(agent.pid), agent.pid)
            with open(f"/proc/{agent.pid}/cgroup") as file:
                placed = file.read()
            context = agent.context()
            self.assertEqual((context["leads_group"], context["ppid"]), (True, os.getpid()))
            for _, line in cgroups:
                self.assertIn(line, placed.splitlines())
                # Before the script ran: its own report shows it there.
                self.assertIn(line, context["cgroup"].splitlines())
            if not cgroups:
                print("\nno writable cgroup hierarchy: placement not checked", file=sys.stderr)
            self.assertEqual(agent.kill(), signal.SIGKILL)
        finally:
            for path, _ in cgroups:
                remove_cgroup(path)

    def test_a_cgroup_that_refuses_the_agent_is_reported_and_it_runs_anyway(self) -> None:
        started = self.start()
        refusing = os.open(os.devnull, os.O_RDONLY)  # a write to it fails
        agent = started.request("cg-refused", *session("cg-refused"), cgroup_procs=[refusing])
        os.close(refusing)
        self.assertIn("Bad file descriptor", agent.reply["cgroup_error"])
        self.assertEqual(agent.context()["environ"]["SESSION_ID"], "cg-refused")
        self.assertEqual(agent.finish()[0], 0)

    def test_thirty_requests_in_a_row_give_thirty_agents_each_with_its_voice(self) -> None:
        started = self.start(("email.mime.text",))
        agents: list[tuple[str, Agent]] = []
        for i in range(30):
            voice = f"voice-{i}"
            agents.append((voice, started.request(f"burst-{i}", *session(f"burst-{i}", voice))))
        pids, randoms = set(), set()
        for voice, agent in agents:
            context = agent.context()
            self.assertEqual(agent.line(), f"voice {voice} pid {agent.pid}")
            self.assertEqual((context["pid"], context["leads_group"]), (agent.pid, True))
            pids.add(agent.pid)
            randoms.add(context["random"])
        for _, agent in agents:
            self.assertEqual(agent.finish()[0], 0)
        self.assertEqual(len(pids), 30)  # each leads its own group: 30 groups
        self.assertEqual(len(randoms), 30)

    def test_a_preload_that_starts_a_thread_is_refused_naming_it(self) -> None:
        preload = ("email.mime.text", "starts_thread")
        refused = self.track(Zygote(CONTEXT, preload=preload, env=base_env()))
        message = refused.receive()
        code, out, err = refused.close()
        self.assertEqual(code, 3, err)
        reason = message["refused"]
        self.assertEqual(message, {"v": 1, "refused": reason})
        self.assertRegex(reason, r"thread \d+ '.*' \(Python thread 'sleeper-at-import'\) "
                         r"started while importing starts_thread")
        self.assertIn(reason, err)
        self.assertNotIn("AGENT_WORKER_ZYGOTE", out)

    def test_a_preload_that_sets_an_event_loop_is_refused_naming_it(self) -> None:
        refused = self.track(Zygote(CONTEXT, preload=("sets_loop",), env=base_env()))
        reason = refused.receive()["refused"]
        self.assertRegex(reason, r"asyncio event loop <.*EventLoop.*> set or running "
                         r"\(since importing sets_loop\)")
        self.assertEqual(refused.close()[0], 3)

    def test_a_preload_that_fails_or_a_missing_script_is_refused(self) -> None:
        for preload, script, reason in (
            (("no_such_module_here",), CONTEXT, "preloading no_such_module_here failed"),
            ((), "/nonexistent/agent.py", "no such script: /nonexistent/agent.py"),
        ):
            refused = self.track(Zygote(script, preload=preload, env=base_env()))
            self.assertIn(reason, refused.receive()["refused"])
            code, _, err = refused.close()
            self.assertEqual(code, 1, err)
        not_a_socket = subprocess.run(
            [sys.executable, "-m", "agent_worker.zygote", "--", CONTEXT],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=DEADLINE,
        )
        self.assertEqual(not_a_socket.returncode, 1)
        self.assertIn(b"stdin must be a Unix SOCK_SEQPACKET socket", not_a_socket.stderr)

    def test_end_of_file_ends_the_zygote_and_its_agents_keep_running(self) -> None:
        started = self.start()
        agent = started.request("eof-1", *session("eof-1", then="wait"))
        agent.context()
        # The zygote exits, and its stdout and stderr end: no agent holds a copy of them.
        code, out, err = started.close()
        self.assertEqual((code, out), (0, ""), err)
        self.assertTrue(alive(agent.pid))
        with open(f"/proc/{agent.pid}/stat") as stat:
            self.assertEqual(int(stat.read().rsplit(")", 1)[1].split()[1]), os.getpid())
        # Stopped as the worker stops any agent: SIGTERM to its group.
        os.killpg(agent.pid, signal.SIGTERM)
        self.assertEqual(agent.finish()[0], signal.SIGTERM)

    def test_a_killed_zygote_does_not_take_its_agents_with_it(self) -> None:
        started = self.start()
        agents = [started.request(f"kill-{i}", *session(f"kill-{i}", then="wait")) for i in (1, 2)]
        for agent in agents:
            agent.context()
        started.process.kill()
        started.process.wait(timeout=DEADLINE)
        for agent in agents:
            self.assertTrue(alive(agent.pid))
            self.assertEqual(agent.kill(), signal.SIGKILL)

    def test_a_killed_worker_leaves_no_zygote_and_no_agent(self) -> None:
        args, env = session("orphaned", then="wait")
        worker = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "_zygote.py"), "--hold", "--", CONTEXT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=base_env(),
        )
        worker.stdin.write(json.dumps({"args": args, "env": env}).encode())
        worker.stdin.close()
        pids = json.loads(worker.stdout.readline())
        worker.stdout.close()
        worker.kill()
        worker.wait(timeout=DEADLINE)
        # Both are re-parented to this process (a subreaper above the dead worker): the agent
        # by its death signal, the zygote at the end of its socket.
        self.assertEqual(wait_exit(pids["agent"]), signal.SIGKILL)
        self.assertEqual(os.waitstatus_to_exitcode(wait_exit(pids["zygote"])), 0)

    def test_a_bad_request_gets_an_error_and_the_zygote_keeps_serving(self) -> None:
        started = self.start()
        for message, session_id, reason in (
            (b"not json", None, "request is not JSON"),
            (b" " * (1 << 20) + b"{}", None, "request longer than 1048576 bytes"),
            (b"[1]", None, "request is not a JSON object"),
            ({"v": 2, "id": "b-1", "args": []}, "b-1", "unsupported protocol version 2"),
            ({"v": 1, "args": []}, None, "id must be a string"),
            ({"v": 1, "id": "b-2", "args": [1]}, "b-2", "args must be a list of strings"),
            ({"v": 1, "id": "b-3", "args": [], "env": {"A": 1}}, "b-3", "env must map strings"),
            ({"v": 1, "id": "b-4", "args": [], "cgroups": 1}, "b-4", "expected 3 fds"),
            ({"v": 1, "id": "b-5", "args": [], "cgroups": True}, "b-5", "cgroups must be"),
        ):
            with self.subTest(message=str(message)[:100]):
                out_r, out_w = os.pipe()
                reply = started.send(message, [out_w, out_w])
                os.close(out_w)
                self.assertEqual(reply["v"], 1)
                self.assertEqual(reply["id"], session_id)
                self.assertIn(reason, reply["error"])
                self.assertNotIn("pid", reply)
                # The zygote closed the fds it got: the pipe ends.
                self.assertEqual(read_until_eof([out_r]), [b""])
                os.close(out_r)
        agent = started.request("b-ok", *session("b-ok"))
        self.assertEqual(agent.context()["environ"]["SESSION_ID"], "b-ok")
        self.assertEqual(agent.finish()[0], 0)
        code, _, err = started.close()
        self.assertEqual(code, 0)
        self.assertIn("request b-2: args must be a list of strings", err)

    def test_the_scripts_exit_status_is_the_agents_as_cold(self) -> None:
        started = self.start()
        for then, code, stderr in (("exit=7", 7, ""), ("raise", 1, "RuntimeError: agent")):
            with self.subTest(then=then):
                args, env = session(f"status-{code}", then=then)
                status, _, err = started.request(f"status-{code}", args, env).finish()
                self.assertEqual(os.waitstatus_to_exitcode(status), code, err)
                self.assertIn(stderr, err)
                cold_code, _, cold_err = cold(CONTEXT, args, env)
                self.assertEqual(cold_code, code)
                self.assertEqual(err.splitlines()[-1:], cold_err.splitlines()[-1:])

    def test_the_sessions_oom_score_adj_is_applied_and_not_kept(self) -> None:
        started = self.start()
        args, env = session("oom-1")
        agent = started.request("oom-1", args, {**env, "AGENT_WORKER_OOM_SCORE_ADJ": "500"})
        context = agent.context()
        self.assertEqual(context["oom_score_adj"], "500")
        self.assertNotIn("AGENT_WORKER_OOM_SCORE_ADJ", context["environ"])
        self.assertEqual(agent.finish()[0], 0)

    def test_fork_to_first_line_latency(self) -> None:
        """Measured: request sent → the agent's first output line, 20 forks each, with a
        trivial script and with the benchmark's 36 standard-library modules preloaded (which
        the script imports again, as an agent would). Printed; p50 bounded loosely."""
        script = os.path.join(AGENTS, "first_line.py")
        for name, preload, leading in (
            ("trivial", (), ()),
            ("36 stdlib modules", tuple(HEAVY_STDLIB.split(":")), (f"--modules={HEAVY_STDLIB}",)),
        ):
            started = self.track(Zygote(script, leading, preload, env=base_env()))
            started.ready()
            times = []
            for i in range(20):
                sent = time.perf_counter()
                agent = started.request(f"lat-{i}", [])
                self.assertEqual(agent.line(), "first line")
                times.append((time.perf_counter() - sent) * 1000)
                self.assertEqual(agent.finish()[0], 0)
            cold_times = []
            for _ in range(3):
                sent = time.perf_counter()
                done = subprocess.run([sys.executable, script, *leading], capture_output=True)
                self.assertEqual(done.stdout, b"first line\n")
                cold_times.append((time.perf_counter() - sent) * 1000)
            print(
                f"\nzygote fork → first line, {name}: p50 {statistics.median(times):.1f} ms, "
                f"max {max(times):.1f} ms (20 forks); cold run to exit: p50 "
                f"{statistics.median(cold_times):.1f} ms (3 runs)",
                file=sys.stderr,
            )
            self.assertLess(statistics.median(times), 100)


def temporary_cgroups() -> list[tuple[str, str]]:
    """A new cgroup below this process's in the v2 (``unified``) and the v1 ``pids`` hierarchy,
    where writable: its directory and the line ``/proc/<pid>/cgroup`` shows for a process in
    it."""
    with open("/proc/self/cgroup") as file:
        mine = {
            controllers: (hierarchy, path)
            for hierarchy, controllers, path in (line.rstrip().split(":", 2) for line in file)
        }
    name = f"aw-zygote-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    made = []
    for root, controllers in (("/sys/fs/cgroup/unified", ""), ("/sys/fs/cgroup/pids", "pids")):
        if controllers not in mine:
            continue
        hierarchy, parent = mine[controllers]
        path = os.path.join(root, parent.lstrip("/"), name)
        try:
            os.mkdir(path)
        except OSError:
            continue
        made.append((path, f"{hierarchy}:{controllers}:{os.path.join(parent, name)}"))
    return made


def remove_cgroup(path: str) -> None:
    """Kills and reaps what is left in the cgroup at ``path`` (a test that failed half-way),
    then removes it."""
    with open(f"{path}/cgroup.procs") as procs:
        for pid in map(int, procs.read().split()):
            os.kill(pid, signal.SIGKILL)
            wait_exit(pid)
    os.rmdir(path)


if __name__ == "__main__":
    unittest.main()
