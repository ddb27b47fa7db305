"""Helpers for the message-level abuse matrix (tests/reliability/test_message_abuse.py).

A *raw* device connection: real mTLS with an enrolled device's certificate, the
upgrade and the ``hello`` done with websockets' client protocol, after which the
test writes whatever bytes it likes on the TLS stream (frames no conforming
client would send) and reads the broker's close frame back through the same
protocol object. Plus what the three-way reconciliation reads: counter deltas of
the broker's registry and audit records of the data dir's audit log.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from relay._trio.websocket import (
    ConnectionClosed,
    WebSocketConnection,
    connect_websocket,
)
from relay.audit_reader import read_records
from relay.config import WebSocketLimits
from relay.pki_files import AgentDir, DataDir
from relay.proto import control, tunnel
from tests.e2e.conftest import LOOPBACK, PKI, RunningBroker
from tests.e2e.test_device_listener import open_device
from tests.e2e.test_sessions_broker import FakeDevice, Harness

#: Client-side cap: large enough that the client never refuses what it reads.
_CLIENT_MAX_BYTES: Final = 1024 * 1024
_READ_BYTES: Final = 64 * 1024
#: The engineer client's limits (the broker's cap is what is tested, not ours).
ENGINEER_LIMITS: Final = WebSocketLimits(
    max_message_bytes=_CLIENT_MAX_BYTES, close_timeout_s=1.0
)
#: The flooder's: its own keepalive must not end the flood. Its pings wait in
#: the socket behind the flood it sent, so the broker's pongs come late.
FLOOD_LIMITS: Final = WebSocketLimits(
    max_message_bytes=_CLIENT_MAX_BYTES, close_timeout_s=5.0, ping_interval_s=600.0
)


def frame_bytes(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
) -> bytes:
    """One WebSocket frame, built by hand (RFC 6455 §5.2), valid or not.

    The mask key is zero when *masked*: a legal key that leaves the payload as it
    is, so large payloads cost nothing to mask.
    """
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if masked else 0
    size = len(payload)
    if size < 126:
        head = bytes([first, mask_bit | size])
    elif size < 2**16:
        head = bytes([first, mask_bit | 126]) + size.to_bytes(2, "big")
    else:
        head = bytes([first, mask_bit | 127]) + size.to_bytes(8, "big")
    return head + (b"\x00\x00\x00\x00" if masked else b"") + payload


@dataclass
class RawDevice:
    """An upgraded device connection that the test writes raw bytes on."""

    tls: trio.SSLStream[trio.SocketStream]
    protocol: ClientProtocol

    async def send_raw(self, data: bytes) -> None:
        """Write *data* as it is; a broker that already closed is not an error."""
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.tls.send_all(data)

    async def send_message(self, data: bytes) -> None:
        """One well-formed binary message."""
        self.protocol.send_binary(data)
        await self.send_raw(b"".join(self.protocol.data_to_send()))

    async def next_message(self) -> bytes:
        """The next data frame's payload (the broker never fragments)."""
        while True:
            for event in self.protocol.events_received():
                if isinstance(event, Frame) and event.opcode is Opcode.BINARY:
                    return bytes(event.data)
            await self._read()

    async def close_code(self) -> int:
        """Read until the broker's close frame (or EOF); its code, 1006 for none."""
        while self.protocol.close_rcvd is None:
            self.protocol.events_received()
            if not await self._read():
                return 1006
        return int(self.protocol.close_rcvd.code)

    async def send_until_closed(self, data: bytes, *, limit_bytes: int) -> int:
        """Write *data* over and over until the broker stops taking it or
        *limit_bytes* went out; return how many bytes were written."""
        written = 0
        while written < limit_bytes:
            try:
                await self.tls.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break
            written += len(data)
        return written

    async def _read(self) -> bool:
        try:
            data = await self.tls.receive_some(_READ_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.protocol.receive_eof()
            return False
        self.protocol.receive_data(data)
        return True


@asynccontextmanager
async def raw_device(
    broker: RunningBroker,
    pki: PKI,
    agent_dir: AgentDir,
    *,
    hello_as: str | None = None,
    path: str = "/v1/device/control",
) -> AsyncIterator[RawDevice]:
    """Connect as *agent_dir*'s device and upgrade; say ``hello`` (as *hello_as*)
    and wait for ``welcome`` unless *hello_as* is None."""
    context: ssl.SSLContext = pki.client_context(agent_dir)
    tcp = await trio.open_tcp_stream(LOOPBACK, broker.ports.device)
    tls = trio.SSLStream(
        tcp, context, server_hostname="localhost", https_compatible=True
    )
    async with tls:
        await tls.do_handshake()
        protocol = ClientProtocol(
            parse_uri(f"wss://localhost:{broker.ports.device}{path}"),
            max_size=_CLIENT_MAX_BYTES,
        )
        protocol.send_request(protocol.connect())
        device = RawDevice(tls, protocol)
        await device.send_raw(b"".join(protocol.data_to_send()))
        response: Response | None = None
        while response is None:
            if not await device._read():
                raise ConnectionError("the broker refused the upgrade")
            for event in protocol.events_received():
                if isinstance(event, Response):
                    response = event
        if response.status_code != 101:
            raise ConnectionError(f"upgrade refused: {response.status_code}")
        if hello_as is not None:
            channel = control.ControlChannel(control.Role.DEVICE)
            await device.send_message(
                channel.send(
                    control.Hello(
                        version=control.PROTOCOL_VERSION,
                        device_id=hello_as,
                        agent_version="abuse-test",
                    )
                )
            )
            channel.receive_message(await device.next_message())
            assert isinstance(channel.next_event(), control.Welcome)
        yield device


class CounterDelta:
    """The change of some samples of a broker's registry since construction."""

    def __init__(
        self, broker: RunningBroker, samples: Iterable[tuple[str, dict[str, str]]]
    ) -> None:
        self._broker = broker
        self._samples = list(samples)
        self._start = [broker.sample(name, **labels) for name, labels in self._samples]

    def deltas(self) -> list[int]:
        """Each sample's change, in the order given."""
        return [
            round(self._broker.sample(name, **labels) - start)
            for (name, labels), start in zip(self._samples, self._start, strict=True)
        ]


def audit_dir(pki: PKI) -> Path:
    """The audit log directory of the broker on *pki*'s data dir."""
    return DataDir(pki.data_dir).audit_dir


def audit_records(pki: PKI, *, after_seq: int = 0) -> list[dict[str, Any]]:
    """Every audit record written after *after_seq* (0: all of them)."""
    directory = audit_dir(pki)
    if not directory.exists():
        return []
    return list(read_records(directory, from_seq=after_seq + 1))


def last_seq(pki: PKI) -> int:
    """The sequence number of the newest audit record, 0 for none."""
    records = audit_records(pki)
    return max((int(r["seq"]) for r in records), default=0)


def rss_bytes() -> int:
    """Resident set size of this process (the broker runs in it), from /proc."""
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")  # pragma: no cover - Linux


# --- remote sessions ----------------------------------------------------------------


@dataclass
class LiveSession:
    """A granted session with both legs attached (engineer: our client)."""

    offer: control.Offer
    tunnel: WebSocketConnection
    engineer: WebSocketConnection

    @property
    def session_id(self) -> str:
        return self.offer.session_id

    async def engineer_status(self) -> dict[str, Any]:
        """The next text (status) message on the engineer's leg."""
        with trio.fail_after(5):
            message = await self.engineer.receive()
        assert isinstance(message, str), message
        result: dict[str, Any] = json.loads(message)
        return result


@asynccontextmanager
async def engineer_socket(
    h: Harness, path: str, token: str
) -> AsyncIterator[WebSocketConnection]:
    """An engineer WebSocket on *path* with a bearer token (our client, which
    takes the broker's text status messages); a refused upgrade raises
    :class:`~relay._trio.websocket.HandshakeFailed` with the HTTP status."""
    port = h.broker.ports.engineer
    context = ssl.create_default_context(cafile=str(h.pki.ca_file))
    stream = await trio.open_ssl_over_tcp_stream(
        LOOPBACK, port, ssl_context=context, https_compatible=True
    )
    try:
        async with connect_websocket(
            stream,
            f"wss://{LOOPBACK}:{port}{path}",
            ENGINEER_LIMITS,
            extra_headers=[("Authorization", f"Bearer {token}")],
            accept_text=True,
        ) as ws:
            yield ws
    finally:
        await trio.aclose_forcefully(stream)


async def request_session(
    h: Harness, device: FakeDevice, token: str, channels: list[str]
) -> control.Offer:
    """POST a session for *device* as *token*'s engineer; the offer it got."""
    response = await h.api.post(
        "/api/v1/sessions",
        json={
            "device_id": device.device_id,
            "reason": "abuse matrix",
            "channels": channels,
        },
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 201, response.text
    offer = await device.next_event()
    assert isinstance(offer, control.Offer)
    return offer


@asynccontextmanager
async def live_session(
    h: Harness,
    device: FakeDevice,
    token: str,
    channels: tuple[str, ...] = ("tcp:22",),
) -> AsyncIterator[LiveSession]:
    """Request, grant (signed by the device key), open the tunnel, attach."""
    offer = await request_session(h, device, token, list(channels))
    await device.send(device.grant(offer))
    sid = offer.session_id
    async with (
        open_device(
            h.broker, h.pki, device.agent_dir, f"/v1/device/tunnel/{sid}"
        ) as tun,
        engineer_socket(h, f"/api/v1/sessions/{sid}/attach", token) as eng,
    ):
        session = LiveSession(offer, tun, eng)
        while (await session.engineer_status()).get("state") != "active":
            pass
        yield session


async def open_stream(session: LiveSession, stream_id: int) -> None:
    """Open stream *stream_id* to tcp:22 and answer it from the device."""
    await session.engineer.send_message(
        tunnel.encode(tunnel.StreamOpen(stream_id=stream_id, channel="tcp:22"))
    )
    with trio.fail_after(5):
        assert tunnel.decode(await session.tunnel.receive_message()) == (
            tunnel.StreamOpen(stream_id=stream_id, channel="tcp:22")
        )
    await session.tunnel.send_message(
        tunnel.encode(tunnel.StreamOpenOk(stream_id=stream_id))
    )
    with trio.fail_after(5):
        assert tunnel.decode(await session.engineer.receive_message()) == (
            tunnel.StreamOpenOk(stream_id=stream_id)
        )


async def drain_until_closed(ws: WebSocketConnection) -> tuple[list[bytes], int, str]:
    """Every message until the close; the messages and the close (code, reason)."""
    messages: list[bytes] = []
    with trio.fail_after(10):
        while True:
            try:
                message = await ws.receive()
            except ConnectionClosed as closed:
                return messages, closed.code, closed.reason
            if isinstance(message, bytes):
                messages.append(message)


# --- C6: the flooding engineer and its device, in a process of their own ------------------


@dataclass(frozen=True)
class FloodOrder:
    """What the flooding process does (passed as JSON on its command line)."""

    engineer_port: int
    device_port: int
    ca_file: str
    device_cert: str
    device_key: str
    token: str
    session_id: str
    messages: int
    payload_bytes: int


async def _flood(order: FloodOrder) -> dict[str, Any]:
    """Attach as the engineer and open the tunnel as the device of a granted
    session; open stream 1; send *messages* DATA frames as fast as the client
    goes while the device end counts them; then go past the stream's credit
    window and report the broker's close."""
    device_context = ssl.create_default_context(cafile=order.ca_file)
    device_context.load_cert_chain(order.device_cert, order.device_key)
    tcp = await trio.open_tcp_stream(LOOPBACK, order.device_port)
    device_tls = trio.SSLStream(
        tcp, device_context, server_hostname="localhost", https_compatible=True
    )
    await device_tls.do_handshake()
    engineer_tls = await trio.open_ssl_over_tcp_stream(
        LOOPBACK,
        order.engineer_port,
        ssl_context=ssl.create_default_context(cafile=order.ca_file),
        https_compatible=True,
    )
    sid = order.session_id
    result: dict[str, Any] = {}
    async with (
        connect_websocket(
            device_tls,
            f"wss://localhost:{order.device_port}/v1/device/tunnel/{sid}",
            FLOOD_LIMITS,
        ) as tun,
        connect_websocket(
            engineer_tls,
            f"wss://{LOOPBACK}:{order.engineer_port}/api/v1/sessions/{sid}/attach",
            FLOOD_LIMITS,
            extra_headers=[("Authorization", f"Bearer {order.token}")],
            accept_text=True,
        ) as eng,
    ):
        session = LiveSession(
            control.Offer(
                session_id=sid,
                engineer="",
                engineer_role="engineer",
                reason="-",
                channels=("tcp:22",),
                max_seconds=1,
                grant_deadline_ms=0,
                nonce="-",
            ),
            tun,
            eng,
        )
        while (await session.engineer_status()).get("state") != "active":
            pass
        await open_stream(session, 1)
        payload = tunnel.encode(
            tunnel.StreamData(stream_id=1, payload=b"f" * order.payload_bytes)
        )
        received = 0
        all_in = trio.Event()

        async def sink() -> None:
            nonlocal received
            with suppress(ConnectionClosed):
                while True:
                    frame = tunnel.decode(await tun.receive_message())
                    if isinstance(frame, tunnel.StreamData):
                        received += 1
                        if received == order.messages:
                            all_in.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sink)
            result["start_wall"] = time.time()
            start = trio.current_time()
            for _ in range(order.messages):
                await eng.send_message(payload)
            with trio.fail_after(120):
                await all_in.wait()
            result["seconds"] = trio.current_time() - start
            result["end_wall"] = time.time()
            result["received"] = received
            # Past the credit window: full frames, then one more small one.
            sent_bytes = order.messages * order.payload_bytes
            big = tunnel.encode(
                tunnel.StreamData(stream_id=1, payload=b"x" * tunnel.MAX_DATA_BYTES)
            )
            with suppress(ConnectionClosed):
                for _ in range(
                    (tunnel.INITIAL_WINDOW_BYTES - sent_bytes) // tunnel.MAX_DATA_BYTES
                    + 1
                ):
                    await eng.send_message(big)
                await eng.send_message(payload)
            _, code, reason = await drain_until_closed(eng)
            result["close"] = [code, reason]
            result["received_after_close"] = received
            nursery.cancel_scope.cancel()
    return result


def flood_main(argv: list[str]) -> None:
    """Entry point of the flooding process: one JSON :class:`FloodOrder` in
    ``argv[0]``, one JSON result line out."""
    order = FloodOrder(**json.loads(argv[0]))
    print(json.dumps(trio.run(_flood, order)))


if __name__ == "__main__":
    flood_main(sys.argv[1:])
