"""One endpoint's streams over a session tunnel: the engineer CLI's side of the
attach socket (and a device side for tests and, later, the agent).

Theory of operation
===================
A :class:`TunnelMux` owns one message connection (the attach WebSocket, or the
device's tunnel) and one :class:`relay.proto.tunnel.StreamTable` for this end.
:meth:`TunnelMux.run` is the only reader: it decodes every binary message into a
frame, lets the table judge it (the peer is ``side.peer``), and hands the frame
to its :class:`MuxStream`. Text messages (the broker's JSON status on the attach
socket) go to ``on_text``. Every frame this end sends goes through
``table.send(frame, sender=side)`` first, so this end can never break the rules
it holds the peer to.

Flow control, per stream: a writer sends DATA only within the credit the peer
gave (:meth:`MuxStream.send_all` waits for WINDOW otherwise). Received DATA is
kept until the application reads it; at most the initial window can be
unread (the peer cannot send more), so no buffer grows without bound. Once the
application has read half a window, the mux gives that much back with WINDOW.

Streams are opened by the engineer side (:meth:`TunnelMux.open_stream`); a device
side answers opens through ``on_open``, which returns a :class:`MuxStream` handler
task's decision (accept with OPEN_OK, or refuse with OPEN_FAIL).

Ending: :meth:`MuxStream.aclose` sends CLOSE; a stream whose peer sent CLOSE or
OPEN_FAIL reads as ended and answers CLOSE. When the connection ends, every
stream reads as ended and every waiting writer gets :class:`StreamClosed`.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import trio

from relay.proto import tunnel
from relay.proto.errors import LocalProtocolError, RemoteProtocolError
from relay.proto.tunnel import Disposition, Side

__all__ = [
    "MessageConnection",
    "MuxStream",
    "StreamClosed",
    "StreamRefused",
    "TunnelMux",
]

_WINDOW_RETURN_FRACTION: Final = 2  # give credit back once half a window is read


class MessageConnection(Protocol):
    """What the mux needs of a WebSocket: whole messages in and out."""

    async def send_message(self, data: bytes) -> None: ...

    async def receive(self) -> bytes | str: ...


class StreamClosed(Exception):
    """The stream (or the whole tunnel) is closed; nothing more can be sent."""


class StreamRefused(Exception):
    """The device refused to open the stream (OPEN_FAIL); ``code`` says why."""

    def __init__(self, code: tunnel.OpenFailCode, reason: str) -> None:
        super().__init__(
            f"{code.name.lower()}: {reason}" if reason else code.name.lower()
        )
        self.code = code
        self.reason = reason


class MuxStream:
    """One stream of the tunnel, as a byte stream for the application."""

    def __init__(self, mux: TunnelMux, stream_id: int, channel: str) -> None:
        self._mux = mux
        self.stream_id = stream_id
        self.channel = channel
        self._inbound: deque[bytes] = deque()
        self._unreturned = 0  # bytes read by the application, not yet given back
        self._readable = trio.Event()
        self._credit_changed = trio.Event()
        self._opened = trio.Event()
        self._refused: StreamRefused | None = None
        self._peer_eof = False
        self._peer_closed = False
        self._sent_eof = False
        self._closed = False
        #: Set by a device-side handler of a shell stream: called on RESIZE.
        self.on_resize: Callable[[int, int], None] | None = None

    @property
    def peer_closed(self) -> bool:
        """The peer closed the stream (CLOSE or OPEN_FAIL), or the tunnel ended."""
        return self._peer_closed or self._mux.ended

    # Reading -------------------------------------------------------------------

    async def receive_some(self) -> bytes:
        """The next bytes from the peer; ``b""`` once it sent EOF or closed."""
        while not self._inbound:
            if self._peer_eof or self._peer_closed or self._mux.ended:
                return b""
            self._readable = trio.Event()
            await self._readable.wait()
        data = self._inbound.popleft()
        await self._give_back(len(data))
        return data

    async def _give_back(self, n: int) -> None:
        self._unreturned += n
        if (
            self._unreturned * _WINDOW_RETURN_FRACTION >= self._mux.initial_window
            and not self._peer_eof
            and not self._peer_closed
            and self.stream_id in self._mux.table
        ):
            credit, self._unreturned = self._unreturned, 0
            # A stream closed meanwhile needs no more credit.
            with contextlib.suppress(StreamClosed):
                await self._send(
                    tunnel.StreamWindow(stream_id=self.stream_id, credit=credit)
                )

    # Writing -------------------------------------------------------------------

    async def send_all(self, data: bytes) -> None:
        """Send *data*, as fast as the peer's credit allows.

        Raises:
            StreamClosed: The stream or the tunnel is closed.
        """
        view = memoryview(data)
        while view:
            if self._closed or self._sent_eof or self._peer_closed or self._mux.ended:
                raise StreamClosed(f"stream {self.stream_id} is closed")
            credit = self._mux.table.credit(self.stream_id, self._mux.side)
            if credit <= 0:
                self._credit_changed = trio.Event()
                await self._credit_changed.wait()
                continue
            chunk = bytes(view[: min(credit, tunnel.MAX_DATA_BYTES)])
            view = view[len(chunk) :]
            await self._send(tunnel.StreamData(stream_id=self.stream_id, payload=chunk))

    async def send_eof(self) -> None:
        """Half-close: no more data from this end; reading goes on."""
        if self._sent_eof or self._closed or self._peer_closed or self._mux.ended:
            return
        self._sent_eof = True
        await self._send(tunnel.StreamEof(stream_id=self.stream_id))

    async def resize(self, cols: int, rows: int) -> None:
        """Tell a shell stream the terminal's new size."""
        await self._send(
            tunnel.StreamResize(stream_id=self.stream_id, cols=cols, rows=rows)
        )

    async def aclose(self) -> None:
        """Close the stream both ways (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._wake()
        if not self._mux.ended:
            await self._mux.send_close(self.stream_id)

    async def _send(self, frame: tunnel.Frame) -> None:
        try:
            await self._mux.send_frame(frame)
        except LocalProtocolError:
            # The peer closed the stream, or half-closed it (then it takes no
            # more credit), or the tunnel ended, while this frame was on its
            # way: for the application that is a closed stream.
            if self._peer_closed or self._peer_eof or self._closed or self._mux.ended:
                raise StreamClosed(f"stream {self.stream_id} is closed") from None
            raise

    # Called by the mux --------------------------------------------------------

    def _wake(self) -> None:
        self._readable.set()
        self._credit_changed.set()
        self._opened.set()


class TunnelMux:
    """The streams of one end of a session tunnel; see the module docstring.

    Args:
        connection: The attach socket or the tunnel.
        side: Which end this is.
        on_text: Called with every text message (broker status); None refuses
            text (it ends the mux).
        initial_window: Credit per direction at OPEN_OK (the protocol default).
    """

    def __init__(
        self,
        connection: MessageConnection,
        *,
        side: Side,
        on_text: Callable[[str], None] | None = None,
        on_open: Callable[
            [tunnel.StreamOpen], Awaitable[MuxStream | tunnel.StreamOpenFail]
        ]
        | None = None,
        initial_window: int = tunnel.INITIAL_WINDOW_BYTES,
    ) -> None:
        self.connection = connection
        self.side = side
        self.initial_window = initial_window
        self.table = tunnel.StreamTable(initial_window_bytes=initial_window)
        self.ended = False
        self._on_text = on_text
        self._on_open = on_open
        self._streams: dict[int, MuxStream] = {}
        self._ids = itertools.count(1, 2)  # odd: engineer-opened
        self._send_lock = trio.Lock()

    async def send_frame(self, frame: tunnel.Frame) -> None:
        """Send *frame* after this end's own table has checked it."""
        async with self._send_lock:
            data = self.table.send(frame, sender=self.side)
            await self.connection.send_message(data)

    async def open_stream(
        self, channel: str, *, cols: int = 0, rows: int = 0
    ) -> MuxStream:
        """Open a stream to *channel* and wait for the device's answer.

        Raises:
            StreamRefused: The device refused it.
            StreamClosed: The tunnel ended first.
        """
        stream_id = next(self._ids)
        stream = MuxStream(self, stream_id, channel)
        self._streams[stream_id] = stream
        await self.send_frame(
            tunnel.StreamOpen(
                stream_id=stream_id, channel=channel, cols=cols, rows=rows
            )
        )
        await stream._opened.wait()
        if stream._refused is not None:
            raise stream._refused
        if self.ended:
            raise StreamClosed("the tunnel ended")
        return stream

    async def run(self) -> None:
        """Read the connection until it ends; dispatch frames to streams.

        Raises:
            relay.proto.errors.RemoteProtocolError: The peer broke the rules.
        """
        try:
            while True:
                message = await self.connection.receive()
                if isinstance(message, str):
                    if self._on_text is None:
                        raise RemoteProtocolError("text message on a tunnel")
                    self._on_text(message)
                    continue
                frame = tunnel.decode(message)
                if self.table.receive(frame, sender=self.side.peer) is Disposition.DROP:
                    continue
                await self._dispatch(frame)
        finally:
            self.ended = True
            for stream in self._streams.values():
                stream._wake()

    async def _dispatch(self, frame: tunnel.Frame) -> None:
        stream = self._streams.get(frame.stream_id)
        if isinstance(frame, tunnel.StreamOpen):
            await self._accept(frame)
            return
        if stream is None:  # pragma: no cover - the table refuses unknown streams
            return
        if isinstance(frame, tunnel.StreamOpenOk):
            stream._opened.set()
        elif isinstance(frame, tunnel.StreamOpenFail):
            stream._refused = StreamRefused(
                tunnel.OpenFailCode(frame.code), frame.reason
            )
            stream._peer_closed = True
            stream._wake()
            await self._answer_final(frame.stream_id)
            self._forget(stream)
        elif isinstance(frame, tunnel.StreamData):
            stream._inbound.append(frame.payload)
            stream._readable.set()
        elif isinstance(frame, tunnel.StreamWindow):
            stream._credit_changed.set()
        elif isinstance(frame, tunnel.StreamEof):
            stream._peer_eof = True
            stream._readable.set()
        elif isinstance(frame, tunnel.StreamClose):
            stream._peer_closed = True
            stream._wake()
            await self._answer_final(frame.stream_id)
            self._forget(stream)
        elif isinstance(frame, tunnel.StreamResize) and stream.on_resize is not None:
            stream.on_resize(frame.cols, frame.rows)

    async def _answer_final(self, stream_id: int) -> None:
        # Whoever gets the peer's final frame first answers with CLOSE.
        await self.send_close(stream_id)

    async def send_close(self, stream_id: int) -> None:
        """Send this end's CLOSE of *stream_id*, unless it is sent already or
        the stream is gone. Checked under the send lock: the application's
        close and the answer to the peer's close may race."""
        async with self._send_lock:
            status = self.table.status(stream_id)
            if status is None or self.side in status.closed:
                return
            data = self.table.send(
                tunnel.StreamClose(stream_id=stream_id), sender=self.side
            )
            await self.connection.send_message(data)

    def _forget(self, stream: MuxStream) -> None:
        if stream.stream_id not in self.table:
            self._streams.pop(stream.stream_id, None)

    async def _accept(self, frame: tunnel.StreamOpen) -> None:
        decision: MuxStream | tunnel.StreamOpenFail
        if self._on_open is None:
            decision = tunnel.StreamOpenFail(
                stream_id=frame.stream_id,
                code=tunnel.OpenFailCode.NOT_ALLOWED,
                reason="this end opens no streams",
            )
        else:
            decision = await self._on_open(frame)
        if isinstance(decision, tunnel.StreamOpenFail):
            await self.send_frame(decision)
            return
        self._streams[frame.stream_id] = decision
        await self.send_frame(tunnel.StreamOpenOk(stream_id=frame.stream_id))

    def new_stream(self, frame: tunnel.StreamOpen) -> MuxStream:
        """A stream object for an incoming *frame* (for ``on_open`` handlers)."""
        return MuxStream(self, frame.stream_id, frame.channel)
