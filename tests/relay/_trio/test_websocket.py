"""The trio WebSocket transport over websockets' sans-I/O core."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
import trio_websocket
import websockets.asyncio.client
from websockets.client import ClientProtocol
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from relay._trio.websocket import (
    ConnectionClosed,
    HandshakeFailed,
    ServerHandshake,
    WebSocketConnection,
    connect_websocket,
)
from relay.config import WebSocketLimits
from relay.proto.close import CloseCode

LIMITS = WebSocketLimits(
    max_message_bytes=1024, ping_interval_s=1.0, close_timeout_s=1.0
)

Handler = Callable[[WebSocketConnection], Awaitable[None]]


async def _serve_one(
    stream: trio.abc.Stream, handler: Handler, limits: WebSocketLimits = LIMITS
) -> None:
    handshake = ServerHandshake(stream, limits)
    request = await handshake.receive_request()
    if request.path != "/echo":
        await handshake.reject(404, "unknown path")
        return
    async with handshake.accept(request) as ws:
        await handler(ws)


async def _echo(ws: WebSocketConnection) -> None:
    try:
        while True:
            await ws.send_message(await ws.receive_message())
    except ConnectionClosed:
        pass


@asynccontextmanager
async def _pair(
    handler: Handler, limits: WebSocketLimits = LIMITS, path: str = "/echo"
) -> AsyncIterator[WebSocketConnection]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_one, server_stream, handler, limits)
        async with connect_websocket(
            client_stream, f"ws://relay.test{path}", limits
        ) as ws:
            yield ws


async def test_echo_round_trip() -> None:
    """Binary messages of every size up to the cap come back unchanged."""
    with trio.fail_after(5):
        async with _pair(_echo) as ws:
            for size in (0, 1, 125, 126, 1000, 1024):
                payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
                await ws.send_message(payload)
                assert await ws.receive_message() == payload


async def test_client_close_is_seen_by_server() -> None:
    """A polite close from the client reaches the server handler with its code and reason."""
    seen: list[tuple[int, str]] = []

    async def handler(ws: WebSocketConnection) -> None:
        try:
            await ws.receive_message()
        except ConnectionClosed as exc:
            seen.append((exc.code, exc.reason))

    with trio.fail_after(5):
        async with _pair(handler) as ws:
            await ws.aclose(CloseCode.NORMAL, "bye")
            assert ws.close_code == CloseCode.NORMAL
    assert seen == [(1000, "bye")]


async def test_server_close_code_reaches_client() -> None:
    """An application close code sent by the server is what the client sees."""

    async def handler(ws: WebSocketConnection) -> None:
        await ws.aclose(CloseCode.REPLACED, "replaced by a newer connection")

    with trio.fail_after(5):
        async with _pair(handler) as ws:
            with pytest.raises(ConnectionClosed) as info:
                await ws.receive_message()
            assert info.value.code == CloseCode.REPLACED
            assert info.value.reason == "replaced by a newer connection"
            with pytest.raises(ConnectionClosed):
                await ws.send_message(b"late")


async def test_oversized_message_closes_with_1009() -> None:
    """A message above max_message_bytes fails the connection with 1009 on both sides."""
    codes: list[int] = []

    async def handler(ws: WebSocketConnection) -> None:
        try:
            await ws.receive_message()
        except ConnectionClosed as exc:
            codes.append(exc.code)

    big_client = dataclasses.replace(LIMITS, max_message_bytes=10 * 1024)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve_one, server_stream, handler)
            async with connect_websocket(
                client_stream, "ws://relay.test/echo", big_client
            ) as ws:
                await ws.send_message(b"x" * 2000)
                with pytest.raises(ConnectionClosed) as info:
                    await ws.receive_message()
                assert info.value.code == CloseCode.MESSAGE_TOO_BIG
    assert codes == [CloseCode.MESSAGE_TOO_BIG]


async def test_fragmented_message_is_reassembled_and_capped() -> None:
    """Fragments are joined into one message; the cap applies to the whole message."""
    got: list[bytes] = []
    codes: list[int] = []

    async def handler(ws: WebSocketConnection) -> None:
        try:
            while True:
                got.append(await ws.receive_message())
        except ConnectionClosed as exc:
            codes.append(exc.code)

    with trio.fail_after(5):
        async with _pair(handler) as ws:
            protocol = ws._protocol
            protocol.send_binary(b"a" * 600, fin=False)
            protocol.send_continuation(b"b" * 300, fin=True)
            ws._pump()
            protocol.send_binary(b"c" * 600, fin=False)
            protocol.send_continuation(b"d" * 600, fin=True)
            ws._pump()
            with pytest.raises(ConnectionClosed):
                await ws.receive_message()
    assert got == [b"a" * 600 + b"b" * 300]
    assert codes == [CloseCode.MESSAGE_TOO_BIG]


async def test_text_frame_closes_with_1003() -> None:
    """A text frame on a binary-only channel closes the connection with 1003."""
    with trio.fail_after(5):
        async with _pair(_echo) as ws:
            ws._protocol.send_text(b"hello")
            ws._pump()
            with pytest.raises(ConnectionClosed) as info:
                await ws.receive_message()
            assert info.value.code == CloseCode.UNSUPPORTED_DATA


async def test_unknown_path_is_rejected_with_status_and_body() -> None:
    """The server's HTTP refusal reaches the client as HandshakeFailed with status and body."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve_one, server_stream, _echo)
            with pytest.raises(HandshakeFailed) as info:
                async with connect_websocket(
                    client_stream, "ws://relay.test/elsewhere", LIMITS
                ):
                    pass  # pragma: no cover - the handshake fails
    assert info.value.status == 404
    assert info.value.body == b"unknown path\n"


async def test_oversized_upgrade_request_gets_431() -> None:
    """An upgrade request above max_upgrade_request_bytes is refused with 431."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            failures: list[HandshakeFailed] = []

            async def server() -> None:
                try:
                    await _serve_one(server_stream, _echo)
                except HandshakeFailed as exc:
                    failures.append(exc)

            nursery.start_soon(server)
            await client_stream.send_all(
                b"GET /echo HTTP/1.1\r\nHost: x\r\n"
                + b"X-Pad: "
                + b"p" * 4000
                + b"\r\n" * 1
                + (b"X-More: " + b"q" * 4000 + b"\r\n") * 2
            )
            answer = b""
            while chunk := await client_stream.receive_some(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 431")
    assert failures[0].status == 431


async def test_garbage_before_upgrade_is_closed() -> None:
    """Bytes that are not an HTTP request end the handshake without an upgrade."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            failures: list[HandshakeFailed] = []

            async def server() -> None:
                try:
                    await _serve_one(server_stream, _echo)
                except HandshakeFailed as exc:
                    failures.append(exc)

            nursery.start_soon(server)
            await client_stream.send_all(b"\x16\x03\x01garbage\r\n\r\n")
            answer = b""
            while chunk := await client_stream.receive_some(65536):
                answer += chunk
    assert b"101" not in answer
    assert len(failures) == 1


async def test_silent_peer_is_dropped_by_keepalive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A peer that stops answering is declared dead after ping_missed_max intervals."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    closed: list[tuple[int, float]] = []

    async def handler(ws: WebSocketConnection) -> None:
        start = trio.current_time()
        try:
            await ws.receive_message()
        except ConnectionClosed as exc:
            closed.append((exc.code, trio.current_time() - start))

    protocol = ClientProtocol(parse_uri("ws://relay.test/echo"))
    protocol.send_request(protocol.connect())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_one, server_stream, handler)
        await client_stream.send_all(b"".join(protocol.data_to_send()))
        # Read the 101 and then go silent: never answer pings.
        await client_stream.receive_some(65536)
    assert closed, "the server handler must return"
    code, elapsed = closed[0]
    assert code == CloseCode.INTERNAL_ERROR
    dead_after = LIMITS.ping_interval_s * LIMITS.ping_missed_max
    # Measured from the 101 (the last bytes the server received were the request).
    assert dead_after - 0.01 <= elapsed <= dead_after + 0.01


class _TransportClosedUnder(trio.abc.Stream):
    """A stream whose transport its owner closed already: closing it raises,
    as a TLS stream's close_notify does over a socket closed under it."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self.inner.receive_some(max_bytes))

    async def aclose(self) -> None:
        await self.inner.aclose()
        raise trio.ClosedResourceError("this socket was already closed")


async def test_a_transport_closed_under_the_connection_does_not_crash_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The keepalive drops a silent peer and closes the stream; a stream that
    cannot send its goodbye any more (closed under it) ends the connection
    all the same, without an exception out of the handler's nursery."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    closed: list[int] = []

    async def handler(ws: WebSocketConnection) -> None:
        try:
            await ws.receive_message()
        except ConnectionClosed as exc:
            closed.append(exc.code)

    protocol = ClientProtocol(parse_uri("ws://relay.test/echo"))
    protocol.send_request(protocol.connect())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_one, _TransportClosedUnder(server_stream), handler)
        await client_stream.send_all(b"".join(protocol.data_to_send()))
        await client_stream.receive_some(65536)
    assert closed == [CloseCode.INTERNAL_ERROR]


async def test_answering_peer_stays_connected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Pings are answered automatically, so an idle but live connection stays open."""
    async with _pair(_echo) as ws:
        await trio.sleep(LIMITS.ping_interval_s * 20)
        assert not ws.closed
        await ws.send_message(b"still here")
        assert await ws.receive_message() == b"still here"


async def test_close_without_answer_is_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """aclose() returns after close_timeout_s even when the peer never answers the close."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    protocol = ClientProtocol(parse_uri("ws://relay.test/echo"))
    protocol.send_request(protocol.connect())
    durations: list[float] = []

    async def handler(ws: WebSocketConnection) -> None:
        start = trio.current_time()
        await ws.aclose(CloseCode.GOING_AWAY, "shutdown")
        durations.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_one, server_stream, handler)
        await client_stream.send_all(b"".join(protocol.data_to_send()))
        await client_stream.receive_some(65536)
        # Keep the socket open but say nothing.
        await trio.sleep(LIMITS.close_timeout_s * 3)
    assert durations
    assert durations[0] <= LIMITS.close_timeout_s + 0.01


async def test_sender_waits_when_peer_does_not_read() -> None:
    """send_message() blocks once send_buffer_bytes are queued and the peer does not read."""
    limits = dataclasses.replace(
        LIMITS, send_buffer_bytes=4096, receive_queue_messages=1
    )
    client_stream, server_stream = trio.testing.lockstep_stream_pair()
    stalled = trio.Event()

    async def handler(ws: WebSocketConnection) -> None:
        await stalled.wait()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve_one, server_stream, handler, limits)
            async with connect_websocket(
                client_stream, "ws://relay.test/echo", limits
            ) as ws:
                sent = 0
                with trio.move_on_after(0.5):
                    while True:
                        await ws.send_message(b"z" * 1000)
                        sent += 1
                assert sent < 100, "the sender must be held back"
                stalled.set()
                await ws.aclose()


# Interoperability with independent implementations, over real TCP on loopback.


async def _serve_echo_tcp(
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    async def on_connection(stream: trio.SocketStream) -> None:
        with contextlib.suppress(HandshakeFailed):
            await _serve_one(stream, _echo)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(on_connection, listeners)


@pytest.mark.slow
async def test_trio_websocket_client_talks_to_our_server() -> None:
    """A trio-websocket client exchanges binary messages with our server."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serve_echo_tcp)
        with trio.fail_after(10):
            async with trio_websocket.open_websocket(
                "127.0.0.1", port, "/echo", use_ssl=False
            ) as ws:
                await ws.send_message(b"\x00\x01binary")
                assert await ws.get_message() == b"\x00\x01binary"
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_websockets_asyncio_client_talks_to_our_server() -> None:
    """A websockets asyncio client (in its own thread and loop) talks to our server."""

    async def asyncio_client(port: int) -> bytes:
        async with websockets.asyncio.client.connect(
            f"ws://127.0.0.1:{port}/echo", compression=None
        ) as ws:
            await ws.send(b"from asyncio")
            reply = await ws.recv()
            assert isinstance(reply, bytes)
            return reply

    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serve_echo_tcp)
        with trio.fail_after(10):
            reply = await trio.to_thread.run_sync(
                lambda: asyncio.run(asyncio_client(port))
            )
        assert reply == b"from asyncio"
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_our_client_talks_to_trio_websocket_server() -> None:
    """Our client exchanges binary messages with a trio-websocket server."""

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                await ws.send_message(await ws.get_message())
        except trio_websocket.ConnectionClosed:
            pass

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None
        )
        port = server.port
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with connect_websocket(
                stream, f"ws://127.0.0.1:{port}/", LIMITS
            ) as ws:
                await ws.send_message(b"\xffours")
                assert await ws.receive_message() == b"\xffours"
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_our_client_sends_headers_and_takes_text_when_asked() -> None:
    """extra_headers reach the server; with accept_text, text messages arrive as
    str beside binary ones; without it, text is refused (1003)."""
    seen_headers: list[dict[bytes, bytes]] = []

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        seen_headers.append(dict(request.headers))
        ws = await request.accept()
        await ws.send_message('{"type":"state"}')
        await ws.send_message(b"\x01frame")
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            await ws.get_message()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None
        )
        port = server.port
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with connect_websocket(
                stream,
                f"ws://127.0.0.1:{port}/",
                LIMITS,
                extra_headers=[("Authorization", "Bearer t0ken")],
                accept_text=True,
            ) as ws:
                assert await ws.receive() == '{"type":"state"}'
                assert await ws.receive() == b"\x01frame"
                await ws.aclose()
            assert seen_headers[0][b"authorization"] == b"Bearer t0ken"
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with connect_websocket(
                stream, f"ws://127.0.0.1:{port}/", LIMITS
            ) as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.receive_message()
                assert closed.value.code == CloseCode.UNSUPPORTED_DATA
        nursery.cancel_scope.cancel()


async def test_silence_mid_interval_is_caught_at_the_exact_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A peer that goes quiet between pings is dropped dead_after seconds after its last bytes."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    closed: list[float] = []
    dead_after = LIMITS.ping_interval_s * LIMITS.ping_missed_max

    async def handler(ws: WebSocketConnection) -> None:
        assert await ws.receive_message() == b"last words"
        quiet_since = trio.current_time()
        with pytest.raises(ConnectionClosed):
            await ws.receive_message()
        closed.append(trio.current_time() - quiet_since)

    protocol = ClientProtocol(parse_uri("ws://relay.test/echo"))
    protocol.send_request(protocol.connect())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_one, server_stream, handler)
        await client_stream.send_all(b"".join(protocol.data_to_send()))
        protocol.receive_data(await client_stream.receive_some(65536))
        await trio.sleep(LIMITS.ping_interval_s * 0.4)  # off the ping schedule
        protocol.send_binary(b"last words")
        await client_stream.send_all(b"".join(protocol.data_to_send()))
    assert closed
    assert dead_after - 0.01 <= closed[0] <= dead_after + 0.01


async def test_slow_application_is_not_mistaken_for_a_dead_peer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """While the application does not read, the reader stops; keepalive does not fire."""
    limits = dataclasses.replace(LIMITS, receive_queue_messages=1)
    got: list[bytes] = []
    release = trio.Event()

    async def handler(ws: WebSocketConnection) -> None:
        await release.wait()
        for _ in range(5):
            got.append(await ws.receive_message())
        await ws.send_message(b"done")

    with trio.fail_after(limits.ping_interval_s * 100):
        async with _pair(handler, limits) as ws:
            for i in range(5):
                await ws.send_message(bytes([i]))
            await trio.sleep(limits.ping_interval_s * limits.ping_missed_max * 5)
            release.set()
            assert await ws.receive_message() == b"done"
    assert got == [bytes([i]) for i in range(5)]


async def test_message_sent_with_the_upgrade_response_is_delivered() -> None:
    """A server that speaks first: its message shares a write with the 101 and still arrives."""

    async def handler(ws: WebSocketConnection) -> None:
        await ws.send_message(b"server first")
        with contextlib.suppress(ConnectionClosed):
            await ws.receive_message()

    with trio.fail_after(5):
        async with _pair(handler) as ws:
            assert await ws.receive_message() == b"server first"


async def test_message_pipelined_with_the_request_is_delivered() -> None:
    """A client frame sent right behind the upgrade request is not lost."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    got: list[bytes] = []

    async def handler(ws: WebSocketConnection) -> None:
        got.append(await ws.receive_message())

    protocol = ClientProtocol(parse_uri("ws://relay.test/echo"))
    protocol.send_request(protocol.connect())
    request = b"".join(protocol.data_to_send())
    protocol.receive_data(
        b"HTTP/1.1 101 Switching Protocols\r\n"
    )  # keep the parser busy
    frame = ClientProtocol(parse_uri("ws://relay.test/echo"), state=State.OPEN)
    frame.send_binary(b"eager")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve_one, server_stream, handler)
            await client_stream.send_all(request + b"".join(frame.data_to_send()))
            while await client_stream.receive_some(65536):
                pass
    assert got == [b"eager"]


async def test_complete_oversized_upgrade_in_one_write_gets_431() -> None:
    """A whole upgrade request above the cap is refused even when it arrives in one read."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    protocol = ClientProtocol(parse_uri("ws://relay.test/echo"))
    request = protocol.connect()
    request.headers["X-Pad"] = "p" * (LIMITS.max_upgrade_request_bytes + 100)
    protocol.send_request(request)
    failures: list[HandshakeFailed] = []

    async def server() -> None:
        try:
            await _serve_one(server_stream, _echo)
        except HandshakeFailed as exc:
            failures.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            await client_stream.send_all(b"".join(protocol.data_to_send()))
            answer = b""
            while chunk := await client_stream.receive_some(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 431")
    assert failures[0].status == 431


async def test_ping_flood_from_a_peer_that_never_reads_is_cut_off() -> None:
    """Pongs the peer provokes cannot grow our queue without bound: past the cap it is dropped."""
    client_stream, server_stream = trio.testing.lockstep_stream_pair()
    closed: list[ConnectionClosed] = []

    async def handler(ws: WebSocketConnection) -> None:
        try:
            await ws.receive_message()
        except ConnectionClosed as exc:
            closed.append(exc)

    protocol = ClientProtocol(parse_uri("ws://relay.test/echo"))
    protocol.send_request(protocol.connect())
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve_one, server_stream, handler)
            await client_stream.send_all(b"".join(protocol.data_to_send()))
            response = b""
            while b"\r\n\r\n" not in response:
                response += await client_stream.receive_some(1)
            protocol.receive_data(response)
            # From now on: send pings with big payloads, never read a byte.
            try:
                while not closed:
                    protocol.send_ping(b"x" * 125)
                    await client_stream.send_all(b"".join(protocol.data_to_send()) * 50)
            except trio.BrokenResourceError:
                pass
            await client_stream.aclose()
    assert closed[0].code == CloseCode.POLICY_VIOLATION
    assert closed[0].reason == "peer does not read"


async def test_client_gives_up_on_a_server_that_never_closes_tcp(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After the close handshake the client waits close_timeout_s for TCP to close, not forever."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    server = ServerProtocol()

    async def rude_server() -> None:
        data = await server_stream.receive_some(65536)
        server.receive_data(data)
        (request,) = server.events_received()
        assert isinstance(request, Request)
        server.send_response(server.accept(request))
        server.send_close(CloseCode.GOING_AWAY, "bye")
        await server_stream.send_all(b"".join(server.data_to_send()))
        await trio.sleep_forever()  # never closes TCP, never reads again

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rude_server)
        async with connect_websocket(
            client_stream, "ws://relay.test/echo", LIMITS
        ) as ws:
            start = trio.current_time()
            with pytest.raises(ConnectionClosed) as info:
                await ws.receive_message()
            waited = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert info.value.code == CloseCode.GOING_AWAY
    assert waited <= LIMITS.close_timeout_s + 0.01


@pytest.fixture
def pings(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Pings sent by each end of our transport, counted at websockets' protocol."""
    counts = {"client": 0, "server": 0}

    def counting(side: str, original: Callable[..., None]) -> Callable[..., None]:
        def send_ping(self: object, data: bytes) -> None:
            counts[side] += 1
            original(self, data)

        return send_ping

    monkeypatch.setattr(
        ClientProtocol, "send_ping", counting("client", ClientProtocol.send_ping)
    )
    monkeypatch.setattr(
        ServerProtocol, "send_ping", counting("server", ServerProtocol.send_ping)
    )
    return counts


async def test_an_idle_connection_kept_alive_by_both_ends_pings_about_once_per_interval(
    autojump_clock: trio.testing.MockClock, pings: dict[str, int]
) -> None:
    """The peer's ping resets our silence: one ping per interval, not one per end."""
    intervals = 40

    async def idle(ws: WebSocketConnection) -> None:
        await trio.sleep(LIMITS.ping_interval_s * intervals)

    async with _pair(idle) as ws:
        await trio.sleep(LIMITS.ping_interval_s * intervals)
        assert ws._is_open()  # kept alive the whole time
    total = pings["client"] + pings["server"]
    # A wait is 75-100 % of the interval; one ping from each end every
    # interval would be 2 * intervals.
    assert intervals - 2 <= total <= intervals / 0.75 + 2, pings


async def test_a_busy_connection_sends_no_pings(
    autojump_clock: trio.testing.MockClock, pings: dict[str, int]
) -> None:
    """Traffic proves the peer alive as well as a pong would."""
    with trio.fail_after(LIMITS.ping_interval_s * 100):
        async with _pair(_echo) as ws:
            for _ in range(40):
                await ws.send_message(b"k")
                assert await ws.receive_message() == b"k"
                await trio.sleep(LIMITS.ping_interval_s / 2)
    assert pings == {"client": 0, "server": 0}
