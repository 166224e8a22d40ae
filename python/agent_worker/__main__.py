"""``python -m agent_worker``: see :mod:`agent_worker.cli`."""

import sys

from .cli import main

sys.exit(main())
