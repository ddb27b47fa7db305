"""The agent's session runtime against a fake broker over real TLS on loopback.

The fake broker speaks our control protocol and accepts the tunnel path with our
own ServerHandshake; the test plays the engineer through tunnel frames.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import gc
import os
import random
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio
import trio.testing
from cryptography import x509

import auth
from relay._trio.agent import (
    AgentSettings,
    AgentStatus,
    make_session_runtime,
    run_agent,
    tunnel_url_allowed,
)
from relay._trio.agent_sessions import (
    END_RECEIPT_MAX_SENDS,
    END_RECEIPTS_KEPT,
    SessionRuntime,
    StaleSession,
)
from relay._trio.websocket import (
    ConnectionClosed,
    ServerHandshake,
    WebSocketConnection,
)
from relay.config import AgentConfig, ListenAddress, WebSocketLimits
from relay.pki_files import (
    AgentDir,
    DataDir,
    default_server_names,
    ensure_listener_certificate,
    init_ca,
    load_ca,
    write_private,
    write_public,
)
from relay.proto import control, receipts, tunnel
from relay.proto.session import new_session_id
from relay.tls import device_listener_context

pytestmark = pytest.mark.slow

LOOPBACK = "127.0.0.1"
DEVICE_ID = "dev-sessions"
E = tunnel.Side.ENGINEER
D = tunnel.Side.DEVICE


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    """A leaked socket or fd fails the test that leaked it."""
    yield
    gc.collect()


@dataclass
class Device:
    agent_dir: AgentDir
    ca_file: Path
    certificate: x509.Certificate
    server_context_files: tuple[Path, Path]


@pytest.fixture
def device(tmp_path: Path) -> Device:
    data = DataDir(tmp_path / "relay-data")
    now = datetime.now(UTC)
    init_ca(data, now=now, lifetime=timedelta(days=365))
    ensure_listener_certificate(
        data, names=default_server_names(()), now=now, lifetime=timedelta(days=30)
    )
    key = auth.generate_private_key()
    signed = auth.sign_device_csr(
        load_ca(data),
        auth.build_device_csr(key, DEVICE_ID),
        now=now,
        lifetime=timedelta(days=365),
        max_csr_bytes=16384,
    )
    agent_dir = AgentDir(tmp_path / "agent")
    agent_dir.root.mkdir()
    write_private(agent_dir.key, auth.private_key_pem(key))
    write_public(agent_dir.cert, signed.certificate_pem())
    return Device(
        agent_dir=agent_dir,
        ca_file=data.ca_cert,
        certificate=x509.load_pem_x509_certificate(signed.certificate_pem()),
        server_context_files=(data.listener_cert, data.listener_key),
    )


@dataclass
class FakeBroker:
    """Accepts one control channel and tunnels; hands their traffic to the test."""

    device: Device
    # The control protocol version it welcomes with (1: a broker without acks).
    welcome_version: int = control.PROTOCOL_VERSION
    limits: WebSocketLimits = field(
        default_factory=lambda: WebSocketLimits(
            ping_interval_s=0.5, close_timeout_s=1.0
        )
    )
    control_ws: WebSocketConnection | None = None
    channel: control.ControlChannel | None = None
    tunnel_paths: list[str] = field(default_factory=list)
    # Every accepted TCP connection, so a test can drop them as a killed
    # broker process would (the kernel closes its sockets, nobody says goodbye).
    sockets: list[trio.SocketStream] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.events_send, self.events = trio.open_memory_channel[control.Event](100)
        self.tunnels_send, self.tunnels = trio.open_memory_channel[WebSocketConnection](
            10
        )
        self.connected = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[int]) -> None:
        cert, key = self.device.server_context_files
        context = device_listener_context(
            cert_file=cert, key_file=key, device_ca_file=self.device.ca_file
        )
        listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
        port = listeners[0].socket.getsockname()[1]
        ssl_listeners = [trio.SSLListener(lst, context) for lst in listeners]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, ssl_listeners)
            task_status.started(port)

    async def _handle(self, tls: trio.SSLStream[trio.SocketStream]) -> None:
        self.sockets.append(tls.transport_stream)
        handshake = ServerHandshake(tls, self.limits)
        request = await handshake.receive_request()
        if request.path == "/v1/device/control":
            async with handshake.accept(request) as ws:
                await self._control(ws)
        elif request.path.startswith("/v1/device/tunnel/"):
            self.tunnel_paths.append(request.path)
            async with handshake.accept(request) as ws:
                await self.tunnels_send.send(ws)
                await trio.sleep_forever()
        else:
            await handshake.reject(404, "unknown path")

    async def _control(self, ws: WebSocketConnection) -> None:
        channel = control.ControlChannel(control.Role.BROKER)
        channel.receive_message(await ws.receive_message())
        hello = channel.next_event()
        assert isinstance(hello, control.Hello)
        await ws.send_message(
            channel.send(
                control.Welcome(
                    version=self.welcome_version,
                    heartbeat_interval_s=0.5,
                    broker_version="fake",
                )
            )
        )
        self.control_ws, self.channel = ws, channel
        self.connected.set()
        try:
            while True:
                channel.receive_message(await ws.receive_message())
                event = channel.next_event()
                if isinstance(event, control.Heartbeat):
                    await ws.send_message(
                        channel.send(control.HeartbeatAck(seq=event.seq))
                    )
                elif not isinstance(event, control._NeedData):
                    await self.events_send.send(event)
        except (ConnectionClosed, trio.ClosedResourceError):
            # ClosedResourceError: vanish() closed the socket under a send.
            return

    async def send(self, event: control.Event) -> None:
        assert self.control_ws is not None
        assert self.channel is not None
        await self.control_ws.send_message(self.channel.send(event))

    async def next_event(self) -> control.Event:
        with trio.fail_after(5):
            return await self.events.receive()

    async def next_tunnel(self) -> WebSocketConnection:
        with trio.fail_after(5):
            return await self.tunnels.receive()

    async def vanish(self) -> None:
        """Drop every connection at the TCP level, as a SIGKILLed broker does."""
        self.connected = trio.Event()
        for sock in self.sockets:
            await trio.aclose_forcefully(sock)
        self.sockets.clear()


def make_offer(channels: tuple[str, ...], max_seconds: int = 3600) -> control.Offer:
    nonce = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    return control.Offer(
        session_id=new_session_id(secrets.token_bytes(16)),
        engineer="alice",
        engineer_role="engineer, Example Service",
        reason="ticket 4711: conductivity alarm",
        channels=channels,
        max_seconds=max_seconds,
        grant_deadline_ms=time.time_ns() // 1_000_000 + 60_000,
        nonce=nonce,
    )


@dataclass
class Engineer:
    """The engineer's end of the tunnel (frames checked with its own table)."""

    ws: WebSocketConnection
    table: tunnel.StreamTable = field(default_factory=tunnel.StreamTable)
    received: dict[int, bytearray] = field(default_factory=dict)
    sent_bytes: int = 0
    received_bytes: int = 0
    auto_window: bool = False

    async def send(self, frame: tunnel.Frame) -> None:
        await self.ws.send_message(self.table.send(frame, sender=E))
        if isinstance(frame, tunnel.StreamData):
            self.sent_bytes += len(frame.payload)

    async def receive(self) -> tunnel.Frame:
        with trio.fail_after(5):
            frame = tunnel.decode(await self.ws.receive_message())
        self.table.receive(frame, sender=D)
        if isinstance(frame, tunnel.StreamData):
            self.received_bytes += len(frame.payload)
            self.received.setdefault(frame.stream_id, bytearray()).extend(frame.payload)
            if self.auto_window:
                # Hand the credit back at once, as a fast reader would.
                await self.send(
                    tunnel.StreamWindow(
                        stream_id=frame.stream_id, credit=len(frame.payload)
                    )
                )
        return frame

    async def answer(self, stream_id: int) -> tunnel.Frame:
        """The device's next non-DATA frame on *stream_id* (other frames are kept)."""
        while True:
            frame = await self.receive()
            if frame.stream_id == stream_id and not isinstance(
                frame, (tunnel.StreamData, tunnel.StreamWindow)
            ):
                return frame

    async def receive_until(self, stream_id: int, needle: bytes) -> bytes:
        while needle not in self.received.get(stream_id, b""):
            await self.receive()
        return bytes(self.received[stream_id])

    async def expect_close(self) -> tuple[int, str]:
        with trio.fail_after(5):
            while True:
                try:
                    await self.receive()
                except ConnectionClosed as exc:
                    return exc.code, exc.reason


async def echo_server(nursery: trio.Nursery, closed: list[float]) -> int:
    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
            except trio.BrokenResourceError:
                pass
        closed.append(trio.current_time())

    listeners: list[trio.SocketListener] = await nursery.start(
        functools.partial(trio.serve_tcp, handle, 0, host=LOOPBACK)
    )
    return int(listeners[0].socket.getsockname()[1])


@dataclass
class Setup:
    broker: FakeBroker
    runtime: SessionRuntime
    settings: AgentSettings


@pytest.fixture
def make_setup(device: Device, nursery: trio.Nursery) -> object:
    async def start(
        config: AgentConfig,
        wall_clock_ms: Callable[[], int] | None = None,
        welcome_version: int = control.PROTOCOL_VERSION,
    ) -> Setup:
        broker = FakeBroker(device, welcome_version=welcome_version)
        port = await nursery.start(broker.serve)
        settings = AgentSettings(
            broker_url=f"wss://{LOOPBACK}:{port}",
            agent_dir=device.agent_dir.root,
            ca_file=device.ca_file,
            limits=config,
            websocket=WebSocketLimits(ping_interval_s=0.5, close_timeout_s=1.0),
        )
        runtime = make_session_runtime(settings, wall_clock_ms=wall_clock_ms)
        await nursery.start(runtime.run)
        nursery.start_soon(
            lambda: run_agent(
                settings,
                status=AgentStatus(),
                runtime=runtime,
                rng=random.Random(1),  # noqa: S311 - repeatable jitter
            )
        )
        with trio.fail_after(5):
            await broker.connected.wait()
        return Setup(broker=broker, runtime=runtime, settings=settings)

    return start


def agent_config(**changes: object) -> AgentConfig:
    base = AgentConfig(
        backoff_base_s=0.05,
        backoff_cap_s=0.2,
        connect_timeout_s=2.0,
        stable_after_s=0.5,
        shell_command=("/bin/sh",),
        ui_listen=ListenAddress(host=LOOPBACK, port=0),
        pty_kill_grace_s=0.3,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


async def wait_for(predicate: object, timeout_s: float = 5.0) -> None:
    assert callable(predicate)
    with trio.fail_after(timeout_s):
        while not predicate():  # noqa: ASYNC110 - state owned by the runtime
            await trio.sleep(0.01)


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def grant_offer(
    setup: Setup, device: Device, offer: control.Offer
) -> receipts.GrantReceipt:
    await setup.broker.send(offer)
    await wait_for(lambda: setup.runtime.offer is not None)
    setup.runtime.grant(offer.session_id)
    grant = await setup.broker.next_event()
    assert isinstance(grant, control.Grant)
    return receipts.verify_grant(
        device.certificate,
        receipts.SignedReceipt.from_wire(grant.receipt, grant.signature),
        session_id=offer.session_id,
        device_id=DEVICE_ID,
        nonce=offer.nonce,
        engineer=offer.engineer,
        offered_channels=offer.channels,
        offered_max_seconds=offer.max_seconds,
    )


async def ended_receipt(
    setup: Setup, device: Device, offer: control.Offer
) -> receipts.EndReceipt:
    ended = await setup.broker.next_event()
    assert isinstance(ended, control.SessionEnded)
    return receipts.verify_end(
        device.certificate,
        receipts.SignedReceipt.from_wire(ended.receipt, ended.signature),
        session_id=offer.session_id,
        device_id=DEVICE_ID,
        nonce=offer.nonce,
    )


async def open_shell(engineer: Engineer, stream_id: int) -> int:
    """Open a shell stream and return the shell's pid (it prints it)."""
    await engineer.send(
        tunnel.StreamOpen(stream_id=stream_id, channel="shell", cols=80, rows=24)
    )
    assert isinstance(await engineer.answer(stream_id), tunnel.StreamOpenOk)
    await engineer.send(
        tunnel.StreamData(
            stream_id=stream_id, payload=b"echo pid=$$ size=$(stty size)\n"
        )
    )
    output = await engineer.receive_until(stream_id, b" size=24 80")
    marker = output.rindex(b"pid=")
    return int(output[marker + 4 :].split(b" ", 1)[0])


async def test_grant_streams_and_broker_end(
    make_setup: object, device: Device, nursery: trio.Nursery
) -> None:
    """A grant verifies against the device certificate; shell and TCP streams work
    through the tunnel; a port off the allow-list is refused even when the broker
    offers it; the broker's session_end gets a verifiable end receipt with the counts."""
    assert callable(make_setup)
    closed: list[float] = []
    echo_port = await echo_server(nursery, closed)
    setup: Setup = await make_setup(agent_config(allowed_ports=(echo_port,)))
    fds_before = open_fds()  # the control channel is up; no session yet
    offer = make_offer(("shell", f"tcp:{echo_port}", "tcp:1"), max_seconds=3600)
    grant = await grant_offer(setup, device, offer)
    # The device decides: tcp:1 was offered but is not on its allow-list.
    assert grant.channels == ("shell", f"tcp:{echo_port}")
    assert grant.max_seconds == 3600
    engineer = Engineer(await setup.broker.next_tunnel())
    assert setup.broker.tunnel_paths == [f"/v1/device/tunnel/{offer.session_id}"]

    pid = await open_shell(engineer, 1)
    assert pid_alive(pid)
    await engineer.send(tunnel.StreamResize(stream_id=1, cols=100, rows=30))
    await engineer.send(tunnel.StreamData(stream_id=1, payload=b"stty size\n"))
    await engineer.receive_until(1, b"30 100")

    await engineer.send(tunnel.StreamOpen(stream_id=3, channel=f"tcp:{echo_port}"))
    assert isinstance(await engineer.answer(3), tunnel.StreamOpenOk)
    # More than two windows each way: the device's WINDOW frames must flow.
    payload = os.urandom(600_000)
    engineer.auto_window = True
    for offset in range(0, len(payload), 60_000):
        chunk = payload[offset : offset + 60_000]
        while not engineer.table.can_send(3, E, len(chunk)):
            await engineer.receive()
        await engineer.send(tunnel.StreamData(stream_id=3, payload=chunk))
    while len(engineer.received.get(3, b"")) < len(payload):
        await engineer.receive()
    engineer.auto_window = False
    assert bytes(engineer.received[3]) == payload

    # Off the allow-list and not granted: refused, whatever the broker relays.
    await engineer.send(tunnel.StreamOpen(stream_id=5, channel="tcp:1"))
    refused = await engineer.answer(5)
    assert isinstance(refused, tunnel.StreamOpenFail)
    assert refused.code is tunnel.OpenFailCode.NOT_ALLOWED

    await setup.broker.send(
        control.SessionEnd(session_id=offer.session_id, reason="admin")
    )
    code, reason = await engineer.expect_close()
    assert (code, reason) == (4005, "admin")
    end = await ended_receipt(setup, device, offer)
    assert end.reason == "admin"
    assert end.streams_opened == 2
    assert end.bytes_to_device == engineer.sent_bytes
    assert end.bytes_from_device == engineer.received_bytes
    await wait_for(lambda: not pid_alive(pid))
    await wait_for(lambda: setup.runtime.state()["session"] is None)
    assert setup.runtime.state()["last_end"] == {
        "session_id": offer.session_id,
        "reason": "admin",
    }
    await wait_for(lambda: len(closed) == 1)
    await engineer.ws.aclose()
    with pytest.raises(StaleSession):
        setup.runtime.end(offer.session_id)
    # Nothing of the session is left: its tunnel, PTY and TCP fds are closed.
    gc.collect()
    await wait_for(lambda: open_fds() <= fds_before)
    nursery.cancel_scope.cancel()


async def test_onsite_end_closes_local_streams_first(
    make_setup: object, device: Device, nursery: trio.Nursery
) -> None:
    """The on-site End closes local streams within 1 s, then the tunnel with 4005
    "onsite", then sends session_ended; the shell process is gone."""
    assert callable(make_setup)
    closed: list[float] = []
    echo_port = await echo_server(nursery, closed)
    setup: Setup = await make_setup(agent_config(allowed_ports=(echo_port,)))
    offer = make_offer(("shell", f"tcp:{echo_port}"))
    await grant_offer(setup, device, offer)
    engineer = Engineer(await setup.broker.next_tunnel())
    pid = await open_shell(engineer, 1)
    await engineer.send(tunnel.StreamOpen(stream_id=3, channel=f"tcp:{echo_port}"))
    assert isinstance(await engineer.answer(3), tunnel.StreamOpenOk)
    await engineer.send(tunnel.StreamData(stream_id=3, payload=b"ping"))
    await engineer.receive_until(3, b"ping")

    ended_at = trio.current_time()
    setup.runtime.end(offer.session_id)
    setup.runtime.end(offer.session_id)  # a second press is harmless
    code, reason = await engineer.expect_close()
    tunnel_closed_at = trio.current_time()
    assert (code, reason) == (4005, "onsite")
    assert len(closed) == 1
    assert closed[0] - ended_at <= 1.0
    assert closed[0] <= tunnel_closed_at
    assert not pid_alive(pid)
    end = await ended_receipt(setup, device, offer)
    assert end.reason == "onsite"
    assert end.streams_opened == 2
    await engineer.ws.aclose()
    nursery.cancel_scope.cancel()


async def test_cap_on_the_agents_own_timer_with_a_silent_broker(
    make_setup: object, device: Device, nursery: trio.Nursery
) -> None:
    """With the broker silent, the agent ends the session at its own cap (time_cap,
    <= cap + 2 s from the grant), and a grant never allows more than its cap."""
    assert callable(make_setup)
    setup: Setup = await make_setup(agent_config(max_session_seconds=1))
    offer = make_offer(("shell",), max_seconds=3600)
    grant = await grant_offer(setup, device, offer)
    granted_at = trio.current_time()
    assert grant.max_seconds == 1
    engineer = Engineer(await setup.broker.next_tunnel())
    pid = await open_shell(engineer, 1)
    code, reason = await engineer.expect_close()
    assert (code, reason) == (4005, "time_cap")
    # At the cap plus the agent's grace (1 s), within the BRIEF's cap + 2 s.
    assert 1 + 1 - 0.1 <= trio.current_time() - granted_at <= 1 + 2
    assert not pid_alive(pid)
    end = await ended_receipt(setup, device, offer)
    assert end.reason == "time_cap"
    await engineer.ws.aclose()
    nursery.cancel_scope.cancel()


@pytest.mark.parametrize("jump_s", [2 * 3600, -2 * 3600], ids=["plus-2h", "minus-2h"])
async def test_a_wall_clock_jump_does_not_move_the_cap(
    make_setup: object, device: Device, nursery: trio.Nursery, jump_s: int
) -> None:
    """E5: the device's wall clock jumps by 2 h after the grant; its cap still
    ends the session on the monotonic clock (<= cap + 2 s from the grant)."""
    assert callable(make_setup)
    offset_ms = 0

    def wall_clock_ms() -> int:
        return int(time.time() * 1000) + offset_ms

    setup: Setup = await make_setup(agent_config(max_session_seconds=2), wall_clock_ms)
    offer = make_offer(("shell",))
    await grant_offer(setup, device, offer)
    granted_at = trio.current_time()
    offset_ms = jump_s * 1000
    engineer = Engineer(await setup.broker.next_tunnel())
    code, reason = await engineer.expect_close()
    assert (code, reason) == (4005, "time_cap")
    assert 2 - 0.1 <= trio.current_time() - granted_at <= 2 + 2
    end = await ended_receipt(setup, device, offer)
    assert end.reason == "time_cap"
    await engineer.ws.aclose()
    nursery.cancel_scope.cancel()


async def test_device_page_warnings_come_from_the_agents_own_timer(
    make_setup: object, device: Device, nursery: trio.Nursery
) -> None:
    """The device side is warned at each configured instant before its own cap
    (T-10 min / T-1 min in production; 2 s / 1 s here), with no broker message."""
    assert callable(make_setup)
    setup: Setup = await make_setup(
        agent_config(max_session_seconds=3, warning_seconds=(1, 2))
    )
    offer = make_offer(("shell",))
    await grant_offer(setup, device, offer)
    engineer = Engineer(await setup.broker.next_tunnel())
    seen: list[int | None] = []
    with trio.fail_after(6):
        while (session := setup.runtime.state()["session"]) is not None:
            if session["warning_seconds"] not in seen:
                seen.append(session["warning_seconds"])
            await setup.runtime.changed.wait()
    assert seen == [None, 2, 1]
    code, reason = await engineer.expect_close()
    assert (code, reason) == (4005, "time_cap")
    await engineer.ws.aclose()
    nursery.cancel_scope.cancel()


async def test_a_vanished_broker_ends_local_streams_at_once(
    make_setup: object, device: Device, nursery: trio.Nursery
) -> None:
    """E10, device side: the broker's connections drop without a close message
    (a killed process); the agent ends its local streams within 1 s of noticing,
    reconnects, and then delivers the end receipt (device_disconnect)."""
    assert callable(make_setup)
    setup: Setup = await make_setup(agent_config())
    offer = make_offer(("shell",))
    await grant_offer(setup, device, offer)
    engineer = Engineer(await setup.broker.next_tunnel())
    pid = await open_shell(engineer, 1)
    await setup.broker.vanish()
    dropped_at = trio.current_time()
    await wait_for(lambda: not pid_alive(pid), timeout_s=3)
    assert trio.current_time() - dropped_at <= 1.0
    with trio.fail_after(5):
        await setup.broker.connected.wait()
    end = await ended_receipt(setup, device, offer)
    assert end.reason == "device_disconnect"
    assert setup.runtime.state()["session"] is None
    nursery.cancel_scope.cancel()


async def test_end_receipt_waits_for_the_control_channel(
    make_setup: object, device: Device, nursery: trio.Nursery
) -> None:
    """An on-site end while the control channel is down works at once; the end
    receipt is sent when the channel is back."""
    assert callable(make_setup)
    setup: Setup = await make_setup(agent_config())
    offer = make_offer(("shell",))
    await grant_offer(setup, device, offer)
    engineer = Engineer(await setup.broker.next_tunnel())
    pid = await open_shell(engineer, 1)
    assert setup.broker.control_ws is not None
    setup.broker.connected = trio.Event()
    await setup.broker.control_ws.aclose()
    setup.runtime.end(offer.session_id)
    code, reason = await engineer.expect_close()
    assert (code, reason) == (4005, "onsite")
    assert not pid_alive(pid)
    with trio.fail_after(5):
        await setup.broker.connected.wait()
    end = await ended_receipt(setup, device, offer)
    assert end.reason == "onsite"
    await engineer.ws.aclose()
    nursery.cancel_scope.cancel()


async def _onsite_end(setup: Setup, device: Device) -> control.Offer:
    """A granted session with a shell, ended on site; its receipt came."""
    offer = make_offer(("shell",))
    await grant_offer(setup, device, offer)
    engineer = Engineer(await setup.broker.next_tunnel())
    await open_shell(engineer, 1)
    setup.runtime.end(offer.session_id)
    assert await engineer.expect_close() == (4005, "onsite")
    assert (await ended_receipt(setup, device, offer)).reason == "onsite"
    await engineer.ws.aclose()
    return offer


async def _reconnect(setup: Setup) -> None:
    await setup.broker.vanish()
    with trio.fail_after(5):
        await setup.broker.connected.wait()


async def _nothing_sent(setup: Setup, within_s: float = 1.0) -> None:
    with trio.move_on_after(within_s):
        event = await setup.broker.events.receive()
        raise AssertionError(f"unexpected {event!r}")


async def test_an_end_receipt_is_sent_on_every_channel_until_acked(
    make_setup: object, device: Device, nursery: trio.Nursery
) -> None:
    """A receipt the broker has not acked (written into a connection that then
    died) is sent again, once, on each new channel; once acked, never again."""
    assert callable(make_setup)
    setup: Setup = await make_setup(agent_config())
    offer = await _onsite_end(setup, device)
    await _nothing_sent(setup, 0.5)  # once per channel
    for _ in range(2):
        await _reconnect(setup)
        assert (await ended_receipt(setup, device, offer)).reason == "onsite"
    await setup.broker.send(control.EndReceiptAck(session_id=offer.session_id))
    # Taken before the channel drops (a reset may discard the ack unread).
    await wait_for(lambda: not setup.runtime._receipts)
    await _reconnect(setup)
    await _nothing_sent(setup)
    nursery.cancel_scope.cancel()


async def test_a_version_1_broker_gets_each_end_receipt_once(
    make_setup: object, device: Device, nursery: trio.Nursery
) -> None:
    """A broker that welcomes with protocol version 1 never acks: the receipt
    is sent once, as before, and not again on the next channel."""
    assert callable(make_setup)
    setup: Setup = await make_setup(agent_config(), welcome_version=1)
    await _onsite_end(setup, device)
    await _reconnect(setup)
    await _nothing_sent(setup)
    nursery.cancel_scope.cancel()


class _Channels:
    """Fake control channels for the runtime alone: what each one was sent."""

    def __init__(self, runtime: SessionRuntime) -> None:
        self.runtime = runtime
        self.sent: list[list[control.Event]] = []
        self._send: Callable[[control.Event], Any] | None = None

    async def connect(self, *, acks: bool = True) -> list[control.Event]:
        """Detach the last channel, attach a new one; what it was sent."""
        if self._send is not None:
            self.runtime.detach_control(self._send)
        sent: list[control.Event] = []
        self.sent.append(sent)

        async def send(event: control.Event) -> None:
            sent.append(event)

        self._send = send
        self.runtime.attach_control(send, acks=acks)
        await trio.testing.wait_all_tasks_blocked()
        return sent


def _runtime() -> SessionRuntime:
    def no_identity() -> Any:
        raise AssertionError("no session here")

    def no_tunnel(session_id: str, tunnel_url: str | None) -> Any:
        raise AssertionError("no tunnel here")

    return SessionRuntime(
        config=agent_config(), load_identity=no_identity, open_tunnel=no_tunnel
    )


def _receipt(n: int) -> control.SessionEnded:
    return control.SessionEnded(session_id=f"{n:032x}", receipt="AQ", signature="AQ")


async def test_unacked_end_receipts_are_bounded_and_given_up(
    nursery: trio.Nursery,
) -> None:
    """In memory, at most END_RECEIPTS_KEPT unacked receipts (the oldest is
    dropped), each sent on at most END_RECEIPT_MAX_SENDS channels; an ack
    removes one at once, and a version 1 channel forgets what it was sent."""
    runtime = _runtime()
    await nursery.start(runtime.run)
    channels = _Channels(runtime)
    for n in range(END_RECEIPTS_KEPT + 1):
        runtime._queue_receipt(_receipt(n))  # as _finish does at each end
    sent = await channels.connect()
    assert sent == [_receipt(n) for n in range(1, END_RECEIPTS_KEPT + 1)]
    for n in range(2, END_RECEIPTS_KEPT + 1):
        runtime.handle_control(control.EndReceiptAck(session_id=f"{n:032x}"))
    runtime.handle_control(control.EndReceiptAck(session_id="e" * 32))  # unknown
    for _ in range(END_RECEIPT_MAX_SENDS - 1):
        assert await channels.connect() == [_receipt(1)]
    assert await channels.connect() == []  # given up
    runtime._queue_receipt(_receipt(0))
    assert await channels.connect(acks=False) == [_receipt(0)]
    assert await channels.connect() == []  # the older broker had it once
    nursery.cancel_scope.cancel()


async def test_offers_busy_nothing_allowed_withdrawn_and_deny(
    make_setup: object, device: Device, nursery: trio.Nursery
) -> None:
    """One offer at a time (a second is denied busy); an offer of nothing this
    device allows is denied without asking; a withdrawn offer is gone; a deny
    answers the broker; stale ids are refused."""
    assert callable(make_setup)
    setup: Setup = await make_setup(agent_config(shell_command=()))
    nothing = make_offer(("shell", "tcp:1"))
    await setup.broker.send(nothing)
    deny = await setup.broker.next_event()
    assert isinstance(deny, control.Deny)
    assert deny.session_id == nothing.session_id

    first = make_offer(("tcp:22", "shell"))
    await setup.broker.send(first)
    await wait_for(lambda: setup.runtime.offer is not None)
    view = setup.runtime.offer
    assert view is not None
    assert view.channels == ("tcp:22",)
    assert view.refused_channels == ("shell",)
    second = make_offer(("tcp:22",))
    await setup.broker.send(second)
    busy = await setup.broker.next_event()
    assert isinstance(busy, control.Deny)
    assert (busy.session_id, busy.reason) == (second.session_id, "busy")

    await setup.broker.send(
        control.OfferWithdrawn(session_id=first.session_id, reason="cancelled")
    )
    await wait_for(lambda: setup.runtime.offer is None)
    with pytest.raises(StaleSession):
        setup.runtime.grant(first.session_id)

    third = make_offer(("tcp:443",))
    await setup.broker.send(third)
    await wait_for(lambda: setup.runtime.offer is not None)
    with pytest.raises(StaleSession):
        setup.runtime.deny(first.session_id)
    setup.runtime.deny(third.session_id)
    answer = await setup.broker.next_event()
    assert isinstance(answer, control.Deny)
    assert answer.session_id == third.session_id
    assert setup.runtime.state()["offer"] is None
    nursery.cancel_scope.cancel()


def with_tunnel(offer: control.Offer, tunnel_url: str) -> control.OfferWithTunnel:
    fields = {f.name: getattr(offer, f.name) for f in dataclasses.fields(offer)}
    return control.OfferWithTunnel(**fields, tunnel_url=tunnel_url)


async def test_a_tunnel_elsewhere_goes_only_to_a_host_the_agent_allows(
    make_setup: object, device: Device, nursery: trio.Nursery
) -> None:
    """A session across broker nodes: the offer names another address for the
    tunnel. One on a host the agent was not told about is denied at once,
    never shown; one on an allowed host is shown, and after the grant the
    tunnel is opened there (here: the same fake broker under the name
    "localhost", which its certificate covers)."""
    assert callable(make_setup)
    setup: Setup = await make_setup(agent_config(tunnel_hosts=("localhost",)))
    port = urlsplit(setup.settings.broker_url).port
    stranger = with_tunnel(make_offer(("tcp:22",)), "wss://relay.example.net:9443")
    await setup.broker.send(stranger)
    deny = await setup.broker.next_event()
    assert isinstance(deny, control.Deny)
    assert deny.session_id == stranger.session_id
    assert "tunnel address not allowed" in deny.reason
    assert setup.runtime.offer is None

    offer = with_tunnel(make_offer(("tcp:22",)), f"wss://localhost:{port}")
    await grant_offer(setup, device, offer)
    tunnel_ws = await setup.broker.next_tunnel()
    assert setup.broker.tunnel_paths == [f"/v1/device/tunnel/{offer.session_id}"]
    await tunnel_ws.aclose(4005, "engineer")
    nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("tunnel_url", "hosts", "allowed"),
    [
        ("wss://127.0.0.1:8502", (), True),  # the broker's host, another port
        ("wss://127.0.0.2:8502", (), False),
        ("wss://broker-2.relay.example.com:9443", ("*.relay.example.com",), True),
        ("wss://relay.example.com:9443", ("*.relay.example.com",), False),
        ("wss://evilrelay.example.com:9443", ("*.relay.example.com",), False),
        ("wss://BROKER-2.example.com", ("broker-2.example.com",), True),
        ("wss://broker-3.example.com", ("broker-2.example.com",), False),
    ],
)
def test_which_tunnel_hosts_the_agent_accepts(
    tunnel_url: str, hosts: tuple[str, ...], allowed: bool
) -> None:
    settings = AgentSettings(
        broker_url="wss://127.0.0.1:9443",
        agent_dir=Path("/nonexistent"),
        ca_file=Path("/nonexistent"),
        limits=AgentConfig(tunnel_hosts=hosts),
    )
    assert tunnel_url_allowed(settings, tunnel_url) is allowed


@pytest.mark.parametrize("pattern", ["*", "*.com", "relay example", "*.*.example.com"])
def test_tunnel_hosts_refuse_patterns_that_reach_too_far(pattern: str) -> None:
    with pytest.raises(ValueError, match="tunnel_hosts"):
        AgentConfig(tunnel_hosts=(pattern,))


def test_config_limits() -> None:
    """The agent's cap is at most 3600 s and its UI stays on loopback unless allowed."""
    with pytest.raises(ValueError, match="3600"):
        AgentConfig(max_session_seconds=3601)
    with pytest.raises(ValueError, match="loopback"):
        AgentConfig(ui_listen=ListenAddress(host="0.0.0.0", port=7070))  # noqa: S104 - the refused case
    with pytest.raises(ValueError, match="65535"):
        AgentConfig(allowed_ports=(70000,))
    with pytest.raises(ValueError, match="cap_grace_s"):
        AgentConfig(cap_grace_s=1.5)
    with pytest.raises(ValueError, match="warning_seconds"):
        AgentConfig(warning_seconds=(3600,))
    assert AgentConfig(warning_seconds=(60, 600)).warning_seconds == (600, 60)
    remote = AgentConfig(
        ui_listen=ListenAddress(host="0.0.0.0", port=7070),  # noqa: S104 - allowed explicitly
        ui_allow_remote=True,
    )
    assert remote.ui_listen.port == 7070
    assert (
        AgentConfig(ui_listen=ListenAddress(host="::1", port=1)).ui_listen.host == "::1"
    )


async def test_shutdown_denies_a_pending_offer_and_returns(
    make_setup: object, nursery: trio.Nursery
) -> None:
    """SIGTERM's orderly end with an offer on the screen: the offer is denied
    ("device shutting down") and shutdown returns once the deny went out; with
    nothing live it returns at once."""
    assert callable(make_setup)
    setup: Setup = await make_setup(agent_config())
    offer = make_offer(("tcp:22",))
    await setup.broker.send(offer)
    await wait_for(lambda: setup.runtime.offer is not None)
    with trio.fail_after(2):
        await setup.runtime.shutdown()
    deny = await setup.broker.next_event()
    assert isinstance(deny, control.Deny)
    assert (deny.session_id, deny.reason) == (offer.session_id, "device shutting down")
    assert setup.runtime.state()["offer"] is None
    with trio.fail_after(0.5):
        await setup.runtime.shutdown()  # nothing live: at once
    nursery.cancel_scope.cancel()
