"""Where the package's Lua scripts come from: one source, the repository's ``jobs/lua/``.

The scripts run in Redis and are shared with the Rust side (``agent-jobs`` and the worker), so
they are not committed inside the package. Two places hold them:

- **installed** (``pip install ./python``, a wheel, an sdist): the build step in ``setup.py``
  copies ``jobs/lua/*.lua`` into the package's ``lua/`` data directory;
- **a checkout** (``python/`` on ``PYTHONPATH``, as the tests and ``-e`` installs use it): the
  package has no ``lua/`` directory and reads ``jobs/lua/`` next to ``python/``.

The package's own copy wins when it exists, so an installed package never reads a checkout.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

CHECKOUT_SCRIPTS = Path(__file__).resolve().parent.parent.parent / "jobs" / "lua"
"""``jobs/lua/`` of the repository this package sits in, when it runs from a checkout."""


def path(name: str) -> Traversable:
    """The file of script ``name`` (``enqueue.lua``): the package's copy, else the checkout's.

    Raises ``FileNotFoundError`` naming both places when neither has it.
    """
    installed = resources.files(__package__).joinpath("lua").joinpath(name)
    if installed.is_file():
        return installed
    checkout = CHECKOUT_SCRIPTS / name
    if checkout.is_file():
        return checkout
    raise FileNotFoundError(
        f"Lua script {name} is neither in the installed package ({installed}) nor in a "
        f"checkout's jobs/lua/ ({checkout}); install the package from a checkout of "
        "agent-worker (pip install ./python), which copies the scripts in"
    )


@cache
def lua(name: str) -> str:
    """The text of script ``name``, read once."""
    return path(name).read_text(encoding="utf-8")
