"""atheris target: the WebSocket upgrade and frames of our transport
(``relay._trio.websocket`` on websockets' sans-I/O protocol).

The first byte picks the mode. Even: the rest is what a client sends on a new
connection; the relay's own ``ServerHandshake`` reads it as the listeners do
(``receive_request``, then ``accept``), on an in-memory stream under a mock
clock, and must open the connection or raise ``HandshakeFailed``, nothing
else. Odd: the rest is what a client sends on an open connection; a
``ServerProtocol`` set up as the transport sets it up (``max_size`` = our
message cap) must turn it into frames no larger than the cap, or fail the
connection, never raise. Binary payloads that arrive are then decoded as
tunnel frames, as the broker does with each message.
"""

from __future__ import annotations

import contextlib
import sys

import atheris  # type: ignore[import-untyped]

# Only our code (and the parser under test) is instrumented: instrumenting
# every dependency makes start-up take minutes for no useful coverage.
with atheris.instrument_imports(
    include=["relay._trio.websocket", "relay.proto", "websockets"],
    enable_loader_override=False,
):
    import trio
    import trio.testing
    from websockets.frames import Frame, Opcode
    from websockets.protocol import State
    from websockets.server import ServerProtocol

    from relay._trio.websocket import ConnectionClosed, HandshakeFailed, ServerHandshake
    from relay.config import WebSocketLimits
    from relay.proto import tunnel
    from relay.proto.errors import RemoteProtocolError

_LIMITS = WebSocketLimits()
_CAP = _LIMITS.max_message_bytes


async def _upgrade(data: bytes) -> None:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(data)
    await client.send_stream.aclose()
    handshake = ServerHandshake(server, _LIMITS)
    try:
        request = await handshake.receive_request()
        async with handshake.accept(request) as connection:
            await connection.receive_message()
    except (HandshakeFailed, ConnectionClosed):
        return


def _handshake(data: bytes) -> None:
    # The mock clock jumps over every wait (close handshakes, keepalives).
    trio.run(_upgrade, data, clock=trio.testing.MockClock(autojump_threshold=0))


def _frames(data: bytes) -> None:
    protocol = ServerProtocol(max_size=_CAP, state=State.OPEN)
    protocol.receive_data(data)
    protocol.receive_eof()
    for event in protocol.events_received():
        if not isinstance(event, Frame):
            raise AssertionError(f"an open connection produced {event!r}")
        if len(event.data) > _CAP:
            raise AssertionError(f"a {len(event.data)}-byte frame passed the cap")
        if event.opcode is Opcode.BINARY and event.fin:
            with contextlib.suppress(RemoteProtocolError):
                tunnel.decode(bytes(event.data))
    protocol.data_to_send()


def fuzz_one_input(data: bytes) -> None:
    """One input: an upgrade request (first byte even) or frames (odd)."""
    if not data:
        return
    if data[0] & 1:
        _frames(data[1:])
    else:
        _handshake(data[1:])


def main() -> None:
    """Fuzz with libFuzzer's command line (see fuzz/README.md)."""
    atheris.Setup(sys.argv, fuzz_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
