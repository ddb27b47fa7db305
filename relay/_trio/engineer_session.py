"""``relay shell`` and ``relay forward``: a remote session from the engineer's terminal.

Theory of operation
===================
:func:`run_session` asks the broker for a session (``POST /api/v1/sessions``),
attaches to it (``/api/v1/sessions/{id}/attach``, bearer token, our WebSocket
client with text accepted for the broker's status messages) and runs a
:class:`~relay._trio.tunnel_mux.TunnelMux` on the socket. The broker's status
messages drive what the engineer sees on stderr: the wait for the person at the
instrument, the grant and the remaining time, the T-10 and T-1 warnings, and the
end with its reason. Once the session is active, the *work* runs: a shell
(:func:`shell_work`) or a port forward (:func:`forward_work`).

Ending, every way out: the work finishes (the remote shell exited) or the engineer
presses Ctrl-C (``forward``; in ``shell`` Ctrl-C goes to the remote shell): the
session is ended with ``DELETE``; then the broker closes the socket with 4005 and
the reason. The broker may end it first (on-site person, time cap, denial ...):
the work is cancelled. :data:`EXIT_CODES` gives each end reason its own exit
status, so scripts can tell them apart.

The terminal is put in raw mode only while the shell runs, and restored on every
way out (including cancellation and errors), together with the blocking mode of
stdin and stdout, which trio's fd streams change.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import termios
import tty
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from http import HTTPStatus
from typing import Any, Final, TextIO
from urllib.parse import urlsplit

import trio

from relay._trio.tunnel_mux import MuxStream, StreamClosed, StreamRefused, TunnelMux
from relay._trio.websocket import (
    ConnectionClosed,
    HandshakeFailed,
    WebSocketConnection,
    connect_websocket,
)
from relay.config import WebSocketLimits
from relay.end_wording import END_WORDING as END_WORDING
from relay.engineer_client import ApiError, Credentials, api_call
from relay.proto import tunnel
from relay.proto.close import CloseCode
from relay.proto.tunnel import Side

__all__ = [
    "EXIT_CODES",
    "SessionOutcome",
    "SessionStatus",
    "forward_work",
    "run_session",
    "shell_work",
]

#: Exit status of ``relay shell`` / ``relay forward`` by end reason. 1 is an error
#: before the session existed, 2 a usage error, 3 a refused request (busy, policy).
EXIT_CODES: Final = {
    "engineer": 0,
    "onsite": 10,
    "time_cap": 11,
    "admin": 12,
    "denied": 13,
    "grant_timeout": 14,
    "device_disconnect": 15,
    "engineer_disconnect": 16,
    "revoked": 17,
    "login_ended": 18,
    "broker_shutdown": 19,
    "audit_failure": 20,
    "cancelled": 21,
    "device_shutdown": 22,
    "policy_revoked": 23,
    "broker_crash": 24,
}
#: Exit status for an end reason this client does not know (a newer broker).
UNKNOWN_END_EXIT: Final = 29

_END_WAIT_S: Final = 5.0


@dataclass
class SessionOutcome:
    """How a session went, for the exit status."""

    session_id: str
    end_reason: str | None

    @property
    def exit_code(self) -> int:
        if self.end_reason is None:
            return UNKNOWN_END_EXIT
        return EXIT_CODES.get(self.end_reason, UNKNOWN_END_EXIT)


def _time_left(warning: dict[str, Any]) -> str:
    # Minutes from one minute on; seconds when a short test cap warns earlier.
    seconds = warning.get("seconds_left")
    if type(seconds) is int and 0 < seconds < 60:
        return f"{seconds} s"
    return f"{warning.get('minutes_left')} min"


@dataclass
class SessionStatus:
    """The broker's status messages, as the engineer sees them on *out*."""

    out: TextIO
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    state: str = "requested"
    ends_at_ms: int | None = None
    end_reason: str | None = None
    active: trio.Event = field(default_factory=trio.Event)
    ended: trio.Event = field(default_factory=trio.Event)

    def on_text(self, text: str) -> None:
        """Handle one status message (malformed ones are shown, not fatal)."""
        try:
            message = json.loads(text)
            kind = message["type"]
        except (ValueError, KeyError, TypeError):
            self._say(f"unexpected status from the relay: {text[:200]!r}")
            return
        if kind == "state":
            self._state(str(message.get("state")), message.get("ends_at_ms"))
        elif kind == "warning":
            self._say(f"warning: {_time_left(message)} left in this session")
        elif kind == "end":
            self.end(str(message.get("reason")))

    def end(self, reason: str) -> None:
        """Record the end (the first reason is kept) and say it."""
        if self.end_reason is None:
            self.end_reason = reason
            wording = END_WORDING.get(reason, reason)
            self._say(f"session ended: {wording}")
        self.ended.set()
        self.active.set()  # wake whoever waits for the start

    def _state(self, state: str, ends_at_ms: object) -> None:
        self.state = state
        if isinstance(ends_at_ms, int):
            self.ends_at_ms = ends_at_ms
        if state == "offered":
            self._say("waiting for the person at the instrument to allow access ...")
        elif state == "granted":
            self._say(f"access granted; {self._remaining()}")
        elif state == "active":
            self._say(f"session active; {self._remaining()}")
            self.active.set()

    def _remaining(self) -> str:
        if self.ends_at_ms is None:
            return "no end time given"
        left_s = max(0, self.ends_at_ms / 1000 - self.now().timestamp())
        minutes, seconds = divmod(int(left_s), 60)
        return f"{minutes} min {seconds:02d} s left"

    def _say(self, text: str) -> None:
        # \r\n: the terminal may be in raw mode while the shell runs.
        self.out.write(f"[relay] {text}\r\n")
        self.out.flush()


Work = Callable[[TunnelMux, SessionStatus], Awaitable[None]]


async def run_session(
    credentials: Credentials,
    *,
    device_id: str,
    reason: str,
    channels: list[str],
    work: Work,
    out: TextIO = sys.stderr,
    limits: WebSocketLimits | None = None,
) -> SessionOutcome:
    """Request, attach, run *work* while active, end; see the module docstring.

    A session that ended before the attach socket got there (410: the person
    at the instrument was quicker, or the broker could not keep the grant)
    is reported with the end reason the broker gives for it.

    Raises:
        ApiError: The request was refused (busy, policy, unknown device ...) or the
            broker could not be reached.
        HandshakeFailed: The attach socket was refused (other than 410).
    """
    created = await trio.to_thread.run_sync(
        partial(
            api_call,
            credentials,
            "POST",
            "/api/v1/sessions",
            {"device_id": device_id, "reason": reason, "channels": channels},
        )
    )
    session_id = str(created["session_id"])
    status = SessionStatus(out)
    status._say(f"session {session_id} requested for {device_id}")
    try:
        async with _attach(credentials, session_id, limits) as ws:
            mux = TunnelMux(ws, side=Side.ENGINEER, on_text=status.on_text)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_run_mux, mux, status, nursery.cancel_scope)
                await status.active.wait()
                if not status.ended.is_set():
                    with _cancel_on_end(status, nursery):
                        await work(mux, status)
                if not status.ended.is_set():
                    await _end_session(credentials, session_id)
                with trio.move_on_after(_END_WAIT_S):
                    await status.ended.wait()
                nursery.cancel_scope.cancel()
    except HandshakeFailed as refused:
        if refused.status != HTTPStatus.GONE:
            with trio.CancelScope(shield=True):
                await _end_session(credentials, session_id)
            raise
        view = await trio.to_thread.run_sync(
            partial(api_call, credentials, "GET", f"/api/v1/sessions/{session_id}")
        )
        status.end(str(view.get("end_reason") or "ended"))
    except BaseException:
        if not status.ended.is_set():
            with trio.CancelScope(shield=True), contextlib.suppress(ApiError):
                await _end_session(credentials, session_id)
        raise
    return SessionOutcome(session_id, status.end_reason)


@contextlib.contextmanager
def _cancel_on_end(status: SessionStatus, nursery: trio.Nursery) -> Iterator[None]:
    """Cancel the work when the broker ends the session first."""
    with trio.CancelScope() as scope:

        async def watch() -> None:
            await status.ended.wait()
            scope.cancel()

        nursery.start_soon(watch)
        yield


async def _run_mux(
    mux: TunnelMux, status: SessionStatus, cancel_scope: trio.CancelScope
) -> None:
    try:
        await mux.run()
    except ConnectionClosed as closed:
        if closed.code == CloseCode.SESSION_ENDED and closed.reason:
            status.end(closed.reason)
        else:
            status.end("engineer_disconnect")
    finally:
        status.ended.set()
        status.active.set()


async def _end_session(credentials: Credentials, session_id: str) -> None:
    with contextlib.suppress(ApiError):
        await trio.to_thread.run_sync(
            partial(api_call, credentials, "DELETE", f"/api/v1/sessions/{session_id}")
        )


@asynccontextmanager
async def _attach(
    credentials: Credentials, session_id: str, limits: WebSocketLimits | None
) -> AsyncIterator[WebSocketConnection]:
    parts = urlsplit(credentials.broker)
    host, port = parts.hostname or "", parts.port or 443
    limits = limits or WebSocketLimits()
    stream = await trio.open_ssl_over_tcp_stream(
        host, port, ssl_context=credentials.ssl_context(), https_compatible=True
    )
    url = f"wss://{parts.netloc}/api/v1/sessions/{session_id}/attach"
    try:
        async with connect_websocket(
            stream,
            url,
            limits,
            extra_headers=[("Authorization", f"Bearer {credentials.token}")],
            accept_text=True,
        ) as ws:
            yield ws
    except HandshakeFailed:
        await trio.aclose_forcefully(stream)
        raise


# --- the work: a shell ----------------------------------------------------------


async def shell_work(
    mux: TunnelMux,
    status: SessionStatus,
    *,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
) -> None:
    """The device's shell on this terminal, raw, following its size."""
    cols, rows = _terminal_size(stdout_fd)
    try:
        stream = await mux.open_stream("shell", cols=cols, rows=rows)
    except StreamRefused as refused:
        status._say(f"the instrument refused a shell: {refused}")
        return
    with _raw_terminal(stdin_fd), _blocking_restored(stdin_fd, stdout_fd):
        input_stream = trio.lowlevel.FdStream(os.dup(stdin_fd))
        output_stream = trio.lowlevel.FdStream(os.dup(stdout_fd))
        async with input_stream, output_stream, trio.open_nursery() as nursery:

            async def keyboard() -> None:
                while data := await input_stream.receive_some(4096):
                    await stream.send_all(data)
                await stream.send_eof()

            async def resizes() -> None:
                with trio.open_signal_receiver(signal.SIGWINCH) as signals:
                    async for _ in signals:
                        await stream.resize(*_terminal_size(stdout_fd))

            nursery.start_soon(keyboard)
            nursery.start_soon(resizes)
            with contextlib.suppress(StreamClosed, trio.BrokenResourceError):
                while data := await stream.receive_some():
                    await output_stream.send_all(data)
            nursery.cancel_scope.cancel()
        await stream.aclose()


def _terminal_size(fd: int) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 80, 24
    return max(1, min(size.columns, 1000)), max(1, min(size.lines, 1000))


@contextlib.contextmanager
def _raw_terminal(fd: int) -> Iterator[None]:
    """Raw mode for the block, if *fd* is a terminal; always restored."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _blocking_restored(*fds: int) -> Iterator[None]:
    """trio's FdStream makes the (shared) file descriptions non-blocking."""
    saved = [(fd, os.get_blocking(fd)) for fd in fds]
    try:
        yield
    finally:
        for fd, blocking in saved:
            with contextlib.suppress(OSError):
                os.set_blocking(fd, blocking)


# --- the work: a port forward ---------------------------------------------------


async def forward_work(
    mux: TunnelMux,
    status: SessionStatus,
    *,
    local_port: int,
    device_port: int,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Forward 127.0.0.1:*local_port* to the device's *device_port*, one stream
    per accepted connection, until the session ends or Ctrl-C."""
    listeners = await trio.open_tcp_listeners(local_port, host="127.0.0.1")
    bound = listeners[0].socket.getsockname()[1]
    status._say(
        f"forwarding 127.0.0.1:{bound} to port {device_port} of the instrument (Ctrl-C ends)"
    )
    task_status.started(bound)
    async with trio.open_nursery() as nursery:

        async def one(connection: trio.SocketStream) -> None:
            async with connection:
                try:
                    stream = await mux.open_stream(f"tcp:{device_port}")
                except StreamRefused as refused:
                    status._say(f"the instrument refused port {device_port}: {refused}")
                    return
                except StreamClosed:
                    return
                await _pump(connection, stream)

        nursery.start_soon(partial(trio.serve_listeners, one, listeners))
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()


async def _pump(connection: trio.SocketStream, stream: MuxStream) -> None:
    """Both directions until both are done, or the device closes the stream."""
    async with trio.open_nursery() as nursery:

        async def upstream() -> None:
            with contextlib.suppress(StreamClosed, trio.BrokenResourceError):
                # At most one DATA frame's payload per read: a 64 KiB read
                # would go out as a full frame plus a 5-byte one, twice the
                # messages through every hop for the same bytes.
                while data := await connection.receive_some(tunnel.MAX_DATA_BYTES):
                    await stream.send_all(data)
                await stream.send_eof()

        nursery.start_soon(upstream)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await stream.receive_some():
                await connection.send_all(data)
            await connection.send_eof()
        if stream.peer_closed:
            # Closed, not half-closed: nothing more can go either way.
            nursery.cancel_scope.cancel()
    await stream.aclose()
