"""The engineer CLI's session client (``relay shell`` / ``relay forward``) against
the real broker, with a scripted device that serves its streams through a
device-side TunnelMux."""

from __future__ import annotations

import contextlib
import io
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio

from relay._trio.engineer_session import (
    SessionOutcome,
    SessionStatus,
    forward_work,
    run_session,
    shell_work,
)
from relay._trio.tunnel_mux import MuxStream, TunnelMux
from relay._trio.websocket import ConnectionClosed
from relay.engineer_client import Credentials
from relay.proto import control, tunnel
from relay.proto.close import CloseCode
from relay.proto.tunnel import Side
from tests.e2e.conftest import LOOPBACK, PKI
from tests.e2e.test_sessions_broker import (
    DEVICE,
    FakeDevice,
    Harness,
    fake_device,
    harness,
    open_tunnel,
)

pytestmark = pytest.mark.slow


def engineer_credentials(h: Harness) -> Credentials:
    """What `relay login` would have saved for the harness's engineer."""
    return Credentials(
        broker=f"https://{LOOPBACK}:{h.broker.ports.engineer}",
        username="alice",
        token=h.token,
        expires_at="",
        ca_file=str(h.pki.ca_file),
    )


def forward_to(
    device_port: int, ports: list[int]
) -> Callable[[TunnelMux, SessionStatus], Awaitable[None]]:
    """`relay forward`'s work on any free local port, which goes into *ports*."""

    async def work(mux: TunnelMux, status: SessionStatus) -> None:
        async with trio.open_nursery() as inner:
            ports.append(
                await inner.start(
                    lambda task_status: forward_work(
                        mux,
                        status,
                        local_port=0,
                        device_port=device_port,
                        task_status=task_status,
                    )
                )
            )

    return work


async def _echo(stream: MuxStream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()


@asynccontextmanager
async def serving_device(
    h: Harness, device: FakeDevice, *, end_onsite_after_echo: bool = False
) -> AsyncIterator[list[control.Event]]:
    """The device grants the next offer, opens its tunnel and echoes every stream.

    With *end_onsite_after_echo*, it ends the session itself (as the person at
    the instrument would) once one stream has echoed and been closed.
    """
    events: list[control.Event] = []
    async with trio.open_nursery() as nursery:

        async def run() -> None:
            offer = await device.next_event()
            assert isinstance(offer, control.Offer)
            events.append(offer)
            await device.send(device.grant(offer))
            echoed = trio.Event()
            async with (
                open_tunnel(h, device, offer.session_id) as tun,
                trio.open_nursery() as streams,
            ):

                async def serve(stream: MuxStream) -> None:
                    await stream.accept()
                    await _echo(stream)
                    await stream.aclose()  # a device stream's task sends its CLOSE
                    echoed.set()

                def on_stream(stream: MuxStream, _frame: tunnel.StreamOpen) -> None:
                    streams.start_soon(serve, stream)

                mux = TunnelMux(tun, side=Side.DEVICE, on_stream=on_stream)

                async def run_mux() -> None:
                    # The broker closes the tunnel at the end: that ends run().
                    with contextlib.suppress(ConnectionClosed):
                        await mux.run()
                    streams.cancel_scope.cancel()

                streams.start_soon(run_mux)
                if end_onsite_after_echo:
                    await echoed.wait()
                    await tun.aclose(CloseCode.SESSION_ENDED, "onsite")
                    await device.send(device.ended(offer, "onsite"))
                    streams.cancel_scope.cancel()

        nursery.start_soon(run)
        yield events
        nursery.cancel_scope.cancel()


async def test_shell_work_types_and_reads_until_the_remote_end_finishes(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """Keyboard bytes reach the device's shell stream and its output comes back;
    when the remote side ends the stream, the client ends the session: "engineer",
    exit 0."""
    stdin_read, stdin_write = os.pipe()
    stdout_read, stdout_write = os.pipe()
    out = io.StringIO()
    async with harness(pki, nursery) as h, fake_device(h) as device:
        async with serving_device(h, device) as events:

            async def work(mux: TunnelMux, status: SessionStatus) -> None:
                await shell_work(
                    mux, status, stdin_fd=stdin_read, stdout_fd=stdout_write
                )

            async def type_and_hang_up() -> None:
                os.write(stdin_write, b"echo hello\r")
                os.close(stdin_write)  # end of keyboard input: EOF to the device

            nursery.start_soon(type_and_hang_up)
            with trio.fail_after(15):
                outcome = await run_session(
                    engineer_credentials(h),
                    device_id=DEVICE,
                    reason="ticket 4711: conductivity alarm",
                    channels=["shell"],
                    work=work,
                    out=out,
                )
        os.close(stdout_write)
        assert os.read(stdout_read, 1024) == b"echo hello\r"
        os.close(stdin_read)
        os.close(stdout_read)
        offer = events[0]
        assert isinstance(offer, control.Offer)
        assert offer.channels == ("shell",)
        assert offer.reason == "ticket 4711: conductivity alarm"
        assert outcome == SessionOutcome(offer.session_id, "engineer")
        assert outcome.exit_code == 0
        text = out.getvalue()
        assert "session active;" in text
        assert "session ended: ended by you" in text
        await h.assert_clean()


async def test_forward_relays_a_connection_and_ctrl_c_ends_the_session(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """relay forward: a local connection is one stream to the device's port;
    Ctrl-C (SIGINT) ends the session from the engineer's side."""
    out = io.StringIO()
    async with harness(pki, nursery) as h, fake_device(h) as device:
        async with serving_device(h, device):
            ports: list[int] = []
            work = forward_to(22, ports)

            async def use_the_forward() -> None:
                with trio.fail_after(10):
                    while not ports:  # noqa: ASYNC110 - set by the work
                        await trio.sleep(0.02)
                    conn = await trio.open_tcp_stream(LOOPBACK, ports[0])
                    async with conn:
                        await conn.send_all(b"SSH-2.0-test\r\n")
                        assert await conn.receive_some(100) == b"SSH-2.0-test\r\n"
                os.kill(os.getpid(), signal.SIGINT)

            nursery.start_soon(use_the_forward)
            with trio.fail_after(15):
                outcome = await run_session(
                    engineer_credentials(h),
                    device_id=DEVICE,
                    reason="ticket 4712",
                    channels=["tcp:22"],
                    work=work,
                    out=out,
                )
        assert (outcome.end_reason, outcome.exit_code) == ("engineer", 0)
        assert f"forwarding 127.0.0.1:{ports[0]} to port 22" in out.getvalue()
        await h.assert_clean()


async def test_onsite_end_cancels_the_work_and_sets_its_exit_code(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """The person at the instrument ends it mid-forward: the client says so and
    exits with the on-site code (10)."""
    out = io.StringIO()
    async with harness(pki, nursery) as h, fake_device(h) as device:
        async with serving_device(h, device, end_onsite_after_echo=True):
            ports: list[int] = []
            work = forward_to(22, ports)

            async def use_the_forward() -> None:
                with trio.fail_after(10):
                    while not ports:  # noqa: ASYNC110 - set by the work
                        await trio.sleep(0.02)
                    conn = await trio.open_tcp_stream(LOOPBACK, ports[0])
                    async with conn:
                        await conn.send_all(b"ping")
                        assert await conn.receive_some(100) == b"ping"
                        await conn.send_eof()
                        assert await conn.receive_some(100) == b""

            nursery.start_soon(use_the_forward)
            with trio.fail_after(15):
                outcome = await run_session(
                    engineer_credentials(h),
                    device_id=DEVICE,
                    reason="ticket 4713",
                    channels=["tcp:22"],
                    work=work,
                    out=out,
                )
        assert (outcome.end_reason, outcome.exit_code) == ("onsite", 10)
        assert "ended by the person at the instrument" in out.getvalue()
        await h.assert_clean()
