"""The latency test's agent: imports ``--modules`` (colon-separated; already imported when
preloaded), prints one line and exits."""

import importlib
import sys

for arg in sys.argv[1:]:
    if arg.startswith("--modules="):
        for module in filter(None, arg.removeprefix("--modules=").split(":")):
            importlib.import_module(module)
print("first line", flush=True)
