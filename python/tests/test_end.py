"""end_session against a worker in another process: the agent stops, no key is left behind,
and a second call changes nothing. Also the CLI (python -m agent_worker)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unittest
import uuid

import redis

import agent_worker
from agent_worker.keys import EVENTS, SESSION_HEARTBEATS, SESSIONS_READY, SESSIONS_STARTING

from ._env import PREFIX, QUEUE, REDIS_URL, wait_for


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def keys_naming(r: redis.Redis, session_id: str) -> list[str]:
    """Every key whose name contains the session id (a test Redis: small, SCAN is fine)."""
    return sorted(k.decode() for k in r.scan_iter(match=f"*{session_id}*", count=1000))


class EndSession(unittest.TestCase):
    def setUp(self) -> None:
        self.client = agent_worker.Client.from_url(REDIS_URL, queue=QUEUE)
        self.raw = redis.Redis.from_url(REDIS_URL)

    def tearDown(self) -> None:
        self.client.close()
        self.raw.close()

    def test_end_session_stops_the_agent_and_leaves_no_key_behind(self) -> None:
        sid = f"{PREFIX}-end-{uuid.uuid4().hex[:8]}"
        self.client.write_session_config(sid, "Craig", "alice", opening_line="Hello")
        self.client.enqueue_agent_start(sid, user_id="alice")
        record = self.client.wait_ready(sid, timeout=30)
        pid = record.agent_pid
        assert pid is not None
        self.assertTrue(alive(pid), "the agent runs")
        position = self.raw.xrevrange(EVENTS, count=1)[0][0]

        removed = self.client.end_session(sid)
        # The record, config, pid, logs, health (no logfile: agent.log_dir is unset) and the
        # entry in session:ready.
        self.assertEqual(removed, 6)
        self.assertIsNone(self.client.session(sid))

        # The owning worker (another process) notices within a heartbeat and stops the agent.
        def stopped() -> dict | None:
            for _, entries in self.raw.xread({EVENTS: position}, block=200) or []:
                for _, fields in entries:
                    event = {k.decode(): v.decode() for k, v in fields.items()}
                    if event["session_id"] == sid:
                        return event
            return None

        event = wait_for("the worker's stop event", 20, stopped)
        self.assertEqual((event["status"], event.get("reason")), ("stopped", "session_ended"))
        self.assertEqual(event["worker_id"], record.worker_id)
        wait_for("the agent to exit", 20, lambda: True if not alive(pid) else None)

        # Nothing of the session is left but the queue's idempotency key, which keeps the same
        # session id from starting again within the TTL (jobs/README.md).
        idempotency = f"{QUEUE}:idempotency:session:{sid}"
        wait_for(
            "the session's keys to be gone",
            20,
            lambda: True if keys_naming(self.raw, sid) == [idempotency] else None,
        )
        self.assertFalse(self.raw.sismember(SESSIONS_STARTING, sid))
        self.assertFalse(self.raw.sismember(SESSIONS_READY, sid))
        wait_for(
            "the worker to drop its index entry",
            20,
            lambda: True if self.raw.zscore(SESSION_HEARTBEATS, sid) is None else None,
        )
        # Idempotent.
        self.assertEqual(self.client.end_session(sid), 0)
        self.assertEqual(keys_naming(self.raw, sid), [idempotency])

    def test_the_cli_enqueues_waits_shows_and_ends(self) -> None:
        sid = f"{PREFIX}-cli-{uuid.uuid4().hex[:8]}"
        env = dict(os.environ, REDIS_URL=REDIS_URL)

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "agent_worker", *args, "--queue", QUEUE, "--session-id", sid],
                env=env, capture_output=True, text=True, timeout=60,
            )

        enqueued = cli("enqueue", "--voice-id", "Olivia", "--user-id", "carol")
        self.assertEqual(enqueued.returncode, 0, enqueued.stderr)
        self.assertEqual(len(enqueued.stdout.strip()), 26, "a ULID task id")
        waited = cli("wait", "--timeout", "30")
        self.assertEqual(waited.returncode, 0, waited.stderr)
        self.assertEqual(json.loads(waited.stdout)["status"], "ready")
        shown = cli("status")
        self.assertEqual(shown.returncode, 0, shown.stderr)
        self.assertEqual(json.loads(shown.stdout)["voice_id"], "Olivia")
        ended = cli("end")
        self.assertEqual((ended.returncode, ended.stdout.strip()), (0, "6"), ended.stderr)
        self.assertEqual(cli("status").returncode, 1)
        bad = subprocess.run(
            [sys.executable, "-m", "agent_worker", "end", "--session-id", "a:b"],
            env=env, capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(bad.returncode, 2)
        self.assertIn("':'", bad.stderr)


if __name__ == "__main__":
    unittest.main()
