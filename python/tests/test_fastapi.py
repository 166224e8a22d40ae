"""The seed scenario through the FastAPI example (examples/fastapi_orchestrator/app.py) served
by uvicorn, with the real worker and test agent: one user, test_concurrent_user, starts two
sessions at the same moment with voices Craig and Olivia; each agent must receive its own."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import unittest
from pathlib import Path

import httpx
import redis

from ._env import QUEUE, REDIS_URL, received, wait_for

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fastapi_orchestrator"
USER = "test_concurrent_user"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SeedScenario(unittest.TestCase):
    def setUp(self) -> None:
        self.port = free_port()
        env = dict(os.environ, REDIS_URL=REDIS_URL, AGENT_WORKER_QUEUE=QUEUE)
        self.server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning"],
            cwd=EXAMPLE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        self.raw = redis.Redis.from_url(REDIS_URL)

        def answers() -> bool | None:
            if self.server.poll() is not None:
                raise AssertionError(f"uvicorn exited: {self.server.stdout.read()}")
            try:
                return httpx.get(f"{self.base}/session/none-such", timeout=1).status_code == 404 or None
            except httpx.TransportError:
                return None

        wait_for("uvicorn to answer", 30, answers)

    def tearDown(self) -> None:
        self.server.terminate()
        self.server.wait(timeout=10)
        self.server.stdout.close()
        self.raw.close()

    def test_two_sessions_of_one_user_at_once_each_get_their_own_voice(self) -> None:
        voices = {"seed-craig": "Craig", "seed-olivia": "Olivia"}

        async def start_both() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=self.base, timeout=60) as http:
                return await asyncio.gather(*(
                    http.post(
                        "/session/start?wait=1",
                        json={"session_id": sid, "user_name": USER, "voice_id": voice},
                    )
                    for sid, voice in voices.items()
                ))

        for response in asyncio.run(start_both()):
            self.assertEqual(response.status_code, 200, response.text)
            body = response.json()
            sid = body["session_id"]
            self.assertEqual(body["status"], "ready")
            self.assertEqual(body["voice_id"], voices[sid])
            self.assertEqual(body["user_id"], USER)
        for sid, voice in voices.items():
            # What the agent process itself received: its argv and environment.
            got = wait_for(f"the agent of {sid} to report", 10, lambda: received(self.raw, sid))
            self.assertEqual(got["contract"]["voice_id"], voice, sid)
            self.assertEqual(got["contract"]["room"], sid)
            self.assertEqual(got["env"]["VOICE_ID"], voice)
            shown = httpx.get(f"{self.base}/session/{sid}", timeout=10)
            self.assertEqual((shown.status_code, shown.json()["status"]), (200, "ready"))

        ended = httpx.post(f"{self.base}/session/end", json={"session_id": "seed-craig"}, timeout=10)
        self.assertEqual(ended.status_code, 200, ended.text)
        self.assertEqual(httpx.get(f"{self.base}/session/seed-craig", timeout=10).status_code, 404)
        self.assertEqual(
            httpx.post(f"{self.base}/session/end", json={"session_id": "seed-craig"}, timeout=10).status_code,
            404,
        )
        bad = httpx.get(f"{self.base}/session/a:b", timeout=10)
        self.assertEqual(bad.status_code, 422)


if __name__ == "__main__":
    unittest.main()
