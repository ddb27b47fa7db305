"""The engineer CLI's view of a session: status wording, end reasons, exit codes."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio

from relay._trio.engineer_session import (
    END_WORDING,
    EXIT_CODES,
    SessionOutcome,
    SessionStatus,
    _pump,
)
from relay.engineer_client import Credentials, load_credentials, save_credentials
from relay.proto import tunnel
from relay.proto.session import EndReason

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def _status() -> tuple[SessionStatus, io.StringIO]:
    out = io.StringIO()
    return SessionStatus(out, now=lambda: NOW), out


def test_every_end_reason_has_wording_and_its_own_exit_code() -> None:
    """Scripts can tell every end apart; the engineer reads words, not codes."""
    reasons = {reason.value for reason in EndReason}
    assert set(EXIT_CODES) == reasons
    assert set(END_WORDING) == reasons
    codes = list(EXIT_CODES.values())
    assert len(set(codes)) == len(codes)
    assert EXIT_CODES["engineer"] == 0
    assert not {1, 2, 3} & set(codes)  # kept for errors, usage, refusals


def test_the_wait_the_grant_and_the_time_left_are_shown() -> None:
    """offered -> waiting text; active -> the time left from ends_at_ms."""
    status, out = _status()
    status.on_text('{"type":"state","state":"offered","ends_at_ms":null}')
    assert "waiting for the person at the instrument to allow access" in out.getvalue()
    assert not status.active.is_set()
    ends_at_ms = int(NOW.timestamp() * 1000) + 3_599_000
    status.on_text(f'{{"type":"state","state":"active","ends_at_ms":{ends_at_ms}}}')
    assert "session active; 59 min 59 s left" in out.getvalue()
    assert status.active.is_set()
    assert out.getvalue().endswith("\r\n")  # readable in a raw terminal too


def test_warnings_and_the_end_are_shown_and_the_first_reason_kept() -> None:
    """T-1 warning text; the end names its reason in words; a later end is ignored."""
    status, out = _status()
    status.on_text('{"type":"warning","seconds_left":600,"minutes_left":10}')
    status.on_text('{"type":"warning","seconds_left":60,"minutes_left":1}')
    status.on_text('{"type":"warning","seconds_left":5,"minutes_left":1}')
    status.on_text('{"type":"end","reason":"onsite"}')
    status.end("engineer_disconnect")
    text = out.getvalue()
    assert "warning: 10 min left in this session" in text
    assert "warning: 1 min left in this session" in text
    assert "warning: 5 s left in this session" in text
    assert "session ended: ended by the person at the instrument" in text
    assert status.end_reason == "onsite"
    assert status.ended.is_set()
    assert SessionOutcome("s", status.end_reason).exit_code == EXIT_CODES["onsite"]


@pytest.mark.parametrize("text", ["not json", "[]", '{"no":"type"}'])
def test_malformed_status_is_shown_not_fatal(text: str) -> None:
    """A status the client does not understand is printed and skipped."""
    status, out = _status()
    status.on_text(text)
    assert "unexpected status from the relay" in out.getvalue()
    assert not status.ended.is_set()


def test_unknown_end_reason_gets_its_own_exit_code() -> None:
    """A newer broker's reason: shown as is, exit 29."""
    assert SessionOutcome("s", "new_reason").exit_code == 29
    assert SessionOutcome("s", None).exit_code == 29


def test_credentials_keep_the_ca_file(tmp_path: Path) -> None:
    """relay login's CA file is what later commands trust."""
    path = tmp_path / "credentials.json"
    credentials = Credentials(
        broker="https://relay.example:9443",
        username="alice",
        token="t" * 43,
        expires_at=NOW.isoformat(),
        ca_file=str(tmp_path / "ca.pem"),
    )
    save_credentials(credentials, path)
    assert load_credentials(path) == credentials
    assert path.stat().st_mode & 0o777 == 0o600


class _RecordingStream:
    """Stands in for a MuxStream: records what the forward hands it."""

    def __init__(self) -> None:
        self.writes: list[int] = []
        self.eof = trio.Event()
        self.peer_closed = False

    async def send_all(self, data: bytes) -> None:
        self.writes.append(len(data))

    async def send_eof(self) -> None:
        self.eof.set()

    async def receive_some(self) -> bytes:
        await self.eof.wait()
        return b""

    async def aclose(self) -> None:
        pass


async def test_the_forward_reads_at_most_one_data_frame_at_a_time() -> None:
    """A local client writing 64 KiB blocks becomes full DATA frames, never a full
    frame plus a 5-byte one (twice the messages through every hop)."""
    total = 16 * 64 * 1024
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    stream = _RecordingStream()
    async with trio.open_nursery() as nursery:

        async def client() -> None:
            async with await trio.open_tcp_stream("127.0.0.1", port) as conn:
                for _ in range(16):
                    await conn.send_all(bytes(64 * 1024))
                await conn.send_eof()
                await conn.receive_some(1)

        nursery.start_soon(client)
        async with listeners[0], await listeners[0].accept() as connection:
            with trio.fail_after(10):
                await _pump(connection, stream)  # type: ignore[arg-type]
    assert sum(stream.writes) == total
    assert max(stream.writes) <= tunnel.MAX_DATA_BYTES
    assert stream.eof.is_set()
