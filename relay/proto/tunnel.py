"""Tunnel frames of a remote session, and the per-stream bookkeeping (pure).

Theory of operation
===================
A remote session has two WebSocket legs: the engineer's attach socket and the
device's tunnel socket (``/v1/device/tunnel/{session}``). Both carry binary
messages only, one tunnel frame per message, and the broker relays frames from
one leg to the other. Inside the tunnel the engineer opens *streams*: a shell
(a PTY on the device) or a TCP connection to a port on the device's own
allow-list. The broker parses and checks every frame from either side with this
module, counts bytes, and relays the message bytes it checked unchanged (it
never re-encodes, and it never makes up frames of its own: to end a session it
closes both WebSockets).

Binary layout
-------------
Every frame starts with the same 5-byte header, big-endian, then a body whose
layout depends on the type. There are no length fields: the WebSocket message
is the frame's boundary, and at most one field per frame has a variable length,
always the last one, running to the end of the message. So no length can
disagree with the message; a message shorter or longer than its type allows is
malformed ("too short", "trailing bytes")::

    offset  size  field
    0       1     type       (FrameType, 1..8)
    1       4     stream_id  (u32, odd, 1..2**31-1)
    5       ...   body

    type          body
    1 OPEN        cols u16, rows u16, channel (ASCII, rest of the message)
    2 OPEN_OK     (empty)
    3 OPEN_FAIL   code u16 (OpenFailCode), reason (UTF-8, 0..200 bytes, rest)
    4 DATA        payload (1..MAX_DATA_BYTES bytes, rest)
    5 WINDOW      credit u32 (1..MAX_WINDOW_BYTES)
    6 EOF         (empty)
    7 CLOSE       code u16 (StreamCloseCode)
    8 RESIZE      cols u16, rows u16 (1..1000 each)

A channel is ``"shell"`` or ``"tcp:PORT"`` (PORT 1..65535, no leading zeros).
An OPEN of ``"shell"`` carries the terminal's initial size (1..1000 each); an
OPEN of a TCP channel carries cols = rows = 0. An OPEN_FAIL reason is text for
people: at most 200 bytes of UTF-8 without control characters (it is shown in
terminals, where an escape sequence would be an attack).

Sizes: :data:`MAX_FRAME_BYTES` is 64 KiB, the largest message the WebSocket
transports accept (``max_message_bytes``); the largest frame is a DATA frame
with :data:`MAX_DATA_BYTES` = 64 KiB - 5 payload bytes, which fills that
message exactly. Every other frame is at most 207 bytes.

Measured with ``timeit`` on the development machine (CPython 3.11.7, one AMD
EPYC core; no test asserts a duration): a 1-byte DATA frame encodes in about
2.3 µs and decodes in about 2.6 µs; a full DATA frame encodes in about 4.6 µs
and decodes in about 8.6 µs (about 7 GB/s: the payload is copied once, never
parsed).

Stream ids
----------
Only the engineer opens streams, so stream ids are odd (even ids stay free for
device-opened streams, should they ever exist), and 0 is never a stream. Each
OPEN uses an id above every id opened before (gaps allowed), so "opening an id
twice" and "a frame for a stream that is gone" are recognised with one counter,
without remembering every id a session ever used.

Stream lifecycle
----------------
OPEN (engineer) -> OPEN_OK (device) -> data in both directions -> each side
sends exactly one *final frame*: CLOSE, or for the device OPEN_FAIL in place of
OPEN_OK. A stream is gone once both sides' final frames have been seen; a side
that receives the peer's final frame before sending its own answers with CLOSE.
So after :meth:`StreamTable.receive` delivers a CLOSE or OPEN_FAIL, ``stream_id
in table`` tells an endpoint that it still owes its CLOSE. The engineer may
cancel an open it has not seen answered by sending CLOSE; the device then
answers with CLOSE (or the OPEN_FAIL already on its way counts as its final
frame). The device refuses an open with OPEN_FAIL, never with CLOSE.

Half-close: EOF ends the sender's direction only (like TCP's FIN): no more DATA
from that side, while the other direction goes on. After EOF both ways the
stream still ends with a CLOSE from each side.

Credit
------
Each direction of each open stream has a window of credit, in payload bytes:
:data:`INITIAL_WINDOW_BYTES` from OPEN_OK on, less every DATA payload the sender
sends, plus every WINDOW the receiver grants. DATA beyond the credit is a
protocol error. The receiver grants credit back as it hands data on (to the
terminal, to the local TCP peer), so what any endpoint buffers for a stream is
bounded by the credit it granted, and a stream whose reader stalls runs out of
credit and stops while the others flow. Each endpoint keeps reading its socket
(it can always buffer what arrives), so the shared WebSocket never backs up
because of one stream. The initial window and the stream limit are protocol
constants: the constructor arguments exist for tests and must otherwise be
left at their defaults at both ends and at the broker, as there is no
negotiation. A receiver that wants a larger window grants more with WINDOW; a
window never exceeds :data:`MAX_WINDOW_BYTES`.

Every other observer (the broker, the receiving endpoint) learns of credit
granted to a sender no later than the sender itself does, and of the sender's
DATA no earlier; so the credit it computes for a sender is never below the
sender's own view, and a sender that keeps to its own credit never trips the
check anywhere. The broker buffers nothing per stream: it relays with the
WebSocket transports' backpressure and only checks the credit.

One tracker, three places
-------------------------
:class:`StreamTable` keeps the rules of one session's streams from a neutral
point of view: every frame is observed together with the :class:`Side` that
sent it. The broker runs one table per session and feeds it the frames of both
legs with :meth:`~StreamTable.receive`; an endpoint feeds it the peer's frames
with :meth:`~StreamTable.receive` and its own with :meth:`~StreamTable.send`.
Frames travel in order on each leg and the broker relays in order, so the same
rules hold at all three places; only the interleaving of the two directions
differs, which is what the race rules below are for.

Races: what is dropped, exactly
-------------------------------
After one side's final frame, the other side may still have frames in flight
that it sent before it saw that final frame. Until its own final frame arrives,
such frames are checked as usual (form, order, credit) and then *dropped*
(:data:`Disposition.DROP`): the broker does not relay them and an endpoint
ignores them. These are DATA, WINDOW, EOF, RESIZE (from the engineer) and
OPEN_OK (from the device, when the engineer cancelled the open). The late side's
final frame is delivered and ends the stream. A WINDOW granting credit to a side
that has sent EOF is dropped as well: that credit can never be used.

Nothing else is tolerated. A frame on a stream that has ended is an error,
because neither side sends anything after its final frame. An endpoint that
*has seen* the peer's final frame (or EOF, for WINDOW) knows better than to
send a frame that would be dropped, so :meth:`StreamTable.send` refuses it.

Rule 1: every frame is checked in full before it is relayed or acted on; a
malformed frame is a :class:`~relay.proto.errors.RemoteProtocolError` from
:func:`decode`, and :func:`encode` refuses a bad frame with
:class:`~relay.proto.errors.LocalProtocolError`.
Rule 2: a stream id is used once; ids increase; only the engineer opens.
Rule 3: no DATA before OPEN_OK, after the sender's EOF or final frame, or beyond
the sender's credit.
Rule 4: each side sends exactly one final frame per stream; nothing follows it.
Rule 5: only the frames listed under "Races" are ever dropped.
Rule 6: after any protocol error the table refuses every further frame.
Rule 7: the device decides what is reachable. The table can narrow the channels
to those granted for the session (``channels=``), never widen anything.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import ClassVar, Final

from relay.proto.close import CloseCode
from relay.proto.errors import LocalProtocolError, RemoteProtocolError
from relay.proto.session import parse_channel

#: Bytes of the header every frame starts with: type u8, stream id u32.
HEADER_BYTES: Final = 5
#: Largest encoded frame: the WebSocket transports' message cap (64 KiB).
MAX_FRAME_BYTES: Final = 64 * 1024
#: Largest DATA payload: a full DATA frame is exactly MAX_FRAME_BYTES.
MAX_DATA_BYTES: Final = MAX_FRAME_BYTES - HEADER_BYTES
#: Stream ids are odd numbers in 1..MAX_STREAM_ID.
MAX_STREAM_ID: Final = 2**31 - 1
#: Longest OPEN_FAIL reason, in UTF-8 bytes.
MAX_REASON_BYTES: Final = 200
#: Terminal columns and rows are 1..MAX_TERMINAL_SIZE.
MAX_TERMINAL_SIZE: Final = 1000
#: Credit of each direction of a stream at OPEN_OK (a protocol constant).
INITIAL_WINDOW_BYTES: Final = 256 * 1024
#: Most credit a direction may hold; a WINDOW beyond it is an overflow.
MAX_WINDOW_BYTES: Final = 2**31 - 1
#: Streams a session may hold at once (a protocol constant).
MAX_STREAMS: Final = 16

_HEADER: Final = struct.Struct(">BI")
_U16: Final = struct.Struct(">H")
_U16_PAIR: Final = struct.Struct(">HH")
_U32: Final = struct.Struct(">I")
# "shell" or "tcp:PORT"; [0-9] (not \d) keeps non-ASCII digits out; the port's
# range is checked on the number.


class FrameType(IntEnum):
    """The first byte of every frame."""

    OPEN = 1
    OPEN_OK = 2
    OPEN_FAIL = 3
    DATA = 4
    WINDOW = 5
    EOF = 6
    CLOSE = 7
    RESIZE = 8


class OpenFailCode(IntEnum):
    """Why the device refused to open a stream (OPEN_FAIL)."""

    NOT_ALLOWED = 1  # not granted for this session, or not on the device's allow-list
    CONNECT_FAILED = 2  # the local TCP connection failed
    NO_PTY = 3  # no terminal could be made for the shell
    TOO_MANY_STREAMS = 4  # the device's own stream limit (at most MAX_STREAMS)


class StreamCloseCode(IntEnum):
    """How a stream ended (CLOSE)."""

    NORMAL = 0  # finished: EOF both ways, the shell exited, or the user closed it
    ABORTED = 1  # local I/O failed (e.g. connection reset); data may be lost


class Side(Enum):
    """The two ends of a tunnel; every frame is observed with its sender."""

    ENGINEER = "engineer"
    DEVICE = "device"

    @property
    def peer(self) -> Side:
        """The other end."""
        return Side.DEVICE if self is Side.ENGINEER else Side.ENGINEER


class Disposition(Enum):
    """What to do with a frame that passed the checks."""

    DELIVER = "deliver"  # relay it (broker) or act on it (endpoint)
    DROP = "drop"  # a benign late frame (see "Races"): ignore it


# Frames
# ======


class Frame:
    """Base class of tunnel frames."""

    __slots__ = ()
    TYPE: ClassVar[FrameType]
    stream_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamOpen(Frame):
    """Open a stream to *channel* (engineer to device).

    *cols* and *rows* are the terminal's initial size for ``"shell"`` (1..1000
    each) and 0 for a TCP channel.
    """

    TYPE: ClassVar[FrameType] = FrameType.OPEN
    stream_id: int
    channel: str
    cols: int = 0
    rows: int = 0

    @property
    def port(self) -> int | None:
        """The TCP port of a ``"tcp:PORT"`` channel; ``None`` for the shell."""
        if self.channel.startswith("tcp:"):
            return int(self.channel[4:])
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamOpenOk(Frame):
    """The device opened the stream (device to engineer)."""

    TYPE: ClassVar[FrameType] = FrameType.OPEN_OK
    stream_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamOpenFail(Frame):
    """The device refused to open the stream; its final frame for it.

    *reason* is optional text for the engineer (at most 200 bytes of UTF-8, no
    control characters).
    """

    TYPE: ClassVar[FrameType] = FrameType.OPEN_FAIL
    stream_id: int
    code: OpenFailCode
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamData(Frame):
    """Payload bytes of one direction of an open stream (1..MAX_DATA_BYTES)."""

    TYPE: ClassVar[FrameType] = FrameType.DATA
    stream_id: int
    payload: bytes

    def __repr__(self) -> str:
        # Payloads are terminal sessions and tunnelled traffic: keep them out of
        # logs and error messages, show the size only.
        return f"StreamData(stream_id={self.stream_id!r}, payload=<{len(self.payload)} bytes>)"


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamWindow(Frame):
    """The sender (a receiver of DATA) grants *credit* more bytes."""

    TYPE: ClassVar[FrameType] = FrameType.WINDOW
    stream_id: int
    credit: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamEof(Frame):
    """The sender will send no more DATA on this stream (half-close)."""

    TYPE: ClassVar[FrameType] = FrameType.EOF
    stream_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamClose(Frame):
    """The stream is over in both directions; the sender's final frame."""

    TYPE: ClassVar[FrameType] = FrameType.CLOSE
    stream_id: int
    code: StreamCloseCode = StreamCloseCode.NORMAL


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamResize(Frame):
    """The engineer's terminal changed size (shell streams only)."""

    TYPE: ClassVar[FrameType] = FrameType.RESIZE
    stream_id: int
    cols: int
    rows: int


# Checks shared by encode and decode
# ==================================


class _BadFrame(Exception):
    """A frame breaks a rule; decode and encode choose the error class."""


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not low <= value <= high
    ):
        raise _BadFrame(
            f"{name} must be an integer in {low}..{high}, not {_shorten(value)}"
        )
    return value


def _check_stream_id(value: object) -> None:
    stream_id = _check_int("stream id", value, 1, MAX_STREAM_ID)
    if stream_id % 2 == 0:
        raise _BadFrame(
            f"stream id {stream_id} is even; the engineer opens odd ids only"
        )


def _check_size(cols: object, rows: object) -> None:
    _check_int("cols", cols, 1, MAX_TERMINAL_SIZE)
    _check_int("rows", rows, 1, MAX_TERMINAL_SIZE)


def _check_code(value: object, codes: type[IntEnum]) -> None:
    known = sorted(int(code) for code in codes)
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value not in codes._value2member_map_
    ):
        raise _BadFrame(f"unknown {codes.__name__} {_shorten(value)} (known: {known})")


def _check_open(frame: StreamOpen) -> None:
    channel: object = frame.channel  # an unchecked frame may hold anything
    try:
        parsed = parse_channel(channel)
    except ValueError:
        raise _BadFrame(
            f'channel must be "shell" or "tcp:PORT" (1..65535, no leading zeros), '
            f"not {_shorten(channel)}"
        ) from None
    if parsed.kind == "shell":
        _check_size(frame.cols, frame.rows)
    elif frame.cols != 0 or frame.rows != 0:
        raise _BadFrame(
            f"a tcp channel has no terminal size (cols = rows = 0), "
            f"not {_shorten(frame.cols)}x{_shorten(frame.rows)}"
        )


def _check_open_fail(frame: StreamOpenFail) -> None:
    _check_code(frame.code, OpenFailCode)
    reason = frame.reason
    if not isinstance(reason, str):
        raise _BadFrame(f"reason must be text, not {_shorten(reason)}")
    try:
        size = len(reason.encode("utf-8"))
    except UnicodeEncodeError:
        # Lone surrogates ("\ud800") have no UTF-8 form.
        raise _BadFrame(f"reason is not valid Unicode: {_shorten(reason)}") from None
    if size > MAX_REASON_BYTES:
        raise _BadFrame(f"reason is {size} bytes of UTF-8, at most {MAX_REASON_BYTES}")
    if any(char < " " or "\x7f" <= char <= "\x9f" for char in reason):
        # C0, DEL and C1: a reason is shown in terminals, where ESC starts a
        # control sequence.
        raise _BadFrame(f"reason holds control characters: {_shorten(reason)}")


def _check_data(frame: StreamData) -> None:
    payload = frame.payload
    if not isinstance(payload, bytes):
        raise _BadFrame(f"payload must be bytes, not {type(payload).__name__}")
    if not payload:
        raise _BadFrame("payload is empty (a DATA frame carries 1 byte or more)")
    if len(payload) > MAX_DATA_BYTES:
        raise _BadFrame(f"payload is {len(payload)} bytes, at most {MAX_DATA_BYTES}")


def _check_window(frame: StreamWindow) -> None:
    _check_int("credit", frame.credit, 1, MAX_WINDOW_BYTES)


def _check_close(frame: StreamClose) -> None:
    _check_code(frame.code, StreamCloseCode)


def _check_resize(frame: StreamResize) -> None:
    _check_size(frame.cols, frame.rows)


def _check_frame(frame: Frame) -> None:
    # DATA first: it is most of the traffic.
    match frame:
        case StreamData():
            _check_stream_id(frame.stream_id)
            _check_data(frame)
        case StreamWindow():
            _check_stream_id(frame.stream_id)
            _check_window(frame)
        case StreamOpen():
            _check_stream_id(frame.stream_id)
            _check_open(frame)
        case StreamOpenFail():
            _check_stream_id(frame.stream_id)
            _check_open_fail(frame)
        case StreamClose():
            _check_stream_id(frame.stream_id)
            _check_close(frame)
        case StreamResize():
            _check_stream_id(frame.stream_id)
            _check_resize(frame)
        case StreamOpenOk() | StreamEof():
            _check_stream_id(frame.stream_id)
        case _:
            raise _BadFrame(f"not a tunnel frame: {type(frame).__name__}")


def _shorten(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# Codec
# =====


def encode(frame: Frame) -> bytes:
    """The wire form of *frame*.

    Raises:
        LocalProtocolError: *frame* breaks a rule of the layout (bad stream id,
            channel, size, code, reason or payload).
    """
    try:
        _check_frame(frame)
    except _BadFrame as exc:
        raise LocalProtocolError(f"cannot encode {_describe(frame)}: {exc}") from None
    return _HEADER.pack(frame.TYPE, frame.stream_id) + _body(frame)


def decode(data: bytes) -> Frame:
    """Parse one tunnel frame (one whole WebSocket message).

    Raises:
        RemoteProtocolError: *data* is not a valid frame. Its ``close_code`` is
            1009 for a message above :data:`MAX_FRAME_BYTES`, 1002 otherwise.
    """
    size = len(data)
    if size > MAX_FRAME_BYTES:
        raise RemoteProtocolError(
            f"tunnel frame is {size} bytes, at most {MAX_FRAME_BYTES}",
            close_code=CloseCode.MESSAGE_TOO_BIG,
        )
    if size < HEADER_BYTES:
        raise RemoteProtocolError(
            f"tunnel frame is {size} bytes, shorter than its {HEADER_BYTES}-byte header"
        )
    type_byte, stream_id = _HEADER.unpack_from(data)
    layout = _LAYOUTS.get(type_byte)
    if layout is None:
        raise RemoteProtocolError(f"unknown tunnel frame type {type_byte}")
    fixed, variable, parse = layout
    body = data[HEADER_BYTES:]
    # This is the broker's hot path: the messages are built only on error.
    try:
        if len(body) < fixed:
            expected = f"at least {fixed}" if variable else f"exactly {fixed}"
            raise _BadFrame(f"too short: body is {len(body)} bytes, needs {expected}")
        if len(body) > fixed and not variable:
            raise _BadFrame(f"trailing bytes: body is {len(body)} bytes, needs {fixed}")
        if stream_id & 1 == 0 or stream_id > MAX_STREAM_ID:
            _check_stream_id(stream_id)  # raises, with the reason
        return parse(stream_id, body)
    except _BadFrame as exc:
        name = FrameType(type_byte).name
        raise RemoteProtocolError(
            f"tunnel {name} frame on stream {stream_id}: {exc}"
        ) from None


def _describe(frame: Frame) -> str:
    frame_type = getattr(frame, "TYPE", None)
    name = (
        frame_type.name if isinstance(frame_type, FrameType) else type(frame).__name__
    )
    return f"{name} frame"


def _parse_open(stream_id: int, body: bytes) -> Frame:
    cols, rows = _U16_PAIR.unpack_from(body)
    try:
        channel = body[4:].decode("ascii")
    except UnicodeDecodeError:
        raise _BadFrame(f"channel is not ASCII: {_shorten(body[4:])}") from None
    frame = StreamOpen(stream_id=stream_id, channel=channel, cols=cols, rows=rows)
    _check_open(frame)
    return frame


def _parse_open_fail(stream_id: int, body: bytes) -> Frame:
    (code,) = _U16.unpack_from(body)
    _check_code(code, OpenFailCode)
    raw = body[2:]
    if len(raw) > MAX_REASON_BYTES:
        # Checked before decoding, so a long reason is never decoded.
        raise _BadFrame(
            f"reason is {len(raw)} bytes of UTF-8, at most {MAX_REASON_BYTES}"
        )
    try:
        reason = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _BadFrame(f"reason is not UTF-8: {_shorten(raw)}") from None
    frame = StreamOpenFail(stream_id=stream_id, code=OpenFailCode(code), reason=reason)
    _check_open_fail(frame)  # the control characters
    return frame


def _parse_open_ok(stream_id: int, body: bytes) -> Frame:
    return StreamOpenOk(stream_id=stream_id)


def _parse_data(stream_id: int, body: bytes) -> Frame:
    if not body:
        raise _BadFrame("payload is empty (a DATA frame carries 1 byte or more)")
    # The frame cap already bounds the payload to MAX_DATA_BYTES.
    return StreamData(stream_id=stream_id, payload=body)


def _parse_window(stream_id: int, body: bytes) -> Frame:
    (credit,) = _U32.unpack_from(body)
    frame = StreamWindow(stream_id=stream_id, credit=credit)
    _check_window(frame)
    return frame


def _parse_eof(stream_id: int, body: bytes) -> Frame:
    return StreamEof(stream_id=stream_id)


def _parse_close(stream_id: int, body: bytes) -> Frame:
    (code,) = _U16.unpack_from(body)
    _check_code(code, StreamCloseCode)
    return StreamClose(stream_id=stream_id, code=StreamCloseCode(code))


def _parse_resize(stream_id: int, body: bytes) -> Frame:
    cols, rows = _U16_PAIR.unpack_from(body)
    _check_size(cols, rows)
    return StreamResize(stream_id=stream_id, cols=cols, rows=rows)


def _body(frame: Frame) -> bytes:
    """The body of a checked frame."""
    match frame:
        case StreamData():
            return frame.payload
        case StreamWindow():
            return _U32.pack(frame.credit)
        case StreamOpen():
            return _U16_PAIR.pack(frame.cols, frame.rows) + frame.channel.encode()
        case StreamOpenFail():
            return _U16.pack(frame.code) + frame.reason.encode()
        case StreamClose():
            return _U16.pack(frame.code)
        case StreamResize():
            return _U16_PAIR.pack(frame.cols, frame.rows)
        case _:  # OPEN_OK and EOF: _check_frame let nothing else through
            return b""


_Parse = Callable[[int, bytes], Frame]
# Per type: fixed body bytes, whether a variable tail may follow, the parser.
_LAYOUTS: Final[dict[int, tuple[int, bool, _Parse]]] = {
    FrameType.OPEN: (4, True, _parse_open),
    FrameType.OPEN_OK: (0, False, _parse_open_ok),
    FrameType.OPEN_FAIL: (2, True, _parse_open_fail),
    FrameType.DATA: (0, True, _parse_data),
    FrameType.WINDOW: (4, False, _parse_window),
    FrameType.EOF: (0, False, _parse_eof),
    FrameType.CLOSE: (2, False, _parse_close),
    FrameType.RESIZE: (4, False, _parse_resize),
}


# Flow control
# ============


class FlowControl:
    """Per-stream credit of both directions of one session's streams.

    The credit of ``(stream, sender)`` is what *sender* may still send on the
    stream. It is neutral like :class:`StreamTable`: an endpoint calls
    :meth:`on_data` with ``sender=`` its own side for DATA it sends and the peer's
    for DATA it receives; the broker calls it for both. The checks raise
    :class:`~relay.proto.errors.RemoteProtocolError` (the usual case is checking a
    peer); :meth:`StreamTable.send` turns that into a local error for our own
    frames.
    """

    def __init__(self, *, initial_window_bytes: int = INITIAL_WINDOW_BYTES) -> None:
        if not 0 < initial_window_bytes <= MAX_WINDOW_BYTES:
            raise ValueError(
                f"initial_window_bytes must be in 1..{MAX_WINDOW_BYTES}, "
                f"not {initial_window_bytes}"
            )
        self.initial_window_bytes = initial_window_bytes
        self._credit: dict[tuple[int, Side], int] = {}

    def add_stream(self, stream_id: int) -> None:
        """Give both directions of *stream_id* the initial window (at OPEN_OK)."""
        for side in Side:
            self._credit[stream_id, side] = self.initial_window_bytes

    def remove_stream(self, stream_id: int) -> None:
        """Forget *stream_id* (no error if it has no window)."""
        for side in Side:
            self._credit.pop((stream_id, side), None)

    def credit(self, stream_id: int, sender: Side) -> int:
        """Bytes *sender* may still send on *stream_id* (0 without a window)."""
        return self._credit.get((stream_id, sender), 0)

    def can_send(self, stream_id: int, sender: Side, n: int) -> bool:
        """Whether *sender* may send *n* more bytes on *stream_id* now."""
        return (
            n <= self.credit(stream_id, sender) and (stream_id, sender) in self._credit
        )

    def on_data(self, stream_id: int, sender: Side, n: int) -> None:
        """Count *n* payload bytes sent by *sender* against its credit.

        Raises:
            RemoteProtocolError: *n* is more than the credit *sender* was given,
                or the stream has no window.
        """
        key = (stream_id, sender)
        available = self._credit.get(key)
        where = f"{sender.value} sent DATA on stream {stream_id}"
        if available is None:
            raise RemoteProtocolError(f"{where}: the stream has no window")
        if n > available:
            raise RemoteProtocolError(
                f"{where}: {n} bytes with only {available} bytes of credit"
            )
        self._credit[key] = available - n

    def on_window(self, stream_id: int, granter: Side, credit: int) -> None:
        """Add *credit* to what the peer of *granter* may send on *stream_id*.

        Raises:
            RemoteProtocolError: The window would exceed :data:`MAX_WINDOW_BYTES`,
                or the stream has no window.
        """
        key = (stream_id, granter.peer)
        available = self._credit.get(key)
        where = f"{granter.value} sent WINDOW on stream {stream_id}"
        if available is None:
            raise RemoteProtocolError(f"{where}: the stream has no window")
        if available + credit > MAX_WINDOW_BYTES:
            raise RemoteProtocolError(
                f"{where}: the window overflows: {available} + {credit} bytes "
                f"is above {MAX_WINDOW_BYTES}"
            )
        self._credit[key] = available + credit


# The stream table
# ================


@dataclass(slots=True)
class _Stream:
    channel: str
    opened: bool = False  # OPEN_OK seen
    eof: set[Side] = field(default_factory=set)  # sides that sent EOF
    closed: set[Side] = field(default_factory=set)  # sides that sent their final frame


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamStatus:
    """A snapshot of one live stream, as the table sees it.

    Attributes:
        stream_id: The stream.
        channel: The channel it was opened to (``"shell"``, ``"tcp:PORT"``).
        opened: OPEN_OK has been seen.
        eof: The sides that have sent EOF.
        closed: The sides that have sent their final frame (CLOSE or OPEN_FAIL).
    """

    stream_id: int
    channel: str
    opened: bool
    eof: frozenset[Side]
    closed: frozenset[Side]


class StreamTable:
    """The stream rules of one session, for frames of both sides.

    Args:
        max_streams: Most streams alive at once (from OPEN until both final
            frames). A protocol constant; change it only in tests.
        initial_window_bytes: Credit of each direction at OPEN_OK. A protocol
            constant; change it only in tests.
        channels: If given, the channels granted for this session; an OPEN of
            any other channel is a protocol error.

    Attributes:
        flow: The credit of every open stream.
    """

    def __init__(
        self,
        *,
        max_streams: int = MAX_STREAMS,
        initial_window_bytes: int = INITIAL_WINDOW_BYTES,
        channels: Collection[str] | None = None,
    ) -> None:
        if max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, not {max_streams}")
        self.max_streams = max_streams
        self.flow = FlowControl(initial_window_bytes=initial_window_bytes)
        self._channels = None if channels is None else frozenset(channels)
        self._streams: dict[int, _Stream] = {}
        self._last_opened = 0
        self._broken = False

    def __len__(self) -> int:
        """Streams alive now (opening, open or closing)."""
        return len(self._streams)

    def __iter__(self) -> Iterator[int]:
        """The ids of the streams alive now, oldest first (a copy: safe to close)."""
        return iter(list(self._streams))

    def __contains__(self, stream_id: object) -> bool:
        """Whether *stream_id* is alive (not yet closed by both sides)."""
        return stream_id in self._streams

    def status(self, stream_id: int) -> StreamStatus | None:
        """A snapshot of *stream_id*, or ``None`` if it is not alive."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return None
        return StreamStatus(
            stream_id=stream_id,
            channel=stream.channel,
            opened=stream.opened,
            eof=frozenset(stream.eof),
            closed=frozenset(stream.closed),
        )

    def credit(self, stream_id: int, sender: Side) -> int:
        """Bytes of DATA *sender* may send on *stream_id* now.

        0 unless the stream is open and *sender* has sent neither EOF nor its
        final frame.
        """
        stream = self._streams.get(stream_id)
        if (
            stream is None
            or not stream.opened
            or sender in stream.eof
            or sender in stream.closed
        ):
            return 0
        return self.flow.credit(stream_id, sender)

    def can_send(self, stream_id: int, sender: Side, n: int) -> bool:
        """Whether *sender* may send one DATA frame of *n* bytes now."""
        return 1 <= n <= min(MAX_DATA_BYTES, self.credit(stream_id, sender))

    def receive(self, frame: Frame, *, sender: Side) -> Disposition:
        """Observe *frame* from the peer (endpoint) or from either leg (broker).

        Args:
            frame: A frame from :func:`decode`.
            sender: The side that sent it.

        Returns:
            :data:`Disposition.DELIVER` to act on it or relay it;
            :data:`Disposition.DROP` for a benign late frame (see "Races").

        Raises:
            RemoteProtocolError: *sender* broke a stream rule. The table refuses
                every later frame; end the session.
        """
        if self._broken:
            raise RemoteProtocolError(
                "stream table refuses frames after a protocol error"
            )
        try:
            return self._observe(frame, sender)
        except RemoteProtocolError:
            self._broken = True
            raise

    def send(self, frame: Frame, *, sender: Side) -> bytes:
        """Check our own *frame* against the rules and encode it.

        Args:
            frame: The frame to send.
            sender: Our side.

        Returns:
            The wire form of *frame*.

        Raises:
            LocalProtocolError: *frame* is malformed, breaks a stream rule, or
                would be dropped because we have seen the peer's final frame (send
                CLOSE instead) or its EOF (a WINDOW it cannot use). The table
                refuses every later frame.
        """
        if self._broken:
            raise LocalProtocolError(
                "stream table refuses frames after a protocol error"
            )
        try:
            data = encode(frame)
            stream = self._streams.get(frame.stream_id)
            peer_closed = stream is not None and sender.peer in stream.closed
            if self._observe(frame, sender) is Disposition.DROP:
                why = "closed the stream" if peer_closed else "sent EOF"
                raise LocalProtocolError(
                    f"{sender.value} may not send {frame.TYPE.name} on stream "
                    f"{frame.stream_id}: the {sender.peer.value} already {why}"
                )
        except RemoteProtocolError as exc:
            self._broken = True
            raise LocalProtocolError(str(exc), close_code=exc.close_code) from None
        except LocalProtocolError:
            self._broken = True
            raise
        return data

    # Rules
    # -----

    def _observe(self, frame: Frame, sender: Side) -> Disposition:
        match frame:
            case StreamData():
                return self._on_data(frame, sender)
            case StreamWindow():
                return self._on_window(frame, sender)
            case StreamOpen():
                return self._on_open(frame, sender)
            case StreamOpenOk():
                return self._on_open_ok(frame, sender)
            case StreamOpenFail():
                return self._on_open_fail(frame, sender)
            case StreamEof():
                return self._on_eof(frame, sender)
            case StreamClose():
                return self._on_close(frame, sender)
            case StreamResize():
                return self._on_resize(frame, sender)
            case _:
                raise TypeError(f"not a tunnel frame: {type(frame).__name__}")

    def _on_open(self, frame: StreamOpen, sender: Side) -> Disposition:
        if sender is not Side.ENGINEER:
            raise _error(frame, sender, "only the engineer opens streams")
        if frame.stream_id <= self._last_opened:
            raise _error(
                frame,
                sender,
                f"the id was already used (ids must increase; last was "
                f"{self._last_opened})",
            )
        if len(self._streams) >= self.max_streams:
            raise _error(
                frame, sender, f"{len(self._streams)} streams are alive, the limit"
            )
        if self._channels is not None and frame.channel not in self._channels:
            raise _error(
                frame,
                sender,
                f"channel {frame.channel!r} is not granted for this session",
            )
        self._last_opened = frame.stream_id
        self._streams[frame.stream_id] = _Stream(channel=frame.channel)
        return Disposition.DELIVER

    def _on_open_ok(self, frame: StreamOpenOk, sender: Side) -> Disposition:
        if sender is not Side.DEVICE:
            raise _error(frame, sender, "only the device answers an OPEN")
        stream = self._live(frame, sender)
        if stream.opened:
            raise _error(frame, sender, "the stream is already open")
        stream.opened = True
        self.flow.add_stream(frame.stream_id)
        return _unless_peer_closed(stream, sender)

    def _on_open_fail(self, frame: StreamOpenFail, sender: Side) -> Disposition:
        if sender is not Side.DEVICE:
            raise _error(frame, sender, "only the device answers an OPEN")
        stream = self._live(frame, sender)
        if stream.opened:
            raise _error(frame, sender, "the stream is open; end it with CLOSE")
        return self._final(frame, stream, sender)

    def _on_data(self, frame: StreamData, sender: Side) -> Disposition:
        stream = self._open(frame, sender)
        if sender in stream.eof:
            raise _error(frame, sender, "DATA after the sender's own EOF")
        self.flow.on_data(frame.stream_id, sender, len(frame.payload))
        return _unless_peer_closed(stream, sender)

    def _on_window(self, frame: StreamWindow, sender: Side) -> Disposition:
        stream = self._open(frame, sender)
        receiver = sender.peer
        if receiver in stream.eof or receiver in stream.closed:
            # Credit for a direction that is over can never be used.
            return Disposition.DROP
        self.flow.on_window(frame.stream_id, sender, frame.credit)
        return Disposition.DELIVER

    def _on_eof(self, frame: StreamEof, sender: Side) -> Disposition:
        stream = self._open(frame, sender)
        if sender in stream.eof:
            raise _error(frame, sender, "a second EOF")
        stream.eof.add(sender)
        return _unless_peer_closed(stream, sender)

    def _on_close(self, frame: StreamClose, sender: Side) -> Disposition:
        stream = self._live(frame, sender)
        if (
            not stream.opened
            and sender is Side.DEVICE
            and Side.ENGINEER not in stream.closed
        ):
            raise _error(
                frame,
                sender,
                "CLOSE before OPEN_OK only answers the engineer's CLOSE; "
                "refuse an OPEN with OPEN_FAIL",
            )
        return self._final(frame, stream, sender)

    def _on_resize(self, frame: StreamResize, sender: Side) -> Disposition:
        if sender is not Side.ENGINEER:
            raise _error(frame, sender, "only the engineer resizes a terminal")
        stream = self._open(frame, sender)
        if stream.channel != "shell":
            raise _error(frame, sender, "RESIZE on a tcp stream (shell streams only)")
        return _unless_peer_closed(stream, sender)

    def _live(self, frame: Frame, sender: Side) -> _Stream:
        """The stream of *frame*, which *sender* has not ended yet."""
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            if frame.stream_id <= self._last_opened:
                raise _error(
                    frame, sender, "the stream is gone (closed, or its id was skipped)"
                )
            raise _error(frame, sender, "the stream was never opened")
        if sender in stream.closed:
            raise _error(
                frame,
                sender,
                "the sender already sent its final frame (CLOSE or OPEN_FAIL)",
            )
        return stream

    def _open(self, frame: Frame, sender: Side) -> _Stream:
        """Like :meth:`_live`, and OPEN_OK must have been seen."""
        stream = self._live(frame, sender)
        if not stream.opened:
            raise _error(frame, sender, "the stream is not open yet (before OPEN_OK)")
        return stream

    def _final(self, frame: Frame, stream: _Stream, sender: Side) -> Disposition:
        """Record *sender*'s final frame; forget the stream once both sent theirs."""
        stream.closed.add(sender)
        if len(stream.closed) == len(Side):
            del self._streams[frame.stream_id]
            self.flow.remove_stream(frame.stream_id)
        return Disposition.DELIVER


def _unless_peer_closed(stream: _Stream, sender: Side) -> Disposition:
    """Drop a late frame of *sender* once its peer has sent its final frame."""
    return Disposition.DROP if sender.peer in stream.closed else Disposition.DELIVER


def _error(frame: Frame, sender: Side, why: str) -> RemoteProtocolError:
    return RemoteProtocolError(
        f"{sender.value} sent {frame.TYPE.name} on stream {frame.stream_id}: {why}"
    )
