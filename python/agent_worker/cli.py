"""``python -m agent_worker``: the command line of the client (it replaces agent_jobs.py's).

    python -m agent_worker enqueue --session-id ID [--user-id U] [--voice-id V]
                                   [--opening-line T] [--system-prompt T] [--ttl S]
                                   [--start-within 30s] [--traceparent TP [--tracestate TS]]
    python -m agent_worker status  --session-id ID
    python -m agent_worker wait    --session-id ID [--timeout S]
    python -m agent_worker end     --session-id ID

Every command takes ``--redis-url`` (default ``$REDIS_URL``, else ``redis://127.0.0.1:6379``)
and ``--queue`` (default ``agent-start``). ``enqueue`` writes the session config first when a
voice, opening line or prompt is given (voice ``Ashley`` when only the others are) and prints
the task id (no deadline unless ``--start-within`` is given: ``30``, ``30s``, ``500ms``,
``2m``; the current OpenTelemetry context, if any, unless ``--traceparent`` is); ``status`` and ``wait`` print the record as JSON; ``end`` prints how many keys and
set entries it removed. Exit codes: 0 done, 1 Redis error or no record (``status``) or the
session ended instead of becoming ready (``wait``), 2 invalid input, 3 ``wait`` timed out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys

from . import _protocol as p
from .keys import DEFAULT_QUEUE, validate_queue, validate_session_id

PROG = "agent_worker"


def _redacted(url: str) -> str:
    # Never print a password: everything between :// and the last @ goes, as the worker does.
    return re.sub(r"://.*@", "://***@", url)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    )
    common.add_argument("--queue", default=DEFAULT_QUEUE)
    common.add_argument("--session-id", required=True)
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    enqueue = commands.add_parser("enqueue", parents=[common], help="write the config, enqueue")
    enqueue.add_argument("--user-id")
    enqueue.add_argument("--voice-id")
    enqueue.add_argument("--opening-line")
    enqueue.add_argument("--system-prompt")
    enqueue.add_argument("--ttl", type=int, default=p.DEFAULT_TTL, help="session TTL, seconds")
    enqueue.add_argument("--start-within", help="deadline after the enqueue: 30, 30s, 500ms, 2m")
    enqueue.add_argument("--traceparent", help="W3C traceparent the worker continues")
    enqueue.add_argument("--tracestate", help="W3C tracestate (with --traceparent)")
    commands.add_parser("status", parents=[common], help="print the session's record")
    wait = commands.add_parser("wait", parents=[common], help="wait until the agent is ready")
    wait.add_argument("--timeout", type=float, default=90.0, help="seconds")
    commands.add_parser("end", parents=[common], help="end the session (delete its keys)")
    return parser


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m)?\Z")


def parse_duration(text: str) -> float:
    """Seconds of ``30``, ``30s``, ``500ms`` or ``2m``; ``ValueError`` naming the text."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"--start-within {text!r} is not a duration like 30s, 500ms or 2m")
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[match.group(2)]
    return float(match.group(1)) * scale


def _record_json(record: object) -> str:
    fields = dataclasses.asdict(record)  # type: ignore[call-overload]
    return json.dumps(fields, ensure_ascii=False, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        # Everything is validated before anything is written.
        validate_session_id(args.session_id)
        validate_queue(args.queue)
        if args.command == "enqueue":
            p.validate_user_id(args.user_id)
            within = None if args.start_within is None else parse_duration(args.start_within)
            options = p.StartOptions.of(args.traceparent, args.tracestate, None, within)
    except ValueError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2

    import redis

    from .client import Client
    from .records import SessionFailed, WaitTimeout

    ttl = getattr(args, "ttl", p.DEFAULT_TTL)
    # A wait blocks on the stream for up to its timeout: no socket timeout shorter than that.
    socket_timeout = None if args.command == "wait" else 5
    client = Client.from_url(
        args.redis_url,
        queue=args.queue,
        session_ttl=ttl,
        socket_connect_timeout=5,
        socket_timeout=socket_timeout,
    )
    try:
        if args.command == "enqueue":
            if any(v is not None for v in (args.voice_id, args.opening_line, args.system_prompt)):
                client.write_session_config(
                    args.session_id,
                    args.voice_id if args.voice_id is not None else p.DEFAULT_VOICE,
                    args.user_id or "",
                    opening_line=args.opening_line,
                    system_prompt=args.system_prompt,
                )
            job = client.enqueue_agent_start(
                args.session_id,
                args.user_id,
                start_within=options.start_within,
                traceparent=options.traceparent,
                tracestate=options.tracestate,
            )
            if job.duplicate:
                print(f"{PROG}: session {args.session_id} already enqueued", file=sys.stderr)
            print(job.task_id)
        elif args.command == "status":
            record = client.session(args.session_id)
            if record is None:
                print(f"{PROG}: session {args.session_id} has no record", file=sys.stderr)
                return 1
            print(_record_json(record))
        elif args.command == "wait":
            print(_record_json(client.wait_ready(args.session_id, args.timeout)))
        else:
            print(client.end_session(args.session_id))
    except ValueError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except SessionFailed as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except WaitTimeout as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 3
    except redis.RedisError as e:
        print(f"{PROG}: Redis at {_redacted(args.redis_url)}: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0
