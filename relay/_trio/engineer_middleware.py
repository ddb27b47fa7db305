"""ASGI middleware of the engineer listener: the request head cap, ambiguous
requests and security headers.

:class:`RequestHeadLimit` refuses a request or a WebSocket upgrade whose request
line and headers together are larger than ``max_request_head_bytes`` (8 KiB) with
431, before any route or authentication runs. Hypercorn's own limit (h11's
``max_incomplete_event_size``) applies only while a head is still arriving in
pieces: a head that comes in one read is parsed whatever its size. So the cap is
checked here, on the parsed head, for every request. h11's limit stays as the
memory bound per connection (64 KiB, relay._trio.http): a head beyond it gets
Hypercorn's bare 431 and the connection is closed.

:class:`AmbiguousRequest` refuses with 400 a request with two session cookies
and an upgrade with two ``Sec-WebSocket-Key`` headers.

:class:`SecurityHeaders` adds HSTS, CSP, nosniff and no-referrer to every HTTP
answer, including the HTTP answer that refuses a WebSocket upgrade, and
``Cache-Control: no-store`` to everything under ``/api/``. The console page
brings its own policy (:data:`CONSOLE_CSP`, the same with one relaxation for
the terminal's styles), which the middleware leaves alone.
"""

from __future__ import annotations

import json
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay.api_contract import SESSION_COOKIE
from relay.metrics import RelayMetrics

__all__ = [
    "CONSOLE_CSP",
    "CSP",
    "AmbiguousRequest",
    "RequestHeadLimit",
    "SecurityHeaders",
    "request_head_bytes",
]

#: The listener's Content-Security-Policy, on every answer but the console page.
CSP: Final = (
    "default-src 'self'; script-src 'self'; object-src 'none'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
#: The console page's policy: :data:`CSP` with two relaxations, one for styles
#: and one for WebAssembly, and no form submission at all.
#:
#: Why ``style-src 'self' 'unsafe-inline'``: xterm.js 6.0's DOM renderer puts
#: its theme (the 16/256 colour classes, cursor, selection), its cell size and
#: its scrollbar colours into ``<style>`` elements it creates, and 24-bit colours
#: into ``style`` attributes of the cells (Chromium reports them as
#: ``style-src-elem`` and ``style-src-attr`` violations under :data:`CSP`; the
#: terminal then has no colours, no cursor and an invisible selection). The
#: contents change with the theme, the font size and the terminal's instance, so
#: hashes cannot list them, and xterm gives its elements no nonce. The session
#: player (asciinema-player) sets its size and colours in ``style`` attributes
#: too. Scripts stay ``'self'`` only (no inline script, no ``eval``): the page
#: has no inline script and no inline style in its HTML, and writes every text
#: it did not write itself with ``textContent``, so an injected style would need
#: an HTML injection first.
#:
#: Why ``script-src ... 'wasm-unsafe-eval'``: the auditors' session player,
#: asciinema-player 3.x (vendored, served from ``'self'``), runs its terminal
#: emulator as WebAssembly that its own module carries inline (base64) and
#: compiles with ``WebAssembly.instantiate``; under ``script-src 'self'`` alone
#: Chromium refuses the compilation and the player shows nothing. The keyword
#: allows compiling WebAssembly only: it does not allow ``eval``, ``new
#: Function``, inline scripts or scripts from elsewhere, so only the page's own
#: modules (``'self'``) can compile any. ``form-action 'none'``: the
#: page's forms are sent by its script; if the script did not load, a form must
#: not put a password into a URL.
CONSOLE_CSP: Final = (
    "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; "
    "style-src 'self' 'unsafe-inline'; "
    "object-src 'none'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'"
)

_SECURITY_HEADERS: Final = (
    (b"strict-transport-security", b"max-age=31536000"),
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)
_HEAD_TOO_LARGE_BODY: Final = json.dumps(
    {"error": "request header fields too large"}
).encode()


def request_head_bytes(scope: Scope) -> int:
    """The size of the request line and headers of *scope*, as they came on the wire.

    ``METHOD SP target SP HTTP/1.1 CRLF``, each ``name: value CRLF``, and the
    final CRLF; WebSocket scopes are upgrades of a GET.
    """
    method = scope.get("method", "GET")
    target = len(scope.get("raw_path") or scope["path"].encode())
    query = scope.get("query_string", b"")
    if query:
        target += 1 + len(query)
    size = len(method) + 1 + target + len(" HTTP/1.1\r\n") + 2
    for name, value in scope.get("headers", ()):
        size += len(name) + 2 + len(value) + 2
    return size


class RequestHeadLimit:
    """ASGI middleware: 431 for a request or upgrade with a head over *max_bytes*."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, metrics: RelayMetrics) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if request_head_bytes(scope) <= self.max_bytes:
            await self.app(scope, receive, send)
            return
        self.metrics.engineer_refusals.labels("head_too_large").inc()
        prefix = "websocket." if scope["type"] == "websocket" else ""
        if prefix and "websocket.http.response" not in scope.get("extensions", {}):
            # No way to answer an upgrade with a status: refuse it outright.
            await send({"type": "websocket.close", "code": 1008, "reason": ""})
            return
        await send(
            {
                "type": f"{prefix}http.response.start",
                "status": 431,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(_HEAD_TOO_LARGE_BODY)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send(
            {"type": f"{prefix}http.response.body", "body": _HEAD_TOO_LARGE_BODY}
        )


def _count_session_cookies(scope: Scope) -> int:
    """How many ``SESSION_COOKIE`` pairs the request's Cookie headers carry."""
    wanted = SESSION_COOKIE.encode()
    return sum(
        1
        for name, value in scope.get("headers", ())
        if name == b"cookie"
        for pair in value.split(b";")
        if pair.split(b"=", 1)[0].strip() == wanted
    )


class AmbiguousRequest:
    """ASGI middleware: 400 for a request that says one thing twice.

    Two session cookies (e.g. one tossed in by a sibling domain, next to the
    real one) leave which session is meant to the parser's whim: the request
    must carry exactly one (BRIEF: "exactly one session cookie"). A WebSocket
    upgrade with two ``Sec-WebSocket-Key`` headers is malformed (RFC 6455
    §4.2.1 asks for one); Hypercorn would take the last. Counted in
    ``relay_engineer_refusals_total`` as ``duplicate_session_cookie`` and
    ``duplicate_websocket_key``.
    """

    def __init__(self, app: ASGIApp, *, metrics: RelayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        reason = None
        if _count_session_cookies(scope) > 1:
            reason = "duplicate_session_cookie"
        elif scope["type"] == "websocket" and (
            sum(
                1
                for name, _ in scope.get("headers", ())
                if name == b"sec-websocket-key"
            )
            > 1
        ):
            reason = "duplicate_websocket_key"
        if reason is None:
            await self.app(scope, receive, send)
            return
        self.metrics.engineer_refusals.labels(reason).inc()
        prefix = "websocket." if scope["type"] == "websocket" else ""
        if prefix and "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008, "reason": ""})
            return
        body = json.dumps({"error": reason.replace("_", " ")}).encode()
        await send(
            {
                "type": f"{prefix}http.response.start",
                "status": 400,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": f"{prefix}http.response.body", "body": body})


class SecurityHeaders:
    """ASGI middleware: security headers on every HTTP answer.

    A header the application already set is left alone; ``Cache-Control:
    no-store`` is forced on every path under ``/api/``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        api = str(scope.get("path", "")).startswith("/api/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] in (
                "http.response.start",
                "websocket.http.response.start",
            ):
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if not (api and name.lower() == b"cache-control")
                ]
                present = {name.lower() for name, _ in headers}
                headers.extend(h for h in _SECURITY_HEADERS if h[0] not in present)
                if api:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
