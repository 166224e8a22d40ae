"""A Python agent script for the zygote tests: reports everything of its process that a start
mode could get wrong (``context {json}``), then behaves as a voice agent.

    python3 context.py --room=R --voice-id=V [--then exit|wait|exit=N|raise] [...]

Like a real agent it uses argparse, asyncio.run, __file__, a sibling-module import and the
``__main__`` guard. After its report it prints ``voice <VOICE_ID> pid <pid>`` and ``Room joined
<room>``; then ``--then`` says what it does: exit 0 (``exit``, the default), exit with N
(``exit=N``), raise an uncaught exception (``raise``), or run until a signal ends it (``wait``).
"""

import argparse
import asyncio
import ctypes
import gc
import json
import multiprocessing
import os
import random
import resource
import signal
import sys

import context_sibling

PR_GET_PDEATHSIG = 2


def handler_name(handler: object) -> str:
    """A signal handler by name: ``SIG_DFL``, ``SIG_IGN``, a function's name, or ``None``."""
    if isinstance(handler, signal.Handlers):
        return handler.name
    return getattr(handler, "__qualname__", None) or str(handler)


def open_files() -> dict[str, str]:
    """Each open fd and what it is open on (a pipe's or socket's inode left out)."""
    listing = os.listdir("/proc/self/fd")
    files = {}
    for name in listing:
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own fd
        files[name] = target.split(":[", 1)[0]
    return files


def death_signal() -> int:
    value = ctypes.c_int(-1)
    ctypes.CDLL(None).prctl(PR_GET_PDEATHSIG, ctypes.byref(value), 0, 0, 0)
    return value.value


def read(path: str) -> str:
    with open(path) as file:
        return file.read()


def report(args: argparse.Namespace) -> dict:
    umask = os.umask(0)
    os.umask(umask)
    pool_env = sys.modules.get("pool_env")
    return {
        "argv": sys.argv,
        "file": __file__,
        "name": __name__,
        "path0": sys.path[0],
        "main_is_this": sys.modules["__main__"].__dict__.get("main") is main,
        "sibling": context_sibling.GREETING,
        "args": vars(args),
        "environ": dict(os.environ),
        "stdin": sys.stdin.read(),
        "cwd": os.getcwd(),
        "umask": umask,
        "signals": {
            signal.Signals(s).name if s in signal.Signals._value2member_map_ else str(s):
            handler_name(signal.getsignal(s))
            for s in sorted(signal.valid_signals())
        },
        "wakeup_fd": signal.set_wakeup_fd(-1),
        "signal_mask": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, ())),
        "leads_group": os.getpgid(0) == os.getpid(),
        "ppid": os.getppid(),
        "death_signal": death_signal(),
        "cgroup": read("/proc/self/cgroup"),
        "oom_score_adj": read("/proc/self/oom_score_adj").strip(),
        "open_files": open_files(),
        "threads": len(os.listdir("/proc/self/task")),
        "gc": [gc.isenabled(), gc.get_threshold()],
        "line_buffering": [sys.stdout.line_buffering, sys.stderr.line_buffering],
        "rlimits": {
            name: resource.getrlimit(getattr(resource, name))
            for name in sorted(dir(resource))
            if name.startswith("RLIMIT_")
        },
        "flags": str(sys.flags),
        "start_method": multiprocessing.get_start_method(allow_none=True),
        # Per process: compared between agents, not with cold.
        "pid": os.getpid(),
        "random": random.random(),
        # What a preloaded module saw at import (tests/zygote_agents/pool_env.py).
        "pool_env_at_preload": getattr(pool_env, "SEEN", None),
    }


async def join(room: str) -> str:
    await asyncio.sleep(0)
    return f"Room joined {room}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--room", "-r", required=True)
    parser.add_argument("--voice-id", required=True)
    parser.add_argument("--opening-line", default="")
    parser.add_argument("--system-prompt", default="")
    parser.add_argument("--leading", default="")
    parser.add_argument("--then", default="exit")
    args = parser.parse_args()
    print("context " + json.dumps(report(args), sort_keys=True), flush=True)
    print(f"voice {os.environ.get('VOICE_ID')} pid {os.getpid()}", flush=True)
    print(asyncio.run(join(args.room)), flush=True)
    if args.then == "raise":
        raise RuntimeError(f"agent {args.room} failed on purpose")
    if args.then.startswith("exit="):
        sys.exit(int(args.then.removeprefix("exit=")))
    if args.then == "wait":
        # Until a signal ends it (SIGTERM's default action).
        signal.pause()


if __name__ == "__main__":
    main()
