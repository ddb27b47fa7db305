"""Tunnel frames, flow control and the stream table (relay/proto/tunnel.py)."""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import FrozenInstanceError, dataclass, field
from typing import Any, Final

import pytest
from hypothesis import given, settings, strategies as st

from relay.proto.close import CloseCode
from relay.proto.errors import LocalProtocolError, RemoteProtocolError
from relay.proto.tunnel import (
    HEADER_BYTES,
    INITIAL_WINDOW_BYTES,
    MAX_DATA_BYTES,
    MAX_FRAME_BYTES,
    MAX_REASON_BYTES,
    MAX_STREAM_ID,
    MAX_STREAMS,
    MAX_WINDOW_BYTES,
    Disposition,
    FlowControl,
    Frame,
    FrameType,
    OpenFailCode,
    Side,
    StreamClose,
    StreamCloseCode,
    StreamData,
    StreamEof,
    StreamOpen,
    StreamOpenFail,
    StreamOpenOk,
    StreamResize,
    StreamStatus,
    StreamTable,
    StreamWindow,
    decode,
    encode,
)

ENGINEER: Final = Side.ENGINEER
DEVICE: Final = Side.DEVICE
DELIVER: Final = Disposition.DELIVER
DROP: Final = Disposition.DROP

SHELL: Final = StreamOpen(stream_id=1, channel="shell", cols=80, rows=24)
TCP: Final = StreamOpen(stream_id=3, channel="tcp:22")


# Helpers
# =======


def header(frame_type: int, stream_id: int = 1) -> bytes:
    """The 5-byte frame header."""
    return struct.pack(">BI", frame_type, stream_id)


def u16(*values: int) -> bytes:
    """Big-endian unsigned 16-bit integers."""
    return struct.pack(f">{len(values)}H", *values)


def u32(value: int) -> bytes:
    """A big-endian unsigned 32-bit integer."""
    return struct.pack(">I", value)


def data(stream_id: int, size: int) -> StreamData:
    """A DATA frame of *size* bytes."""
    return StreamData(stream_id=stream_id, payload=b"x" * size)


def open_stream(table: StreamTable, stream_id: int = 1, channel: str = "shell") -> None:
    """Pass OPEN and OPEN_OK for *stream_id* through *table*."""
    size = 80 if channel == "shell" else 0
    opening = StreamOpen(stream_id=stream_id, channel=channel, cols=size, rows=size)
    assert table.receive(opening, sender=ENGINEER) is DELIVER
    assert table.receive(StreamOpenOk(stream_id=stream_id), sender=DEVICE) is DELIVER


def status(table: StreamTable, stream_id: int) -> StreamStatus:
    """The status of a stream that must be alive."""
    found = table.status(stream_id)
    assert found is not None
    return found


# Codec: round trips and the wire form
# ====================================

EVERY_FRAME: Final = [
    pytest.param(SHELL, id="open-shell"),
    pytest.param(
        StreamOpen(stream_id=MAX_STREAM_ID, channel="shell", cols=1, rows=1000),
        id="open-shell-limits",
    ),
    pytest.param(TCP, id="open-tcp"),
    pytest.param(StreamOpen(stream_id=5, channel="tcp:1"), id="open-tcp-1"),
    pytest.param(StreamOpen(stream_id=5, channel="tcp:65535"), id="open-tcp-65535"),
    pytest.param(StreamOpenOk(stream_id=1), id="open_ok"),
    pytest.param(
        StreamOpenFail(stream_id=1, code=OpenFailCode.NOT_ALLOWED), id="open_fail"
    ),
    pytest.param(
        StreamOpenFail(
            stream_id=7,
            code=OpenFailCode.CONNECT_FAILED,
            reason="connection refused: 127.0.0.1:22",
        ),
        id="open_fail-reason",
    ),
    pytest.param(
        StreamOpenFail(stream_id=7, code=OpenFailCode.NO_PTY, reason="é" * 100),
        id="open_fail-reason-200-bytes",
    ),
    pytest.param(
        StreamOpenFail(stream_id=7, code=OpenFailCode.TOO_MANY_STREAMS, reason="🙂"),
        id="open_fail-too-many",
    ),
    pytest.param(StreamData(stream_id=1, payload=b"\x00"), id="data-1"),
    pytest.param(data(9, MAX_DATA_BYTES), id="data-max"),
    pytest.param(StreamWindow(stream_id=1, credit=1), id="window-1"),
    pytest.param(StreamWindow(stream_id=1, credit=MAX_WINDOW_BYTES), id="window-max"),
    pytest.param(StreamEof(stream_id=1), id="eof"),
    pytest.param(StreamClose(stream_id=1), id="close"),
    pytest.param(
        StreamClose(stream_id=1, code=StreamCloseCode.ABORTED), id="close-aborted"
    ),
    pytest.param(StreamResize(stream_id=1, cols=1, rows=1), id="resize-min"),
    pytest.param(StreamResize(stream_id=1, cols=1000, rows=1000), id="resize-max"),
]


@pytest.mark.parametrize("frame", EVERY_FRAME)
def test_decode_inverts_encode(frame: Frame) -> None:
    """Every frame type decodes back to an equal frame of the same class."""
    decoded = decode(encode(frame))
    assert decoded == frame
    assert type(decoded) is type(frame)


@pytest.mark.parametrize(
    ("frame", "wire"),
    [
        pytest.param(SHELL, header(1, 1) + u16(80, 24) + b"shell", id="open-shell"),
        pytest.param(TCP, header(1, 3) + u16(0, 0) + b"tcp:22", id="open-tcp"),
        pytest.param(StreamOpenOk(stream_id=1), header(2), id="open_ok"),
        pytest.param(
            StreamOpenFail(stream_id=1, code=OpenFailCode.NO_PTY, reason="é"),
            header(3) + u16(3) + "é".encode(),
            id="open_fail",
        ),
        pytest.param(
            StreamData(stream_id=5, payload=b"ls\n"),
            header(4, 5) + b"ls\n",
            id="data",
        ),
        pytest.param(
            StreamWindow(stream_id=1, credit=65536),
            header(5) + u32(65536),
            id="window",
        ),
        pytest.param(StreamEof(stream_id=1), header(6), id="eof"),
        pytest.param(
            StreamClose(stream_id=1, code=StreamCloseCode.ABORTED),
            header(7) + u16(1),
            id="close",
        ),
        pytest.param(
            StreamResize(stream_id=1, cols=132, rows=43),
            header(8) + u16(132, 43),
            id="resize",
        ),
    ],
)
def test_wire_layout(frame: Frame, wire: bytes) -> None:
    """The layout is a 5-byte header (type, stream id) and a big-endian body."""
    assert encode(frame) == wire
    assert decode(wire) == frame


def test_full_data_frame_is_exactly_max_frame_bytes() -> None:
    """The largest DATA payload fills the 64 KiB WebSocket message exactly."""
    assert MAX_FRAME_BYTES == 64 * 1024
    assert HEADER_BYTES + MAX_DATA_BYTES == MAX_FRAME_BYTES
    assert len(encode(data(1, MAX_DATA_BYTES))) == MAX_FRAME_BYTES


def test_non_data_frames_are_small() -> None:
    """Apart from DATA, the longest frame is an OPEN_FAIL with a full reason."""
    longest = StreamOpenFail(
        stream_id=1, code=OpenFailCode.NOT_ALLOWED, reason="x" * MAX_REASON_BYTES
    )
    assert len(encode(longest)) == HEADER_BYTES + 2 + MAX_REASON_BYTES == 207


def test_decoded_codes_are_enum_members() -> None:
    """OPEN_FAIL and CLOSE codes decode to their IntEnum members."""
    failed = decode(header(3) + u16(2))
    closed = decode(header(7) + u16(0))
    assert isinstance(failed, StreamOpenFail)
    assert failed.code is OpenFailCode.CONNECT_FAILED
    assert isinstance(closed, StreamClose)
    assert closed.code is StreamCloseCode.NORMAL


def test_open_port() -> None:
    """StreamOpen.port is the TCP port, or None for the shell."""
    assert TCP.port == 22
    assert StreamOpen(stream_id=1, channel="tcp:65535").port == 65535
    assert SHELL.port is None


def test_frames_are_immutable() -> None:
    """Frames are frozen dataclasses."""
    with pytest.raises(FrozenInstanceError):
        SHELL.stream_id = 3  # type: ignore[misc]


def test_data_repr_hides_the_payload() -> None:
    """A DATA frame's repr shows the payload's size, never its bytes."""
    frame = StreamData(stream_id=3, payload=b"hunter2")
    assert repr(frame) == "StreamData(stream_id=3, payload=<7 bytes>)"


def test_frame_types_are_numbered_one_to_eight() -> None:
    """The type byte values are fixed: they are the wire format."""
    assert [int(t) for t in FrameType] == list(range(1, 9))


# Codec: malformed input
# ======================

MALFORMED: Final = [
    # The header.
    pytest.param(b"", "shorter than its 5-byte header", id="empty"),
    pytest.param(b"\x04\x00\x00\x00", "shorter than its 5-byte header", id="header-4"),
    pytest.param(header(0), "unknown tunnel frame type 0", id="type-0"),
    pytest.param(header(9) + b"x", "unknown tunnel frame type 9", id="type-9"),
    pytest.param(header(255), "unknown tunnel frame type 255", id="type-255"),
    pytest.param(header(2, 0), "stream id must be an integer in 1", id="id-0"),
    pytest.param(header(2, 2), "stream id 2 is even", id="id-even"),
    pytest.param(header(4, 2**31 - 2) + b"x", "is even", id="id-even-high"),
    pytest.param(header(2, 2**31 + 1), "stream id must be", id="id-above-max"),
    pytest.param(header(2, 2**32 - 1), "stream id must be", id="id-u32-max"),
    # OPEN.
    pytest.param(
        header(1), "too short: body is 0 bytes, needs at least 4", id="open-0"
    ),
    pytest.param(header(1) + u16(80) + b"s", "too short", id="open-3"),
    pytest.param(header(1) + u16(80, 24), "not ''", id="open-no-channel"),
    pytest.param(header(1) + u16(0, 0) + b"ssh", "not 'ssh'", id="open-ssh"),
    pytest.param(header(1) + u16(0, 0) + b"tcp:0", "not 'tcp:0'", id="open-tcp-0"),
    pytest.param(
        header(1) + u16(0, 0) + b"tcp:65536", "not 'tcp:65536'", id="open-tcp-65536"
    ),
    pytest.param(
        header(1) + u16(0, 0) + b"tcp:99999", "not 'tcp:99999'", id="open-tcp-99999"
    ),
    pytest.param(
        header(1) + u16(0, 0) + b"tcp:022", "not 'tcp:022'", id="open-tcp-022"
    ),
    pytest.param(header(1) + u16(0, 0) + b"tcp:", "not 'tcp:'", id="open-tcp-empty"),
    pytest.param(header(1) + u16(0, 0) + b"tcp:-1", "not 'tcp:-1'", id="open-tcp-neg"),
    pytest.param(header(1) + u16(0, 0) + b"tcp:+22", "not", id="open-tcp-plus"),
    pytest.param(header(1) + u16(0, 0) + b"tcp:22 ", "not", id="open-tcp-space"),
    pytest.param(header(1) + u16(0, 0) + b"tcp:22\n", "not", id="open-tcp-newline"),
    pytest.param(header(1) + u16(0, 0) + b"TCP:22", "not", id="open-tcp-upper"),
    pytest.param(header(1) + u16(0, 0) + b"tcp:123456", "not", id="open-tcp-6-digits"),
    pytest.param(header(1) + u16(80, 24) + b"SHELL", "not 'SHELL'", id="open-SHELL"),
    pytest.param(header(1) + u16(80, 24) + b"shell\x00", "not", id="open-shell-nul"),
    pytest.param(
        header(1) + u16(0, 0) + "tcp:\uff12\uff12".encode(),
        "not ASCII",
        id="open-wide-digits",
    ),
    pytest.param(header(1) + u16(0, 0) + b"\xff", "not ASCII", id="open-not-ascii"),
    pytest.param(
        header(1) + u16(0, 0) + b"tcp:22" * 2000, "channel must be", id="open-long"
    ),
    pytest.param(header(1) + u16(0, 24) + b"shell", "cols must be", id="open-cols-0"),
    pytest.param(header(1) + u16(80, 0) + b"shell", "rows must be", id="open-rows-0"),
    pytest.param(
        header(1) + u16(1001, 24) + b"shell", "cols must be", id="open-cols-1001"
    ),
    pytest.param(
        header(1) + u16(80, 1001) + b"shell", "rows must be", id="open-rows-1001"
    ),
    pytest.param(
        header(1) + u16(80, 24) + b"tcp:22", "no terminal size", id="open-tcp-size"
    ),
    pytest.param(
        header(1) + u16(0, 1) + b"tcp:22", "no terminal size", id="open-tcp-rows"
    ),
    # OPEN_OK.
    pytest.param(header(2) + b"\x00", "trailing bytes", id="open_ok-trailing"),
    # OPEN_FAIL.
    pytest.param(header(3), "too short", id="open_fail-0"),
    pytest.param(header(3) + b"\x00", "too short", id="open_fail-1"),
    pytest.param(header(3) + u16(0), "unknown OpenFailCode 0", id="open_fail-code-0"),
    pytest.param(
        header(3) + u16(99) + b"x", "unknown OpenFailCode 99", id="open_fail-code-99"
    ),
    pytest.param(
        header(3) + u16(1) + b"x" * (MAX_REASON_BYTES + 1),
        "reason is 201 bytes of UTF-8, at most 200",
        id="open_fail-reason-201",
    ),
    pytest.param(
        header(3) + u16(1) + "é".encode() * 101, "202 bytes", id="open_fail-reason-202"
    ),
    pytest.param(header(3) + u16(1) + b"\xff", "not UTF-8", id="open_fail-reason-ff"),
    pytest.param(
        header(3) + u16(1) + b"caf\xc3", "not UTF-8", id="open_fail-reason-truncated"
    ),
    pytest.param(
        header(3) + u16(1) + b"\xed\xa0\x80", "not UTF-8", id="open_fail-surrogate"
    ),
    pytest.param(
        header(3) + u16(1) + b"\xc0\xaf", "not UTF-8", id="open_fail-overlong"
    ),
    pytest.param(
        header(3) + u16(1) + b"\x1b[2J", "control characters", id="open_fail-escape"
    ),
    pytest.param(
        header(3) + u16(1) + b"a\nb", "control characters", id="open_fail-newline"
    ),
    pytest.param(
        header(3) + u16(1) + b"\x7f", "control characters", id="open_fail-del"
    ),
    pytest.param(
        header(3) + u16(1) + "\u009b2J".encode(),
        "control characters",
        id="open_fail-c1",
    ),
    # DATA.
    pytest.param(header(4), "payload is empty", id="data-empty"),
    # WINDOW.
    pytest.param(
        header(5), "too short: body is 0 bytes, needs exactly 4", id="window-0"
    ),
    pytest.param(header(5) + b"\x00\x00\x01", "too short", id="window-3"),
    pytest.param(header(5) + u32(1) + b"\x00", "trailing bytes", id="window-5"),
    pytest.param(
        header(5) + u32(0), "credit must be an integer in 1..", id="window-zero"
    ),
    pytest.param(header(5) + u32(2**31), "credit must be", id="window-2**31"),
    pytest.param(header(5) + u32(2**32 - 1), "credit must be", id="window-u32-max"),
    # EOF.
    pytest.param(header(6) + b"x", "trailing bytes", id="eof-trailing"),
    # CLOSE.
    pytest.param(header(7), "too short", id="close-0"),
    pytest.param(header(7) + b"\x00", "too short", id="close-1"),
    pytest.param(header(7) + u16(0) + b"\x00", "trailing bytes", id="close-3"),
    pytest.param(header(7) + u16(2), "unknown StreamCloseCode 2", id="close-code-2"),
    pytest.param(
        header(7) + u16(65535), "unknown StreamCloseCode", id="close-code-max"
    ),
    # RESIZE.
    pytest.param(header(8) + u16(80), "too short", id="resize-2"),
    pytest.param(header(8) + u16(80, 24) + b"\x00", "trailing bytes", id="resize-5"),
    pytest.param(header(8) + u16(0, 24), "cols must be", id="resize-cols-0"),
    pytest.param(header(8) + u16(80, 0), "rows must be", id="resize-rows-0"),
    pytest.param(header(8) + u16(1001, 24), "cols must be", id="resize-cols-1001"),
    pytest.param(header(8) + u16(80, 65535), "rows must be", id="resize-rows-max"),
]


@pytest.mark.parametrize(("wire", "message"), MALFORMED)
def test_decode_refuses_malformed_frames(wire: bytes, message: str) -> None:
    """Every malformed frame is a RemoteProtocolError (close code 1002)."""
    with pytest.raises(RemoteProtocolError) as caught:
        decode(wire)
    assert message in str(caught.value)
    assert caught.value.close_code == CloseCode.PROTOCOL_ERROR


def test_decode_error_names_the_frame() -> None:
    """A body error names the frame type and the stream."""
    with pytest.raises(
        RemoteProtocolError, match=r"^tunnel WINDOW frame on stream 7: "
    ):
        decode(header(5, 7) + u32(0))


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(
            header(4) + b"x" * (MAX_DATA_BYTES + 1), id="data-payload-over-cap"
        ),
        pytest.param(header(7) + b"x" * MAX_FRAME_BYTES, id="close-huge"),
        pytest.param(b"\x00" * (10 * MAX_FRAME_BYTES), id="zeros"),
    ],
)
def test_decode_refuses_oversized_frames_with_1009(wire: bytes) -> None:
    """A message above MAX_FRAME_BYTES is refused before parsing, close code 1009."""
    with pytest.raises(RemoteProtocolError, match="at most 65536") as caught:
        decode(wire)
    assert caught.value.close_code == CloseCode.MESSAGE_TOO_BIG


class NotAFrame(Frame):
    """A Frame subclass the codec does not know."""

    __slots__ = ()


BAD_FRAMES: Final = [
    pytest.param(StreamOpenOk(stream_id=0), "stream id must be", id="id-0"),
    pytest.param(StreamOpenOk(stream_id=2), "is even", id="id-even"),
    pytest.param(StreamOpenOk(stream_id=-1), "stream id must be", id="id-negative"),
    pytest.param(StreamOpenOk(stream_id=2**31 + 1), "stream id must be", id="id-big"),
    pytest.param(StreamOpenOk(stream_id=True), "not True", id="id-bool"),
    pytest.param(StreamOpenOk(stream_id="1"), "not '1'", id="id-str"),  # type: ignore[arg-type]
    pytest.param(StreamEof(stream_id=1.0), "not 1.0", id="id-float"),  # type: ignore[arg-type]
    pytest.param(StreamOpen(stream_id=1, channel="ssh"), "not 'ssh'", id="open-ssh"),
    pytest.param(
        StreamOpen(stream_id=1, channel="tcp:0"), "not 'tcp:0'", id="open-tcp-0"
    ),
    pytest.param(
        StreamOpen(stream_id=1, channel="tcp:022"), "tcp:022", id="open-tcp-022"
    ),
    pytest.param(
        StreamOpen(stream_id=1, channel="tcp:65536"), "65536", id="open-tcp-65536"
    ),
    pytest.param(
        StreamOpen(stream_id=1, channel="tcp:\uff12\uff12"),
        "tcp:\uff12\uff12",
        id="open-wide",
    ),
    pytest.param(
        StreamOpen(stream_id=1, channel=b"shell"),  # type: ignore[arg-type]
        "not b'shell'",
        id="open-bytes",
    ),
    pytest.param(
        StreamOpen(stream_id=1, channel="shell"),
        "cols must be",
        id="open-shell-no-size",
    ),
    pytest.param(
        StreamOpen(stream_id=1, channel="shell", cols=80, rows=1001),
        "rows must be",
        id="open-shell-rows",
    ),
    pytest.param(
        StreamOpen(stream_id=1, channel="tcp:22", cols=80, rows=24),
        "no terminal size",
        id="open-tcp-size",
    ),
    pytest.param(
        StreamOpenFail(stream_id=1, code=0),  # type: ignore[arg-type]
        "unknown OpenFailCode 0",
        id="open_fail-code-0",
    ),
    pytest.param(
        StreamOpenFail(stream_id=1, code=True),  # type: ignore[arg-type]
        "unknown OpenFailCode True",
        id="open_fail-code-bool",
    ),
    pytest.param(
        StreamOpenFail(stream_id=1, code="1"),  # type: ignore[arg-type]
        "unknown OpenFailCode '1'",
        id="open_fail-code-str",
    ),
    pytest.param(
        StreamOpenFail(stream_id=1, code=OpenFailCode.NO_PTY, reason="é" * 101),
        "202 bytes of UTF-8",
        id="open_fail-reason-long",
    ),
    pytest.param(
        StreamOpenFail(stream_id=1, code=OpenFailCode.NO_PTY, reason="\ud800"),
        "not valid Unicode",
        id="open_fail-surrogate",
    ),
    pytest.param(
        StreamOpenFail(stream_id=1, code=OpenFailCode.NO_PTY, reason="\x1b[31mred"),
        "control characters",
        id="open_fail-escape",
    ),
    pytest.param(
        StreamOpenFail(stream_id=1, code=OpenFailCode.NO_PTY, reason=None),  # type: ignore[arg-type]
        "reason must be text",
        id="open_fail-reason-none",
    ),
    pytest.param(
        StreamData(stream_id=1, payload=b""), "payload is empty", id="data-empty"
    ),
    pytest.param(data(1, MAX_DATA_BYTES + 1), "at most 65531", id="data-too-big"),
    pytest.param(
        StreamData(stream_id=1, payload="text"),  # type: ignore[arg-type]
        "payload must be bytes, not str",
        id="data-str",
    ),
    pytest.param(
        StreamData(stream_id=1, payload=bytearray(b"x")),  # type: ignore[arg-type]
        "not bytearray",
        id="data-bytearray",
    ),
    pytest.param(StreamWindow(stream_id=1, credit=0), "credit must be", id="window-0"),
    pytest.param(
        StreamWindow(stream_id=1, credit=-5), "credit must be", id="window-neg"
    ),
    pytest.param(
        StreamWindow(stream_id=1, credit=MAX_WINDOW_BYTES + 1),
        "credit must be",
        id="window-big",
    ),
    pytest.param(
        StreamClose(stream_id=1, code=7),  # type: ignore[arg-type]
        "unknown StreamCloseCode 7",
        id="close-code",
    ),
    pytest.param(
        StreamResize(stream_id=1, cols=0, rows=24), "cols must be", id="resize-0"
    ),
    pytest.param(
        StreamResize(stream_id=1, cols=80, rows=1001), "rows must be", id="resize-big"
    ),
    pytest.param(Frame(), "not a tunnel frame: Frame", id="base-frame"),
    pytest.param(NotAFrame(), "not a tunnel frame: NotAFrame", id="unknown-subclass"),
]


@pytest.mark.parametrize(("frame", "message"), BAD_FRAMES)
def test_encode_refuses_bad_frames(frame: Frame, message: str) -> None:
    """Encoding a frame that breaks the layout's rules is a LocalProtocolError."""
    with pytest.raises(LocalProtocolError) as caught:
        encode(frame)
    assert message in str(caught.value)
    assert str(caught.value).startswith("cannot encode ")


def test_encode_error_names_the_frame_type() -> None:
    """The error of a known frame class names its type."""
    with pytest.raises(LocalProtocolError, match=r"^cannot encode WINDOW frame: "):
        encode(StreamWindow(stream_id=1, credit=0))


def test_codes_are_distinct_numbers() -> None:
    """The OPEN_FAIL and CLOSE codes are the wire values named in the layout."""
    assert [int(c) for c in OpenFailCode] == [1, 2, 3, 4]
    assert [int(c) for c in StreamCloseCode] == [0, 1]


# Codec: properties
# =================

STREAM_IDS: Final = st.integers(0, (MAX_STREAM_ID - 1) // 2).map(lambda k: 2 * k + 1)
SIZES: Final = st.integers(1, 1000)
REASONS: Final = st.text(
    st.characters(exclude_categories=("Cs", "Cc")), max_size=MAX_REASON_BYTES
).filter(lambda reason: len(reason.encode()) <= MAX_REASON_BYTES)

FRAMES: Final[st.SearchStrategy[Frame]] = st.one_of(
    st.builds(
        StreamOpen,
        stream_id=STREAM_IDS,
        channel=st.just("shell"),
        cols=SIZES,
        rows=SIZES,
    ),
    st.builds(
        StreamOpen,
        stream_id=STREAM_IDS,
        channel=st.integers(1, 65535).map(lambda port: f"tcp:{port}"),
    ),
    st.builds(StreamOpenOk, stream_id=STREAM_IDS),
    st.builds(
        StreamOpenFail,
        stream_id=STREAM_IDS,
        code=st.sampled_from(OpenFailCode),
        reason=REASONS,
    ),
    st.builds(
        StreamData, stream_id=STREAM_IDS, payload=st.binary(min_size=1, max_size=2048)
    ),
    st.builds(
        StreamWindow, stream_id=STREAM_IDS, credit=st.integers(1, MAX_WINDOW_BYTES)
    ),
    st.builds(StreamEof, stream_id=STREAM_IDS),
    st.builds(StreamClose, stream_id=STREAM_IDS, code=st.sampled_from(StreamCloseCode)),
    st.builds(StreamResize, stream_id=STREAM_IDS, cols=SIZES, rows=SIZES),
)


@st.composite
def frame_like_bytes(draw: st.DrawFn) -> bytes:
    """Bytes that are often close to a frame: a header of a known type, any body."""
    frame_type = draw(st.integers(0, 9))
    stream_id = draw(st.sampled_from([0, 1, 2, 3, MAX_STREAM_ID, 2**31, 2**32 - 1]))
    body = draw(
        st.binary(max_size=24)
        | st.sampled_from([b"shell", b"tcp:22", b"tcp:0", b"\x00\x50\x00\x18shell"])
    )
    return header(frame_type, stream_id) + body


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    """A valid frame's bytes with one byte changed, cut short or extended."""
    wire = bytearray(encode(draw(FRAMES)))
    action = draw(st.sampled_from(["flip", "cut", "extend"]))
    if action == "flip":
        index = draw(st.integers(0, len(wire) - 1))
        wire[index] ^= draw(st.integers(1, 255))
    elif action == "cut":
        del wire[draw(st.integers(0, len(wire) - 1)) :]
    else:
        wire += draw(st.binary(min_size=1, max_size=8))
    return bytes(wire)


@settings(max_examples=500)
@given(FRAMES)
def test_property_decode_inverts_encode(frame: Frame) -> None:
    """decode(encode(f)) == f for every valid frame."""
    assert decode(encode(frame)) == frame


@settings(max_examples=1000)
@given(st.binary(max_size=300) | frame_like_bytes() | mutated_frames())
def test_property_decode_raises_only_remote_protocol_error(wire: bytes) -> None:
    """Arbitrary bytes decode to a frame or raise RemoteProtocolError, nothing else.

    Hypothesis's per-example deadline also makes a hang a failure. A frame that
    decodes has exactly one spelling: encoding it gives the same bytes back.
    """
    try:
        frame = decode(wire)
    except RemoteProtocolError:
        return
    assert encode(frame) == wire


# Flow control
# ============


def test_flow_control_initial_window_per_direction() -> None:
    """Each direction of a new stream starts with the initial window."""
    flow = FlowControl(initial_window_bytes=100)
    flow.add_stream(1)
    assert flow.credit(1, ENGINEER) == flow.credit(1, DEVICE) == 100
    assert FlowControl().initial_window_bytes == INITIAL_WINDOW_BYTES == 256 * 1024


@pytest.mark.parametrize("sender", list(Side))
def test_flow_control_sender_within_credit_never_trips(sender: Side) -> None:
    """A sender that spends exactly its credit, then waits for WINDOW, is fine."""
    flow = FlowControl(initial_window_bytes=100)
    flow.add_stream(1)
    for _ in range(5):
        assert flow.can_send(1, sender, 100)
        flow.on_data(1, sender, 60)
        flow.on_data(1, sender, 40)
        assert flow.credit(1, sender) == 0
        assert not flow.can_send(1, sender, 1)
        flow.on_window(1, sender.peer, 100)
    assert flow.credit(1, sender.peer) == 100  # the other direction is untouched


@pytest.mark.parametrize("sender", list(Side))
def test_flow_control_one_byte_over_credit_trips(sender: Side) -> None:
    """DATA one byte beyond the credit is a protocol error."""
    flow = FlowControl(initial_window_bytes=100)
    flow.add_stream(1)
    flow.on_data(1, sender, 99)
    with pytest.raises(
        RemoteProtocolError,
        match=f"{sender.value} sent DATA on stream 1: 2 bytes with only 1 bytes of credit",
    ):
        flow.on_data(1, sender, 2)


def test_flow_control_credit_is_per_stream() -> None:
    """A stalled stream's exhausted credit does not block another stream."""
    flow = FlowControl(initial_window_bytes=10)
    flow.add_stream(1)
    flow.add_stream(3)
    flow.on_data(1, DEVICE, 10)
    assert not flow.can_send(1, DEVICE, 1)
    assert flow.can_send(3, DEVICE, 10)
    flow.on_data(3, DEVICE, 10)
    flow.on_window(3, ENGINEER, 5)
    assert flow.credit(1, DEVICE) == 0
    assert flow.credit(3, DEVICE) == 5


def test_flow_control_window_overflow() -> None:
    """Credit above MAX_WINDOW_BYTES is a protocol error; exactly the max is not."""
    flow = FlowControl(initial_window_bytes=10)
    flow.add_stream(1)
    flow.on_window(1, DEVICE, MAX_WINDOW_BYTES - 10)
    assert flow.credit(1, ENGINEER) == MAX_WINDOW_BYTES
    with pytest.raises(
        RemoteProtocolError,
        match="device sent WINDOW on stream 1: the window overflows",
    ):
        flow.on_window(1, DEVICE, 1)


def test_flow_control_unknown_stream() -> None:
    """A stream without a window has no credit, and DATA or WINDOW on it is an error."""
    flow = FlowControl()
    assert flow.credit(1, ENGINEER) == 0
    assert not flow.can_send(1, ENGINEER, 0)
    with pytest.raises(
        RemoteProtocolError, match="on stream 1: the stream has no window"
    ):
        flow.on_data(1, ENGINEER, 1)
    with pytest.raises(
        RemoteProtocolError, match="on stream 1: the stream has no window"
    ):
        flow.on_window(1, DEVICE, 1)


def test_flow_control_remove_stream() -> None:
    """A removed stream loses its windows; removing it twice is harmless."""
    flow = FlowControl()
    flow.add_stream(1)
    flow.remove_stream(1)
    flow.remove_stream(1)
    assert flow.credit(1, DEVICE) == 0


@pytest.mark.parametrize("size", [0, -1, MAX_WINDOW_BYTES + 1])
def test_flow_control_refuses_bad_initial_window(size: int) -> None:
    """The initial window is 1..MAX_WINDOW_BYTES."""
    with pytest.raises(ValueError, match="initial_window_bytes"):
        FlowControl(initial_window_bytes=size)


# Stream table: the lifecycle
# ===========================


def test_table_full_lifecycle() -> None:
    """OPEN, OPEN_OK, data both ways, EOF both ways, CLOSE both ways: gone."""
    table = StreamTable()
    assert table.receive(SHELL, sender=ENGINEER) is DELIVER
    assert 1 in table
    assert status(table, 1) == StreamStatus(
        stream_id=1, channel="shell", opened=False, eof=frozenset(), closed=frozenset()
    )
    assert table.credit(1, ENGINEER) == 0
    assert table.receive(StreamOpenOk(stream_id=1), sender=DEVICE) is DELIVER
    assert table.credit(1, ENGINEER) == INITIAL_WINDOW_BYTES
    for sender in Side:
        assert table.receive(data(1, 10), sender=sender) is DELIVER
        assert (
            table.receive(StreamWindow(stream_id=1, credit=10), sender=sender.peer)
            is DELIVER
        )
    assert (
        table.receive(StreamResize(stream_id=1, cols=100, rows=30), sender=ENGINEER)
        is DELIVER
    )
    assert table.receive(StreamEof(stream_id=1), sender=ENGINEER) is DELIVER
    assert table.credit(1, ENGINEER) == 0
    assert table.receive(data(1, 5), sender=DEVICE) is DELIVER  # half-close
    assert table.receive(StreamEof(stream_id=1), sender=DEVICE) is DELIVER
    assert status(table, 1).eof == {ENGINEER, DEVICE}
    assert table.receive(StreamClose(stream_id=1), sender=DEVICE) is DELIVER
    assert 1 in table  # the engineer still owes its CLOSE
    assert status(table, 1).closed == {DEVICE}
    assert table.receive(StreamClose(stream_id=1), sender=ENGINEER) is DELIVER
    assert 1 not in table
    assert table.status(1) is None
    assert len(table) == 0
    assert table.flow.credit(1, DEVICE) == 0  # the windows are gone too


def test_table_open_fail_then_close_ack() -> None:
    """A refused open ends once the engineer answers the OPEN_FAIL with CLOSE."""
    table = StreamTable()
    table.receive(TCP, sender=ENGINEER)
    refused = StreamOpenFail(stream_id=3, code=OpenFailCode.NOT_ALLOWED, reason="no")
    assert table.receive(refused, sender=DEVICE) is DELIVER
    assert 3 in table
    assert table.receive(StreamClose(stream_id=3), sender=ENGINEER) is DELIVER
    assert 3 not in table


def test_table_ids_may_skip() -> None:
    """Ids must increase but need not be consecutive."""
    table = StreamTable()
    table.receive(StreamOpen(stream_id=11, channel="tcp:443"), sender=ENGINEER)
    table.receive(StreamOpen(stream_id=99, channel="tcp:443"), sender=ENGINEER)
    assert list(table) == [11, 99]
    assert len(table) == 2


def test_table_iteration_is_a_copy() -> None:
    """Iterating the table while closing its streams is safe."""
    table = StreamTable()
    for stream_id in (1, 3):
        open_stream(table, stream_id)
    for stream_id in table:
        table.receive(StreamClose(stream_id=stream_id), sender=ENGINEER)
        table.receive(StreamClose(stream_id=stream_id), sender=DEVICE)
    assert len(table) == 0


def test_table_max_streams_counts_until_both_close() -> None:
    """A stream holds its slot until both final frames; then a new open fits."""
    table = StreamTable(max_streams=2)
    open_stream(table, 1)
    open_stream(table, 3)
    with pytest.raises(RemoteProtocolError, match="2 streams are alive, the limit"):
        table.receive(StreamOpen(stream_id=5, channel="tcp:22"), sender=ENGINEER)


def test_table_slot_freed_after_both_closes() -> None:
    """Once both sides closed a stream, its slot is free again."""
    table = StreamTable(max_streams=1)
    open_stream(table, 1)
    table.receive(StreamClose(stream_id=1), sender=ENGINEER)
    closing = StreamTable(max_streams=1)
    open_stream(closing, 1)
    closing.receive(StreamClose(stream_id=1), sender=ENGINEER)
    with pytest.raises(RemoteProtocolError, match="the limit"):
        closing.receive(TCP, sender=ENGINEER)  # half-closed still counts
    table.receive(StreamClose(stream_id=1), sender=DEVICE)
    assert table.receive(TCP, sender=ENGINEER) is DELIVER


def test_table_default_limit() -> None:
    """The default limit is MAX_STREAMS (16) streams."""
    table = StreamTable()
    assert table.max_streams == MAX_STREAMS == 16
    for index in range(MAX_STREAMS):
        table.receive(
            StreamOpen(stream_id=2 * index + 1, channel="tcp:22"), sender=ENGINEER
        )
    with pytest.raises(RemoteProtocolError, match="16 streams are alive"):
        table.receive(StreamOpen(stream_id=33, channel="tcp:22"), sender=ENGINEER)


def test_table_granted_channels() -> None:
    """With channels=, only granted channels may be opened."""
    table = StreamTable(channels=["shell", "tcp:443"])
    assert table.receive(SHELL, sender=ENGINEER) is DELIVER
    with pytest.raises(
        RemoteProtocolError, match="channel 'tcp:22' is not granted for this session"
    ):
        table.receive(TCP, sender=ENGINEER)


def test_table_refuses_bad_max_streams() -> None:
    """max_streams is at least 1."""
    with pytest.raises(ValueError, match="max_streams"):
        StreamTable(max_streams=0)


def test_table_credit_and_can_send() -> None:
    """credit() and can_send() answer what one DATA frame may carry now."""
    table = StreamTable(initial_window_bytes=MAX_DATA_BYTES + 10)
    assert table.credit(1, ENGINEER) == 0  # unknown stream
    open_stream(table, 1)
    assert table.credit(1, DEVICE) == MAX_DATA_BYTES + 10
    assert table.can_send(1, DEVICE, MAX_DATA_BYTES)
    assert not table.can_send(1, DEVICE, MAX_DATA_BYTES + 1)  # above one frame
    assert not table.can_send(1, DEVICE, 0)  # empty DATA is malformed
    table.receive(data(1, MAX_DATA_BYTES), sender=DEVICE)
    assert table.can_send(1, DEVICE, 10)
    assert not table.can_send(1, DEVICE, 11)
    table.receive(StreamClose(stream_id=1), sender=DEVICE)
    assert table.credit(1, DEVICE) == 0  # after its final frame
    assert table.credit(1, ENGINEER) == MAX_DATA_BYTES + 10  # the other direction


# Stream table: rules
# ===================


def stream_table_with(*frames: tuple[Frame, Side]) -> StreamTable:
    """A table that has seen *frames* (each with its sender) without error."""
    table = StreamTable(initial_window_bytes=100)
    for frame, sender in frames:
        table.receive(frame, sender=sender)
    return table


OPENED: Final = ((SHELL, ENGINEER), (StreamOpenOk(stream_id=1), DEVICE))
TCP_OPENED: Final = ((TCP, ENGINEER), (StreamOpenOk(stream_id=3), DEVICE))

RULES: Final = [
    pytest.param(
        (), SHELL, DEVICE, "only the engineer opens streams", id="device-opens"
    ),
    pytest.param(OPENED, SHELL, ENGINEER, "already used", id="open-same-id"),
    pytest.param(
        ((StreamOpen(stream_id=5, channel="tcp:22"), ENGINEER),),
        TCP,
        ENGINEER,
        "already used (ids must increase; last was 5)",
        id="open-lower-id",
    ),
    pytest.param(
        ((SHELL, ENGINEER),),
        StreamOpenOk(stream_id=1),
        ENGINEER,
        "only the device answers an OPEN",
        id="engineer-open_ok",
    ),
    pytest.param(
        ((SHELL, ENGINEER),),
        StreamOpenFail(stream_id=1, code=OpenFailCode.NO_PTY),
        ENGINEER,
        "only the device answers an OPEN",
        id="engineer-open_fail",
    ),
    pytest.param(
        OPENED, StreamOpenOk(stream_id=1), DEVICE, "already open", id="open_ok-twice"
    ),
    pytest.param(
        OPENED,
        StreamOpenFail(stream_id=1, code=OpenFailCode.NO_PTY),
        DEVICE,
        "the stream is open; end it with CLOSE",
        id="open_fail-after-open_ok",
    ),
    pytest.param(
        ((SHELL, ENGINEER),),
        data(1, 1),
        ENGINEER,
        "not open yet (before OPEN_OK)",
        id="data-before-open_ok-engineer",
    ),
    pytest.param(
        ((SHELL, ENGINEER),),
        data(1, 1),
        DEVICE,
        "not open yet (before OPEN_OK)",
        id="data-before-open_ok-device",
    ),
    pytest.param(
        ((SHELL, ENGINEER),),
        StreamWindow(stream_id=1, credit=1),
        ENGINEER,
        "before OPEN_OK",
        id="window-before-open_ok",
    ),
    pytest.param(
        ((SHELL, ENGINEER),),
        StreamEof(stream_id=1),
        ENGINEER,
        "before OPEN_OK",
        id="eof-before-open_ok",
    ),
    pytest.param(
        ((SHELL, ENGINEER),),
        StreamResize(stream_id=1, cols=1, rows=1),
        ENGINEER,
        "before OPEN_OK",
        id="resize-before-open_ok",
    ),
    pytest.param(
        (*OPENED, (StreamEof(stream_id=1), ENGINEER)),
        data(1, 1),
        ENGINEER,
        "DATA after the sender's own EOF",
        id="data-after-eof",
    ),
    pytest.param(
        (*OPENED, (StreamEof(stream_id=1), DEVICE)),
        StreamEof(stream_id=1),
        DEVICE,
        "a second EOF",
        id="eof-twice",
    ),
    pytest.param(
        TCP_OPENED,
        StreamResize(stream_id=3, cols=80, rows=24),
        ENGINEER,
        "RESIZE on a tcp stream",
        id="resize-tcp",
    ),
    pytest.param(
        OPENED,
        StreamResize(stream_id=1, cols=80, rows=24),
        DEVICE,
        "only the engineer resizes",
        id="resize-from-device",
    ),
    pytest.param(
        ((SHELL, ENGINEER),),
        StreamClose(stream_id=1),
        DEVICE,
        "refuse an OPEN with OPEN_FAIL",
        id="device-close-before-open_ok",
    ),
    pytest.param((), data(1, 1), ENGINEER, "never opened", id="data-unknown"),
    pytest.param(
        (), StreamClose(stream_id=1), DEVICE, "never opened", id="close-unknown"
    ),
    pytest.param(
        OPENED, StreamOpenOk(stream_id=3), DEVICE, "never opened", id="open_ok-unknown"
    ),
    pytest.param(
        (
            *OPENED,
            (StreamClose(stream_id=1), ENGINEER),
            (StreamClose(stream_id=1), DEVICE),
        ),
        data(1, 1),
        DEVICE,
        "stream 1: the stream is gone",
        id="data-after-both-close",
    ),
    pytest.param(
        (
            *OPENED,
            (StreamClose(stream_id=1), ENGINEER),
            (StreamClose(stream_id=1), DEVICE),
        ),
        StreamClose(stream_id=1),
        ENGINEER,
        "the stream is gone",
        id="close-after-both-close",
    ),
    pytest.param(
        (
            (StreamOpen(stream_id=5, channel="tcp:22"), ENGINEER),
            (StreamOpenOk(stream_id=5), DEVICE),
        ),
        data(3, 1),
        ENGINEER,
        "stream 3: the stream is gone (closed, or its id was skipped)",
        id="data-on-skipped-id",
    ),
    pytest.param(
        (*OPENED, (StreamClose(stream_id=1), ENGINEER)),
        data(1, 1),
        ENGINEER,
        "already sent its final frame",
        id="data-after-own-close",
    ),
    pytest.param(
        (*OPENED, (StreamClose(stream_id=1), ENGINEER)),
        StreamClose(stream_id=1),
        ENGINEER,
        "already sent its final frame",
        id="close-twice",
    ),
    pytest.param(
        (
            (SHELL, ENGINEER),
            (StreamOpenFail(stream_id=1, code=OpenFailCode.NO_PTY), DEVICE),
        ),
        StreamClose(stream_id=1),
        DEVICE,
        "already sent its final frame",
        id="device-close-after-open_fail",
    ),
    pytest.param(
        (
            (SHELL, ENGINEER),
            (StreamOpenFail(stream_id=1, code=OpenFailCode.NO_PTY), DEVICE),
        ),
        StreamOpenOk(stream_id=1),
        DEVICE,
        "already sent its final frame",
        id="open_ok-after-open_fail",
    ),
    pytest.param(
        OPENED,
        data(1, 101),
        DEVICE,
        "device sent DATA on stream 1: 101 bytes with only 100 bytes of credit",
        id="data-over-credit",
    ),
    pytest.param(
        OPENED,
        StreamWindow(stream_id=1, credit=MAX_WINDOW_BYTES),
        ENGINEER,
        "engineer sent WINDOW on stream 1: the window overflows",
        id="window-overflow",
    ),
]


@pytest.mark.parametrize(("before", "frame", "sender", "message"), RULES)
def test_table_rule_violations(
    before: tuple[tuple[Frame, Side], ...], frame: Frame, sender: Side, message: str
) -> None:
    """Each broken stream rule is a RemoteProtocolError naming sender and stream."""
    table = stream_table_with(*before)
    with pytest.raises(RemoteProtocolError) as caught:
        table.receive(frame, sender=sender)
    assert message in str(caught.value)
    assert str(caught.value).startswith(f"{sender.value} sent")


@pytest.mark.parametrize(("before", "frame", "sender", "message"), RULES)
def test_table_send_rule_violations(
    before: tuple[tuple[Frame, Side], ...], frame: Frame, sender: Side, message: str
) -> None:
    """The same rules refuse our own frames in send() with a LocalProtocolError."""
    table = stream_table_with(*before)
    with pytest.raises(LocalProtocolError) as caught:
        table.send(frame, sender=sender)
    assert message in str(caught.value)


def test_table_refuses_everything_after_an_error() -> None:
    """After a protocol error the table refuses every frame (Rule 6)."""
    table = stream_table_with(*OPENED)
    with pytest.raises(RemoteProtocolError):
        table.receive(data(1, 1000), sender=DEVICE)
    with pytest.raises(RemoteProtocolError, match="after a protocol error"):
        table.receive(data(1, 1), sender=DEVICE)
    with pytest.raises(LocalProtocolError, match="after a protocol error"):
        table.send(data(1, 1), sender=ENGINEER)


def test_table_send_error_breaks_the_table() -> None:
    """A frame we may not send also leaves the table refusing frames."""
    table = StreamTable()
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        table.send(StreamWindow(stream_id=1, credit=0), sender=ENGINEER)
    with pytest.raises(RemoteProtocolError, match="after a protocol error"):
        table.receive(SHELL, sender=ENGINEER)


def test_table_receive_refuses_non_frames() -> None:
    """receive() takes frames from decode(); anything else is a TypeError."""
    with pytest.raises(TypeError, match="not a tunnel frame: NotAFrame"):
        StreamTable().receive(NotAFrame(), sender=ENGINEER)


# Stream table: races
# ===================


@pytest.mark.parametrize("closer", list(Side))
def test_race_late_frames_after_peer_close_are_dropped(closer: Side) -> None:
    """After one side's CLOSE, the other side's in-flight frames are dropped.

    Example: the engineer closes a port-forward while the device is still sending
    the web page; the device's DATA, WINDOW and EOF that were on their way are
    checked and dropped, and its CLOSE ends the stream.
    """
    late = closer.peer
    table = stream_table_with(*OPENED)
    assert table.receive(StreamClose(stream_id=1), sender=closer) is DELIVER
    assert table.receive(data(1, 100), sender=late) is DROP
    assert table.receive(StreamWindow(stream_id=1, credit=5), sender=late) is DROP
    if late is ENGINEER:
        assert (
            table.receive(StreamResize(stream_id=1, cols=9, rows=9), sender=late)
            is DROP
        )
    assert table.receive(StreamEof(stream_id=1), sender=late) is DROP
    assert table.receive(StreamClose(stream_id=1), sender=late) is DELIVER
    assert 1 not in table


@pytest.mark.parametrize("closer", list(Side))
def test_race_dropped_frames_are_still_checked(closer: Side) -> None:
    """A late frame that breaks a rule is an error even though it would be dropped."""
    late = closer.peer
    table = stream_table_with(*OPENED)
    table.receive(StreamClose(stream_id=1), sender=closer)
    table.receive(data(1, 100), sender=late)
    with pytest.raises(RemoteProtocolError, match="with only 0 bytes of credit"):
        table.receive(data(1, 1), sender=late)


def test_race_eof_then_data_after_peer_close_is_an_error() -> None:
    """DATA after the sender's own EOF is an error, also while the peer closed."""
    table = stream_table_with(*OPENED)
    table.receive(StreamEof(stream_id=1), sender=DEVICE)
    table.receive(StreamClose(stream_id=1), sender=ENGINEER)
    with pytest.raises(RemoteProtocolError, match="after the sender's own EOF"):
        table.receive(data(1, 1), sender=DEVICE)


def test_race_simultaneous_close() -> None:
    """Two CLOSEs that cross are each other's answer."""
    table = stream_table_with(*OPENED)
    assert table.receive(StreamClose(stream_id=1), sender=DEVICE) is DELIVER
    assert table.receive(StreamClose(stream_id=1), sender=ENGINEER) is DELIVER
    assert len(table) == 0


def test_race_cancel_crosses_open_ok() -> None:
    """The engineer cancels an open; the device's OPEN_OK and DATA are dropped."""
    table = stream_table_with((SHELL, ENGINEER))
    assert table.receive(StreamClose(stream_id=1), sender=ENGINEER) is DELIVER
    assert table.receive(StreamOpenOk(stream_id=1), sender=DEVICE) is DROP
    assert table.receive(data(1, 100), sender=DEVICE) is DROP
    assert table.receive(StreamClose(stream_id=1), sender=DEVICE) is DELIVER
    assert len(table) == 0


def test_race_cancel_answered_before_open_ok() -> None:
    """A device that saw the cancel before answering acknowledges with CLOSE."""
    table = stream_table_with((SHELL, ENGINEER))
    table.receive(StreamClose(stream_id=1), sender=ENGINEER)
    assert table.receive(StreamClose(stream_id=1), sender=DEVICE) is DELIVER
    assert len(table) == 0


def test_race_cancel_crosses_open_fail() -> None:
    """A cancel that crosses an OPEN_FAIL: the OPEN_FAIL is the device's final frame."""
    table = stream_table_with((TCP, ENGINEER))
    table.receive(StreamClose(stream_id=3), sender=ENGINEER)
    refused = StreamOpenFail(stream_id=3, code=OpenFailCode.CONNECT_FAILED)
    assert table.receive(refused, sender=DEVICE) is DELIVER
    assert len(table) == 0


@pytest.mark.parametrize("eof_sender", list(Side))
def test_race_window_after_peer_eof_is_dropped(eof_sender: Side) -> None:
    """Credit for a direction that has sent EOF is dropped: it cannot be used."""
    table = stream_table_with(*OPENED)
    table.receive(StreamEof(stream_id=1), sender=eof_sender)
    window = StreamWindow(stream_id=1, credit=MAX_WINDOW_BYTES)  # not even checked
    assert table.receive(window, sender=eof_sender.peer) is DROP
    assert table.flow.credit(1, eof_sender) == 100


def test_race_window_from_eof_sender_still_counts() -> None:
    """A side that sent EOF still receives, so its WINDOW is delivered."""
    table = stream_table_with(*OPENED)
    table.receive(StreamEof(stream_id=1), sender=ENGINEER)
    assert (
        table.receive(StreamWindow(stream_id=1, credit=7), sender=ENGINEER) is DELIVER
    )
    assert table.credit(1, DEVICE) == 107


# Stream table: endpoints
# =======================


def test_endpoint_send_returns_the_wire_form() -> None:
    """send() checks our frame and returns encode(frame)."""
    engineer = StreamTable()
    assert engineer.send(SHELL, sender=ENGINEER) == encode(SHELL)
    assert 1 in engineer


def test_endpoint_owes_close_after_peer_close() -> None:
    """After the peer's CLOSE is delivered, `stream_id in table` means: send CLOSE."""
    device = StreamTable()
    device.receive(SHELL, sender=ENGINEER)
    device.send(StreamOpenOk(stream_id=1), sender=DEVICE)
    assert device.receive(StreamClose(stream_id=1), sender=ENGINEER) is DELIVER
    assert 1 in device  # we still owe our CLOSE
    device.send(StreamClose(stream_id=1), sender=DEVICE)
    assert 1 not in device


def test_endpoint_no_close_owed_when_ours_was_first() -> None:
    """If our CLOSE went first, the peer's CLOSE ends the stream: nothing owed."""
    engineer = StreamTable()
    engineer.send(SHELL, sender=ENGINEER)
    engineer.receive(StreamOpenOk(stream_id=1), sender=DEVICE)
    engineer.send(StreamClose(stream_id=1), sender=ENGINEER)
    assert engineer.receive(data(1, 3), sender=DEVICE) is DROP
    assert engineer.receive(StreamClose(stream_id=1), sender=DEVICE) is DELIVER
    assert 1 not in engineer


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(data(1, 1), id="data"),
        pytest.param(StreamWindow(stream_id=1, credit=1), id="window"),
        pytest.param(StreamEof(stream_id=1), id="eof"),
    ],
)
def test_endpoint_may_not_send_after_seeing_peer_close(frame: Frame) -> None:
    """An endpoint that has seen the peer's CLOSE may only answer with CLOSE."""
    device = stream_table_with(*OPENED)
    device.receive(StreamClose(stream_id=1), sender=ENGINEER)
    with pytest.raises(
        LocalProtocolError,
        match=f"device may not send {frame.TYPE.name} on stream 1: the engineer already closed",
    ):
        device.send(frame, sender=DEVICE)


def test_endpoint_may_not_open_ok_a_cancelled_open() -> None:
    """A device that has seen the cancel answers it with CLOSE, not OPEN_OK."""
    device = stream_table_with((SHELL, ENGINEER), (StreamClose(stream_id=1), ENGINEER))
    with pytest.raises(LocalProtocolError, match="already closed the stream"):
        device.send(StreamOpenOk(stream_id=1), sender=DEVICE)


def test_endpoint_may_not_grant_credit_after_peer_eof() -> None:
    """Granting credit to a side that sent EOF is a local bug, not a race."""
    engineer = stream_table_with(*OPENED, (StreamEof(stream_id=1), DEVICE))
    with pytest.raises(LocalProtocolError, match="the device already sent EOF"):
        engineer.send(StreamWindow(stream_id=1, credit=1), sender=ENGINEER)


def test_endpoint_send_keeps_close_code_of_rule_errors() -> None:
    """A rule error from send() keeps the protocol-error close code."""
    with pytest.raises(LocalProtocolError) as caught:
        StreamTable().send(SHELL, sender=DEVICE)
    assert caught.value.close_code == CloseCode.PROTOCOL_ERROR


# Three views of one session: engineer, broker, device
# ====================================================


@dataclass
class Endpoint:
    """A compliant endpoint in the simulation below."""

    side: Side
    table: StreamTable
    to_grant: dict[int, int] = field(default_factory=dict)  # consumed, not granted

    def send(self, frame: Frame, out: deque[bytes]) -> None:
        """Send *frame* (checked by our table) into the queue *out*."""
        out.append(self.table.send(frame, sender=self.side))

    def receive(self, wire: bytes, out: deque[bytes]) -> None:
        """Handle a frame from the peer the way the endpoint shells should."""
        frame = decode(wire)
        if self.table.receive(frame, sender=self.side.peer) is DROP:
            return
        if isinstance(frame, StreamData):
            # Consumed at once; the credit goes back with a later WINDOW.
            self.to_grant[frame.stream_id] = self.to_grant.get(
                frame.stream_id, 0
            ) + len(frame.payload)
        if (
            isinstance(frame, StreamClose | StreamOpenFail)
            and frame.stream_id in self.table
        ):
            self.send(StreamClose(stream_id=frame.stream_id), out)


class Session:
    """An engineer and a device, with a broker relaying between them."""

    def __init__(self, window: int, max_streams: int) -> None:
        def table() -> StreamTable:
            return StreamTable(initial_window_bytes=window, max_streams=max_streams)

        self.engineer = Endpoint(ENGINEER, table())
        self.device = Endpoint(DEVICE, table())
        self.broker = table()
        self.to_broker = {ENGINEER: deque[bytes](), DEVICE: deque[bytes]()}
        self.from_broker = {ENGINEER: deque[bytes](), DEVICE: deque[bytes]()}
        self.next_id = 1

    def endpoint(self, side: Side) -> Endpoint:
        return self.engineer if side is ENGINEER else self.device

    def out(self, side: Side) -> deque[bytes]:
        """Where *side* sends."""
        return self.to_broker[side]

    def step_broker(self, sender: Side) -> None:
        """The broker checks one frame from *sender* and relays it unless dropped."""
        wire = self.to_broker[sender].popleft()
        if self.broker.receive(decode(wire), sender=sender) is DELIVER:
            self.from_broker[sender.peer].append(wire)

    def step_endpoint(self, receiver: Side) -> None:
        """*receiver* handles one frame the broker relayed to it."""
        wire = self.from_broker[receiver].popleft()
        self.endpoint(receiver).receive(wire, self.out(receiver))

    def queues(self) -> list[deque[bytes]]:
        return [*self.to_broker.values(), *self.from_broker.values()]

    def check_credit_views(self) -> None:
        """The broker and the receiver never see less credit than the sender."""
        for sender in Side:
            mine = self.endpoint(sender).table
            others = (self.broker, self.endpoint(sender.peer).table)
            for stream_id in mine:
                for view in others:
                    seen = view.status(stream_id)
                    if seen is not None and seen.opened:
                        assert view.flow.credit(stream_id, sender) >= mine.credit(
                            stream_id, sender
                        )


def enabled_actions(session: Session) -> list[tuple[str, Any]]:
    """Every action a compliant endpoint or the network may take now."""
    actions: list[tuple[str, Any]] = []
    engineer = session.engineer.table
    if len(engineer) < engineer.max_streams:
        actions.append(("open", None))
    for side in Side:
        ep = session.endpoint(side)
        for stream_id in ep.table:
            seen = status(ep.table, stream_id)
            if side in seen.closed or side.peer in seen.closed:
                continue  # we owe nothing but the CLOSE we already sent at once
            if side is DEVICE and not seen.opened:
                actions.append(("answer", stream_id))
                continue
            if side is ENGINEER:
                actions.append(("close", (side, stream_id)))
            if not seen.opened:
                continue
            if side is DEVICE:
                actions.append(("close", (side, stream_id)))
            if ep.table.can_send(stream_id, side, 1):
                actions.append(("data", (side, stream_id)))
            if side not in seen.eof:
                actions.append(("eof", (side, stream_id)))
            if ep.to_grant.get(stream_id, 0) and side.peer not in seen.eof:
                actions.append(("window", (side, stream_id)))
            if side is ENGINEER and seen.channel == "shell":
                actions.append(("resize", stream_id))
    for sender in Side:
        if session.to_broker[sender]:
            actions.append(("broker", sender))
        if session.from_broker[sender]:
            actions.append(("deliver", sender))
    return actions


# Hypothesis favours the first entries of sampled_from: the traffic comes first,
# so that streams carry data and credit before they are closed.
_PRIORITY: Final = (
    "data",
    "window",
    "answer",
    "broker",
    "deliver",
    "resize",
    "eof",
    "open",
    "close",
)


def act(session: Session, name: str, arg: Any, source: st.DataObject) -> None:
    """Perform one action of enabled_actions()."""
    if name == "open":
        channel = source.draw(st.sampled_from(["shell", "tcp:22"]))
        size = 24 if channel == "shell" else 0
        frame = StreamOpen(
            stream_id=session.next_id, channel=channel, cols=size, rows=size
        )
        session.next_id += 2 * source.draw(st.integers(1, 2))
        session.engineer.send(frame, session.out(ENGINEER))
    elif name == "answer":
        frame_ok: Frame = (
            StreamOpenFail(stream_id=arg, code=OpenFailCode.NOT_ALLOWED)
            if source.draw(st.booleans())  # False, the simpler draw, opens it
            else StreamOpenOk(stream_id=arg)
        )
        session.device.send(frame_ok, session.out(DEVICE))
    elif name == "broker":
        session.step_broker(arg)
    elif name == "deliver":
        session.step_endpoint(arg)
    elif name == "resize":
        session.engineer.send(
            StreamResize(stream_id=arg, cols=100, rows=40), session.out(ENGINEER)
        )
    else:
        side, stream_id = arg
        ep = session.endpoint(side)
        frame_out: Frame
        if name == "close":
            frame_out = StreamClose(stream_id=stream_id)
        elif name == "data":
            credit = ep.table.credit(stream_id, side)
            frame_out = data(stream_id, source.draw(st.integers(1, min(credit, 40))))
        elif name == "eof":
            frame_out = StreamEof(stream_id=stream_id)
        else:
            frame_out = StreamWindow(
                stream_id=stream_id, credit=ep.to_grant.pop(stream_id)
            )
        ep.send(frame_out, session.out(side))


def drain(session: Session) -> None:
    """Answer every open, close every stream and deliver everything."""
    for _ in range(4):
        for stream_id in session.device.table:
            seen = status(session.device.table, stream_id)
            if not seen.opened and not seen.closed:
                refused = StreamOpenFail(stream_id=stream_id, code=OpenFailCode.NO_PTY)
                session.device.send(refused, session.out(DEVICE))
        for side in Side:
            ep = session.endpoint(side)
            for stream_id in ep.table:
                seen = status(ep.table, stream_id)
                if side not in seen.closed and (seen.opened or side is ENGINEER):
                    ep.send(StreamClose(stream_id=stream_id), session.out(side))
        while any(session.queues()):
            for sender in Side:
                while session.to_broker[sender]:
                    session.step_broker(sender)
                while session.from_broker[sender]:
                    session.step_endpoint(sender)


@settings(max_examples=80, deadline=None)
@given(
    st.data(),
    st.integers(1, 120),
    st.integers(1, 4),
)
def test_property_compliant_endpoints_never_break_the_rules(
    data_: st.DataObject, window: int, max_streams: int
) -> None:
    """Compliant endpoints, any interleaving: no error anywhere, and all ends clean.

    The engineer, the broker and the device each keep a StreamTable; frames travel
    in order on each leg but the two directions interleave at random, so every race
    above (close against data, cancel against OPEN_OK or OPEN_FAIL, simultaneous
    close, WINDOW against EOF) happens. No table may raise, the broker and the
    receiver never see less credit than the sender, and after everything is closed
    and delivered all three tables are empty.
    """
    session = Session(window, max_streams)
    steps = data_.draw(st.integers(20, 120), label="steps")
    for _ in range(steps):
        actions = enabled_actions(session)
        if not actions:
            break
        # The kind of action first, then which one: many streams must not make
        # opening and closing crowd out the traffic.
        kinds = sorted({name for name, _ in actions}, key=_PRIORITY.index)
        kind = data_.draw(st.sampled_from(kinds), label="kind")
        args = [arg for name, arg in actions if name == kind]
        act(session, kind, data_.draw(st.sampled_from(args), label="which"), data_)
        session.check_credit_views()
    drain(session)
    assert not any(session.queues())
    assert (
        len(session.engineer.table)
        == len(session.broker)
        == len(session.device.table)
        == 0
    )
