"""Reading a JSON request body on the engineer listener, bounded.

One reader for every route that takes a body: the content type is checked first
(415), then the declared length (413 before a byte is read), then the length
while the body streams in (413 as soon as it passes the cap, for chunked bodies
that declare nothing), then the JSON itself (400). The stream is closed when the
reader stops early, not whenever the garbage collector gets to it.
"""

from __future__ import annotations

import json
from contextlib import aclosing
from typing import Any, Final

from starlette.requests import Request

__all__ = ["BadBody", "read_json_body"]


class BadBody(Exception):
    """The body cannot be used; ``status`` and ``reason`` say why.

    ``reason`` is one of ``unsupported_media_type`` (415), ``body_too_large``
    (413) and ``bad_json`` (400).
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    @property
    def message(self) -> str:
        """The short answer for the client: ``unsupported media type``,
        ``request body too large`` or ``bad request``."""
        return _MESSAGES[self.status]


_MESSAGES: Final = {
    415: "unsupported media type",
    413: "request body too large",
    400: "bad request",
}


async def read_json_body(request: Request, max_bytes: int) -> Any:
    """The parsed JSON body of *request*, which must be at most *max_bytes*.

    Raises:
        BadBody: Not ``application/json``, too large, or not valid JSON.
    """
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise BadBody(415, "unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise BadBody(413, "body_too_large")
    body = bytearray()
    async with aclosing(request.stream()) as chunks:
        async for chunk in chunks:
            body += chunk
            if len(body) > max_bytes:
                raise BadBody(413, "body_too_large")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        # ValueError: malformed JSON, undecodable bytes, over-long integers;
        # RecursionError: nesting deeper than the parser's stack.
        raise BadBody(400, "bad_json") from None
