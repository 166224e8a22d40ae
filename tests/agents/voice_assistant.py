#!/usr/bin/env python3
"""A stand-in for the original system's voice agent, for agent-worker's compatibility tests.

It behaves like the Pipecat agent the worker launches in production
(backend/agent/voice_assistant.py of the original system) wherever the worker depends on it,
without LiveKit or any speech service:

- argv: parsed twice, as the real agent does. First its own argparse parser with
  --room, --voice-id (default Ashley), --opening-line, --system-prompt (strict
  parse_args: an unknown option or a value argparse takes for an option exits 2). Then the
  parse Pipecat's configure() makes of sys.argv: parse_known_args with -r/--room and
  -u/--url, whose room is the one the agent joins.
- output: AGENT_ALIVE right after its imports, environment_validated,
  voice_assistant_starting voice_id=<v>, one report line "voice-agent received {json}",
  then "Connected to <room> as voice-agent" (Pipecat's transport line: the worker's ready
  pattern).
- Redis (REDIS_URL from the environment it inherits from the worker): when the first
  participant joins (at once here) it writes conversationStartTime (unix seconds) into
  session:<room>; when the participant leaves (SIGUSR1 here: "hang up") it writes
  conversationDuration (s), conversationDurationMinutes (ceil), status=completed and
  lastActive, then exits 0.
- SIGTERM: the real agent installs no handler (its PipelineRunner runs with
  handle_sigint=False), so it dies of the signal without writing anything. So does this one.

Test behaviours, from the session config's pass-through field testBehaviour (it arrives in
SESSION_CONFIG):
- normal (default)
- hang-before-alive: never gets past its imports (no alive line, runs until killed)
- crash-on-import: exits 1 before its alive line
- timeout-once: on its first run for a room, alive but never connected; later runs normal
  (counted in $TEST_AGENT_STATE_DIR/<room>.runs)
"""

import argparse
import json
import math
import os
import signal
import sys
import time

import redis

config = json.loads(os.environ.get("SESSION_CONFIG") or "{}")
behaviour = config.get("testBehaviour", "normal")
if behaviour == "crash-on-import":
    print("ImportError: a model failed to load", file=sys.stderr, flush=True)
    sys.exit(1)
if behaviour == "hang-before-alive":
    while True:
        time.sleep(3600)

print("AGENT_ALIVE", flush=True)

# The agent's own parser: strict, as in the original.
parser = argparse.ArgumentParser(description="voice assistant")
parser.add_argument("--room", type=str, required=False)
parser.add_argument("--voice-id", type=str, default="Ashley")
parser.add_argument("--opening-line", type=str, default=None)
parser.add_argument("--system-prompt", type=str, default=None)
args = parser.parse_args()

# Pipecat's configure(): a second parser over the same sys.argv, tolerant of the rest.
pipecat = argparse.ArgumentParser(description="LiveKit AI SDK Bot Sample")
pipecat.add_argument("-r", "--room", type=str, required=False, help="Name of the LiveKit room")
pipecat.add_argument("-u", "--url", type=str, required=False, help="URL of the LiveKit server")
known, _ = pipecat.parse_known_args()
room = known.room or os.getenv("LIVEKIT_ROOM_NAME")
url = known.url or os.getenv("LIVEKIT_URL")

print("environment_validated", flush=True)
print(f"voice_assistant_starting voice_id={args.voice_id}", flush=True)
report = {
    "argv": sys.argv[1:],
    "room": args.room,
    "voice_id": args.voice_id,
    "opening_line": args.opening_line,
    "system_prompt": args.system_prompt,
    "pipecat_room": room,
    "pipecat_url": url,
    "session_id_env": os.getenv("SESSION_ID"),
    "traceparent": os.getenv("TRACEPARENT"),
    "pid": os.getpid(),
}
print("voice-agent received " + json.dumps(report), flush=True)

if behaviour == "timeout-once":
    state = os.path.join(os.environ["TEST_AGENT_STATE_DIR"], f"{room}.runs")
    runs = int(open(state).read()) if os.path.exists(state) else 0
    with open(state, "w") as f:
        f.write(str(runs + 1))
    if runs == 0:
        while True:
            time.sleep(3600)

# Blocked before "connecting", so a hang-up that comes at once is not lost.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
client = redis.Redis.from_url(os.getenv("REDIS_URL", "redis://localhost:6379"))
print(f"Connected to {room} as voice-agent", flush=True)

# on_first_participant_joined
started = int(time.time())
client.hset(f"session:{room}", "conversationStartTime", started)

signal.sigwait({signal.SIGUSR1})
print("participant left; ending the conversation", flush=True)
# The finally block of the real agent's main().
duration = int(time.time()) - started
client.hset(
    f"session:{room}",
    mapping={
        "conversationDuration": duration,
        "conversationDurationMinutes": math.ceil(duration / 60),
        "status": "completed",
        "lastActive": int(time.time()),
    },
)
sys.exit(0)
