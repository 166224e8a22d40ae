"""Fork safety of the zygote (``agent_worker.zygote``): importing the ``--preload`` modules so
that the process can still be forked, and refusing when it cannot.

A fork copies only the forking thread. Any other thread is simply absent from the child, and a
lock it held at that moment (the allocator's, a logging handler's, an import lock) stays
locked there forever: the child hangs the first time it needs it. An asyncio event loop made
before the fork would be shared by every child (one epoll instance, one self-pipe). Hence, after
preloading, the zygote refuses to serve while it has another OS thread or an event loop, and
names each with the import during which it appeared.

The known thread pools that libraries start at import (numpy's OpenBLAS, OpenMP, MKL) are
kept to the calling thread with ``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS`` = 1 for the preloads, unless the operator set them; the agents'
environment does not keep the zygote's additions (:class:`agent_worker._agent_process.Inherited`).
"""

from __future__ import annotations

import gc
import importlib
import os
import sys

EXIT_REFUSED = 3
"""The zygote's exit code when it is not safe to fork."""
SINGLE_THREAD_POOLS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""The thread pools known to start at import (numpy's OpenBLAS, OpenMP, MKL): one thread."""


class Refused(Exception):
    """The zygote cannot serve: the reason, and the exit code to end with."""

    def __init__(self, reason: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(reason)
        self.code = code


def single_thread_pools() -> list[str]:
    """Sets each of :data:`SINGLE_THREAD_POOLS` to 1 unless the environment has it; the names
    it set."""
    added = [name for name in SINGLE_THREAD_POOLS if name not in os.environ]
    for name in added:
        os.environ[name] = "1"
    return added


def preload(modules: list[str]) -> None:
    """Imports ``modules`` in order and freezes what they made, then refuses
    (:class:`Refused`) if the process is no longer safe to fork, naming each extra OS thread
    and a set or running asyncio event loop with the import that started it."""
    started_by = {tid: "before any preload" for tid in other_threads()}
    loop_by: str | None = None
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:
            import traceback

            traceback.print_exc()
            raise Refused(
                f"preloading {module} failed: {type(error).__name__}: {error}", code=1
            ) from None
        for tid in other_threads():
            started_by.setdefault(tid, f"while importing {module}")
        if loop_by is None and event_loop() is not None:
            loop_by = module
    # Instagram's trick: the preloaded objects leave the collector's generations, so no
    # collection in an agent writes to (and un-shares) their pages.
    gc.collect()
    gc.freeze()
    hazards = [
        describe_thread(tid, started_by.get(tid, "after the preloads")) for tid in other_threads()
    ]
    loop = event_loop()
    if loop is not None:
        since = f"since importing {loop_by}" if loop_by else "before any preload"
        hazards.append(f"asyncio event loop {loop!r} set or running ({since})")
    hazards = [h for h in hazards if h]
    if hazards:
        raise Refused(
            "not safe to fork (a child gets only the forking thread, and any lock another "
            "thread holds stays locked in it): " + "; ".join(hazards)
        )


def other_threads() -> list[int]:
    """This process's OS threads other than the main one."""
    return sorted(int(t) for t in os.listdir("/proc/self/task") if int(t) != os.getpid())


def describe_thread(tid: int, origin: str) -> str:
    """``thread <tid> '<comm>'`` (and its Python name), started ``origin``; empty once it is
    gone."""
    try:
        with open(f"/proc/self/task/{tid}/comm") as comm:
            name = comm.read().strip()
    except FileNotFoundError:
        return ""
    text = f"thread {tid} {name!r}"
    threading = sys.modules.get("threading")
    if threading is not None:
        for thread in threading.enumerate():
            if thread.native_id == tid:
                text += f" (Python thread {thread.name!r})"
    return f"{text} started {origin}"


def event_loop() -> object | None:
    """The asyncio event loop running or set in this thread, if asyncio is imported at all."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return None
    running = asyncio.events._get_running_loop()
    if running is not None:
        return running
    policy = getattr(asyncio.events, "_event_loop_policy", None)
    return getattr(getattr(policy, "_local", None), "_loop", None)
