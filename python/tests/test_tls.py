"""``agent_worker.Client`` over ``rediss://``: against a TLS-only redis-server, trusting the
test CA, it writes a session's config and enqueues its job, and the worker (over TLS too)
starts the agent; a client that trusts another CA, or only the system's roots, is refused.

The harness (tests/tls.rs) sets AGENT_WORKER_TEST_REDIS_URL to the server's ``rediss://``
URL (by host name: the server certificate names ``localhost``), AGENT_WORKER_TEST_TLS_CA to
the CA that signed it and AGENT_WORKER_TEST_TLS_OTHER_CA to one that did not.
"""

from __future__ import annotations

import os
import unittest

import redis

import agent_worker

from ._env import QUEUE, REDIS_URL, new_id, received, wait_for

CA = os.environ["AGENT_WORKER_TEST_TLS_CA"]
OTHER_CA = os.environ["AGENT_WORKER_TEST_TLS_OTHER_CA"]
TIMEOUT = 30.0


class OverTls(unittest.TestCase):
    def setUp(self) -> None:
        self.assertTrue(REDIS_URL.startswith("rediss://"), REDIS_URL)
        self.client = agent_worker.Client.from_url(REDIS_URL, queue=QUEUE, ssl_ca_certs=CA)

    def tearDown(self) -> None:
        self.client.close()

    def test_the_worker_starts_a_session_the_client_enqueued(self) -> None:
        session_id = new_id("tls")
        self.client.write_session_config(session_id, "Olivia", "tls user")
        enqueued = self.client.enqueue_agent_start(session_id, "tls-user")
        self.assertFalse(enqueued.duplicate)
        record = self.client.wait_ready(session_id, timeout=TIMEOUT)
        self.assertEqual(record.status, "ready")
        self.assertEqual(record.task_id, enqueued.task_id)
        self.assertEqual(record.voice_id, "Olivia")
        got = self.client.session(session_id)
        self.assertIsNotNone(got)
        self.assertEqual(got.status, "ready")
        # The agent got this session's config, read over TLS by the worker.
        report = wait_for("the agent's report", TIMEOUT, lambda: received(self.client, session_id))
        self.assertEqual(report["contract"]["voice_id"], "Olivia", report)
        self.assertGreater(self.client.end_session(session_id), 0)

    def test_a_server_certificate_of_another_ca_is_refused(self) -> None:
        for what, kwargs in [
            ("another CA", {"ssl_ca_certs": OTHER_CA}),
            # Neither the environment's trust store nor the system's holds the test CA.
            ("the system's roots", {}),
        ]:
            with self.subTest(what):
                client = agent_worker.Client.from_url(REDIS_URL, queue=QUEUE, **kwargs)
                try:
                    with self.assertRaises(redis.exceptions.ConnectionError) as refused:
                        client.write_session_config(new_id("untrusted"), "Olivia")
                    self.assertIn("CERTIFICATE_VERIFY_FAILED", str(refused.exception))
                finally:
                    client.close()


if __name__ == "__main__":
    unittest.main()
