"""Cast lines, the recording cap and forward digests (relay/audit/recording.py)."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from typing import Final

import pytest
from hypothesis import given, strategies as st

from relay.audit.recording import (
    TERM,
    CastEncoder,
    DirectionDigest,
    DirectionTotals,
    ForwardDigest,
    ForwardRecord,
    RecordingCap,
)
from relay.proto.tunnel import Side

EMPTY_SHA256: Final = hashlib.sha256(b"").hexdigest()


def _encoder(*, record_input: bool = False, title: str | None = None) -> CastEncoder:
    return CastEncoder(80, 24, 1_780_000_000, record_input=record_input, title=title)


def _events(data: bytes) -> list[list[object]]:
    events = [json.loads(line) for line in data.splitlines()]
    assert all(isinstance(event, list) for event in events)
    return events


def _assert_safe(data: bytes) -> None:
    """ASCII only, one JSON value per line, no raw control byte but the newlines."""
    assert data.endswith(b"\n")
    for line in data.split(b"\n")[:-1]:
        assert all(0x20 <= byte < 0x7F for byte in line), line
        json.loads(line)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# Header
# ======


def test_header_exact_bytes() -> None:
    """The header is one JSON object in asciinema's key order, ending in a newline."""
    assert _encoder().header() == (
        b'{"version": 2, "width": 80, "height": 24, "timestamp": 1780000000, '
        b'"env": {"TERM": "xterm-256color"}}\n'
    )
    assert TERM == "xterm-256color"


def test_header_title_is_escaped() -> None:
    """A title with control and non-ASCII characters comes out escaped."""
    header = _encoder(title="s\x1b[2J\x7f\u202e\u00e9").header()
    _assert_safe(header)
    parsed = json.loads(header)
    assert parsed["title"] == "s\x1b[2J\x7f\u202e\u00e9"
    assert list(parsed) == ["version", "width", "height", "timestamp", "env", "title"]


@pytest.mark.parametrize(
    ("width", "height", "timestamp"),
    [(0, 24, 0), (80, 0, 0), (80, 24, -1), (True, 24, 0), (80.0, 24, 0)],
)
def test_header_fields_are_checked(
    width: object, height: object, timestamp: object
) -> None:
    """Sizes are positive integers and the timestamp a non-negative one."""
    with pytest.raises(ValueError, match="must be an integer"):
        CastEncoder(width, height, timestamp, record_input=False)  # type: ignore[arg-type]


# Events
# ======


def test_event_lines_exact_bytes() -> None:
    """Each event is [time, code, data] with six decimals, one per line."""
    encoder = _encoder(record_input=True)
    assert encoder.output(0.25, b"$ ") == b'[0.250000, "o", "$ "]\n'
    assert encoder.input(1.5, b"ls\r") == b'[1.500000, "i", "ls\\r"]\n'
    assert encoder.resize(2, 120, 40) == b'[2.000000, "r", "120x40"]\n'
    assert encoder.marker(3.0, "note") == b'[3.000000, "m", "note"]\n'


def test_times_are_microseconds() -> None:
    """Times round to the microsecond and never use exponent notation."""
    encoder = _encoder()
    assert encoder.output(1e-6, b"a").startswith(b"[0.000001, ")
    assert encoder.output(0.1234567, b"a").startswith(b"[0.123457, ")
    assert encoder.output(123456.0000004, b"a").startswith(b"[123456.000000, ")


def test_times_never_negative_nor_decreasing() -> None:
    """A time below 0 or below the cast's previous time is written as that time."""
    encoder = _encoder()
    assert encoder.output(-5.0, b"a").startswith(b"[0.000000, ")
    assert encoder.output(-1e-9, b"a").startswith(b"[0.000000, ")
    assert encoder.output(2.0, b"a").startswith(b"[2.000000, ")
    assert encoder.output(1.0, b"a").startswith(b"[2.000000, ")


@pytest.mark.parametrize("t", [math.nan, math.inf, -math.inf])
def test_non_finite_time_is_refused(t: float) -> None:
    """A NaN or infinite time is a caller bug, not something to write."""
    with pytest.raises(ValueError, match="finite"):
        _encoder().output(t, b"a")
    with pytest.raises(ValueError, match="finite"):
        _encoder().finish(t)


def test_split_character_comes_out_whole() -> None:
    """A character split across frames is written with the frame that ends it."""
    encoder = _encoder()
    euro = "€".encode()
    assert encoder.output(0.1, euro[:1]) == b""
    assert encoder.output(0.2, euro[1:2]) == b""
    assert _events(encoder.output(0.3, euro[2:] + b"!")) == [[0.3, "o", "€!"]]
    assert encoder.finish(0.4) == b""


def test_invalid_bytes_become_replacement_characters() -> None:
    """Bytes that are not UTF-8 become U+FFFD."""
    line = _encoder().output(0.0, b"a\xffb\xc0\x80")
    assert _events(line)[0][2] == "a\ufffdb\ufffd\ufffd"


def test_finish_flushes_partial_characters() -> None:
    """A partial character left at the end comes out as U+FFFD, output then input."""
    encoder = _encoder(record_input=True)
    assert encoder.output(0.0, b"\xe2\x82") == b""
    assert encoder.input(0.0, b"\xc3") == b""
    assert _events(encoder.finish(1.0)) == [[1.0, "o", "\ufffd"], [1.0, "i", "\ufffd"]]
    assert encoder.finish(2.0) == b""


def test_input_is_not_recorded_by_default() -> None:
    """Without record_input no input is written, not even a dangling partial character."""
    encoder = _encoder()
    assert encoder.input(0.0, b"hunter2\r") == b""
    assert encoder.input(0.0, b"\xc3") == b""
    assert encoder.finish(1.0) == b""


INJECTIONS: Final = [
    b"\x1b]0;title\x07\x1b[2J",
    b"nul\x00byte\r\n",
    b"del\x7fchar",
    "c1\u0085\u009b31m".encode(),
    "bidi\u202etxt\u2028sep".encode(),
    b'"quote" and \\backslash',
]


@pytest.mark.parametrize("payload", INJECTIONS)
def test_control_characters_are_escaped(payload: bytes) -> None:
    """Escape sequences, NUL, DEL and non-ASCII reach the file only as JSON escapes."""
    encoder = _encoder(record_input=True)
    for line in (encoder.output(0.0, payload), encoder.input(0.0, payload)):
        _assert_safe(line)
        assert _events(line)[0][2] == payload.decode()


@given(text=st.text(), cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_any_split_of_text_decodes_like_the_whole(text: str, cuts: list[int]) -> None:
    """However UTF-8 bytes are cut into frames, the events add up to the text."""
    encoder = _encoder()
    out = b"".join(encoder.output(0.0, chunk) for chunk in _split(text.encode(), cuts))
    out += encoder.finish(0.0)
    assert "".join(str(event[2]) for event in _events(out)) == text


@given(data=st.binary(), cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_any_split_of_bytes_decodes_like_the_whole(
    data: bytes, cuts: list[int]
) -> None:
    """Invalid UTF-8 too: incremental decoding equals decoding all at once."""
    encoder = _encoder(record_input=True)
    out = b"".join(encoder.input(0.0, chunk) for chunk in _split(data, cuts))
    out += encoder.finish(0.0)
    decoded = "".join(str(event[2]) for event in _events(out))
    assert decoded == data.decode("utf-8", errors="replace")


@given(
    payloads=st.lists(st.binary(min_size=1), max_size=10),
    title=st.none() | st.text(),
    marker=st.text(),
)
def test_every_line_is_safe_json(
    payloads: list[bytes], title: str | None, marker: str
) -> None:
    """Every line is ASCII JSON without a raw control byte or DEL."""
    encoder = _encoder(record_input=True, title=title)
    data = encoder.header()
    for i, payload in enumerate(payloads):
        data += encoder.output(i, payload) + encoder.input(i, payload)
    data += encoder.marker(99.0, marker) + encoder.finish(100.0)
    _assert_safe(data)


# The cap
# =======


def _marker_line(cap: RecordingCap, t: float) -> bytes:
    return _encoder().marker(t, cap.marker_text)


def test_cap_admits_lines_while_the_marker_still_fits() -> None:
    """Lines pass while there is room for them and one marker; then the marker, once."""
    cap = RecordingCap(1_000)
    assert cap.marker_text == "recording truncated: cap of 1000 bytes reached"
    room = 1_000 - len(_marker_line(cap, 0.0)) - 10  # what the reserve leaves
    encoder = _encoder()
    assert cap.admit(encoder, 1.0, b"x" * (room - 10)) == b"x" * (room - 10)
    assert (cap.used, cap.truncated) == (room - 10, False)
    marker = cap.admit(encoder, 2.0, b"y" * 11)
    assert _events(marker) == [[2.0, "m", cap.marker_text]]
    assert cap.truncated
    assert cap.used == room - 10 + len(marker) <= cap.max_bytes
    assert cap.admit(encoder, 3.0, b"z") == b""
    assert cap.used == room - 10 + len(marker)


def test_cap_exact_fit() -> None:
    """A line that leaves exactly the reserve is admitted."""
    cap = RecordingCap(1_000)
    reserve = len(_marker_line(cap, 0.0)) + 10
    cap = RecordingCap(1_000)
    line = b"x" * (1_000 - reserve)
    assert cap.admit(_encoder(), 0.0, line) == line
    assert not cap.truncated
    assert _events(cap.admit(_encoder(), 0.0, b"y"))[0][1] == "m"


def test_cap_empty_line_costs_nothing() -> None:
    """Nothing to write is never a reason to truncate."""
    cap = RecordingCap(0)
    assert cap.admit(_encoder(), 0.0, b"") == b""
    assert not cap.truncated


def test_cap_refused_header_truncates_without_marker() -> None:
    """A cast whose header does not fit is never started."""
    cap = RecordingCap(10)
    assert not cap.admit_header(_encoder().header())
    assert cap.truncated
    assert cap.used == 0


def test_cap_after_truncation_refuses_headers() -> None:
    """Once truncated, no new cast starts, however small."""
    cap = RecordingCap(10_000)
    encoder = _encoder()
    assert cap.admit_header(encoder.header())
    assert cap.admit(encoder, 0.0, b"x" * 10_000).startswith(b'[0.000000, "m"')
    assert not cap.admit_header(b"{}\n")


def test_cap_marker_too_late_to_fit_is_left_out() -> None:
    """The reserve covers times below 10**11 s; a later marker is dropped, not overflowed."""
    cap = RecordingCap(1_000)
    reserve = len(_marker_line(cap, 0.0)) + 10
    encoder = _encoder()
    assert cap.admit(encoder, 0.0, b"x" * (1_000 - reserve)) == b"x" * (1_000 - reserve)
    assert cap.admit(encoder, 1e12, b"y") == b""
    assert cap.truncated
    assert cap.used == 1_000 - reserve


@pytest.mark.parametrize("max_bytes", [-1, True, 1.5])
def test_cap_must_be_a_non_negative_int(max_bytes: object) -> None:
    """max_bytes is an int of at least 0."""
    with pytest.raises(ValueError, match="max_bytes"):
        RecordingCap(max_bytes)  # type: ignore[arg-type]


@given(
    max_bytes=st.integers(min_value=0, max_value=2_000),
    sizes=st.lists(st.integers(min_value=0, max_value=300), max_size=30),
    times=st.floats(min_value=0, max_value=1e10),
)
def test_cap_is_never_exceeded(max_bytes: int, sizes: list[int], times: float) -> None:
    """Whatever comes, the admitted bytes stay within the cap; the marker comes last."""
    cap = RecordingCap(max_bytes)
    encoder = _encoder()
    written = b""
    header = encoder.header()
    if cap.admit_header(header):
        written += header
    for size in sizes:
        written += cap.admit(encoder, times, b"x" * size)
    assert len(written) == cap.used <= max_bytes
    markers = written.count(b'"m"')
    assert markers <= 1
    if markers:
        assert cap.truncated
        assert written.endswith(b'reached"]\n')


# Forward digests
# ===============


def test_direction_digest_counts_and_hashes() -> None:
    """A direction's totals are its byte count and the SHA-256 of its bytes joined."""
    digest = DirectionDigest()
    assert digest.totals() == DirectionTotals(bytes=0, sha256=EMPTY_SHA256)
    for chunk in (b"GET / HTTP/1.1\r\n", b"\x00\xff", b"\r\n"):
        digest.update(chunk)
    whole = b"GET / HTTP/1.1\r\n\x00\xff\r\n"
    assert digest.totals() == DirectionTotals(
        bytes=len(whole), sha256=hashlib.sha256(whole).hexdigest()
    )


def test_forward_digest_record() -> None:
    """Engineer DATA counts to the device, device DATA from it; times to the microsecond."""
    forward = ForwardDigest(
        stream_id=3, channel="tcp:8443", port=8443, opened_s=1.0000004
    )
    forward.data(Side.ENGINEER, b"ping")
    forward.data(Side.DEVICE, b"pong")
    forward.data(Side.DEVICE, b"!")
    assert forward.record().to_json() == {
        "stream_id": 3,
        "channel": "tcp:8443",
        "port": 8443,
        "opened_s": 1.0,
        "outcome": None,
        "closed_s": None,
        "to_device": {"bytes": 4, "sha256": hashlib.sha256(b"ping").hexdigest()},
        "from_device": {"bytes": 5, "sha256": hashlib.sha256(b"pong!").hexdigest()},
    }
    forward.outcome = "open_ok"
    forward.closed_s = 2.5000006
    record = forward.record()
    assert isinstance(record, ForwardRecord)
    assert record.to_json()["outcome"] == "open_ok"
    assert record.to_json()["closed_s"] == 2.500001
    with pytest.raises(AttributeError):
        record.port = 1  # type: ignore[misc]
