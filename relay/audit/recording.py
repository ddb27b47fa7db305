"""Session recordings: asciicast v2 lines, the byte cap, forward digests (pure).

Theory of operation
===================
The broker records what passes through a remote session (``relay.recordings``
owns the files; this module only turns observations into bytes). It never
reads a clock or touches a file: every time comes in as an argument, and every
method returns the exact bytes to append, ``b""`` when there is nothing to
write.

Shell streams become asciicast v2 files (one per stream), which asciinema and
its web player replay. :class:`CastEncoder` writes the header line and then one
event line per observation, all relative to the cast's own start::

    {"version": 2, "width": 80, "height": 24, "timestamp": 1780315200, "env": {"TERM": "xterm-256color"}, "title": "..."}
    [0.250000, "o", "$ "]
    [1.500000, "i", "ls\\r"]
    [2.000000, "r", "120x40"]
    [9.000000, "m", "recording truncated: cap of 1048576 bytes reached"]

- ``o``: output, device to engineer. ``i``: input, engineer to device, written
  only with ``record_input=True`` (input holds typed passwords, so it is off
  unless the operator decides otherwise). ``r``: the engineer's terminal was
  resized to ``COLSxROWS``. ``m``: a marker (text for people).
- Payload bytes are decoded as UTF-8 *incrementally*, one decoder per
  direction, so a character split across two DATA frames comes out whole, in
  the event of the frame that completes it; invalid bytes become U+FFFD.
  :meth:`CastEncoder.finish` flushes a dangling partial character (as U+FFFD).
- Strings are JSON with every character outside printable ASCII escaped
  (``\\u001b``, ``\\u007f``, ``\\u00e9``), so no raw control byte, escape
  sequence or non-ASCII byte ever reaches the file: a ``cat`` or ``grep`` of
  a recording cannot drive the reader's terminal.
- Times are seconds with exactly six decimals (microseconds). A time below
  the previous one of the same cast (or below 0) is written as the previous
  one: players expect times that never decrease.

:class:`RecordingCap` bounds what the peers can make the broker write: the
cast bytes of one session, headers included, never exceed ``max_bytes``. It
keeps room for one truncation marker at all times; the event that would not
fit is replaced by the marker, and from then on every shell event of the
session is dropped (``truncated``). A shell stream opened after that gets no
file at all.

Port-forward (``tcp:PORT``) streams are never recorded byte for byte: a
:class:`ForwardDigest` counts the bytes and hashes them (SHA-256) per
direction, and ends as a :class:`ForwardRecord`, one object of the session's
``forwards.json``. Digests cost no disk, so they go on after truncation.

Rule 1: nothing here reads a clock, a file or a socket; callers pass times.
Rule 2: every byte returned is ASCII and every line ends in ``\\n``; each line
is one JSON value.
Rule 3: the cast bytes of a session never exceed the cap (the marker included).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from relay.proto.tunnel import Side

__all__ = [
    "TERM",
    "CastEncoder",
    "DirectionDigest",
    "DirectionTotals",
    "ForwardDigest",
    "ForwardRecord",
    "Outcome",
    "RecordingCap",
]

#: The terminal type every cast header names (what the engineer's xterm.js is).
TERM: Final = "xterm-256color"

#: How a forward's OPEN was answered; ``None`` in a record: not answered.
Outcome: TypeAlias = Literal["open_ok", "open_fail"]

# The cap keeps room for a marker written at a time of up to this many more
# integer digits than "0" (t < 10**11 s, some 3000 years), so the marker always
# fits in practice; a marker that still does not fit is left out (Rule 3 wins).
_MARKER_TIME_SLACK: Final = 10


def _json_text(value: object) -> str:
    # ensure_ascii escapes everything below 0x20 and above 0x7e except DEL,
    # which is ASCII but not printable; DEL can only occur inside a string, so
    # the replacement is exact (as in relay.audit.chain).
    return json.dumps(value, ensure_ascii=True, allow_nan=False).replace(
        "\x7f", "\\u007f"
    )


def _event(t: float, code: str, data: str) -> bytes:
    # Times are formatted by hand: json.dumps would write 1e-06 for a
    # microsecond and varying digits otherwise; "%.6f" is one fixed form.
    return f"[{t:.6f}, {_json_text(code)}, {_json_text(data)}]\n".encode("ascii")


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, not {value!r}")


def _utf8_decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


class CastEncoder:
    """The lines of one asciicast v2 recording of a shell stream.

    *width* and *height* are the terminal size at the start, *timestamp* the
    start in whole Unix seconds. Every *t* is seconds since the cast's start.
    """

    def __init__(
        self,
        width: int,
        height: int,
        timestamp: int,
        *,
        record_input: bool,
        title: str | None = None,
    ) -> None:
        _check_int("width", width, 1)
        _check_int("height", height, 1)
        _check_int("timestamp", timestamp, 0)
        self.width: Final = width
        self.height: Final = height
        self.timestamp: Final = timestamp
        self.record_input: Final = record_input
        self.title: Final = title
        self._last = 0.0
        self._output = _utf8_decoder()
        self._input = _utf8_decoder()

    def header(self) -> bytes:
        """The first line of the cast."""
        header: dict[str, object] = {
            "version": 2,
            "width": self.width,
            "height": self.height,
            "timestamp": self.timestamp,
            "env": {"TERM": TERM},
        }
        if self.title is not None:
            header["title"] = self.title
        return (_json_text(header) + "\n").encode("ascii")

    def output(self, t: float, data: bytes) -> bytes:
        """Shell output (device to engineer)."""
        return self._line(t, "o", self._output.decode(data))

    def input(self, t: float, data: bytes) -> bytes:
        """Engineer input; ``b""`` unless *record_input* (input holds passwords)."""
        if not self.record_input:
            return b""
        return self._line(t, "i", self._input.decode(data))

    def resize(self, t: float, cols: int, rows: int) -> bytes:
        """The engineer's terminal is now *cols* x *rows*."""
        return self._line(t, "r", f"{cols}x{rows}")

    def marker(self, t: float, text: str) -> bytes:
        """A marker: a note for whoever replays the cast."""
        return self._line(t, "m", text)

    def finish(self, t: float) -> bytes:
        """Flush a partial character left at the end of output or input."""
        tail = self._line(t, "o", self._output.decode(b"", final=True))
        if self.record_input:
            tail += self._line(t, "i", self._input.decode(b"", final=True))
        return tail

    def _line(self, t: float, code: str, data: str) -> bytes:
        if not math.isfinite(t):
            raise ValueError(f"time must be finite, not {t!r}")
        if not data:
            # A partial character only: it comes out with the frame that ends it.
            return b""
        self._last = max(self._last, round(t, 6))
        return _event(self._last, code, data)


class RecordingCap:
    """The byte budget of one session's casts (see Rule 3).

    Feed it every line before writing it: :meth:`admit_header` for a new cast's
    header, :meth:`admit` for events. Both keep room for the truncation marker.
    """

    def __init__(self, max_bytes: int) -> None:
        _check_int("max_bytes", max_bytes, 0)
        self.max_bytes: Final = max_bytes
        self.marker_text: Final = (
            f"recording truncated: cap of {max_bytes} bytes reached"
        )
        self._reserve: Final = (
            len(_event(0.0, "m", self.marker_text)) + _MARKER_TIME_SLACK
        )
        self._used = 0
        self._truncated = False

    @property
    def used(self) -> int:
        """Bytes admitted so far (headers, events and the marker)."""
        return self._used

    @property
    def truncated(self) -> bool:
        """Whether a line was refused; from then on every line is."""
        return self._truncated

    def admit_header(self, header: bytes) -> bool:
        """Whether to start a cast with *header* (else write no file for it)."""
        if self._fits(header):
            self._used += len(header)
            return True
        # There is no file to hold a marker: the summary tells of the truncation.
        self._truncated = True
        return False

    def admit(self, encoder: CastEncoder, t: float, line: bytes) -> bytes:
        """What to append to *encoder*'s cast in place of *line*.

        *line* itself while it fits; then, once, the truncation marker at *t*;
        after that ``b""``.
        """
        if self._truncated or not line:
            return b""
        if self._fits(line):
            self._used += len(line)
            return line
        self._truncated = True
        marker = encoder.marker(t, self.marker_text)
        if self._used + len(marker) > self.max_bytes:
            return b""  # only past t = 10**11 s (see _MARKER_TIME_SLACK)
        self._used += len(marker)
        return marker

    def _fits(self, line: bytes) -> bool:
        return (
            not self._truncated
            and self._used + len(line) + self._reserve <= self.max_bytes
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DirectionTotals:
    """What one direction of a forward carried: a byte count and its SHA-256."""

    bytes: int
    sha256: str

    def to_json(self) -> dict[str, object]:
        """The JSON object of ``forwards.json``."""
        return {"bytes": self.bytes, "sha256": self.sha256}


class DirectionDigest:
    """Counts and hashes the payload of one direction, never keeping it."""

    def __init__(self) -> None:
        self._bytes = 0
        self._sha256 = hashlib.sha256()

    def update(self, data: bytes) -> None:
        """Account for *data*, the next payload in this direction."""
        self._bytes += len(data)
        self._sha256.update(data)

    def totals(self) -> DirectionTotals:
        """The count and digest so far."""
        return DirectionTotals(bytes=self._bytes, sha256=self._sha256.hexdigest())


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardRecord:
    """The metadata of one port-forward stream (never its payload).

    Attributes:
        stream_id, channel, port: From the stream's OPEN.
        opened_s: Seconds since the session started, at the OPEN.
        outcome: How the device answered; ``None``: it never did (the session
            ended first, or the engineer cancelled and the device closed).
        closed_s: Seconds since the session started when the stream was gone
            (both sides' final frames); ``None``: it outlived the session.
        to_device, from_device: Payload totals per direction.
    """

    stream_id: int
    channel: str
    port: int
    opened_s: float
    outcome: Outcome | None
    closed_s: float | None
    to_device: DirectionTotals
    from_device: DirectionTotals

    def to_json(self) -> dict[str, object]:
        """One object of ``forwards.json`` (times to the microsecond)."""
        return {
            "stream_id": self.stream_id,
            "channel": self.channel,
            "port": self.port,
            "opened_s": round(self.opened_s, 6),
            "outcome": self.outcome,
            "closed_s": None if self.closed_s is None else round(self.closed_s, 6),
            "to_device": self.to_device.to_json(),
            "from_device": self.from_device.to_json(),
        }


class ForwardDigest:
    """A port-forward stream while it lasts; :meth:`record` freezes it."""

    def __init__(
        self, *, stream_id: int, channel: str, port: int, opened_s: float
    ) -> None:
        self.stream_id: Final = stream_id
        self.channel: Final = channel
        self.port: Final = port
        self.opened_s: Final = opened_s
        self.outcome: Outcome | None = None
        self.closed_s: float | None = None
        self.to_device: Final = DirectionDigest()
        self.from_device: Final = DirectionDigest()

    def data(self, sender: Side, payload: bytes) -> None:
        """Account for a DATA payload sent by *sender*."""
        direction = self.to_device if sender is Side.ENGINEER else self.from_device
        direction.update(payload)

    def record(self) -> ForwardRecord:
        """The metadata as it stands."""
        return ForwardRecord(
            stream_id=self.stream_id,
            channel=self.channel,
            port=self.port,
            opened_s=self.opened_s,
            outcome=self.outcome,
            closed_s=self.closed_s,
            to_device=self.to_device.totals(),
            from_device=self.from_device.totals(),
        )
