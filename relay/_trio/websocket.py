"""A small trio WebSocket transport on websockets' sans-I/O core.

Theory of operation
===================
websockets' ``ServerProtocol``/``ClientProtocol`` parse and serialise frames and run
the opening and closing handshakes without touching a socket. This module drives one
of them over a trio stream (normally a ``trio.SSLStream`` whose TLS handshake the
caller has already done, so that the caller can check the peer certificate first).

An open connection runs three tasks:

* the **reader** reads the stream, feeds the protocol, assembles whole binary
  messages and puts them on a bounded queue. It never awaits a socket write:
  protocol-generated frames (pongs, the close echo) are moved to the outgoing queue
  and the writer is woken. When the queue is full the reader stops reading, which
  is TCP backpressure on the peer.
* the **writer** sends everything queued in one ``send_all`` per wake-up, so many
  small frames become one TLS record (trio's TLS costs about 100 us per record).
  ``send_message`` waits while more than ``send_buffer_bytes`` are queued.
* the **keepalive** pings every ``ping_interval_s`` and declares the peer dead when
  nothing at all has arrived for ``ping_interval_s * ping_missed_max``.

Rules:

1. Only the writer writes to the stream, except during the opening handshake, which
   happens before the tasks start.
2. Only binary messages exist on relay channels: a text frame fails the connection
   with 1003; a message above ``max_message_bytes`` fails it with 1009 (enforced by
   the protocol while parsing, so the buffer never grows past the cap).
3. No compression extension is ever offered or accepted.
4. Every wait on the peer has a deadline from :class:`~relay.config.WebSocketLimits`;
   the caller applies the handshake deadline around the whole opening phase.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHeaderValue, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import SEND_EOF, Protocol, State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from relay.config import WebSocketLimits
from relay.proto.close import CloseCode

#: A keepalive wait is ping_interval_s shortened by up to this fraction, at random.
_PING_JITTER = 0.25
#: Timing jitter only; nothing secret is drawn from it.
_jitter = random.Random()  # noqa: S311


class _CloseMidMessage:
    """A close frame between two fragments of a message ends the connection
    like any other close: the peer's code is echoed (RFC 6455 5.4 lets control
    frames sit between fragments; 5.5.1: the endpoint "typically echos the
    status code it received"). websockets fails the connection with 1002
    "incomplete fragmented message" instead (Autobahn case 7.1.5). The message
    being assembled can never complete, so it is dropped first.
    """

    current_size: int | None

    def recv_frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.CLOSE:
            self.current_size = None
        super().recv_frame(frame)  # type: ignore[misc]


class _ServerProtocol(_CloseMidMessage, ServerProtocol):
    pass


class _ClientProtocol(_CloseMidMessage, ClientProtocol):
    pass


class WebSocketError(Exception):
    """Base class of this module's errors."""


class HandshakeFailed(WebSocketError):
    """The opening handshake did not complete.

    Attributes:
        status: The HTTP status the server answered with, when there was one.
        body: The response body (server's explanation), possibly empty.
    """

    def __init__(
        self, message: str, *, status: int | None = None, body: bytes = b""
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class ConnectionClosed(WebSocketError):
    """The connection is closed; ``code`` and ``reason`` say how.

    ``code`` is the code the peer sent, or the one we sent when we closed first
    (e.g. 1009 after an oversized message), or 1006 when the connection dropped.
    ``by_us`` is True when this side closed or dropped the connection first (the
    transport failing it for the peer's bad input included), False when the peer
    closed it or it was lost.
    """

    def __init__(self, code: int, reason: str, *, by_us: bool = False) -> None:
        super().__init__(f"connection closed: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason
        self.by_us = by_us


@dataclass(frozen=True, slots=True)
class _LocalClose:
    code: int
    reason: str


class WebSocketConnection:
    """One open WebSocket: whole binary messages in and out.

    Create it with :func:`accept_websocket` or :func:`connect_websocket`, which own
    its tasks.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        protocol: Protocol,
        limits: WebSocketLimits,
        *,
        early_events: Sequence[object] = (),
        accept_text: bool = False,
    ) -> None:
        self.stream = stream
        # Text messages are a protocol error unless the application takes them
        # (the engineer CLI reads the broker's JSON status on the attach socket).
        self._accept_text = accept_text
        self._fragments_text = False
        # Frames that arrived in the same read as the handshake (a peer that
        # speaks first); the reader handles them before reading more.
        self._early_events = list(early_events)
        self._protocol = protocol
        self._limits = limits
        self._outgoing: deque[bytes] = deque()
        self._outgoing_bytes = 0
        self._writer_wakeup = trio.Event()
        self._space = trio.lowlevel.ParkingLot()
        self._inbound_send, self._inbound_receive = trio.open_memory_channel[
            bytes | str
        ](limits.receive_queue_messages)
        self._fragments: list[bytes] = []
        self._discarding = False  # set when we fail the connection ourselves
        self._last_received = trio.current_time()
        self._delivering = False  # the reader waits for the application to read
        self._closed = trio.Event()
        self._closing = trio.Event()  # set once the state has left OPEN
        self._local_close: _LocalClose | None = None
        self._stream_closed = False
        # Statistics for metrics and the end-of-session byte counts.
        self.bytes_received = 0
        self.bytes_sent = 0

    # Public API -----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the connection is closed, whoever closed it."""
        return self._closed.is_set()

    @property
    def close_code(self) -> int | None:
        """How the connection closed, or None while it is open."""
        return self._close_info()[0] if self.closed else None

    @property
    def close_reason(self) -> str | None:
        """The close reason, or None while the connection is open."""
        return self._close_info()[1] if self.closed else None

    async def send_message(self, data: bytes) -> None:
        """Send one binary message.

        Waits while more than ``send_buffer_bytes`` are queued for the socket.

        Raises:
            ConnectionClosed: The connection is closing or closed.
        """
        while (
            self._outgoing_bytes >= self._limits.send_buffer_bytes
            and not self._stream_closed
        ):
            await self._space.park()
        if self._protocol.state is not State.OPEN or self._stream_closed:
            raise self._closed_error()
        self._protocol.send_binary(data)
        self._pump()
        await trio.lowlevel.checkpoint()

    async def receive_message(self) -> bytes:
        """Receive the next binary message (on a connection without text).

        Raises:
            ConnectionClosed: The connection closed; no more messages will come.
        """
        message = await self.receive()
        if isinstance(message, str):  # pragma: no cover - only with accept_text
            raise TypeError("a text message arrived: use receive()")
        return message

    async def receive(self) -> bytes | str:
        """Receive the next message: bytes, or str for a text message when the
        connection was opened with ``accept_text``.

        Raises:
            ConnectionClosed: The connection closed; no more messages will come.
        """
        try:
            return await self._inbound_receive.receive()
        except trio.EndOfChannel:
            await self._closed.wait()
            raise self._closed_error() from None

    async def aclose(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close politely: send a close frame and wait for the peer's, bounded.

        Resource handling:
            The stream is closed on return, even when the peer never answers (after
            ``close_timeout_s``) or the call is cancelled.
        """
        try:
            if self._protocol.state is State.OPEN and not self._stream_closed:
                self._protocol.send_close(code, _truncate_reason(reason))
                self._pump()
            with trio.move_on_after(self._limits.close_timeout_s):
                await self._closed.wait()
        finally:
            await self._abort()

    # Tasks ------------------------------------------------------------------------

    async def _run_reader(self) -> None:
        protocol = self._protocol
        try:
            for event in self._early_events:
                await self._handle_frame(event)
            self._early_events.clear()
            while protocol.state is not State.CLOSED:
                try:
                    data = await self.stream.receive_some(self._limits.read_size_bytes)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    protocol.receive_eof()
                    self._pump()
                    break
                self.bytes_received += len(data)
                self._last_received = trio.current_time()
                protocol.receive_data(data)
                self._pump()
                if self._outgoing_bytes > self._hard_cap_bytes():
                    # Only frames the peer provokes (pongs, close echoes) can grow
                    # the queue past the cap: it sends and never reads.
                    self._local_close = _LocalClose(
                        CloseCode.POLICY_VIOLATION, "peer does not read"
                    )
                    await self._abort()
                    break
                for event in protocol.events_received():
                    await self._handle_frame(event)
        finally:
            self._inbound_send.close()
            self._closed.set()
            self._space.unpark_all()
            self._writer_wakeup.set()

    async def _handle_frame(self, event: object) -> None:
        if not isinstance(
            event, Frame
        ):  # pragma: no cover - only frames follow the handshake
            return
        if self._discarding:
            return
        if event.opcode is Opcode.TEXT and not self._accept_text:
            self._fail(CloseCode.UNSUPPORTED_DATA, "text frames are not accepted")
            return
        if event.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
            if event.opcode is not Opcode.CONT:
                self._fragments_text = event.opcode is Opcode.TEXT
            self._fragments.append(bytes(event.data))
            if event.fin:
                data = b"".join(self._fragments)
                self._fragments.clear()
                message: bytes | str = data
                if self._fragments_text:
                    try:
                        message = data.decode("utf-8")
                    except UnicodeDecodeError:
                        self._fail(
                            CloseCode.INVALID_DATA, "invalid UTF-8 in a text message"
                        )
                        return
                # Messages parsed before a failure are delivered: the parser
                # stops at the first bad frame, so everything before it is good.
                # While the application is slow to read, the reader stops reading
                # (backpressure); that silence is ours, not the peer's.
                self._delivering = True
                try:
                    await self._inbound_send.send(message)
                finally:
                    self._delivering = False
                    self._last_received = trio.current_time()

    async def _run_writer(self) -> None:
        try:
            while True:
                await self._writer_wakeup.wait()
                self._writer_wakeup = trio.Event()
                if not self._outgoing:
                    if self._closed.is_set():
                        return
                    continue
                chunks = list(self._outgoing)
                self._outgoing.clear()
                send_eof = SEND_EOF in chunks
                payload = b"".join(chunks)
                if payload:
                    await self.stream.send_all(payload)
                    self.bytes_sent += len(payload)
                # Frames queued during send_all are still waiting: subtract only
                # what was written.
                self._outgoing_bytes -= len(payload)
                self._space.unpark_all()
                if send_eof:
                    # websockets asks for a half-close; a TLS stream has none, so the
                    # TCP connection is closed instead (what a server does anyway).
                    await self._abort()
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self._abort()

    async def _run_keepalive(self) -> None:
        """Ping after silence; drop a silent peer; bound the closing handshake.

        A ping goes out only once nothing has arrived, and no ping has gone
        out, for ``ping_interval_s``: any frame from the peer proves it alive
        as well as a pong would. A busy connection sends no pings at all, and
        an idle one whose two ends both keep it alive sends about one ping (and
        its pong) per interval instead of one from each end: the peer's ping
        resets our silence before our own is due. Each wait is shortened by a
        random 0-25 %, so that the two ends' timers do not keep firing
        together, and a silent peer still gets a ping within every
        ``ping_interval_s`` (the BRIEF's "ping every 10 s"). On a broker
        holding thousands of idle device channels, pings and pongs were most
        of the records it handled (bench/analysis.md).

        The peer is dead when nothing at all has arrived for ``ping_interval_s *
        ping_missed_max`` (checked at that exact deadline, not on the next ping
        tick). Once either side has started closing, the close must finish within
        ``close_timeout_s``: a client waits for the server to close TCP, and a peer
        that never does would otherwise hold the connection forever.
        """
        interval = self._limits.ping_interval_s
        dead_after = interval * self._limits.ping_missed_max
        last_ping = trio.current_time()
        wait = interval * (1 - _PING_JITTER * _jitter.random())
        while self._is_open():
            next_ping = max(self._last_received, last_ping) + wait
            dead_at = self._last_received + dead_after
            # While the application is slow to read, silence is not the peer's.
            wake = next_ping if self._delivering else min(next_ping, dead_at)
            with trio.move_on_at(wake):
                await self._closing.wait()
            if not self._is_open():
                break
            now = trio.current_time()
            if now - self._last_received >= dead_after and not self._delivering:
                # The peer is silent: a close frame would most likely never be
                # answered, so the connection is dropped at once.
                self._local_close = _LocalClose(
                    CloseCode.INTERNAL_ERROR, "keepalive timeout"
                )
                await self._abort()
                return
            if now >= max(self._last_received, last_ping) + wait:
                self._protocol.send_ping(os.urandom(4))
                self._pump()
                last_ping = now
                wait = interval * (1 - _PING_JITTER * _jitter.random())
        with trio.move_on_after(self._limits.close_timeout_s):
            await self._closed.wait()
        await self._abort()

    # Internals ------------------------------------------------------------------

    def _pump(self) -> None:
        """Move protocol output to the writer's queue; never blocks."""
        for chunk in self._protocol.data_to_send():
            self._outgoing.append(chunk)
            self._outgoing_bytes += len(chunk)
        if self._outgoing:
            self._writer_wakeup.set()
        if self._protocol.state is not State.OPEN:
            self._closing.set()

    def _is_open(self) -> bool:
        return self._protocol.state is State.OPEN and not self._stream_closed

    def _hard_cap_bytes(self) -> int:
        # send_message keeps application data under send_buffer_bytes plus one
        # message; twice that is room no well-behaved peer can make us use.
        return 2 * (self._limits.send_buffer_bytes + self._limits.max_message_bytes)

    def _fail(self, code: int, reason: str) -> None:
        self._discarding = True
        self._protocol.fail(code, reason)
        self._pump()

    async def _abort(self) -> None:
        if self._stream_closed:
            return
        self._stream_closed = True
        self._closing.set()
        self._space.unpark_all()
        self._writer_wakeup.set()
        with (
            trio.move_on_after(self._limits.close_timeout_s, shield=True),
            # The transport under a TLS stream may be closed already (by
            # whoever owns the socket); TLS' close_notify then has nowhere to
            # go, and the stream is closed all the same.
            contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError),
        ):
            await self.stream.aclose()
        # aclose closes the stream even when it was cancelled by the deadline.

    def _close_info(self) -> tuple[int, str]:
        return self._close_origin()[:2]

    def _close_origin(self) -> tuple[int, str, bool]:
        """(code, reason, closed by us) of the close."""
        protocol = self._protocol
        received, sent = protocol.close_rcvd, protocol.close_sent
        if received is not None and (sent is None or protocol.close_rcvd_then_sent):
            return received.code, received.reason, False  # the peer closed first
        if sent is not None:
            # We closed first (or failed the connection).
            return sent.code, sent.reason, True
        if self._local_close is not None:
            local = self._local_close
            return local.code, local.reason, True  # dropped by us
        return CloseCode.ABNORMAL, "connection lost", False

    def _closed_error(self) -> ConnectionClosed:
        code, reason, by_us = self._close_origin()
        return ConnectionClosed(code, reason, by_us=by_us)


def _truncate_reason(reason: str) -> str:
    # RFC 6455 §5.5: control frame payloads are <= 125 bytes, 2 of them the code.
    encoded = reason.encode()[:123]
    return encoded.decode(errors="ignore")


@asynccontextmanager
async def _running(
    connection: WebSocketConnection,
) -> AsyncIterator[WebSocketConnection]:
    """Run the connection's tasks around the body; close politely on exit."""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection._run_reader)
            nursery.start_soon(connection._run_writer)
            nursery.start_soon(connection._run_keepalive)
            try:
                yield connection
            finally:
                with trio.CancelScope(shield=True):
                    await connection.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The tasks never raise; what the group holds came from the body. Give the
        # caller the exception it raised, not a group of one.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise  # pragma: no cover - only the body can raise


# Server side ------------------------------------------------------------------------


class ServerHandshake:
    """The server side of the opening handshake on an established stream.

    Usage::

        handshake = ServerHandshake(tls_stream, limits)
        request = await handshake.receive_request()
        if request.path != "/v1/device/control":
            await handshake.reject(404, "unknown path")
            return
        async with handshake.accept(request) as ws:
            ...
    """

    def __init__(self, stream: trio.abc.Stream, limits: WebSocketLimits) -> None:
        self._stream = stream
        self._limits = limits
        self._protocol = _ServerProtocol(max_size=limits.max_message_bytes)
        self._early_events: Sequence[object] = ()

    async def receive_request(self) -> Request:
        """Read the HTTP upgrade request, at most ``max_upgrade_request_bytes``.

        Raises:
            HandshakeFailed: The peer closed, sent something that is not an HTTP
                request, or sent too much; an error response (431) was sent where
                one makes sense and the stream is closed.
        """
        received = 0
        cap = self._limits.max_upgrade_request_bytes
        protocol = self._protocol
        while True:
            # Never ask for more than one byte past the cap: a request that fits
            # in one read is still measured (a TLS record holds up to 16 KiB).
            want = min(self._limits.read_size_bytes, cap + 1 - received)
            try:
                data = await self._stream.receive_some(want)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                await trio.aclose_forcefully(self._stream)
                raise HandshakeFailed("connection closed during the upgrade request")
            received += len(data)
            if received > cap:
                await self.reject(431, "upgrade request too large")
                raise HandshakeFailed("upgrade request too large", status=431)
            protocol.receive_data(data)
            events = protocol.events_received()
            for index, event in enumerate(events):
                if isinstance(event, Request):
                    self._early_events = events[index + 1 :]
                    return event
            if protocol.handshake_exc is not None:
                await self._flush_and_close()
                raise HandshakeFailed(
                    f"invalid upgrade request: {protocol.handshake_exc}", status=400
                )

    async def reject(self, status: int, text: str) -> None:
        """Answer with an HTTP error and close the stream."""
        response = self._protocol.reject(status, text.rstrip("\n") + "\n")
        self._protocol.send_response(response)
        await self._flush_and_close()

    @asynccontextmanager
    async def accept(self, request: Request) -> AsyncIterator[WebSocketConnection]:
        """Complete the upgrade and yield the open connection.

        Raises:
            HandshakeFailed: The request is not a valid WebSocket upgrade (missing
                or wrong headers); a 4xx response was sent and the stream closed.
        """
        if self._protocol.state is not State.CONNECTING or self._protocol.eof_sent:
            # The client sent bytes after its request, before our answer, that
            # are not frames; the protocol has already failed the connection on
            # them (a response now would trip its own assertions).
            await self._flush_and_close()
            raise HandshakeFailed(
                "invalid data after the upgrade request, before the response",
                status=400,
            )
        response = self._protocol.accept(request)
        refused = self._protocol.handshake_exc
        if (
            isinstance(refused, InvalidHeaderValue)
            and refused.name == "Sec-WebSocket-Version"
        ):
            # RFC 6455 §4.4: a version the server does not speak is answered
            # with "an appropriate HTTP error code (such as 426 Upgrade
            # Required) and a |Sec-WebSocket-Version| header field" listing
            # the versions it does speak (websockets answers a bare 400).
            response = self._protocol.reject(426, "unsupported WebSocket version\n")
            response.headers["Sec-WebSocket-Version"] = "13"
        # The server offers no extensions at all (rule 3): drop any the protocol
        # object might negotiate.
        self._protocol.send_response(response)
        if response.status_code != 101:
            await self._flush_and_close()
            raise HandshakeFailed(
                f"invalid upgrade request: {self._protocol.handshake_exc}",
                status=response.status_code,
            )
        connection = WebSocketConnection(
            self._stream, self._protocol, self._limits, early_events=self._early_events
        )
        connection._pump()
        async with _running(connection) as running:
            yield running

    async def _flush_and_close(self) -> None:
        payload = b"".join(self._protocol.data_to_send())
        with trio.move_on_after(self._limits.close_timeout_s):
            try:
                if payload:
                    await self._stream.send_all(payload)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await trio.aclose_forcefully(self._stream)


# Client side ------------------------------------------------------------------------


@asynccontextmanager
async def connect_websocket(
    stream: trio.abc.Stream,
    url: str,
    limits: WebSocketLimits,
    *,
    user_agent: str | None = None,
    extra_headers: Sequence[tuple[str, str]] = (),
    accept_text: bool = False,
) -> AsyncIterator[WebSocketConnection]:
    """Run the client handshake for *url* over *stream* and yield the connection.

    The caller has done TCP and TLS and applies the connect deadline.

    Args:
        extra_headers: Sent with the upgrade (e.g. ``Authorization``).
        accept_text: Deliver text messages (as str, from
            :meth:`WebSocketConnection.receive`) instead of failing with 1003.

    Raises:
        HandshakeFailed: The server refused (``status`` and ``body`` say why) or
            closed the connection before answering (``status`` is None).
    """
    protocol = _ClientProtocol(parse_uri(url), max_size=limits.max_message_bytes)
    request = protocol.connect()
    if user_agent is not None:
        request.headers["User-Agent"] = user_agent
    for name, value in extra_headers:
        request.headers[name] = value
    protocol.send_request(request)
    early_events = await _client_handshake(stream, protocol, limits)
    connection = WebSocketConnection(
        stream, protocol, limits, early_events=early_events, accept_text=accept_text
    )
    async with _running(connection) as running:
        yield running


async def _client_handshake(
    stream: trio.abc.Stream, protocol: ClientProtocol, limits: WebSocketLimits
) -> Sequence[object]:
    """Send the request, read the response; return frames that came with it."""
    try:
        await stream.send_all(b"".join(protocol.data_to_send()))
        received = 0
        while True:
            try:
                data = await stream.receive_some(limits.read_size_bytes)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                raise HandshakeFailed("connection closed before the upgrade response")
            received += len(data)
            protocol.receive_data(data)
            events = protocol.events_received()
            for index, event in enumerate(events):
                if isinstance(event, Response):
                    if isinstance(protocol.handshake_exc, InvalidStatus):
                        raise HandshakeFailed(
                            f"server refused the upgrade: {event.status_code}",
                            status=event.status_code,
                            body=bytes(event.body or b""),
                        )
                    if protocol.handshake_exc is not None:
                        raise HandshakeFailed(
                            f"invalid upgrade response: {protocol.handshake_exc}"
                        )
                    return events[index + 1 :]
            if protocol.handshake_exc is not None:
                raise HandshakeFailed(
                    f"invalid upgrade response: {protocol.handshake_exc}"
                )
            if received > limits.max_upgrade_request_bytes:
                raise HandshakeFailed("upgrade response too large")
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
