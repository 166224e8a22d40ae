"""wait_ready against the real worker: the record after the agent's ready line, the typed
failures, no event lost between the record read and the stream read, and 200 concurrent
asyncio waits sharing one stream reader.

The harness runs a worker on QUEUE whose test agent prints its ready line
AGENT_WORKER_TEST_READY_DELAY_MS after it starts, and one on AGENT_WORKER_TEST_FAILING_QUEUE
whose agent always exits before it is ready.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import unittest

import redis
import redis.asyncio

import agent_worker
from agent_worker.keys import EVENTS, SessionKeys

from ._env import QUEUE, REDIS_URL, ClientTest, log_lines, new_id, received, wait_for

FAILING_QUEUE = os.environ["AGENT_WORKER_TEST_FAILING_QUEUE"]
READY_DELAY_S = int(os.environ["AGENT_WORKER_TEST_READY_DELAY_MS"]) / 1000
TIMEOUT = 30.0


def ready_event_ts(r: redis.Redis, session_id: str) -> int:
    for _, fields in r.xrevrange(EVENTS, count=1000):
        if fields[b"session_id"].decode() == session_id and fields[b"status"] == b"ready":
            return int(fields[b"ts"])
    raise AssertionError(f"no ready event of {session_id}")


def report_latency(kind: str, r: redis.Redis, session_id: str, enqueued: float) -> None:
    returned = time.time()
    # Both clocks are this machine's: the event's ts is Redis's time of the ready record.
    notify_ms = returned * 1000 - ready_event_ts(r, session_id)
    print(
        f"wait_ready latency ({kind}): ready recorded -> wait returned {notify_ms:.1f} ms; "
        f"enqueue -> returned {(returned - enqueued) * 1000:.0f} ms "
        f"(agent ready delay {READY_DELAY_S * 1000:.0f} ms)",
        file=sys.stderr,
    )


class SyncWait(ClientTest):
    def test_returns_the_record_after_the_ready_line(self) -> None:
        sid = new_id("sync-ready")
        self.client.write_session_config(sid, "Craig", "alice")
        enqueued = time.time()
        self.client.enqueue_agent_start(sid, user_id="alice")
        record = self.client.wait_ready(sid, timeout=TIMEOUT)
        report_latency("sync", self.raw, sid, enqueued)
        self.assertEqual(record.status, "ready")
        self.assertEqual(record.session_id, sid)
        self.assertEqual(record.voice_id, "Craig")
        self.assertEqual(record.user_id, "alice")
        self.assertIsNotNone(record.agent_pid)
        # Ready means the agent printed its ready line (shipped to its log list moments later).
        wait_for(
            "the ready line in the agent's logs",
            10,
            lambda: True if f"Room joined {sid}" in log_lines(self.raw, sid) else None,
        )

    def test_a_change_between_the_status_read_and_the_first_stream_read_is_not_missed(
        self,
    ) -> None:
        sid = new_id("sync-race")
        state = SessionKeys.of(sid).state
        self.client.enqueue_agent_start(sid)
        seen: list[str | None] = []

        def ready_meanwhile() -> None:
            # Runs after wait_ready read the record (not ready yet) and before it reads the
            # stream: the worker records `ready` in between. A wait that read the stream from
            # "now" ($) would miss that event and time out.
            seen.append(self.raw.hget(state, "status"))
            wait_for(
                "the worker to record ready",
                TIMEOUT,
                lambda: True if self.raw.hget(state, "status") == b"ready" else None,
            )

        self.client._after_status_read = ready_meanwhile
        started = time.monotonic()
        record = self.client.wait_ready(sid, timeout=TIMEOUT)
        self.assertEqual(len(seen), 1, "the record was not ready at the status read")
        self.assertNotEqual(seen[0], b"ready")
        self.assertEqual(record.status, "ready")
        self.assertLess(time.monotonic() - started, TIMEOUT)

    def test_a_wait_longer_than_the_socket_timeout_blocks_in_shorter_reads(self) -> None:
        # Each XREAD must return before the connection's socket timeout, or redis-py fails it.
        client = agent_worker.Client.from_url(REDIS_URL, queue=QUEUE, socket_timeout=0.5)
        sid = new_id("sync-short-socket")
        client.enqueue_agent_start(sid)
        self.assertEqual(client.wait_ready(sid, timeout=TIMEOUT).status, "ready")
        client.close()

    def test_a_failed_start_raises_session_failed_with_the_reason(self) -> None:
        sid = new_id("sync-fail")
        failing = agent_worker.Client.from_url(REDIS_URL, queue=FAILING_QUEUE)
        failing.enqueue_agent_start(sid)
        with self.assertRaises(agent_worker.SessionFailed) as failed:
            failing.wait_ready(sid, timeout=TIMEOUT)
        self.assertEqual(failed.exception.status, "error")
        self.assertIn("exited", failed.exception.reason or "")
        self.assertEqual(failed.exception.reason, self.client.session(sid).error)
        # The job is dead, with why; retrying it puts it back on the ready list.
        job = wait_for(
            "the job in the dead set",
            10,
            lambda: next((j for j in failing.dead_jobs() if j.session_id == sid), None),
        )
        self.assertIn("exited", job.error)
        self.assertIsNotNone(job.failed_at)
        self.assertEqual(failing.retry_dead([job.task_id, "not-a-dead-task"]), [job.task_id])
        failing.close()

    def test_an_expired_start_raises_at_once_with_start_expired(self) -> None:
        sid = new_id("sync-expired")
        self.client.write_session_config(sid, "Craig", "alice")
        # A deadline long past on any clock: the worker's claim refuses it.
        job = self.client.enqueue_agent_start(sid, start_by=1)
        with self.assertRaises(agent_worker.SessionFailed) as failed:
            self.client.wait_ready(sid, timeout=TIMEOUT)
        # SessionFailed, not WaitTimeout: the error event ended the wait.
        self.assertEqual(failed.exception.status, "error")
        self.assertTrue((failed.exception.reason or "").startswith("start_expired: "), failed.exception)
        record = self.client.session(sid)
        self.assertEqual(record.error, failed.exception.reason)
        self.assertIsNone(record.agent_pid)
        dead = wait_for(
            "the job in the dead set",
            10,
            lambda: next((j for j in self.client.dead_jobs() if j.task_id == job.task_id), None),
        )
        self.assertIn("start_expired", dead.error)

    def test_the_default_deadline_is_a_minute_on_redis_clock(self) -> None:
        sid = new_id("sync-deadline")
        before = self.raw.time()
        job = self.client.enqueue_agent_start(sid)
        after = self.raw.time()
        payload = json.loads(self.raw.hget(f"{QUEUE}:data", job.task_id))
        ms = lambda t: t[0] * 1000 + t[1] // 1000  # noqa: E731
        self.assertEqual(agent_worker.DEFAULT_START_WITHIN, 60.0)
        self.assertLessEqual(ms(before) + 60_000, payload["start_by"])
        self.assertLessEqual(payload["start_by"], ms(after) + 60_000)
        # Within its deadline: it starts.
        self.assertEqual(self.client.wait_ready(sid, timeout=TIMEOUT).status, "ready")

    def test_a_session_nobody_starts_times_out(self) -> None:
        sid = new_id("sync-never")
        started = time.monotonic()
        with self.assertRaises(agent_worker.WaitTimeout) as timeout:
            self.client.wait_ready(sid, timeout=0.5)
        self.assertGreaterEqual(time.monotonic() - started, 0.5)
        self.assertIsNone(timeout.exception.status)

    def test_invalid_ids_are_refused_before_any_command(self) -> None:
        for bad in ["", "a:b", "*", "x" * 129, "é", "a b", "{t}"]:
            with self.assertRaises(ValueError):
                self.client.wait_ready(bad, timeout=1)
            with self.assertRaises(ValueError):
                self.client.end_session(bad)


class AsyncWait(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self) -> None:
        self.raw = redis.Redis.from_url(REDIS_URL)

    async def asyncTearDown(self) -> None:
        self.raw.close()

    async def test_returns_the_record_after_the_ready_line(self) -> None:
        client = agent_worker.AsyncClient.from_url(REDIS_URL, queue=QUEUE)
        sid = new_id("async-ready")
        await client.write_session_config(sid, "Olivia", "bob")
        enqueued = time.time()
        await client.enqueue_agent_start(sid, user_id="bob")
        record = await client.wait_ready(sid, timeout=TIMEOUT)
        report_latency("async", self.raw, sid, enqueued)
        await client.aclose()
        self.assertEqual((record.status, record.voice_id), ("ready", "Olivia"))

    async def test_a_change_between_the_status_read_and_the_first_stream_read_is_not_missed(
        self,
    ) -> None:
        client = agent_worker.AsyncClient.from_url(REDIS_URL, queue=QUEUE)
        sid = new_id("async-race")
        state = SessionKeys.of(sid).state
        await client.enqueue_agent_start(sid)
        seen: list[bytes | None] = []

        async def ready_meanwhile() -> None:
            seen.append(await client.hget(state, "status"))
            deadline = time.monotonic() + TIMEOUT
            while await client.hget(state, "status") != b"ready":
                self.assertLess(time.monotonic(), deadline, "the worker records ready")
                await asyncio.sleep(0.02)

        client._after_status_read = ready_meanwhile
        record = await client.wait_ready(sid, timeout=TIMEOUT)
        await client.aclose()
        self.assertEqual(len(seen), 1)
        self.assertNotEqual(seen[0], b"ready")
        self.assertEqual(record.status, "ready")

    async def test_a_failed_start_raises_session_failed(self) -> None:
        client = agent_worker.AsyncClient.from_url(REDIS_URL, queue=FAILING_QUEUE)
        sid = new_id("async-fail")
        await client.enqueue_agent_start(sid)
        with self.assertRaises(agent_worker.SessionFailed) as failed:
            await client.wait_ready(sid, timeout=TIMEOUT)
        self.assertEqual(failed.exception.status, "error")
        self.assertTrue(failed.exception.reason)
        deadline = time.monotonic() + 10
        while not any(j.session_id == sid for j in await client.dead_jobs()):
            self.assertLess(time.monotonic(), deadline, "the job goes dead")
            await asyncio.sleep(0.02)
        self.assertEqual(len(await client.retry_dead()), 1)
        await client.aclose()

    async def test_200_concurrent_waits_share_one_stream_reader(self) -> None:
        # A pool of 20 connections for 200 waits: one blocking XREAD per waiter could not even
        # start most of them; the shared reader blocks one connection.
        pool = redis.asyncio.BlockingConnectionPool.from_url(REDIS_URL, max_connections=20)
        client = agent_worker.AsyncClient(connection_pool=pool, queue=QUEUE)
        sessions = {new_id(f"many{n}"): voice for n, voice in zip(range(20), ["Craig", "Olivia"] * 10)}
        for sid, voice in sessions.items():
            await client.write_session_config(sid, voice, "test_concurrent_user")
        # The waits begin before the jobs exist (a session nobody has started yet is waited
        # for), so all 200 are pending at once however slow the machine is; the jobs go in
        # only then.
        waits = [
            asyncio.create_task(client.wait_ready(sid, timeout=TIMEOUT))
            for sid in sessions
            for _ in range(10)
        ]
        self.assertEqual(len(waits), 200)
        deadline = time.monotonic() + TIMEOUT
        while sum(len(ws) for ws in client._reader._waiters.values()) < 200:
            self.assertLess(time.monotonic(), deadline, "all 200 waits pending")
            await asyncio.sleep(0.02)
        samples: list[int] = []
        while len(samples) < 5 or int(self.raw.info("clients")["blocked_clients"]) == 0:
            self.assertLess(time.monotonic(), deadline, "the shared reader blocks")
            samples.append(int(self.raw.info("clients")["blocked_clients"]))
            await asyncio.sleep(0.02)
        samples.append(int(self.raw.info("clients")["blocked_clients"]))
        await client.enqueue_agent_starts([(sid, "test_concurrent_user") for sid in sessions])
        while not all(w.done() for w in waits):
            pending = sum(len(ws) for ws in client._reader._waiters.values())
            if pending == 200:
                samples.append(int(self.raw.info("clients")["blocked_clients"]))
            await asyncio.sleep(0.05)
        records = await asyncio.gather(*waits)
        await client.aclose()
        self.assertTrue(samples, "all 200 waits were pending at once at least once")
        self.assertLessEqual(max(samples), 1, f"blocked connections while waiting: {samples}")
        self.assertIn(1, samples, "the shared reader blocks on the stream")
        for (sid, voice), chunk in zip(sessions.items(), [records[i : i + 10] for i in range(0, 200, 10)]):
            for record in chunk:
                self.assertEqual((record.session_id, record.status, record.voice_id), (sid, "ready", voice))
        for sid, voice in sessions.items():
            got = wait_for(f"the agent of {sid}", 10, lambda: received(self.raw, sid))
            self.assertEqual(got["contract"]["voice_id"], voice)
        print(f"200 concurrent waits: blocked connections sampled {sorted(set(samples))}", file=sys.stderr)


if __name__ == "__main__":
    unittest.main()
