"""The benchmark's Python agent with a realistically heavy import phase (part 8).

    python3 heavy_agent.py --modules=a:b:c --room=R --voice-id=V [...]

It imports every module of ``--modules`` (colon-separated; the benchmark passes
pipecat/livekit when they are installed, else a fixed set of large standard-library modules),
prints ``AGENT_ALIVE``, then ``Room joined <room>``, and runs until SIGTERM, as a voice agent
between joining its room and its call. Warm, through ``python3 -m agent_worker.warm --preload
<the same modules> -- heavy_agent.py``, the imports are already done when it runs.
"""

import argparse
import importlib
import signal
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modules", default="")
    parser.add_argument("--room", required=True)
    parser.add_argument("--voice-id", default="")
    parser.add_argument("--opening-line", default="")
    parser.add_argument("--system-prompt", default="")
    args = parser.parse_args()
    for module in filter(None, args.modules.split(":")):
        importlib.import_module(module)
    print("AGENT_ALIVE", flush=True)
    print(f"Room joined {args.room}", flush=True)
    signal.sigwait({signal.SIGTERM})
    sys.exit(0)


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    main()
