#!/usr/bin/env python3
"""A re-export, kept for code and scripts written against the former one-file producer of
agent-start jobs: ``import agent_jobs`` and ``python3 jobs/python/agent_jobs.py enqueue ...``.

Nothing is implemented here: every name is that of ``agent_worker.agent_jobs`` in the
``agent_worker`` package (``python/`` in this repository, ``pip install ./python``), and the
command line is ``python -m agent_worker``'s. When the package is not installed, the
repository's ``python/`` is put on the path. New code imports ``agent_worker``.
"""

import sys
from pathlib import Path

try:
    import agent_worker  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

from agent_worker.agent_jobs import *  # noqa: E402,F401,F403
from agent_worker.agent_jobs import __all__, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
