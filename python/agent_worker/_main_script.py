"""Running an agent's unchanged script as ``python3 SCRIPT [LEADING ARGS] <session args>`` would:
the one implementation behind both start modes that import ahead of the session, the warm shim
(``agent_worker.warm``) and the fork server (``agent_worker.zygote``).

Both are started as ``python3 -m agent_worker.<shim> [OPTIONS] -- SCRIPT [LEADING ARGS...]``;
both put the script's directory first on ``sys.path`` before importing their ``--preload``
modules, and both, once they know the session, apply its environment, set ``sys.argv`` and run
the script as a fresh ``__main__`` module. What a cold start gives the script (``sys.argv``,
``__file__``, ``__name__``, ``sys.path[0]``, the environment) is decided here only, so the two
start modes cannot drift apart from each other or from a cold start.

Standard library only (``builtins``, ``importlib``, ``os``, ``sys``, ``types``): whatever this
imports is already imported when the script runs.
"""

from __future__ import annotations

import builtins
import importlib.machinery
import os
import sys
import types


def parse_options(
    argv: list[str], usage: str, names: tuple[str, ...]
) -> tuple[dict[str, list[str]], str, list[str]]:
    """Splits a shim's own options from ``SCRIPT [LEADING ARGS]`` at ``--``.

    Each of ``names`` may be given as ``--name VALUE`` or ``--name=VALUE``, repeatedly; the
    result maps each given name to its values in order. Anything else, or no script, exits
    with ``usage``.
    """
    if "--" not in argv:
        raise SystemExit(usage)
    split = argv.index("--")
    ours, rest = argv[:split], argv[split + 1 :]
    if not rest:
        raise SystemExit(usage)
    options: dict[str, list[str]] = {}
    i = 0
    while i < len(ours):
        option = ours[i]
        name, has_value, value = option.partition("=")
        if not has_value:
            if i + 1 >= len(ours):
                raise SystemExit(f"{option} needs a value\n{usage}")
            value = ours[i + 1]
            i += 1
        if name not in names:
            raise SystemExit(f"unknown option {name}\n{usage}")
        options.setdefault(name, []).append(value)
        i += 1
    return options, rest[0], rest[1:]


def module_list(values: list[str]) -> list[str]:
    """The modules of ``--preload`` values, each separated by ``,`` or ``:`` (a ``,`` list
    inside the worker's comma-separated environment lists would split)."""
    return [m for value in values for m in value.replace(":", ",").split(",") if m]


def prepare_script(script: str, shim: str) -> None:
    """Checks that ``script`` exists, then puts first on ``sys.path`` what ``python3 SCRIPT``
    puts there: the script's directory, symlinks resolved. Called before the preloads, so the
    script's sibling modules can be preloaded too. Under safe-path mode (``-P``, ``-I``,
    ``PYTHONSAFEPATH``) a cold start adds no directory, and neither does ``-m``: the path is
    left as it is."""
    if not os.path.isfile(script):
        raise SystemExit(f"agent_worker.{shim}: no such script: {script}")
    if not getattr(sys.flags, "safe_path", False):
        sys.path[0] = os.path.dirname(os.path.realpath(script))


def run_as_session(
    script: str, leading: list[str], args: list[str], env: dict[str, str]
) -> None:
    """Becomes the session's agent: applies ``env`` to ``os.environ``, sets ``sys.argv`` to
    ``[script, *leading, *args]`` and runs the script as ``__main__`` (:func:`run_script`).
    Returns when the script returns; its ``SystemExit`` and exceptions propagate, so the
    caller's interpreter ends the way ``python3 SCRIPT`` would."""
    os.environ.update(env)
    sys.argv = [script, *leading, *args]
    run_script(script)


def script_file(script: str) -> str:
    """The ``__file__`` ``python3 SCRIPT`` gives: absolute, joined to the working directory."""
    return script if os.path.isabs(script) else os.path.join(os.getcwd(), script)


def run_script(script: str) -> None:
    """Runs ``script`` as ``__main__``, as ``python3 SCRIPT`` would: a fresh ``__main__`` in
    ``sys.modules`` with the absolute ``__file__``, ``__spec__`` and ``__package__`` None.
    (Not ``runpy.run_path``: it sets ``sys.argv[0]`` to the path it is given, so a relative
    script would see a different ``argv[0]`` or ``__file__`` than cold.)"""
    file = script_file(script)
    with open(file, "rb") as source:
        # dont_inherit: the shim's own `from __future__` imports must not reach the script.
        code = compile(source.read(), file, "exec", dont_inherit=True)
    module = types.ModuleType("__main__")
    module.__dict__.update(
        __file__=file,
        __cached__=None,
        __loader__=importlib.machinery.SourceFileLoader("__main__", file),
        __package__=None,
        __spec__=None,
        __builtins__=builtins,
    )
    sys.modules["__main__"] = module
    exec(code, module.__dict__)
