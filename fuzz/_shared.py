"""Helpers the targets share (kept free of atheris, so tests can import them)."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

_T = TypeVar("_T")


def run_without_io(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine that never has to wait (its I/O is all in memory).

    Raises:
        RuntimeError: The coroutine waited for something after all.
    """
    try:
        coroutine.send(None)
    except StopIteration as done:
        result: _T = done.value
        return result
    coroutine.close()
    raise RuntimeError("the coroutine waited; it needs an event loop")


def json_request(body: bytes, content_type: bytes = b"application/json") -> Request:
    """A POST request whose body arrives in 4 KiB pieces, as from a socket."""
    chunks = [body[i : i + 4096] for i in range(0, len(body), 4096)] or [b""]

    async def receive() -> dict[str, Any]:
        chunk = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/api/v1/enrollments",
        "headers": [(b"content-type", content_type)],
        "query_string": b"",
        "client": ("192.0.2.1", 40000),
    }
    return Request(scope, receive)
