"""One endpoint's streams over a session tunnel: the engineer CLI's side of the
attach socket, and the agent's side of the device tunnel.

Theory of operation
===================
A :class:`TunnelMux` owns one message connection (the attach WebSocket, or the
device's tunnel) and one :class:`relay.proto.tunnel.StreamTable` for this end.
:meth:`TunnelMux.run` is the only reader: it decodes every binary message into a
frame, lets the table judge it (the peer is ``side.peer``), and hands the frame
to its :class:`MuxStream`. Text messages (the broker's JSON status on the attach
socket) go to ``on_text``.

Sending: every frame this end sends goes through ``table.send(frame,
sender=side)`` under one lock, so the wire order is the order the table checked,
and this end can never break the rules it holds the peer to. A frame that lost
its point while it waited for the lock is dropped there, quietly: the peer
closed the stream (only our CLOSE is still due), or half-closed it (a WINDOW it
can never use), or the tunnel ended. Such a race is not an error; a writer
sees :class:`StreamClosed`. Anything else the table refuses is a bug of this end
(:class:`~relay.proto.errors.LocalProtocolError`).

Flow control, per stream: a writer sends DATA only within the credit the peer
gave (:meth:`MuxStream.send_all` waits for WINDOW otherwise). Received DATA is
kept until the application reads it; at most the initial window can be
unread (the peer cannot send more), so no buffer grows without bound. Once the
application has read half a window, the mux gives that much back with WINDOW.
One stream whose application stops reading or writing stops only itself.

Opening: the engineer side opens streams (:meth:`TunnelMux.open_stream`) and
waits for the device's answer. The device side gets every OPEN through
``on_stream``, a plain function the reader calls with the new stream: it starts
a task for it and returns, so a slow answer (a TCP connect, a shell being
spawned) never holds up the frames of the other streams. That task answers with
:meth:`MuxStream.accept` (OPEN_OK) or :meth:`MuxStream.refuse` (OPEN_FAIL). If the
peer cancels the open first (CLOSE), ``accept`` answers with our CLOSE instead
and raises :class:`StreamClosed`: no OPEN_OK is sent. An end without
``on_stream`` (the engineer's) refuses every OPEN.

Ending: :meth:`MuxStream.aclose` sends CLOSE (NORMAL, or ABORTED when the local
end failed). A stream whose peer sent CLOSE or OPEN_FAIL reads as ended
(:meth:`MuxStream.wait_peer_closed` returns) and owes the peer our CLOSE. A
stream of ``on_stream`` pays it itself: its task stops its local end, then calls
``aclose``. The reader answers for every other stream. So the reader of a device
end never sends anything and never waits for the connection: were both ends'
readers to wait for a full connection, each would stop draining what the other
sends, and two busy directions could hold each other up for good. When the
connection ends, every stream reads as ended and every waiting writer gets
:class:`StreamClosed`.

Counting, for the agent's end receipt: ``data_bytes_received`` is every DATA
payload byte from the peer (late ones the table drops too: they crossed the
connection), ``data_bytes_sent`` every DATA payload byte sent, and
``streams_opened`` every OPEN_OK sent or received.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol

import trio

from relay.proto import tunnel
from relay.proto.errors import RemoteProtocolError
from relay.proto.tunnel import Disposition, Side

__all__ = [
    "MessageConnection",
    "MuxStream",
    "StreamClosed",
    "StreamRefused",
    "TunnelMux",
]

_WINDOW_RETURN_FRACTION: Final = 2  # give credit back once half a window is read
_FINAL_FRAMES: Final = (tunnel.StreamClose, tunnel.StreamOpenFail)


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
    """One stream of the tunnel, as a byte stream for the application.

    One task at a time may read (:meth:`receive_some`) and one may write
    (:meth:`send_all`, :meth:`send_eof`).
    """

    def __init__(self, mux: TunnelMux, stream_id: int, channel: str) -> None:
        self._mux = mux
        self.stream_id = stream_id
        self.channel = channel
        self._inbound: deque[bytes] = deque()
        self._unreturned = 0  # bytes read by the application, not yet given back
        self._readable = trio.Event()
        self._credit_changed = trio.Event()
        self._opened = trio.Event()
        self._peer_gone = trio.Event()  # the peer's final frame, or the tunnel's end
        self._refused: StreamRefused | None = None
        self._peer_eof = False
        self._peer_closed = False
        self._sent_eof = False
        self._closed = False
        # A stream of on_stream: its task answers the peer's final frame, not
        # the reader (see "Ending" in the module docstring).
        self._task_answers = False
        #: Set by a device-side handler of a shell stream: called on RESIZE.
        self.on_resize: Callable[[int, int], None] | None = None

    @property
    def peer_closed(self) -> bool:
        """The peer closed the stream (CLOSE or OPEN_FAIL), or the tunnel ended."""
        return self._peer_closed or self._mux.ended

    async def wait_peer_closed(self) -> None:
        """Return once :attr:`peer_closed` is true."""
        await self._peer_gone.wait()

    # Answering an open (device side) --------------------------------------------

    async def accept(self) -> None:
        """Answer the peer's OPEN with OPEN_OK; data flows from now on.

        Raises:
            StreamClosed: The peer cancelled the open first, or the tunnel ended.
                No OPEN_OK was sent; our CLOSE has answered a cancelled open.
        """
        opened = await self._mux.send_frame(
            tunnel.StreamOpenOk(stream_id=self.stream_id)
        )
        if not opened:
            await self.aclose()
            raise StreamClosed(f"stream {self.stream_id} was closed before it opened")

    async def refuse(self, code: tunnel.OpenFailCode, reason: str = "") -> None:
        """Answer the peer's OPEN with OPEN_FAIL, our final frame of the stream.

        Nothing is sent once our final frame is out or the tunnel has ended.
        """
        self._closed = True
        await self._mux.send_frame(
            tunnel.StreamOpenFail(stream_id=self.stream_id, code=code, reason=reason)
        )

    # Reading -------------------------------------------------------------------

    async def receive_some(self) -> bytes:
        """The next bytes from the peer; ``b""`` once it sent EOF or closed."""
        while not self._inbound:
            if self._peer_eof or self.peer_closed:
                return b""
            self._readable = trio.Event()
            await self._readable.wait()
        data = self._inbound.popleft()
        await self._give_back(len(data))
        return data

    async def _give_back(self, n: int) -> None:
        self._unreturned += n
        if self._unreturned * _WINDOW_RETURN_FRACTION < self._mux.initial_window:
            return
        credit, self._unreturned = self._unreturned, 0
        # Dropped if the peer has closed or half-closed the stream meanwhile: it
        # needs no more credit then.
        await self._mux.send_frame(
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
            if self._closed or self._sent_eof or self.peer_closed:
                raise StreamClosed(f"stream {self.stream_id} is closed")
            credit = self._mux.table.credit(self.stream_id, self._mux.side)
            if credit <= 0:
                self._credit_changed = trio.Event()
                await self._credit_changed.wait()
                continue
            size = min(len(view), credit, tunnel.MAX_DATA_BYTES)
            # All of *data* in one frame is the common case: no copy then.
            whole = size == len(data) and isinstance(data, bytes)
            chunk = data if whole else bytes(view[:size])
            view = view[size:]
            sent = await self._mux.send_frame(
                tunnel.StreamData(stream_id=self.stream_id, payload=chunk)
            )
            if not sent:
                raise StreamClosed(f"stream {self.stream_id} is closed")

    async def send_eof(self) -> None:
        """Half-close: no more data from this end; reading goes on."""
        if self._sent_eof or self._closed or self.peer_closed:
            return
        self._sent_eof = True
        await self._mux.send_frame(tunnel.StreamEof(stream_id=self.stream_id))

    async def resize(self, cols: int, rows: int) -> None:
        """Tell a shell stream the terminal's new size."""
        await self._mux.send_frame(
            tunnel.StreamResize(stream_id=self.stream_id, cols=cols, rows=rows)
        )

    async def aclose(
        self, code: tunnel.StreamCloseCode = tunnel.StreamCloseCode.NORMAL
    ) -> None:
        """Close the stream both ways with *code* (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._wake()
        await self._mux.send_close(self.stream_id, code)

    # Called by the mux --------------------------------------------------------

    def _wake(self) -> None:
        self._readable.set()
        self._credit_changed.set()
        self._opened.set()

    def _end_from_peer(self) -> None:
        self._peer_gone.set()
        self._wake()


class TunnelMux:
    """The streams of one end of a session tunnel; see the module docstring.

    Args:
        connection: The attach socket or the tunnel.
        side: Which end this is.
        on_text: Called with every text message (broker status); None refuses
            text (it ends the mux).
        on_stream: Device side: called by the reader with each stream the peer
            opens and its OPEN. It must return at once (start a task); that task
            answers with :meth:`MuxStream.accept` or :meth:`MuxStream.refuse`
            and ends the stream with :meth:`MuxStream.aclose`.
            Without it, every OPEN is refused.
        initial_window: Credit per direction at OPEN_OK (the protocol default).

    Attributes:
        data_bytes_received: DATA payload bytes received (see the module docstring).
        data_bytes_sent: DATA payload bytes sent.
        streams_opened: OPEN_OK frames sent or received.
    """

    def __init__(
        self,
        connection: MessageConnection,
        *,
        side: Side,
        on_text: Callable[[str], None] | None = None,
        on_stream: Callable[[MuxStream, tunnel.StreamOpen], None] | None = None,
        initial_window: int = tunnel.INITIAL_WINDOW_BYTES,
    ) -> None:
        self.connection = connection
        self.side = side
        self.initial_window = initial_window
        self.table = tunnel.StreamTable(initial_window_bytes=initial_window)
        self.ended = False
        self.data_bytes_received = 0
        self.data_bytes_sent = 0
        self.streams_opened = 0
        self._on_text = on_text
        self._on_stream = on_stream
        self._streams: dict[int, MuxStream] = {}
        self._ids = itertools.count(1, 2)  # odd: engineer-opened
        self._send_lock = trio.Lock()

    async def send_frame(self, frame: tunnel.Frame) -> bool:
        """Send *frame* after this end's own table has checked it.

        Returns:
            False if the frame lost its point while it waited and was dropped
            (the stream or the tunnel ended; see the module docstring).

        Raises:
            relay.proto.errors.LocalProtocolError: The table refuses the frame:
                a bug of this end.
        """
        async with self._send_lock:
            if self._is_pointless(frame):
                return False
            data = self.table.send(frame, sender=self.side)
            await self.connection.send_message(data)
        self._count(frame, sent=True)
        if isinstance(frame, _FINAL_FRAMES):
            self._forget_if_gone(frame.stream_id)
        return True

    async def send_close(
        self,
        stream_id: int,
        code: tunnel.StreamCloseCode = tunnel.StreamCloseCode.NORMAL,
    ) -> None:
        """Send this end's CLOSE of *stream_id*, unless our final frame is sent
        already or the stream is gone (the application's close and the answer
        to the peer's close may race)."""
        await self.send_frame(tunnel.StreamClose(stream_id=stream_id, code=code))

    def _is_pointless(self, frame: tunnel.Frame) -> bool:
        if self.ended:
            return True
        if isinstance(frame, tunnel.StreamOpen):
            return False
        status = self.table.status(frame.stream_id)
        if status is None or self.side in status.closed:
            return True  # nothing follows our final frame
        if self.side.peer in status.closed:
            return not isinstance(frame, _FINAL_FRAMES)  # only our CLOSE is due
        return isinstance(frame, tunnel.StreamWindow) and self.side.peer in status.eof

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
        sent = await self.send_frame(
            tunnel.StreamOpen(
                stream_id=stream_id, channel=channel, cols=cols, rows=rows
            )
        )
        if sent:
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
                disposition = self.table.receive(frame, sender=self.side.peer)
                self._count(frame, sent=False)
                if disposition is Disposition.DELIVER:
                    await self._dispatch(frame)
        finally:
            self.ended = True
            for stream in self._streams.values():
                stream._end_from_peer()

    async def _dispatch(self, frame: tunnel.Frame) -> None:
        if isinstance(frame, tunnel.StreamOpen):
            await self._accept(frame)
            return
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            return  # the peer's CLOSE of a stream this end refused at once
        if isinstance(frame, tunnel.StreamData):
            stream._inbound.append(frame.payload)
            stream._readable.set()
        elif isinstance(frame, tunnel.StreamWindow):
            stream._credit_changed.set()
        elif isinstance(frame, tunnel.StreamOpenOk):
            stream._opened.set()
        elif isinstance(frame, tunnel.StreamEof):
            stream._peer_eof = True
            stream._readable.set()
        elif isinstance(frame, _FINAL_FRAMES):
            await self._on_final(stream, frame)
        elif isinstance(frame, tunnel.StreamResize) and stream.on_resize is not None:
            stream.on_resize(frame.cols, frame.rows)

    async def _on_final(
        self, stream: MuxStream, frame: tunnel.StreamClose | tunnel.StreamOpenFail
    ) -> None:
        if isinstance(frame, tunnel.StreamOpenFail):
            stream._refused = StreamRefused(
                tunnel.OpenFailCode(frame.code), frame.reason
            )
        stream._peer_closed = True
        stream._end_from_peer()
        if not stream._task_answers:
            # Whoever gets the peer's final frame first answers with CLOSE.
            await self.send_close(frame.stream_id)
        self._forget_if_gone(frame.stream_id)

    def _forget_if_gone(self, stream_id: int) -> None:
        if stream_id not in self.table:
            self._streams.pop(stream_id, None)

    def _count(self, frame: tunnel.Frame, *, sent: bool) -> None:
        if isinstance(frame, tunnel.StreamData):
            if sent:
                self.data_bytes_sent += len(frame.payload)
            else:
                self.data_bytes_received += len(frame.payload)
        elif isinstance(frame, tunnel.StreamOpenOk):
            self.streams_opened += 1

    async def _accept(self, frame: tunnel.StreamOpen) -> None:
        if self._on_stream is None:
            await self.send_frame(
                tunnel.StreamOpenFail(
                    stream_id=frame.stream_id,
                    code=tunnel.OpenFailCode.NOT_ALLOWED,
                    reason="this end opens no streams",
                )
            )
            return
        stream = MuxStream(self, frame.stream_id, frame.channel)
        stream._task_answers = True
        self._streams[frame.stream_id] = stream
        self._on_stream(stream, frame)
