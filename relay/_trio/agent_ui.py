"""The agent's local device UI: the integration API, a stand-in page, a terminal prompt.

Theory of operation
===================
An instrument's own touchscreen software talks to the agent over a small local
HTTP API (the "device UI integration API"); our stand-in page at ``/`` uses the
same routes:

``GET /api/state``
    ``{"offer": {...} | null, "session": {...} | null, "last_end": {...} | null}``
    (:meth:`~relay._trio.agent_sessions.SessionRuntime.state`).
``POST /api/grant``, ``/api/deny``, ``/api/end`` with ``{"session_id": "..."}``
    Answer the pending offer, or end the running session (reason ``onsite``).
    A session id that is not the current offer or session: 409.

With the monitoring feed, ``/api/state`` also has ``"data_requests"``: the last
requests for the instrument's configuration or consumables (who, what, when,
answered or refused; :meth:`relay._trio.agent_feed.AgentFeed.recent_requests`),
which the page lists so the person at the instrument sees who read what.

Who may call it. The API grants remote access to the instrument, so it must be
reachable only by the person in front of it. It listens on loopback by default
(``AgentConfig.ui_listen``; another address only with ``ui_allow_remote``), and
every request is checked against DNS rebinding and cross-site use:

* the ``Host`` header must name the address the UI is bound to (``127.0.0.1:7070``,
  or ``localhost:7070`` for a loopback bind). A web page on ``evil.example`` that
  rebinds its name to 127.0.0.1 still sends ``Host: evil.example:7070`` and gets
  403, so it can neither read the state nor answer an offer;
* a ``POST`` must carry ``Content-Type: application/json`` (a cross-site form
  cannot send it without a CORS preflight, which we never answer) and, if the
  browser sends ``Origin``, the origin must be our own;
* answers carry ``Content-Security-Policy: default-src 'self'; frame-ancestors
  'none'`` (no inline script, no framing: a Grant button cannot be clickjacked)
  and ``Cache-Control: no-store``.

Not checked: who the local caller is. Any local process can call the API, as any
local user could click the screen; the instrument maker keeps untrusted code off
the instrument.

The page is the package's ``relay/console/device.html`` with one module script
(``/console/device.js``) that polls ``/api/state`` every second and posts the
buttons' answers; all text from the offer is inserted with ``textContent``,
never as HTML. It shares the engineers' console's style sheet, countdown and
end wording (``/console/console.css``, ``common.js``, ``end-wording.js``):
:class:`relay.console.ConsoleFiles` serves those files and no others here.

:class:`TerminalPrompt` is a :class:`~relay._trio.agent_sessions.Decider` for
headless devices (``relay agent run --prompt``): it prints the offer and reads
``y`` or ``n`` from a terminal.
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay._trio.agent_sessions import OfferView, SessionRuntime, StaleSession
from relay._trio.http import serve_http
from relay.config import ListenAddress, is_loopback_host
from relay.console import DEVICE_ASSETS, ConsoleFiles

__all__ = ["TerminalPrompt", "agent_ui_app", "serve_agent_ui"]

CSP: Final = "default-src 'self'; frame-ancestors 'none'"
#: Largest JSON body accepted by the POST routes.
MAX_BODY_BYTES: Final = 1024


class _Binding:
    """The address the UI answers for; the port is known once it is bound."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.port: int | None = None

    def hosts(self) -> frozenset[str]:
        if self.port is None:
            return frozenset()
        host = f"[{self.host}]" if ":" in self.host else self.host
        names = {f"{host}:{self.port}"}
        if is_loopback_host(self.host):
            names.add(f"localhost:{self.port}")
        return frozenset(names)

    def origins(self) -> frozenset[str]:
        return frozenset(f"http://{name}" for name in self.hosts())


class _LocalOnly:
    """Refuse requests for another Host (DNS rebinding); add the security headers."""

    def __init__(self, app: ASGIApp, binding: _Binding) -> None:
        self.app = app
        self.binding = binding

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1")
            for k, v in scope["headers"]
        }
        response: Response | None = None
        if headers.get("host", "") not in self.binding.hosts():
            response = JSONResponse({"error": "unknown host"}, status_code=403)
        elif scope["method"] == "POST":
            origin = headers.get("origin")
            content_type = headers.get("content-type", "").split(";")[0].strip()
            if origin is not None and origin not in self.binding.origins():
                response = JSONResponse(
                    {"error": "cross-origin request"}, status_code=403
                )
            elif content_type != "application/json":
                response = JSONResponse(
                    {"error": "expected application/json"}, status_code=415
                )

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [
                    (b"content-security-policy", CSP.encode()),
                    (b"cache-control", b"no-store"),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                ]
                # Ours replace any the route set (the page's no-cache).
                names = {name for name, _ in extra}
                kept = [h for h in message.get("headers", []) if h[0] not in names]
                message = {**message, "headers": [*kept, *extra]}
            await send(message)

        if response is not None:
            await response(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


def agent_ui_app(
    runtime: SessionRuntime,
    binding: _Binding,
    data_requests: Callable[[], list[dict[str, Any]]] | None = None,
) -> ASGIApp:
    """The device UI's routes, behind the Host/Origin checks."""

    def full_state() -> dict[str, Any]:
        state = runtime.state()
        if data_requests is not None:
            state = {**state, "data_requests": data_requests()}
        return state

    files = ConsoleFiles(assets=DEVICE_ASSETS)

    async def page(_request: Request) -> Response:
        return files.page("device.html", csp=CSP)

    async def asset(request: Request) -> Response:
        return files.asset(request, str(request.path_params["path"]))

    async def state(_request: Request) -> Response:
        return JSONResponse(full_state())

    def action(
        act: Callable[[str], None],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def route(request: Request) -> Response:
            body = await request.body()
            if len(body) > MAX_BODY_BYTES:
                return JSONResponse({"error": "body too large"}, status_code=413)
            try:
                data = json.loads(body)
            except ValueError:
                return JSONResponse({"error": "body is not JSON"}, status_code=400)
            session_id = data.get("session_id") if isinstance(data, dict) else None
            if not isinstance(session_id, str):
                return JSONResponse(
                    {"error": "session_id is required"}, status_code=400
                )
            try:
                act(session_id)
            except StaleSession as exc:
                return JSONResponse({"error": str(exc)}, status_code=409)
            return JSONResponse(full_state())

        return route

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/console/{path:path}", asset),
            Route("/api/state", state),
            Route("/api/grant", action(runtime.grant), methods=["POST"]),
            Route("/api/deny", action(runtime.deny), methods=["POST"]),
            Route("/api/end", action(runtime.end), methods=["POST"]),
        ]
    )
    return _LocalOnly(app, binding)


async def serve_agent_ui(
    runtime: SessionRuntime,
    listen: ListenAddress,
    *,
    data_requests: Callable[[], list[dict[str, Any]]] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the device UI on *listen* until cancelled; reports the bound port.

    *listen* is taken as given: ``AgentConfig`` refuses a non-loopback address
    unless ``ui_allow_remote`` is set. *data_requests* gives the recent data
    requests the page lists (the feed's ``recent_requests``).
    """
    binding = _Binding(listen.host)
    app: Any = agent_ui_app(runtime, binding, data_requests)
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(serve_http, app, listen)
        binding.port = port
        task_status.started(port)


# The terminal prompt ---------------------------------------------------------------


def _printable(text: str) -> str:
    # The offer's text comes from the network: no escape sequence reaches the
    # terminal (it could rewrite what the person reads).
    return "".join(
        ch if ch == " " or unicodedata.category(ch)[0] not in "CZ" else "?"
        for ch in text
    )


class TerminalPrompt:
    """Ask the on-site person on a terminal: print the offer, read ``y`` or ``n``.

    Args:
        receive: Where answers are read from (the terminal).
        send: Where the prompt is written.
    """

    label = "terminal"

    def __init__(
        self, receive: trio.abc.ReceiveStream, send: trio.abc.SendStream
    ) -> None:
        self._receive = receive
        self._send = send
        self._buffer = bytearray()

    @classmethod
    def on_stdio(cls) -> TerminalPrompt:
        """A prompt on the process's own terminal (stdin, stderr)."""
        return cls(trio.lowlevel.FdStream(os.dup(0)), trio.lowlevel.FdStream(os.dup(2)))

    async def decide(self, offer: OfferView) -> bool:
        """Print *offer* and wait for ``y``/``yes`` or ``n``/``no``."""
        lines = [
            "",
            "Remote access requested",
            f"  engineer: {_printable(offer.engineer)}"
            + (f" ({_printable(offer.engineer_role)})" if offer.engineer_role else ""),
            f"  reason:   {_printable(offer.reason)}",
            f"  access:   {', '.join(offer.channels)}",
            f"  for:      at most {offer.max_seconds // 60} min {offer.max_seconds % 60} s",
        ]
        if offer.refused_channels:
            lines.append(
                f"  refused:  {', '.join(offer.refused_channels)} (not allowed here)"
            )
        await self._write("\n".join(lines) + "\n")
        while True:
            await self._write("Allow? [y/n] ")
            line = await self._read_line()
            if line is None:
                return False  # the terminal is gone: no answer is a no
            answer = line.strip().lower()
            if answer in ("y", "yes"):
                return True
            if answer in ("n", "no"):
                return False

    async def _write(self, text: str) -> None:
        await self._send.send_all(text.encode())

    async def _read_line(self) -> str | None:
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_BODY_BYTES:
                self._buffer.clear()  # an overlong line is not an answer
            data = await self._receive.receive_some(MAX_BODY_BYTES)
            if not data:
                return None
            self._buffer += data
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer[:] = rest
        return line.decode(errors="replace")
