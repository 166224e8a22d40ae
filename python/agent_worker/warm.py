"""Warm-pool shim: run any Python agent script as a warm process of agent-worker's pool.

    python3 -m agent_worker.warm [--preload mod1,mod2|mod1:mod2] [--pattern TEXT] -- SCRIPT [LEADING ARGS...]

1. Imports the ``--preload`` modules (the slow part of an agent's start: e.g.
   ``pipecat,livekit.rtc``), so they are already in ``sys.modules`` when the script imports them.
2. Prints the warm line (``AGENT_WORKER_WARM``, or ``--pattern``; it must contain the worker's
   ``agent.warm_pattern``).
3. Reads exactly one line on stdin, the handoff of protocol version 1:
   ``{"v":1,"args":[...],"env":{...}}``. The worker closes stdin after it, so nothing is
   read beyond it.
4. Sets ``os.environ`` from ``env``; ``sys.argv`` to ``[SCRIPT, *LEADING ARGS, *args]``;
   ``sys.path[0]`` to the script's directory (symlinks resolved; set before the preloads, and
   left alone in safe-path mode), as ``python3 SCRIPT`` does;
   then runs the unchanged script as the ``__main__`` module, the way the interpreter runs
   ``python3 SCRIPT``: a fresh ``__main__`` in ``sys.modules`` with the absolute ``__file__``,
   ``__spec__`` and ``__package__`` None. (Not ``runpy.run_path``: it sets ``sys.argv[0]`` to
   the path it is given, so a relative script would see a different ``argv[0]`` or
   ``__file__`` than cold.)

A cold start of the same agent is ``agent.command = ["python3", SCRIPT, *LEADING ARGS]``: both
give the script the same ``sys.argv``, ``__file__``, ``__name__``, ``sys.path[0]`` and
environment, and an stdin at end-of-file.

What stays fixed from warm-up time: environment variables that the preloaded modules read at
import (``os.environ`` changes later do not reach them), the interpreter's options
(``PYTHON*`` variables such as ``PYTHONHASHSEED``, ``-X`` flags), and anything the preloaded
modules did at import. Hence the rule: session-specific values travel only in argv, in
``SESSION_*`` / ``VOICE_ID`` environment variables and in the handoff line, never in module
state created at import.

The shim installs no signal handlers, never changes multiprocessing's start method, and imports
only the standard library (``builtins``, ``importlib``, ``json``, ``os``, ``sys``, ``types``).
Steps 1 and 4 are :mod:`agent_worker._main_script`'s, shared with the fork server
(``agent_worker.zygote``).
"""

from __future__ import annotations

import importlib
import json
import os
import sys

from ._main_script import module_list, parse_options, prepare_script, run_as_session

PROTOCOL_VERSION = 1
DEFAULT_PATTERN = "AGENT_WORKER_WARM"
USAGE = (
    "usage: python3 -m agent_worker.warm [--preload mod1,mod2] [--pattern TEXT] "
    "-- SCRIPT [LEADING ARGS...]"
)


class HandoffError(Exception):
    """The handoff line was missing or malformed."""


def read_handoff(fd: int = 0) -> tuple[list[str], dict[str, str]]:
    """Reads the one handoff line from ``fd`` and returns its ``args`` and ``env``."""
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
        if b"\n" in chunk:
            break
    data = b"".join(chunks)
    line, newline, rest = data.partition(b"\n")
    if not newline:
        raise HandoffError("stdin ended before a whole handoff line")
    if rest:
        raise HandoffError("more than one line on stdin")
    try:
        message = json.loads(line)
    except ValueError as error:
        raise HandoffError(f"the handoff line is not JSON: {error}") from None
    if not isinstance(message, dict) or message.get("v") != PROTOCOL_VERSION:
        raise HandoffError(f"not a version {PROTOCOL_VERSION} handoff line")
    args, env = message.get("args"), message.get("env", {})
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise HandoffError("args must be a list of strings")
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise HandoffError("env must map strings to strings")
    return args, env


def main(argv: list[str] | None = None) -> None:
    """Warms up, waits for the session, runs the script as ``__main__``."""
    options, script, leading = parse_options(
        sys.argv[1:] if argv is None else argv, USAGE, ("--preload", "--pattern")
    )
    preload = module_list(options.get("--preload", []))
    pattern = options.get("--pattern", [DEFAULT_PATTERN])[-1]
    prepare_script(script, "warm")
    for module in preload:
        importlib.import_module(module)
    print(f"{pattern} pid={os.getpid()} preloaded={','.join(preload)}", flush=True)
    try:
        args, env = read_handoff()
    except HandoffError as error:
        raise SystemExit(f"agent_worker.warm: {error}") from None
    run_as_session(script, leading, args, env)


if __name__ == "__main__":
    main()
