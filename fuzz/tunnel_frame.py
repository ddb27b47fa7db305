"""atheris target: the tunnel frame codec and the stream table.

The first byte picks the mode. Even: the rest is one WebSocket message, which
``relay.proto.tunnel.decode`` must turn into a frame that encodes back to the
same bytes, or refuse with ``RemoteProtocolError``. Odd: the rest is a session,
records of ``side (1 byte, low bit: 0 engineer, 1 device) + length (u16) +
message``; each message that decodes is fed to one ``StreamTable`` as the
broker does, which must deliver, drop, or refuse it with
``RemoteProtocolError``, and refuse everything after its first refusal.
Anything else raised is a crash.
"""

from __future__ import annotations

import sys

import atheris  # type: ignore[import-untyped]

# Only our code (and the parser under test) is instrumented: instrumenting
# every dependency makes start-up take minutes for no useful coverage.
with atheris.instrument_imports(include=["relay.proto"], enable_loader_override=False):
    from relay.proto import tunnel
    from relay.proto.errors import RemoteProtocolError


def _one_frame(data: bytes) -> None:
    try:
        frame = tunnel.decode(data)
    except RemoteProtocolError as exc:
        if len(data) > tunnel.MAX_FRAME_BYTES and exc.close_code != 1009:
            raise AssertionError("an oversized frame must close with 1009") from None
        return
    if tunnel.encode(frame) != data:
        raise AssertionError(f"{frame!r} does not encode back to its bytes")


def _session(data: bytes) -> None:
    table = tunnel.StreamTable(max_streams=4, initial_window_bytes=1024)
    broken = False
    offset = 0
    while offset + 3 <= len(data):
        side = tunnel.Side.DEVICE if data[offset] & 1 else tunnel.Side.ENGINEER
        size = int.from_bytes(data[offset + 1 : offset + 3], "big")
        message = data[offset + 3 : offset + 3 + size]
        offset += 3 + size
        try:
            frame = tunnel.decode(message)
        except RemoteProtocolError:
            continue
        try:
            table.receive(frame, sender=side)
        except RemoteProtocolError:
            broken = True
            continue
        if broken:
            raise AssertionError("the table took a frame after a protocol error")
        if len(table) > table.max_streams:
            raise AssertionError("more streams alive than the limit")


def fuzz_one_input(data: bytes) -> None:
    """One input: a frame (first byte even) or a session of frames (odd)."""
    if not data:
        return
    if data[0] & 1:
        _session(data[1:])
    else:
        _one_frame(data[1:])


def main() -> None:
    """Fuzz with libFuzzer's command line (see fuzz/README.md)."""
    atheris.Setup(sys.argv, fuzz_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
