"""The files of a session recording (relay/recordings.py)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Final

import pytest

from relay.proto.tunnel import (
    OpenFailCode,
    Side,
    StreamClose,
    StreamData,
    StreamEof,
    StreamOpen,
    StreamOpenFail,
    StreamOpenOk,
    StreamResize,
    StreamWindow,
)
from relay.recordings import (
    FORWARDS_FILE,
    RecordingError,
    RecordingFile,
    SessionRecording,
)

STARTED: Final = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
ENGINEER: Final = Side.ENGINEER
DEVICE: Final = Side.DEVICE


def _recording(
    tmp_path: Path, *, record_input: bool = False, max_bytes: int = 1 << 20
) -> SessionRecording:
    return SessionRecording(
        tmp_path / "recordings",
        session_id="sess-1",
        started_at=STARTED,
        record_input=record_input,
        max_bytes=max_bytes,
    )


def _parse_cast(path: Path) -> tuple[dict[str, Any], list[list[Any]]]:
    """Parse *path* as asciicast v2, checking the format as a player would."""
    raw = path.read_bytes()
    assert raw.isascii()
    lines = raw.decode("ascii").split("\n")
    assert lines[-1] == ""  # every line ends in a newline
    header = json.loads(lines[0])
    assert header["version"] == 2
    assert isinstance(header["width"], int)
    assert isinstance(header["height"], int)
    assert isinstance(header["timestamp"], int)
    assert header["env"] == {"TERM": "xterm-256color"}
    events = [json.loads(line) for line in lines[1:-1]]
    previous = 0.0
    for time, code, data in events:
        assert isinstance(time, float)
        assert time >= previous
        previous = time
        assert code in {"o", "i", "r", "m"}
        assert isinstance(data, str)
    return header, events


def _open_shell(
    recording: SessionRecording,
    stream_id: int,
    t: float,
    cols: int = 80,
    rows: int = 24,
) -> None:
    recording.observe(
        StreamOpen(stream_id=stream_id, channel="shell", cols=cols, rows=rows),
        ENGINEER,
        t,
    )
    recording.observe(StreamOpenOk(stream_id=stream_id), DEVICE, t + 0.01)


def _close(recording: SessionRecording, stream_id: int, t: float) -> None:
    recording.observe(StreamClose(stream_id=stream_id), DEVICE, t)
    recording.observe(StreamClose(stream_id=stream_id), ENGINEER, t)


def _on_disk(summary_file: RecordingFile, directory: Path) -> None:
    data = (directory / summary_file.name).read_bytes()
    assert summary_file.size_bytes == len(data)
    assert summary_file.sha256 == hashlib.sha256(data).hexdigest()


# Shell streams
# =============


def test_shell_stream_is_an_asciicast(tmp_path: Path) -> None:
    """Open, resize, output and close make one asciicast v2 file, timed from the OPEN."""
    recording = _recording(tmp_path)
    _open_shell(recording, 1, 10.4)
    recording.observe(StreamData(stream_id=1, payload=b"$ \xe2\x82"), DEVICE, 10.5)
    recording.observe(StreamData(stream_id=1, payload=b"\xac\x1b[0m"), DEVICE, 10.75)
    recording.observe(StreamWindow(stream_id=1, credit=100), ENGINEER, 10.8)
    recording.observe(StreamResize(stream_id=1, cols=120, rows=40), ENGINEER, 11.4)
    recording.observe(StreamEof(stream_id=1), DEVICE, 12.0)
    _close(recording, 1, 12.4)
    path = tmp_path / "recordings" / "sess-1" / "shell-1.cast"
    header, events = _parse_cast(path)  # complete before the session closes
    assert header == {
        "version": 2,
        "width": 80,
        "height": 24,
        "timestamp": int(STARTED.timestamp()) + 10,
        "env": {"TERM": "xterm-256color"},
        "title": "session sess-1 shell 1",
    }
    assert events == [[0.1, "o", "$ "], [0.35, "o", "€\x1b[0m"], [1.0, "r", "120x40"]]
    summary = recording.close(13.0)
    assert [f.name for f in summary.files] == ["shell-1.cast"]
    assert summary.files[0].kind == "shell"
    _on_disk(summary.files[0], path.parent)
    assert summary.shell_streams == 1
    assert summary.forward_streams == 0
    assert summary.cast_bytes == path.stat().st_size
    assert not summary.truncated
    assert not (path.parent / FORWARDS_FILE).exists()


@pytest.mark.parametrize("record_input", [False, True])
def test_input_is_recorded_only_when_switched_on(
    tmp_path: Path, *, record_input: bool
) -> None:
    """Engineer DATA on a shell becomes "i" events only with record_input=True."""
    recording = _recording(tmp_path, record_input=record_input)
    _open_shell(recording, 1, 0.0)
    recording.observe(StreamData(stream_id=1, payload=b"hunter2\r"), ENGINEER, 1.0)
    recording.observe(StreamData(stream_id=1, payload=b"ok"), DEVICE, 2.0)
    recording.close(3.0)
    path = tmp_path / "recordings" / "sess-1" / "shell-1.cast"
    _, events = _parse_cast(path)
    expected = [[1.0, "i", "hunter2\r"]] if record_input else []
    assert events == [*expected, [2.0, "o", "ok"]]
    assert (b"hunter2" in path.read_bytes()) is record_input


def test_close_finishes_open_casts(tmp_path: Path) -> None:
    """A shell still open at close gets its dangling partial character flushed."""
    recording = _recording(tmp_path)
    _open_shell(recording, 1, 1.0)
    _open_shell(recording, 3, 2.0, cols=100, rows=50)
    recording.observe(StreamData(stream_id=3, payload=b"x\xe2"), DEVICE, 2.5)
    summary = recording.close(4.0)
    directory = tmp_path / "recordings" / "sess-1"
    assert [f.name for f in summary.files] == ["shell-1.cast", "shell-3.cast"]
    for summary_file in summary.files:
        _on_disk(summary_file, directory)
    header, events = _parse_cast(directory / "shell-3.cast")
    assert (header["width"], header["height"]) == (100, 50)
    assert events == [[0.5, "o", "x"], [2.0, "o", "\ufffd"]]
    assert _parse_cast(directory / "shell-1.cast")[1] == []


def test_refused_shell_leaves_a_header_only_cast(tmp_path: Path) -> None:
    """OPEN_FAIL then the engineer's CLOSE ends the cast with its header alone."""
    recording = _recording(tmp_path)
    recording.observe(
        StreamOpen(stream_id=1, channel="shell", cols=80, rows=24), ENGINEER, 0
    )
    recording.observe(
        StreamOpenFail(stream_id=1, code=OpenFailCode.NO_PTY), DEVICE, 0.5
    )
    recording.observe(StreamClose(stream_id=1), ENGINEER, 0.6)
    summary = recording.close(1.0)
    assert _parse_cast(tmp_path / "recordings" / "sess-1" / "shell-1.cast")[1] == []
    assert summary.shell_streams == 1


def test_files_and_directory_are_private(tmp_path: Path) -> None:
    """The session directory is 0o700 and every file 0o600."""
    recording = _recording(tmp_path)
    _open_shell(recording, 1, 0.0)
    recording.observe(StreamOpen(stream_id=3, channel="tcp:22"), ENGINEER, 0.0)
    summary = recording.close(1.0)
    assert stat.S_IMODE(summary.directory.stat().st_mode) == 0o700
    assert {f.name for f in summary.files} == {"shell-1.cast", FORWARDS_FILE}
    for summary_file in summary.files:
        mode = (summary.directory / summary_file.name).stat().st_mode
        assert stat.S_IMODE(mode) == 0o600


def test_session_without_streams_leaves_nothing(tmp_path: Path) -> None:
    """No stream, no directory and no files."""
    summary = _recording(tmp_path).close(5.0)
    assert summary.files == ()
    assert not summary.directory.exists()


def test_unknown_streams_are_ignored(tmp_path: Path) -> None:
    """Frames of streams the recording never saw open change nothing."""
    recording = _recording(tmp_path)
    recording.observe(StreamData(stream_id=5, payload=b"x"), DEVICE, 0.0)
    recording.observe(StreamResize(stream_id=5, cols=1, rows=1), ENGINEER, 0.0)
    recording.observe(StreamOpenOk(stream_id=5), DEVICE, 0.0)
    _close(recording, 5, 0.0)
    assert recording.close(1.0).files == ()


# Port forwards
# =============


def test_forwards_json_has_digests_not_payloads(tmp_path: Path) -> None:
    """forwards.json holds counts and SHA-256 per direction, never a payload byte."""
    recording = _recording(tmp_path)
    to_device = [b"SSH-2.0-client\r\n", b"\x00secret\xff"]
    from_device = [b"SSH-2.0-device\r\n", b"banner", b"more"]
    recording.observe(StreamOpen(stream_id=3, channel="tcp:22"), ENGINEER, 1.25)
    recording.observe(StreamOpenOk(stream_id=3), DEVICE, 1.5)
    for i in range(3):
        if i < len(to_device):
            recording.observe(
                StreamData(stream_id=3, payload=to_device[i]), ENGINEER, 2
            )
        recording.observe(StreamData(stream_id=3, payload=from_device[i]), DEVICE, 2)
    recording.observe(StreamEof(stream_id=3), ENGINEER, 3)
    _close(recording, 3, 4.5)
    recording.observe(StreamOpen(stream_id=5, channel="tcp:8080"), ENGINEER, 5)
    recording.observe(
        StreamOpenFail(stream_id=5, code=OpenFailCode.CONNECT_FAILED), DEVICE, 5.5
    )
    recording.observe(StreamClose(stream_id=5), ENGINEER, 5.6)
    recording.observe(StreamOpen(stream_id=7, channel="tcp:443"), ENGINEER, 6)
    summary = recording.close(7.0)

    path = summary.directory / FORWARDS_FILE
    raw = path.read_bytes()
    for secret in (b"secret", b"banner", b"SSH-2.0"):
        assert secret not in raw
    empty = {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}
    assert json.loads(raw) == [
        {
            "stream_id": 3,
            "channel": "tcp:22",
            "port": 22,
            "opened_s": 1.25,
            "outcome": "open_ok",
            "closed_s": 4.5,
            "to_device": {
                "bytes": sum(map(len, to_device)),
                "sha256": hashlib.sha256(b"".join(to_device)).hexdigest(),
            },
            "from_device": {
                "bytes": sum(map(len, from_device)),
                "sha256": hashlib.sha256(b"".join(from_device)).hexdigest(),
            },
        },
        {
            "stream_id": 5,
            "channel": "tcp:8080",
            "port": 8080,
            "opened_s": 5.0,
            "outcome": "open_fail",
            "closed_s": 5.6,
            "to_device": empty,
            "from_device": empty,
        },
        {
            "stream_id": 7,
            "channel": "tcp:443",
            "port": 443,
            "opened_s": 6.0,
            "outcome": None,
            "closed_s": None,
            "to_device": empty,
            "from_device": empty,
        },
    ]
    assert [f.kind for f in summary.files] == ["forwards"]
    _on_disk(summary.files[0], summary.directory)
    assert summary.forward_streams == 3
    assert summary.cast_bytes == 0


# The cap
# =======


def test_cap_truncates_shell_but_not_forward_digests(tmp_path: Path) -> None:
    """Past the cap: one marker, no more shell events or casts; forwards still counted."""
    max_bytes = 1_000
    recording = _recording(tmp_path, max_bytes=max_bytes)
    _open_shell(recording, 1, 0.0)
    recording.observe(StreamOpen(stream_id=3, channel="tcp:22"), ENGINEER, 0.0)
    recording.observe(StreamOpenOk(stream_id=3), DEVICE, 0.0)
    recording.observe(StreamData(stream_id=1, payload=b"a" * 300), DEVICE, 1.0)
    recording.observe(StreamData(stream_id=1, payload=b"b" * 700), DEVICE, 2.0)
    assert recording.truncated
    recording.observe(StreamData(stream_id=1, payload=b"c"), DEVICE, 3.0)
    recording.observe(StreamResize(stream_id=1, cols=90, rows=30), ENGINEER, 3.0)
    recording.observe(StreamData(stream_id=3, payload=b"after"), DEVICE, 3.0)
    _open_shell(recording, 5, 4.0)
    recording.observe(StreamData(stream_id=5, payload=b"d"), DEVICE, 4.5)
    _close(recording, 5, 4.6)
    summary = recording.close(5.0)

    directory = summary.directory
    assert summary.truncated
    assert summary.shell_streams == 2
    assert [f.name for f in summary.files] == ["shell-1.cast", FORWARDS_FILE]
    assert not (directory / "shell-5.cast").exists()
    _, events = _parse_cast(directory / "shell-1.cast")
    assert events == [
        [1.0, "o", "a" * 300],
        [2.0, "m", "recording truncated: cap of 1000 bytes reached"],
    ]
    assert (
        (directory / "shell-1.cast").stat().st_size == summary.cast_bytes <= max_bytes
    )
    (forward,) = json.loads((directory / FORWARDS_FILE).read_bytes())
    assert forward["from_device"] == {
        "bytes": 5,
        "sha256": hashlib.sha256(b"after").hexdigest(),
    }


def test_cap_too_small_for_any_header(tmp_path: Path) -> None:
    """A cap below one header records no cast at all and says so."""
    recording = _recording(tmp_path, max_bytes=50)
    _open_shell(recording, 1, 0.0)
    recording.observe(StreamData(stream_id=1, payload=b"x"), DEVICE, 1.0)
    recording.observe(StreamResize(stream_id=1, cols=90, rows=30), ENGINEER, 1.0)
    _close(recording, 1, 2.0)
    summary = recording.close(3.0)
    assert summary.truncated
    assert summary.files == ()
    assert summary.cast_bytes == 0


# Failures
# ========


def test_parent_not_a_directory_is_a_recording_error(tmp_path: Path) -> None:
    """A directory that cannot be made fails the recording at the first stream."""
    (tmp_path / "recordings").write_bytes(b"")
    recording = _recording(tmp_path)
    with pytest.raises(RecordingError) as caught:
        _open_shell(recording, 1, 0.0)
    assert isinstance(caught.value, OSError)
    assert caught.value.errno in {errno.ENOTDIR, errno.EEXIST}


def test_read_only_file_system_is_a_recording_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EROFS on creating a file is a RecordingError that sticks (simulated: tests run as root)."""

    def read_only(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(args[0]))

    recording = _recording(tmp_path)
    monkeypatch.setattr("relay.recordings.os.open", read_only)
    with pytest.raises(RecordingError) as caught:
        _open_shell(recording, 1, 0.0)
    assert caught.value.errno == errno.EROFS
    assert str(caught.value.filename).endswith("shell-1.cast")
    with pytest.raises(RecordingError, match="failed earlier"):
        recording.observe(StreamData(stream_id=1, payload=b"x"), DEVICE, 1.0)
    with pytest.raises(RecordingError, match="failed earlier"):
        recording.close(2.0)


def _full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files the recording creates are /dev/full: every flush fails with ENOSPC."""
    real_open = os.open

    def to_dev_full(path: object, flags: int, mode: int = 0o777) -> int:
        if str(path).endswith((".cast", ".json")):
            return real_open("/dev/full", os.O_WRONLY | os.O_CLOEXEC)
        return real_open(path, flags, mode)  # type: ignore[arg-type]

    monkeypatch.setattr("relay.recordings.os.open", to_dev_full)


def test_full_disk_fails_at_a_large_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Output beyond the write buffer hits the full disk during observe."""
    _full_disk(monkeypatch)
    recording = _recording(tmp_path)
    _open_shell(recording, 1, 0.0)
    with pytest.raises(RecordingError) as caught:
        recording.observe(StreamData(stream_id=1, payload=b"x" * 65_000), DEVICE, 1.0)
    assert caught.value.errno == errno.ENOSPC
    with pytest.raises(RecordingError):
        recording.close(2.0)


@pytest.mark.parametrize("forward", [False, True])
def test_full_disk_fails_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, forward: bool
) -> None:
    """Buffered bytes that cannot be flushed make close() raise, for casts and forwards."""
    _full_disk(monkeypatch)
    recording = _recording(tmp_path)
    if forward:
        recording.observe(StreamOpen(stream_id=1, channel="tcp:22"), ENGINEER, 0.0)
    else:
        _open_shell(recording, 1, 0.0)
        recording.observe(StreamData(stream_id=1, payload=b"small"), DEVICE, 1.0)
    with pytest.raises(RecordingError) as caught:
        recording.close(2.0)
    assert caught.value.errno == errno.ENOSPC
    with pytest.raises(RecordingError):
        recording.close(2.0)


def test_full_disk_with_a_cast_past_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing close also releases a cast that never got a file."""
    _full_disk(monkeypatch)
    recording = _recording(tmp_path, max_bytes=1_000)
    _open_shell(recording, 1, 0.0)
    recording.observe(StreamData(stream_id=1, payload=b"x" * 1_000), DEVICE, 1.0)
    _open_shell(recording, 3, 2.0)  # past the cap: no file
    with pytest.raises(RecordingError):
        recording.close(3.0)


def test_fdopen_failure_closes_the_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If wrapping the new descriptor fails, it is closed, not leaked."""
    closed: list[int] = []
    real_close = os.close

    def no_fdopen(fd: int, mode: str) -> object:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    def spy_close(fd: int) -> None:
        closed.append(fd)
        real_close(fd)

    monkeypatch.setattr("relay.recordings.os.fdopen", no_fdopen)
    monkeypatch.setattr("relay.recordings.os.close", spy_close)
    recording = _recording(tmp_path)
    with pytest.raises(RecordingError):
        _open_shell(recording, 1, 0.0)
    assert len(closed) == 1


def test_existing_session_directory_is_used_but_its_files_are_not(
    tmp_path: Path,
) -> None:
    """The broker keeps the grant receipt in the session's directory first; the
    recording adds its casts beside it, and never writes into a file it finds."""
    directory = tmp_path / "recordings" / "sess-1"
    directory.mkdir(parents=True)
    (directory / "grant-receipt.json").write_text("{}")
    (directory / "shell-2.cast").write_text("planted")
    recording = _recording(tmp_path)
    _open_shell(recording, 1, 0.0)
    assert (directory / "shell-1.cast").exists()
    with pytest.raises(RecordingError) as caught:
        _open_shell(recording, 2, 0.5)
    assert caught.value.errno == errno.EEXIST
    assert (directory / "shell-2.cast").read_text() == "planted"


def test_existing_file_or_symlink_is_never_followed(tmp_path: Path) -> None:
    """A planted symlink at a cast's name fails the recording instead of being written."""
    recording = _recording(tmp_path)
    _open_shell(recording, 1, 0.0)
    target = tmp_path / "elsewhere"
    (tmp_path / "recordings" / "sess-1" / "shell-3.cast").symlink_to(target)
    with pytest.raises(RecordingError) as caught:
        _open_shell(recording, 3, 1.0)
    assert caught.value.errno == errno.EEXIST
    assert not target.exists()


# Lifecycle and arguments
# =======================


def test_close_is_idempotent_and_later_frames_are_ignored(tmp_path: Path) -> None:
    """A second close returns the same summary; observe after close writes nothing."""
    recording = _recording(tmp_path)
    _open_shell(recording, 1, 0.0)
    first = recording.close(1.0)
    path = first.directory / "shell-1.cast"
    before = path.read_bytes()
    recording.observe(StreamData(stream_id=1, payload=b"late"), DEVICE, 2.0)
    _open_shell(recording, 3, 2.0)
    assert recording.close(3.0) is first
    assert path.read_bytes() == before
    assert not (first.directory / "shell-3.cast").exists()


@pytest.mark.parametrize(
    "session_id", ["", "..", "a/b", "a.b", "a\x00", "é", "a" * 65, "a\n"]
)
def test_unsafe_session_id_is_refused(tmp_path: Path, session_id: str) -> None:
    """The session id becomes a directory name: only [A-Za-z0-9_-]{1,64}."""
    with pytest.raises(ValueError, match="session_id"):
        SessionRecording(
            tmp_path,
            session_id=session_id,
            started_at=STARTED,
            record_input=False,
            max_bytes=1,
        )


def test_longest_session_id_is_accepted(tmp_path: Path) -> None:
    """64 characters of the allowed set make a valid id."""
    recording = SessionRecording(
        tmp_path,
        session_id="A-z_9" * 12 + "abcd",
        started_at=STARTED,
        record_input=False,
        max_bytes=1,
    )
    assert recording.directory == tmp_path / ("A-z_9" * 12 + "abcd")


@pytest.mark.parametrize(
    "started_at",
    [datetime(2026, 6, 1), datetime(2026, 6, 1, tzinfo=timezone(timedelta(hours=2)))],
)
def test_started_at_must_be_aware_utc(tmp_path: Path, started_at: datetime) -> None:
    """A naive or non-UTC start would put wrong timestamps in every cast."""
    with pytest.raises(ValueError, match="UTC"):
        SessionRecording(
            tmp_path,
            session_id="s",
            started_at=started_at,
            record_input=False,
            max_bytes=1,
        )
