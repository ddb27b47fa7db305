"""TunnelMux: streams, credit and endings between an engineer end and a device end."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import pytest
import trio

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


@asynccontextmanager
async def connected(
    *, texts: list[str] | None = None
) -> AsyncIterator[tuple[TunnelMux, TunnelMux, trio.Nursery, Pipe]]:
    engineer_pipe, device_pipe = pipe_pair()
    async with trio.open_nursery() as nursery:

        async def on_open(
            frame: tunnel.StreamOpen,
        ) -> MuxStream | tunnel.StreamOpenFail:
            if frame.channel != "tcp:7":
                return tunnel.StreamOpenFail(
                    stream_id=frame.stream_id,
                    code=tunnel.OpenFailCode.NOT_ALLOWED,
                    reason="port not allowed",
                )
            stream = device.new_stream(frame)
            nursery.start_soon(_echo, stream)
            return stream

        engineer = TunnelMux(
            engineer_pipe,
            side=Side.ENGINEER,
            on_text=None if texts is None else texts.append,
            initial_window=WINDOW,
        )
        device = TunnelMux(
            device_pipe, side=Side.DEVICE, on_open=on_open, initial_window=WINDOW
        )
        nursery.start_soon(_run_quietly, engineer)
        nursery.start_soon(_run_quietly, device)
        yield engineer, device, nursery, device_pipe
        nursery.cancel_scope.cancel()


async def _run_quietly(mux: TunnelMux) -> None:
    with suppress(ConnectionError):
        await mux.run()


async def _read_all(stream: MuxStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    return bytes(data)


async def test_bulk_echo_keeps_every_byte_within_credit() -> None:
    """4 MiB through a 64 KiB window: echoed intact, never beyond credit (the
    device's table would raise), and WINDOW keeps it moving."""
    payload = os.urandom(4 * 1024 * 1024)
    async with connected() as (engineer, _device, nursery, _pipe):
        stream = await engineer.open_stream("tcp:7")
        received: list[bytes] = []

        async def reader() -> None:
            received.append(await _read_all(stream))

        nursery.start_soon(reader)
        with trio.fail_after(30):
            await stream.send_all(payload)
            await stream.send_eof()
            while not received:  # noqa: ASYNC110 - the reader task sets it
                await trio.sleep(0.01)
        assert hashlib.sha256(received[0]).digest() == hashlib.sha256(payload).digest()
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
    """Without on_open, an OPEN is answered with OPEN_FAIL not_allowed."""
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
    engineer_pipe, device_pipe = pipe_pair()
    sizes: list[tuple[int, int]] = []
    async with trio.open_nursery() as nursery:

        async def on_open(frame: tunnel.StreamOpen) -> MuxStream:
            stream = device.new_stream(frame)
            stream.on_resize = lambda cols, rows: sizes.append((cols, rows))
            return stream

        engineer = TunnelMux(engineer_pipe, side=Side.ENGINEER)
        device = TunnelMux(device_pipe, side=Side.DEVICE, on_open=on_open)
        nursery.start_soon(_run_quietly, engineer)
        nursery.start_soon(_run_quietly, device)
        shell = await engineer.open_stream("shell", cols=80, rows=24)
        await shell.resize(132, 43)
        with trio.fail_after(5):
            while not sizes:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert sizes == [(132, 43)]
        nursery.cancel_scope.cancel()
