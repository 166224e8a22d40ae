"""W3C Trace Context for a job: shape checks (as ``jobs/src/trace_context.rs``) and the
current OpenTelemetry context, when the ``opentelemetry`` package is importable.

Nothing to configure and no dependency: without ``opentelemetry`` (or without an active span)
a job simply carries no ``traceparent`` and the worker starts a root trace.
"""

from __future__ import annotations

import re

MAX_TRACEPARENT_LEN = 512
"""Longest accepted ``traceparent`` of a later version (version 00 is exactly 55 characters)."""
MAX_TRACESTATE_LEN = 512
"""Longest accepted ``tracestate``, in characters (all printable ASCII)."""

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z", re.S)
_PRINTABLE = re.compile(r"[ -~]*\Z")


def validate_traceparent(value: object) -> str:
    """Returns ``value`` if it is a W3C ``traceparent`` (``00-<32 hex>-<16 hex>-<2 hex>``,
    lowercase, no all-zero id, no version ``ff``); raises ``ValueError`` saying what is wrong."""
    if not isinstance(value, str):
        raise ValueError(f"traceparent must be a string, got {type(value).__name__}")
    shown = value[:64]
    if not 55 <= len(value) <= MAX_TRACEPARENT_LEN or not value.isascii():
        raise ValueError(f"traceparent {shown!r} is not version-traceid-parentid-flags (wrong length)")
    match = _TRACEPARENT.match(value)
    if match is None:
        raise ValueError(f"traceparent {shown!r} is not version-traceid-parentid-flags in lowercase hex")
    version, trace_id, parent_id, _flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        raise ValueError(f"traceparent {shown!r} has an invalid version or extra fields")
    for name, field in (("trace id", trace_id), ("parent id", parent_id)):
        if set(field) == {"0"}:
            raise ValueError(f"traceparent {shown!r} has an all-zero {name}")
    return value


def validate_tracestate(value: object) -> str:
    """Returns ``value`` if it is printable ASCII of at most 512 characters."""
    if not isinstance(value, str):
        raise ValueError(f"tracestate must be a string, got {type(value).__name__}")
    if len(value) > MAX_TRACESTATE_LEN:
        raise ValueError(f"tracestate is {len(value)} bytes long; at most {MAX_TRACESTATE_LEN} are allowed")
    if not _PRINTABLE.match(value):
        raise ValueError("tracestate is not printable ASCII")
    return value


def current() -> tuple[str | None, str | None]:
    """The active OpenTelemetry context as ``(traceparent, tracestate)``, through the globally
    configured propagator; ``(None, None)`` without ``opentelemetry``, without an active span,
    or when the propagator writes something of another shape."""
    try:
        from opentelemetry import propagate
    except ImportError:
        return None, None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    traceparent, tracestate = carrier.get("traceparent"), carrier.get("tracestate")
    try:
        validate_traceparent(traceparent)
    except ValueError:
        return None, None
    try:
        return traceparent, None if tracestate is None else validate_tracestate(tracestate)
    except ValueError:
        return traceparent, None
