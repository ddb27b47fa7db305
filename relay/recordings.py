"""The files of one session's recording: casts, ``forwards.json``, the summary.

Theory of operation
===================
One :class:`SessionRecording` per remote session. The broker hands it every
tunnel frame it relays with :meth:`~SessionRecording.observe`, together with
the sender and the time (seconds since the session was granted; there is no
clock in here), and calls :meth:`~SessionRecording.close` when the session
ends. What to write is decided by the pure core, ``relay.audit.recording``;
this module owns the files.

Pass only frames the ``StreamTable`` delivered: frames it dropped were never
relayed, so they are not part of the session. Frames of streams this recording
never saw open are ignored.

Layout, under ``directory / session_id`` (mode 0o700, created at the first
file, so a session without streams leaves nothing behind)::

    shell-<stream_id>.cast   one asciicast v2 file per shell stream (0o600)
    forwards.json            port-forward metadata, written at close, only if
                             the session had forwards (0o600)

``forwards.json`` is one JSON list, one forward object per line (keys as in
:meth:`~relay.audit.recording.ForwardRecord.to_json`), ASCII only.

Files are created with ``O_EXCL`` (an existing file or symlink is never
followed, appended to or overwritten) when the stream opens and written
through a buffered binary file. A cast is flushed, fsynced and closed when its
stream is gone (both sides' final frames), so file descriptors do not pile up
over a long session; :meth:`~SessionRecording.close` finishes the casts still
open, writes ``forwards.json`` and fsyncs the directory. The size and SHA-256
of each file are counted from the bytes written, so the summary costs no
re-read.

The cap (``max_bytes``) covers the cast files; ``forwards.json`` is outside
it: its size grows with the number of forward streams, not with what the
peers send.

All of this is blocking file I/O, at most one frame's worth (about 400 KB for
a full DATA frame of control bytes) per call, plus one fsync per cast.

Rule 1: any ``OSError`` becomes :class:`RecordingError`; from then on the
recording is broken and every further call raises it again, so the broker
fails closed rather than running a session it cannot record.
Rule 2: after a successful :meth:`~SessionRecording.close`, ``observe`` is
ignored and ``close`` returns the same summary.
Rule 3: no payload byte of a port forward is written, and engineer input only
with ``record_input=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import BinaryIO, Final, Literal

from relay.audit.recording import (
    CastEncoder,
    ForwardDigest,
    ForwardRecord,
    RecordingCap,
)
from relay.pki_files import fsync_directory
from relay.proto import tunnel

__all__ = [
    "FORWARDS_FILE",
    "RecordingError",
    "RecordingFile",
    "RecordingSummary",
    "SessionRecording",
]

#: The name of the port-forward metadata file.
FORWARDS_FILE: Final = "forwards.json"

_SESSION_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
# O_EXCL with O_CREAT also refuses a symlink at the path, dangling or not.
_CREATE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


class RecordingError(OSError):
    """The recording could not be written; the session must not go on."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordingFile:
    """One finished file of a recording."""

    name: str
    kind: Literal["shell", "forwards"]
    size_bytes: int
    sha256: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordingSummary:
    """What :meth:`SessionRecording.close` wrote.

    Attributes:
        directory: The session's recording directory (absent if *files* is empty).
        files: In the order they were created; ``forwards.json`` last.
        truncated: The cap was reached; later shell events were not written.
        shell_streams: Shell streams seen open (with a cast or, past the cap,
            without one).
        forward_streams: Port-forward streams seen open.
        cast_bytes: Bytes of all casts together (what the cap counts).
    """

    directory: Path
    files: tuple[RecordingFile, ...]
    truncated: bool
    shell_streams: int
    forward_streams: int
    cast_bytes: int


class _File:
    """A file being written, with its running size and SHA-256."""

    def __init__(self, path: Path) -> None:
        self.path: Final = path
        fd = os.open(path, _CREATE_FLAGS, 0o600)
        try:
            self._file: BinaryIO = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            raise
        self._size = 0
        self._sha256 = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._size += len(data)
        self._sha256.update(data)

    def finish(self, kind: Literal["shell", "forwards"]) -> RecordingFile:
        """Flush, fsync and close; the file's entry for the summary."""
        with self._file:
            self._file.flush()
            os.fsync(self._file.fileno())
        return RecordingFile(
            name=self.path.name,
            kind=kind,
            size_bytes=self._size,
            sha256=self._sha256.hexdigest(),
        )

    def abandon(self) -> None:
        """Close without caring whether buffered bytes make it (after a failure)."""
        # The recording already failed with the error that matters; on a full
        # disk this close fails its flush again.
        with contextlib.suppress(OSError):
            self._file.close()


@dataclass(slots=True)
class _Cast:
    encoder: CastEncoder
    opened_t: float  # session time of the OPEN; cast times count from here
    file: _File | None  # None: past the cap at OPEN, nothing is written
    finals: set[tunnel.Side] = field(default_factory=set)


@dataclass(slots=True)
class _Forward:
    digest: ForwardDigest
    finals: set[tunnel.Side] = field(default_factory=set)


class SessionRecording:
    """The recording of one session (see the module docstring).

    *started_at* is when the session was granted (aware, UTC); every ``t``
    passed in later counts seconds from it.
    """

    def __init__(
        self,
        directory: Path,
        *,
        session_id: str,
        started_at: datetime,
        record_input: bool,
        max_bytes: int,
    ) -> None:
        if not _SESSION_ID.fullmatch(session_id):
            # The id becomes a path component: no "..", "/", NUL or dots at all.
            raise ValueError("session_id must match [A-Za-z0-9_-]{1,64}")
        if started_at.utcoffset() != timedelta(0):
            raise ValueError("started_at must be an aware UTC datetime")
        self.directory: Final = Path(directory) / session_id
        self.session_id: Final = session_id
        self.started_at: Final = started_at
        self.record_input: Final = record_input
        self._cap = RecordingCap(max_bytes)
        self._casts: dict[int, _Cast] = {}
        self._forwards: dict[int, _Forward] = {}
        self._ended_forwards: list[ForwardRecord] = []
        self._files: list[RecordingFile] = []
        self._shell_streams = 0
        self._directory_made = False
        self._summary: RecordingSummary | None = None
        self._failure: RecordingError | None = None

    @property
    def truncated(self) -> bool:
        """Whether the cap has been reached."""
        return self._cap.truncated

    def observe(self, frame: tunnel.Frame, sender: tunnel.Side, t: float) -> None:
        """Record *frame*, sent by *sender* at *t* seconds into the session."""
        self._check_usable()
        if self._summary is not None:
            return
        try:
            self._observe(frame, sender, t)
        except OSError as exc:
            raise self._fail(exc) from exc

    def close(self, t: float) -> RecordingSummary:
        """Finish every file at *t* and return the summary (idempotent)."""
        self._check_usable()
        if self._summary is not None:
            return self._summary
        try:
            for stream_id in list(self._casts):
                self._end_cast(stream_id, t)
            forwards = self._ended_forwards + [
                forward.digest.record() for forward in self._forwards.values()
            ]
            self._forwards.clear()
            if forwards:
                self._write_forwards(sorted(forwards, key=lambda r: r.stream_id))
            if self._directory_made:
                fsync_directory(self.directory)
        except OSError as exc:
            raise self._fail(exc) from exc
        self._summary = RecordingSummary(
            directory=self.directory,
            files=tuple(self._files),
            truncated=self._cap.truncated,
            shell_streams=self._shell_streams,
            forward_streams=len(forwards),
            cast_bytes=self._cap.used,
        )
        return self._summary

    # Frames
    # ------

    def _observe(self, frame: tunnel.Frame, sender: tunnel.Side, t: float) -> None:
        stream_id = frame.stream_id
        match frame:
            case tunnel.StreamOpen(port=None):
                self._open_cast(frame, t)
            case tunnel.StreamOpen(port=int(port)):
                self._forwards[stream_id] = _Forward(
                    ForwardDigest(
                        stream_id=stream_id,
                        channel=frame.channel,
                        port=port,
                        opened_s=t,
                    )
                )
            case tunnel.StreamData() if stream_id in self._forwards:
                self._forwards[stream_id].digest.data(sender, frame.payload)
            case tunnel.StreamData() if stream_id in self._casts:
                cast = self._casts[stream_id]
                encode = (
                    cast.encoder.output
                    if sender is tunnel.Side.DEVICE
                    else cast.encoder.input
                )
                self._write(cast, t, lambda ct: encode(ct, frame.payload))
            case tunnel.StreamResize() if stream_id in self._casts:
                cast = self._casts[stream_id]
                self._write(
                    cast, t, lambda ct: cast.encoder.resize(ct, frame.cols, frame.rows)
                )
            case tunnel.StreamOpenOk() if stream_id in self._forwards:
                self._forwards[stream_id].digest.outcome = "open_ok"
            case tunnel.StreamOpenFail() | tunnel.StreamClose():
                self._final(frame, sender, t)
            case _:
                pass  # WINDOW, EOF, a shell's OPEN_OK, unknown streams: nothing to keep

    def _final(self, frame: tunnel.Frame, sender: tunnel.Side, t: float) -> None:
        """A side's final frame; the stream ends once both sent theirs."""
        stream_id = frame.stream_id
        if stream_id in self._forwards:
            forward = self._forwards[stream_id]
            if isinstance(frame, tunnel.StreamOpenFail):
                forward.digest.outcome = "open_fail"
            forward.finals.add(sender)
            if len(forward.finals) == len(tunnel.Side):
                forward.digest.closed_s = t
                self._ended_forwards.append(forward.digest.record())
                del self._forwards[stream_id]
        elif stream_id in self._casts:
            cast = self._casts[stream_id]
            cast.finals.add(sender)
            if len(cast.finals) == len(tunnel.Side):
                self._end_cast(stream_id, t)

    # Casts
    # -----

    def _open_cast(self, frame: tunnel.StreamOpen, t: float) -> None:
        self._shell_streams += 1
        # Whole seconds is all asciicast v2 offers; events count from the OPEN.
        timestamp = int(self.started_at.timestamp() + t)
        encoder = CastEncoder(
            frame.cols,
            frame.rows,
            timestamp,
            record_input=self.record_input,
            title=f"session {self.session_id} shell {frame.stream_id}",
        )
        header = encoder.header()
        file = None
        if self._cap.admit_header(header):
            self._make_directory()
            file = _File(self.directory / f"shell-{frame.stream_id}.cast")
            file.write(header)
        self._casts[frame.stream_id] = _Cast(encoder=encoder, opened_t=t, file=file)

    def _write(self, cast: _Cast, t: float, encode: Callable[[float], bytes]) -> None:
        """Append ``encode(cast time)`` to *cast*, as far as the cap admits it."""
        if cast.file is None or self._cap.truncated:
            return  # encode (decode, for data) nothing the file will never hold
        cast_t = t - cast.opened_t
        data = self._cap.admit(cast.encoder, cast_t, encode(cast_t))
        if data:
            cast.file.write(data)

    def _end_cast(self, stream_id: int, t: float) -> None:
        cast = self._casts.pop(stream_id)
        if cast.file is not None:
            self._write(cast, t, cast.encoder.finish)
            self._files.append(cast.file.finish("shell"))

    # Files
    # -----

    def _write_forwards(self, forwards: list[ForwardRecord]) -> None:
        lines = [
            json.dumps(record.to_json(), ensure_ascii=True, allow_nan=False)
            for record in forwards
        ]
        self._make_directory()
        file = _File(self.directory / FORWARDS_FILE)
        file.write(("[\n" + ",\n".join(lines) + "\n]\n").encode("ascii"))
        self._files.append(file.finish("forwards"))

    def _make_directory(self) -> None:
        if self._directory_made:
            return
        self.directory.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The session's directory may exist already: the broker keeps the
        # device's grant receipt there before the first stream opens. Its
        # files are still never merged into: each is created with O_EXCL.
        self.directory.mkdir(mode=0o700, exist_ok=True)
        self._directory_made = True

    # Failure
    # -------

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise RecordingError(
                self._failure.errno,
                "the recording failed earlier",
                self._failure.filename,
            ) from self._failure

    def _fail(self, exc: OSError) -> RecordingError:
        self._failure = RecordingError(
            exc.errno, f"session recording failed: {exc.strerror or exc}", exc.filename
        )
        for cast in self._casts.values():
            if cast.file is not None:
                cast.file.abandon()
        self._casts.clear()
        return self._failure
