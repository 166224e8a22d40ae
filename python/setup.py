"""The package's one build step beyond pyproject.toml: its Lua scripts come from their one
source, the repository's ``jobs/lua/`` (which the Rust side compiles in), and are copied into
the package at build time instead of being committed twice.

- A wheel (``pip install ./python``) gets them in ``agent_worker/lua/``, copied by ``build_py``
  from ``../jobs/lua/`` or, when built from an sdist, from the sdist's own copy.
- An sdist carries that copy (``agent_worker/lua/`` in its tree), so it builds without the
  repository.

From a checkout, without installing, the package reads ``jobs/lua/`` itself
(``agent_worker/_scripts.py``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PACKAGE_SCRIPTS = Path("agent_worker", "lua")
"""Where the scripts are in the package (and in an sdist's tree)."""


def scripts_source() -> Path:
    """``agent_worker/lua/`` of an unpacked sdist (it has ``PKG-INFO``), else the checkout's
    ``jobs/lua/``."""
    if (HERE / "PKG-INFO").is_file():
        source = HERE / PACKAGE_SCRIPTS
    else:
        source = HERE.parent / "jobs" / "lua"
    if not any(source.glob("*.lua")):
        raise SystemExit(
            f"no Lua scripts in {source}: build the package from a checkout of agent-worker "
            "(its python/ directory) or from an sdist of it"
        )
    return source


def copy_scripts(target: Path) -> None:
    """Copies every ``*.lua`` of :func:`scripts_source` into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for script in sorted(scripts_source().glob("*.lua")):
        shutil.copyfile(script, target / script.name)


class BuildPyWithScripts(build_py):
    """``build_py``, then the scripts into the built package."""

    def run(self) -> None:
        super().run()
        copy_scripts(Path(self.build_lib) / PACKAGE_SCRIPTS)


class SdistWithScripts(sdist):
    """``sdist``, with the scripts in the package's tree."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        copy_scripts(Path(base_dir) / PACKAGE_SCRIPTS)


setup(cmdclass={"build_py": BuildPyWithScripts, "sdist": SdistWithScripts})
