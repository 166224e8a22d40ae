"""A Python agent script for the warm-pool shim tests: reports what it was started with, the
way a cold `python3 probe.py ...` and a warm `python3 -m agent_worker.warm -- probe.py ...`
must both see it, then behaves as a voice agent (a ready line, then runs until SIGTERM).

It uses what real agents use: argparse, asyncio.run, __file__, a sibling-module import and the
`if __name__ == "__main__"` guard. It also reports the process state a shim could change by
mistake: the SIGINT and SIGTERM handlers and multiprocessing's start method.
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import sys

import probe_helper


def handler_name(signum: int) -> str:
    """The handler of ``signum`` by name: ``SIG_DFL``, ``SIG_IGN`` or the function's name."""
    handler = signal.getsignal(signum)
    if isinstance(handler, signal.Handlers):
        return handler.name
    return getattr(handler, "__qualname__", None) or str(handler)


async def connect(room: str) -> str:
    await asyncio.sleep(0)
    return f"Room joined {room}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--room", "-r", required=True)
    parser.add_argument("--voice-id", required=True)
    parser.add_argument("--opening-line", default="")
    parser.add_argument("--system-prompt", default="")
    parser.add_argument("--leading", default="")
    parser.add_argument("--exit-after-ready", action="store_true")
    args = parser.parse_args()
    report = {
        "argv": sys.argv,
        "file": __file__,
        "name": __name__,
        "path0": sys.path[0],
        "main_is_this": sys.modules["__main__"].__dict__.get("main") is main,
        "helper": probe_helper.GREETING,
        "here": os.path.dirname(os.path.abspath(__file__)),
        "args": vars(args),
        "env": {k: os.environ.get(k) for k in ("SESSION_ID", "VOICE_ID", "SESSION_CONFIG")},
        "stdin": sys.stdin.read(),
        "preloaded_email": "email.mime.text" in sys.modules,
        "sigint": handler_name(signal.SIGINT),
        "sigterm": handler_name(signal.SIGTERM),
        "start_method": multiprocessing.get_start_method(allow_none=True),
    }
    print("probe report " + json.dumps(report, sort_keys=True), flush=True)
    print(asyncio.run(connect(args.room)), flush=True)
    if args.exit_after_ready:
        return
    # Runs until SIGTERM (its default action ends the process).
    while True:
        asyncio.run(asyncio.sleep(3600))


if __name__ == "__main__":
    main()
