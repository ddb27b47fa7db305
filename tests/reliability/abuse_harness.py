"""Helpers for the connection-level abuse matrix (tests/reliability/test_connection_abuse.py).

A broker of the test's own (shortened listener limits, in-process, real TLS on
loopback), the three things each bad input is reconciled against (what the
sender saw, the Prometheus counters, the audit records in the data dir), and
clients that misbehave on purpose: stallers, tricklers, downgraded TLS.

Several stallers need several source addresses: the device listener caps pending
handshakes per source address, and every 127.0.0.0/8 address reaches a listener
bound to 127.0.0.1, so each "attacker host" is one address of that range.
"""

from __future__ import annotations

import dataclasses
import ssl
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, closing, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trio

from relay._trio.broker import serve_broker
from relay._trio.websocket import WebSocketConnection, connect_websocket
from relay.audit_reader import read_records
from relay.config import BrokerConfig, WebSocketLimits
from relay.metrics import RelayMetrics
from relay.pki_files import AgentDir, DataDir, init_ca
from relay.proto import control
from relay.store import Store
from tests.e2e.conftest import LOOPBACK, PKI, RunningBroker, short_config

CLIENT_LIMITS = WebSocketLimits(max_message_bytes=256 * 1024, close_timeout_s=1.0)


def make_pki(tmp_path: Path) -> PKI:
    """A fresh data dir with a device CA and a store (as the e2e ``pki`` fixture)."""
    data_dir = tmp_path / "relay-data"
    config = short_config(data_dir)
    init_ca(DataDir(data_dir), now=datetime.now(UTC), lifetime=timedelta(days=365))
    with closing(Store.open(config.effective_database_url)):
        pass
    return PKI(data_dir=data_dir, config=config)


@asynccontextmanager
async def abuse_broker(
    pki: PKI,
    nursery: trio.Nursery,
    *,
    device: dict[str, Any] | None = None,
    engineer: dict[str, Any] | None = None,
) -> AsyncIterator[RunningBroker]:
    """A broker on *pki* with these device and engineer listener limits changed."""
    config: BrokerConfig = dataclasses.replace(
        pki.config,
        device_listener=dataclasses.replace(
            pki.config.device_listener, **(device or {})
        ),
        engineer_listener=dataclasses.replace(
            pki.config.engineer_listener, **(engineer or {})
        ),
    )
    metrics, shutdown = RelayMetrics(), trio.Event()
    ports = await nursery.start(
        lambda task_status: serve_broker(
            config, shutdown, metrics=metrics, task_status=task_status
        )
    )
    try:
        yield RunningBroker(ports, config, metrics, shutdown)
    finally:
        shutdown.set()


# Reconciliation: counters and audit records -------------------------------------------


class Counters:
    """Samples of a broker's registry, taken now, to diff against later."""

    def __init__(self, broker: RunningBroker, *keys: tuple[str, dict[str, str]]):
        self.broker = broker
        self.keys = keys
        self.before = [broker.sample(name, **labels) for name, labels in keys]

    def delta(self) -> list[int]:
        """How much each sampled series grew since construction."""
        return [
            round(self.broker.sample(name, **labels) - before)
            for (name, labels), before in zip(self.keys, self.before, strict=True)
        ]


def audit_events(pki: PKI) -> list[dict[str, Any]]:
    """Every record of the broker's audit log, read from the data dir."""
    return list(read_records(DataDir(pki.data_dir).audit_dir))


def audit_count(
    records: Iterable[dict[str, Any]], event: str, *, after_seq: int = 0, **fields: str
) -> int:
    """Records named *event* after *after_seq* whose *fields* match."""
    return sum(
        1
        for record in records
        if record.get("event") == event
        and record.get("seq", 0) > after_seq
        and all(record.get(k) == v for k, v in fields.items())
    )


def last_seq(pki: PKI) -> int:
    """The audit log's newest sequence number (0 when empty)."""
    records = audit_events(pki)
    return int(records[-1]["seq"]) if records else 0


def audit_by_reason(records: Iterable[dict[str, Any]], event: str) -> Counter[str]:
    """How many *event* records there are per ``reason`` field."""
    return Counter(str(r.get("reason")) for r in records if r.get("event") == event)


# Misbehaving and well-behaved clients --------------------------------------------------


def source_address(index: int) -> str:
    """The *index*-th attacker source address (127.0.1.x, 127.0.2.x, ...)."""
    return f"127.0.{1 + index // 250}.{1 + index % 250}"


async def open_tcp(port: int, source: str | None = None) -> trio.SocketStream:
    """A TCP connection to the listener on *port*, from *source* if given."""
    return await trio.open_tcp_stream(LOOPBACK, port, local_address=source)


async def wait_closed(stream: trio.abc.Stream) -> None:
    """Read and discard until the peer closes (EOF or reset)."""
    try:
        while await stream.receive_some(4096):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def client_hello(context: ssl.SSLContext) -> bytes:
    """The ClientHello bytes *context* sends first (made in memory)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def open_tls(
    port: int, context: ssl.SSLContext, source: str | None = None
) -> trio.SSLStream[trio.SocketStream]:
    """A completed TLS handshake with the listener on *port*."""
    tcp = await open_tcp(port, source)
    tls = trio.SSLStream(
        tcp, context, server_hostname="localhost", https_compatible=True
    )
    try:
        await tls.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return tls


@dataclass
class DeviceLink:
    """An open control channel and the TLS stream under it."""

    ws: WebSocketConnection
    channel: control.ControlChannel
    tls: trio.SSLStream[trio.SocketStream]


@asynccontextmanager
async def open_device(
    port: int,
    pki: PKI,
    agent_dir: AgentDir,
    device_id: str,
    context: ssl.SSLContext | None = None,
) -> AsyncIterator[DeviceLink]:
    """A device's control channel, welcomed (TLS, upgrade, hello, welcome)."""
    tls = await open_tls(port, context or pki.client_context(agent_dir))
    async with connect_websocket(
        tls, f"wss://localhost:{port}/v1/device/control", CLIENT_LIMITS
    ) as ws:
        channel = control.ControlChannel(control.Role.DEVICE)
        await ws.send_message(
            channel.send(
                control.Hello(
                    version=control.PROTOCOL_VERSION,
                    device_id=device_id,
                    agent_version="abuse-test",
                )
            )
        )
        channel.receive_message(await ws.receive_message())
        welcome = channel.next_event()
        assert isinstance(welcome, control.Welcome)
        yield DeviceLink(ws=ws, channel=channel, tls=tls)


def downgraded_context(
    pki: PKI,
    agent_dir: AgentDir | None,
    *,
    version: ssl.TLSVersion,
    ciphers: str | None = None,
) -> ssl.SSLContext:
    """A client context that offers only TLS *version* (and *ciphers*).

    Security level 0 so that the client's own OpenSSL really sends the old
    offer: the refusal measured must be the broker's, not the client's.
    """
    context = pki.client_context(agent_dir)
    with warnings.catch_warnings():
        # ssl deprecates TLS 1.0/1.1 version pins; sending them is the point.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = version
        context.maximum_version = version
    context.set_ciphers((ciphers or "ALL") + ":@SECLEVEL=0")
    return context


@dataclass
class Attempt:
    """What one bad client saw: refused or not, and when (s since it started)."""

    refused: bool
    elapsed_s: float
    detail: str = ""
    #: How long the TCP connect itself took (part of *elapsed_s*).
    connect_s: float = 0.0

    @property
    def held_s(self) -> float:
        """From the completed connect to the close: what the broker held."""
        return self.elapsed_s - self.connect_s


@dataclass
class HTTPAnswer:
    """The status line and headers a listener answered an upgrade with."""

    status: int | None
    headers: list[tuple[str, str]]

    def header(self, name: str) -> list[str]:
        """Every value of header *name* (case-insensitive)."""
        return [v for k, v in self.headers if k.lower() == name.lower()]


async def raw_upgrade(port: int, context: ssl.SSLContext, request: bytes) -> HTTPAnswer:
    """Send *request* as is over TLS; read the answer's head (None: no answer)."""
    tls = await open_tls(port, context)
    received = b""
    try:
        await tls.send_all(request)
        with trio.move_on_after(5):
            while b"\r\n\r\n" not in received:
                chunk = await tls.receive_some(65536)
                if not chunk:
                    break
                received += chunk
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(tls)
    head, _, _ = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 "):
        return HTTPAnswer(status=None, headers=[])
    headers = [
        (name.strip(), value.strip())
        for name, _, value in (line.partition(":") for line in lines[1:])
    ]
    return HTTPAnswer(status=int(lines[0].split()[1]), headers=headers)


def upgrade_request(
    host: str, path: str, *extra: str, version: str = "13", key: str | None = None
) -> bytes:
    """A WebSocket upgrade request head with *extra* header lines."""
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key or 'dGhlIHNhbXBsZSBub25jZQ=='}",
        f"Sec-WebSocket-Version: {version}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
