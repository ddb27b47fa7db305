"""TunnelMux: streams, credit and endings between an engineer end and a device end."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress

import pytest
import trio
import trio.testing

from relay._trio.tunnel_mux import MuxStream, StreamClosed, StreamRefused, TunnelMux
from relay.proto import tunnel
from relay.proto.errors import RemoteProtocolError
from relay.proto.tunnel import Side

WINDOW = 64 * 1024  # a small window, so that credit runs out often


class Pipe:
    """One end of an in-memory message connection (like a WebSocket)."""

    def __init__(
        self,
        send: trio.MemorySendChannel[bytes | str],
        receive: trio.MemoryReceiveChannel[bytes | str],
    ) -> None:
        self._send = send
        self._receive = receive
        self.sent_bytes = 0

    async def send_message(self, data: bytes) -> None:
        self.sent_bytes += len(data)
        await self._send.send(data)

    async def send_text(self, text: str) -> None:
        await self._send.send(text)

    async def receive(self) -> bytes | str:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise ConnectionError("closed") from None

    def close(self) -> None:
        self._send.close()


def pipe_pair() -> tuple[Pipe, Pipe]:
    # Bounded like a socket: a writer that outruns its reader waits.
    a_send, b_receive = trio.open_memory_channel[bytes | str](8)
    b_send, a_receive = trio.open_memory_channel[bytes | str](8)
    return Pipe(a_send, a_receive), Pipe(b_send, b_receive)


async def _echo(stream: MuxStream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()


#: A device-side stream handler: answers the open, serves the stream, closes it.
Serve = Callable[[MuxStream, tunnel.StreamOpen], Awaitable[None]]


async def _serve_echo(stream: MuxStream, frame: tunnel.StreamOpen) -> None:
    """Port 7 echoes until the engineer's EOF or CLOSE; any other is refused."""
    if frame.channel != "tcp:7":
        await stream.refuse(tunnel.OpenFailCode.NOT_ALLOWED, "port not allowed")
        return
    await stream.accept()
    await _echo(stream)
    await stream.aclose()


def _start_device(nursery: trio.Nursery, pipe: Pipe, serve: Serve) -> TunnelMux:
    """A running device-side mux that serves each stream in a task of its own."""

    def on_stream(stream: MuxStream, frame: tunnel.StreamOpen) -> None:
        nursery.start_soon(serve, stream, frame)

    device = TunnelMux(
        pipe, side=Side.DEVICE, on_stream=on_stream, initial_window=WINDOW
    )
    nursery.start_soon(_run_quietly, device)
    return device


@asynccontextmanager
async def connected(
    *, texts: list[str] | None = None, serve: Serve = _serve_echo
) -> AsyncIterator[tuple[TunnelMux, TunnelMux, trio.Nursery, Pipe]]:
    engineer_pipe, device_pipe = pipe_pair()
    async with trio.open_nursery() as nursery:
        engineer = TunnelMux(
            engineer_pipe,
            side=Side.ENGINEER,
            on_text=None if texts is None else texts.append,
            initial_window=WINDOW,
        )
        device = _start_device(nursery, device_pipe, serve)
        nursery.start_soon(_run_quietly, engineer)
        yield engineer, device, nursery, device_pipe
        nursery.cancel_scope.cancel()


class RawEngineer:
    """The engineer's end as bare frames, checked with a table of its own."""

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe
        self.table = tunnel.StreamTable(initial_window_bytes=WINDOW)

    async def send(self, frame: tunnel.Frame) -> None:
        await self.pipe.send_message(self.table.send(frame, sender=Side.ENGINEER))

    async def receive(self) -> tunnel.Frame:
        with trio.fail_after(5):
            message = await self.pipe.receive()
        assert isinstance(message, bytes)
        frame = tunnel.decode(message)
        self.table.receive(frame, sender=Side.DEVICE)
        return frame

    async def open(self, stream_id: int) -> None:
        await self.send(tunnel.StreamOpen(stream_id=stream_id, channel="tcp:7"))
        assert await self.receive() == tunnel.StreamOpenOk(stream_id=stream_id)


@asynccontextmanager
async def device_end(serve: Serve) -> AsyncIterator[tuple[RawEngineer, TunnelMux]]:
    """A device-side mux whose streams *serve* handles, and a bare engineer."""
    engineer_pipe, device_pipe = pipe_pair()
    async with trio.open_nursery() as nursery:
        device = _start_device(nursery, device_pipe, serve)
        yield RawEngineer(engineer_pipe), device
        nursery.cancel_scope.cancel()


async def _run_quietly(mux: TunnelMux) -> None:
    with suppress(ConnectionError):
        await mux.run()


async def _read_all(stream: MuxStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    return bytes(data)


async def _round_trip(stream: MuxStream, payload: bytes) -> bytes:
    """Send *payload* and EOF while reading what comes back, up to the peer's EOF."""

    async def write() -> None:
        await stream.send_all(payload)
        await stream.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        return await _read_all(stream)


async def test_bulk_echo_keeps_every_byte_within_credit() -> None:
    """4 MiB through a 64 KiB window: echoed intact, never beyond credit (the
    device's table would raise), and WINDOW keeps it moving."""
    payload = os.urandom(4 * 1024 * 1024)
    async with connected() as (engineer, _device, _nursery, _pipe):
        stream = await engineer.open_stream("tcp:7")
        with trio.fail_after(30):
            echoed = await _round_trip(stream, payload)
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        await stream.aclose()


async def test_streams_do_not_starve_each_other() -> None:
    """A stream whose reader stalls keeps its credit to itself: another stream
    still moves data."""
    async with connected() as (engineer, _device, _nursery, _pipe):
        stalled = await engineer.open_stream("tcp:7")
        # Fill the stalled stream's credit both ways (the echo cannot send back
        # more than we read, so it blocks after one window).
        with trio.move_on_after(1):
            await stalled.send_all(b"x" * (4 * WINDOW))
        lively = await engineer.open_stream("tcp:7")
        with trio.fail_after(5):
            await lively.send_all(b"ping")
            assert await lively.receive_some() == b"ping"


async def test_refused_open_is_stream_refused_and_leaves_nothing() -> None:
    """A port off the device's allow-list: StreamRefused with the code; the stream
    is gone on both ends."""
    async with connected() as (engineer, device, _nursery, _pipe):
        with pytest.raises(StreamRefused) as refused:
            await engineer.open_stream("tcp:22")
        assert refused.value.code is tunnel.OpenFailCode.NOT_ALLOWED
        assert refused.value.reason == "port not allowed"
        with trio.fail_after(5):
            while len(engineer.table) or len(device.table):  # noqa: ASYNC110
                await trio.sleep(0.01)


async def test_close_from_either_end_ends_the_stream_on_both() -> None:
    """aclose sends CLOSE; the peer reads the end, answers CLOSE, tables empty."""
    async with connected() as (engineer, device, _nursery, _pipe):
        stream = await engineer.open_stream("tcp:7")
        await stream.send_all(b"hello")
        assert await stream.receive_some() == b"hello"
        await stream.aclose()
        with pytest.raises(StreamClosed):
            await stream.send_all(b"more")
        with trio.fail_after(5):
            while len(engineer.table) or len(device.table):  # noqa: ASYNC110
                await trio.sleep(0.01)


async def test_text_goes_to_on_text_and_tunnel_end_wakes_everyone() -> None:
    """Status text reaches on_text; when the connection ends, readers get b"" and
    writers StreamClosed."""
    texts: list[str] = []
    async with connected(texts=texts) as (engineer, _device, _nursery, device_pipe):
        stream = await engineer.open_stream("tcp:7")
        await device_pipe.send_text('{"type":"warning","minutes_left":1}')
        device_pipe.close()
        with trio.fail_after(5):
            assert await stream.receive_some() == b""
        assert texts == ['{"type":"warning","minutes_left":1}']
        assert engineer.ended
        with pytest.raises(StreamClosed):
            await stream.send_all(b"late")


async def test_text_on_a_device_tunnel_is_a_protocol_error() -> None:
    """Only the attach socket carries text; on a tunnel it ends the mux."""
    engineer_pipe, device_pipe = pipe_pair()
    device = TunnelMux(device_pipe, side=Side.DEVICE)
    await engineer_pipe.send_text("hello")
    with pytest.raises(RemoteProtocolError, match="text message"):
        await device.run()
    assert device.ended


async def test_an_end_that_opens_nothing_refuses_opens() -> None:
    """Without on_stream, an OPEN is answered with OPEN_FAIL not_allowed."""
    engineer_pipe, device_pipe = pipe_pair()
    async with trio.open_nursery() as nursery:
        engineer = TunnelMux(engineer_pipe, side=Side.ENGINEER)
        device = TunnelMux(device_pipe, side=Side.DEVICE)
        nursery.start_soon(_run_quietly, engineer)
        nursery.start_soon(_run_quietly, device)
        with pytest.raises(StreamRefused, match="not_allowed"):
            await engineer.open_stream("shell", cols=80, rows=24)
        nursery.cancel_scope.cancel()


async def test_resize_reaches_the_device_handler() -> None:
    """RESIZE on a shell stream calls the device stream's on_resize."""
    sizes: list[tuple[int, int]] = []

    async def serve(stream: MuxStream, frame: tunnel.StreamOpen) -> None:
        stream.on_resize = lambda cols, rows: sizes.append((cols, rows))
        await stream.accept()

    async with connected(serve=serve) as (engineer, _device, _nursery, _pipe):
        shell = await engineer.open_stream("shell", cols=80, rows=24)
        await shell.resize(132, 43)
        with trio.fail_after(5):
            while not sizes:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert sizes == [(132, 43)]


async def test_a_slow_answer_does_not_hold_up_other_streams() -> None:
    """on_stream returns at once and the stream's task answers later: while one
    open waits for its answer (a slow connect), another stream opens and echoes."""
    release = trio.Event()

    async def serve(stream: MuxStream, frame: tunnel.StreamOpen) -> None:
        if frame.channel == "tcp:22":
            await release.wait()
        await stream.accept()
        await _echo(stream)

    async with connected(serve=serve) as (engineer, _device, nursery, _pipe):
        slow: list[MuxStream] = []

        async def open_slow() -> None:
            slow.append(await engineer.open_stream("tcp:22"))

        nursery.start_soon(open_slow)
        with trio.fail_after(5):
            fast = await engineer.open_stream("tcp:7")
            await fast.send_all(b"ping")
            assert await fast.receive_some() == b"ping"
        assert not slow
        release.set()
        with trio.fail_after(5):
            while not slow:  # noqa: ASYNC110 - open_slow sets it
                await trio.sleep(0.01)
            await slow[0].send_all(b"pong")
            assert await slow[0].receive_some() == b"pong"


async def test_a_close_before_the_answer_gets_close_and_no_open_ok() -> None:
    """The engineer cancels an open that is still being answered: our CLOSE
    answers it, accept() raises StreamClosed, and no OPEN_OK is ever sent."""
    release = trio.Event()
    outcome: list[str] = []

    async def serve(stream: MuxStream, frame: tunnel.StreamOpen) -> None:
        await release.wait()
        try:
            await stream.accept()
        except StreamClosed:
            outcome.append("closed")
            return
        outcome.append("accepted")

    async with device_end(serve) as (engineer, device):
        await engineer.send(tunnel.StreamOpen(stream_id=1, channel="tcp:7"))
        await engineer.send(tunnel.StreamClose(stream_id=1))
        release.set()
        assert await engineer.receive() == tunnel.StreamClose(stream_id=1)
        await trio.testing.wait_all_tasks_blocked()
        assert outcome == ["closed"]
        assert len(engineer.table) == len(device.table) == 0
        assert device.streams_opened == 0


async def test_the_streams_task_answers_the_engineers_close() -> None:
    """The reader does not answer an engineer's CLOSE of an on_stream stream: the
    stream reads as closed, and our CLOSE goes out, with the task's code, once
    the task has stopped its local end and closes the stream."""
    peer_closed = trio.Event()
    finish = trio.Event()

    async def serve(stream: MuxStream, frame: tunnel.StreamOpen) -> None:
        await stream.accept()
        await stream.wait_peer_closed()
        assert stream.peer_closed
        assert await stream.receive_some() == b""
        peer_closed.set()
        await finish.wait()
        await stream.aclose(tunnel.StreamCloseCode.ABORTED)

    async with device_end(serve) as (engineer, device):
        await engineer.open(1)
        await engineer.send(tunnel.StreamClose(stream_id=1))
        with trio.fail_after(5):
            await peer_closed.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert 1 in device.table  # not answered yet
        finish.set()
        assert await engineer.receive() == tunnel.StreamClose(
            stream_id=1, code=tunnel.StreamCloseCode.ABORTED
        )
        assert len(engineer.table) == len(device.table) == 0


async def test_a_full_connection_never_stops_the_device_reader() -> None:
    """With the connection to the engineer full (a writer waits inside the send
    lock), the device's reader still takes an engineer's CLOSE and delivers DATA
    for another stream: it never waits to send."""
    flood = trio.Event()
    received: list[bytes] = []

    async def serve(stream: MuxStream, frame: tunnel.StreamOpen) -> None:
        await stream.accept()
        if stream.stream_id == 1:
            await flood.wait()
            while True:  # one-byte frames: the pipe fills long before the credit
                await stream.send_all(b"x")
        elif stream.stream_id == 3:
            await stream.wait_peer_closed()
            await stream.aclose()
        else:
            received.append(await stream.receive_some())

    async with device_end(serve) as (engineer, _device):
        for stream_id in (1, 3, 5):
            await engineer.open(stream_id)
        flood.set()
        await trio.testing.wait_all_tasks_blocked()
        await engineer.send(tunnel.StreamClose(stream_id=3))
        await engineer.send(tunnel.StreamData(stream_id=5, payload=b"hello"))
        with trio.fail_after(5):
            while not received:  # noqa: ASYNC110 - the stream's task sets it
                await trio.sleep(0.01)
        assert received == [b"hello"]


async def test_a_frame_that_lost_its_point_is_dropped_not_an_error() -> None:
    """Frames the peer's CLOSE or EOF made pointless (DATA, EOF, WINDOW) are
    dropped quietly; the table is not broken and later streams still work."""

    async def serve(stream: MuxStream, frame: tunnel.StreamOpen) -> None:
        await stream.accept()
        if stream.stream_id == 1:
            await stream.wait_peer_closed()
            with pytest.raises(StreamClosed):
                await stream.send_all(b"late")
            await stream.send_eof()
            await stream.aclose()
            return
        # Reading half a window returns credit, after the engineer's EOF: the
        # WINDOW is dropped.
        while await stream.receive_some():
            pass
        await stream.send_all(b"done")

    async with device_end(serve) as (engineer, device):
        await engineer.open(1)
        await engineer.send(tunnel.StreamClose(stream_id=1))
        assert await engineer.receive() == tunnel.StreamClose(stream_id=1)
        await engineer.open(3)
        await engineer.send(
            tunnel.StreamData(stream_id=3, payload=b"y" * (WINDOW // 2))
        )
        await engineer.send(tunnel.StreamEof(stream_id=3))
        assert await engineer.receive() == tunnel.StreamData(
            stream_id=3, payload=b"done"
        )
        await trio.testing.wait_all_tasks_blocked()  # counted once sent
        assert device.data_bytes_sent == 4


async def test_byte_and_stream_counts() -> None:
    """Both ends count DATA payload bytes each way and the streams that got
    OPEN_OK (a refused one does not count): the agent's end receipt."""
    payload = os.urandom(3 * WINDOW + 123)
    async with connected() as (engineer, device, _nursery, _pipe):
        with pytest.raises(StreamRefused):
            await engineer.open_stream("tcp:22")
        stream = await engineer.open_stream("tcp:7")
        with trio.fail_after(30):
            assert await _round_trip(stream, payload) == payload
        n = len(payload)
        assert (device.data_bytes_received, device.data_bytes_sent) == (n, n)
        assert (engineer.data_bytes_sent, engineer.data_bytes_received) == (n, n)
        assert device.streams_opened == engineer.streams_opened == 1


async def test_late_data_the_table_drops_is_counted() -> None:
    """DATA the engineer sent before it saw our CLOSE crossed the connection:
    counted, though dropped (the broker relayed and counted it too)."""

    async def serve(stream: MuxStream, frame: tunnel.StreamOpen) -> None:
        await stream.accept()
        await stream.aclose()

    async with device_end(serve) as (engineer, device):
        await engineer.open(1)
        # Our CLOSE is on its way, not yet read.
        await engineer.send(tunnel.StreamData(stream_id=1, payload=b"abc"))
        assert await engineer.receive() == tunnel.StreamClose(stream_id=1)
        await engineer.send(tunnel.StreamClose(stream_id=1))
        with trio.fail_after(5):
            while len(device.table):  # noqa: ASYNC110 - the reader empties it
                await trio.sleep(0.01)
        assert device.data_bytes_received == 3


async def test_the_tunnel_ending_ends_every_stream() -> None:
    """When the connection ends, wait_peer_closed returns and writers get
    StreamClosed."""
    ended = trio.Event()

    async def serve(stream: MuxStream, frame: tunnel.StreamOpen) -> None:
        await stream.accept()
        await stream.wait_peer_closed()
        with pytest.raises(StreamClosed):
            await stream.send_all(b"late")
        ended.set()

    async with device_end(serve) as (engineer, device):
        await engineer.open(1)
        engineer.pipe.close()
        with trio.fail_after(5):
            await ended.wait()
        assert device.ended
