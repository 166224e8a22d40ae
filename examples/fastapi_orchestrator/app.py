"""A FastAPI orchestrator on agent-worker: start a session (optionally waiting for its agent),
read it, end it. Run with ``REDIS_URL=redis://... uvicorn app:app`` (see README.md).

One ``AsyncClient`` for the application, made at start-up: its connection pool and its one
event-stream reader serve every request, so any number of ``?wait=1`` requests cost one
blocked Redis connection between them.
"""

from __future__ import annotations

import os
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel

import agent_worker

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
QUEUE = os.environ.get("AGENT_WORKER_QUEUE", "agent-start")
DEFAULT_VOICE = "Ashley"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.agents = agent_worker.AsyncClient.from_url(REDIS_URL, queue=QUEUE)
    yield
    await app.state.agents.aclose()


app = FastAPI(title="voice sessions (agent-worker example)", lifespan=lifespan)


class StartRequest(BaseModel):
    """What the front end sends to start a voice session."""

    user_name: str
    voice_id: str = DEFAULT_VOICE
    session_id: str | None = None
    """Left out: a new id is made."""
    opening_line: str | None = None
    system_prompt: str | None = None


class EndRequest(BaseModel):
    """Which session to end."""

    session_id: str


def agents(request: Request) -> agent_worker.AsyncClient:
    """The application's one client (made in the lifespan)."""
    return request.app.state.agents


def public(record: agent_worker.Session) -> dict[str, Any]:
    """What the API shows of a record: the documented fields, never the config's prompt."""
    return {
        "session_id": record.session_id,
        "status": record.status,
        "voice_id": record.voice_id,
        "user_id": record.user_id,
        "worker_id": record.worker_id,
        "agent_pid": record.agent_pid,
        "startup_time": record.startup_time,
        "error": record.error,
        "ended_at": record.ended_at,
        "conversation_duration_minutes": record.conversation_duration_minutes,
    }


@app.post("/session/start")
async def start_session(
    body: StartRequest, request: Request, wait: bool = False, timeout: float = 60.0
) -> dict[str, Any]:
    """Writes the session's config, enqueues its agent, and with ``?wait=1`` returns once the
    agent is ready (409 when the start failed, 504 after ``timeout`` seconds)."""
    client = agents(request)
    session_id = body.session_id or f"s-{uuid.uuid4().hex}"
    try:
        await client.write_session_config(
            session_id,
            body.voice_id,
            body.user_name,
            opening_line=body.opening_line,
            system_prompt=body.system_prompt,
        )
        job = await client.enqueue_agent_start(session_id, user_id=body.user_name)
    except ValueError as e:
        raise HTTPException(status_code=422, detail=str(e)) from None
    answer: dict[str, Any] = {
        "session_id": session_id,
        "task_id": job.task_id,
        "duplicate": job.duplicate,
        "status": "starting",
    }
    if wait:
        try:
            answer |= public(await client.wait_ready(session_id, timeout=timeout))
        except agent_worker.SessionFailed as e:
            raise HTTPException(
                status_code=409,
                detail={"session_id": session_id, "status": e.status, "reason": e.reason},
            ) from None
        except agent_worker.WaitTimeout:
            raise HTTPException(
                status_code=504, detail={"session_id": session_id, "status": "starting"}
            ) from None
    return answer


@app.get("/session/{session_id}")
async def get_session(session_id: str, request: Request) -> dict[str, Any]:
    """The session's record (404 when it has none)."""
    try:
        record = await agents(request).session(session_id)
    except ValueError as e:
        raise HTTPException(status_code=422, detail=str(e)) from None
    if record is None:
        raise HTTPException(status_code=404, detail="no such session")
    return public(record)


@app.post("/session/end")
async def end_session(body: EndRequest, request: Request) -> dict[str, Any]:
    """The end-of-session handler: reads the record (billing from the agent's
    ``conversationDurationMinutes``), then ends the session; its worker stops the agent."""
    client = agents(request)
    try:
        record = await client.session(body.session_id)
        if record is None:
            raise HTTPException(status_code=404, detail="no such session")
        await client.end_session(body.session_id)
    except ValueError as e:
        raise HTTPException(status_code=422, detail=str(e)) from None
    return {"ended": True, **public(record)}
