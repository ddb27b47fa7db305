"""The device listener over real mTLS on loopback: who gets in, who does not, and why."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import structlog
import trio
import trio_websocket
from websockets.client import ClientProtocol
from websockets.uri import parse_uri

from relay import __version__
from relay._trio.websocket import (
    ConnectionClosed,
    HandshakeFailed,
    WebSocketConnection,
    connect_websocket,
)
from relay.config import WebSocketLimits
from relay.pki_files import AgentDir
from relay.proto import control
from relay.proto.close import CloseCode
from tests.e2e.conftest import LOOPBACK, PKI, RunningBroker, foreign_ca, wait_until

pytestmark = pytest.mark.slow

CLIENT_LIMITS = WebSocketLimits(max_message_bytes=256 * 1024, close_timeout_s=1.0)


async def _open_tls(
    broker: RunningBroker, context: ssl.SSLContext
) -> trio.SSLStream[trio.SocketStream]:
    tcp = await trio.open_tcp_stream(LOOPBACK, broker.ports.device)
    tls = trio.SSLStream(
        tcp, context, server_hostname="localhost", https_compatible=True
    )
    try:
        await tls.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return tls


@asynccontextmanager
async def open_device(
    broker: RunningBroker,
    pki: PKI,
    agent_dir: AgentDir | None,
    path: str = "/v1/device/control",
) -> AsyncIterator[WebSocketConnection]:
    """A raw device connection: TLS with the device cert, then the upgrade."""
    tls = await _open_tls(broker, pki.client_context(agent_dir))
    async with connect_websocket(
        tls, f"wss://localhost:{broker.ports.device}{path}", CLIENT_LIMITS
    ) as ws:
        yield ws


async def say_hello(
    ws: WebSocketConnection, device_id: str, version: int = control.PROTOCOL_VERSION
) -> control.ControlChannel:
    """Send hello (as a device of protocol *version*) and wait for welcome."""
    channel = control.ControlChannel(control.Role.DEVICE)
    await ws.send_message(
        channel.send(
            control.Hello(
                version=version,
                device_id=device_id,
                agent_version="test",
            )
        )
    )
    channel.receive_message(await ws.receive_message())
    welcome = channel.next_event()
    assert isinstance(welcome, control.Welcome)
    assert welcome.broker_version == __version__
    return channel


async def test_enrolled_device_connects_and_heartbeats(
    broker: RunningBroker, pki: PKI
) -> None:
    """An enrolled device gets welcome, heartbeat acks, and counts as connected until it leaves."""
    device = pki.enroll("dev-0001")
    with trio.fail_after(10):
        async with open_device(broker, pki, device) as ws:
            channel = await say_hello(ws, "dev-0001")
            await ws.send_message(channel.send(control.Heartbeat(seq=7)))
            channel.receive_message(await ws.receive_message())
            assert channel.next_event() == control.HeartbeatAck(seq=7)
            assert broker.sample("relay_devices_connected") == 1
            assert broker.sample("relay_device_connects_total") == 1
            # The presence mirror makes the device visible to `relay device list`.
            with pki.store() as store:

                def online() -> bool:
                    return any(
                        d.online
                        for d in store.list_devices(
                            now=datetime.now(UTC), stale_after=timedelta(seconds=5)
                        )
                    )

                await wait_until(online)
            await ws.aclose()
        await wait_until(lambda: broker.sample("relay_devices_connected") == 0)
        assert (
            broker.sample("relay_device_disconnects_total", reason="peer_closed") == 1
        )
        with pki.store() as store:
            await wait_until(
                lambda: (
                    not store.list_devices(
                        now=datetime.now(UTC), stale_after=timedelta(seconds=5)
                    )[0].online
                )
            )


async def _expect_tls_refusal(broker: RunningBroker, context: ssl.SSLContext) -> None:
    """The server refuses during or right after the handshake (TLS 1.3: first read)."""
    with trio.fail_after(5):
        try:
            tls = await _open_tls(broker, context)
        except trio.BrokenResourceError:
            return
        try:
            await tls.send_all(b"GET /v1/device/control HTTP/1.1\r\nHost: x\r\n\r\n")
            data = await tls.receive_some(1024)
        except trio.BrokenResourceError:
            return
        finally:
            await trio.aclose_forcefully(tls)
        assert data == b"", f"expected no answer, got {data!r}"


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("foreign_ca", "unknown_ca"),
        ("no_certificate", "no_certificate"),
        ("expired", "expired"),
        ("not_yet_valid", "not_yet_valid"),
    ],
)
async def test_bad_certificates_fail_the_tls_handshake(
    broker: RunningBroker, pki: PKI, case: str, reason: str
) -> None:
    """Foreign-CA, missing, expired and not-yet-valid certificates are refused and counted by reason."""
    now = datetime.now(UTC)
    agent_dir: AgentDir | None
    if case == "foreign_ca":
        agent_dir = pki.enroll("dev-foreign", ca=foreign_ca(), record=False)
    elif case == "no_certificate":
        agent_dir = None
    elif case == "expired":
        agent_dir = pki.enroll(
            "dev-old", now=now - timedelta(days=40), lifetime=timedelta(days=30)
        )
    else:
        agent_dir = pki.enroll(
            "dev-future", now=now + timedelta(days=10), lifetime=timedelta(days=30)
        )
    await _expect_tls_refusal(broker, pki.client_context(agent_dir))
    await wait_until(
        lambda: (
            broker.sample(
                "relay_tls_handshake_failures_total", listener="device", reason=reason
            )
            == 1
        )
    )
    assert broker.sample("relay_devices_connected") == 0


async def test_revoked_device_is_refused_with_403(
    broker: RunningBroker, pki: PKI
) -> None:
    """A revoked device completes TLS but gets 403 on the upgrade and a rejection metric."""
    device = pki.enroll("dev-revoked")
    with pki.store() as store:
        store.revoke_device("dev-revoked", at=datetime.now(UTC), reason="test")
    with trio.fail_after(5), pytest.raises(HandshakeFailed) as info:
        async with open_device(broker, pki, device):
            pass  # pragma: no cover - refused
    assert info.value.status == 403
    assert info.value.body == b"certificate revoked\n"
    assert broker.sample("relay_device_rejections_total", reason="revoked") == 1


async def test_certificate_not_on_record_is_refused(
    broker: RunningBroker, pki: PKI
) -> None:
    """A certificate signed by our CA but never recorded by `relay ca sign` is refused."""
    device = pki.enroll("dev-unrecorded", record=False)
    with trio.fail_after(5), pytest.raises(HandshakeFailed) as info:
        async with open_device(broker, pki, device):
            pass  # pragma: no cover - refused
    assert info.value.status == 403
    assert (
        broker.sample("relay_device_rejections_total", reason="unknown_certificate")
        == 1
    )


async def test_path_never_names_a_device(broker: RunningBroker, pki: PKI) -> None:
    """A device putting another id in the path gets 404, whatever the path says."""
    device = pki.enroll("dev-a")
    pki.enroll("dev-b")
    with trio.fail_after(5), pytest.raises(HandshakeFailed) as info:
        async with open_device(broker, pki, device, path="/v1/device/control/dev-b"):
            pass  # pragma: no cover - refused
    assert info.value.status == 404
    assert broker.sample("relay_device_rejections_total", reason="bad_path") == 1


async def test_hello_claiming_another_id_is_closed_1008(
    broker: RunningBroker, pki: PKI
) -> None:
    """A hello naming another device closes the channel with 1008; the device never counts as connected."""
    device = pki.enroll("dev-honest")
    pki.enroll("dev-victim")
    with trio.fail_after(5):
        async with open_device(broker, pki, device) as ws:
            channel = control.ControlChannel(control.Role.DEVICE)
            await ws.send_message(
                channel.send(
                    control.Hello(
                        version=1, device_id="dev-victim", agent_version="test"
                    )
                )
            )
            with pytest.raises(ConnectionClosed) as info:
                await ws.receive_message()
    assert info.value.code == CloseCode.POLICY_VIOLATION
    assert broker.sample("relay_device_rejections_total", reason="id_mismatch") == 1
    assert broker.sample("relay_device_connects_total") == 0


async def test_no_hello_closes_at_deadline(broker: RunningBroker, pki: PKI) -> None:
    """A device that upgrades but never says hello is closed with 4002 at the hello deadline."""
    device = pki.enroll("dev-mute")
    with trio.fail_after(5):
        async with open_device(broker, pki, device) as ws:
            with pytest.raises(ConnectionClosed) as info:
                await ws.receive_message()
    assert info.value.code == CloseCode.HELLO_TIMEOUT
    assert broker.sample("relay_device_rejections_total", reason="hello_timeout") == 1


async def test_second_connection_replaces_the_first(
    broker: RunningBroker, pki: PKI
) -> None:
    """A second connection of the same device wins; the first is closed with 4000."""
    device = pki.enroll("dev-twice")
    with trio.fail_after(10):
        async with open_device(broker, pki, device) as first:
            await say_hello(first, "dev-twice")
            async with open_device(broker, pki, device) as second:
                channel = await say_hello(second, "dev-twice")
                with pytest.raises(ConnectionClosed) as info:
                    await first.receive_message()
                assert info.value.code == CloseCode.REPLACED
                await second.send_message(channel.send(control.Heartbeat(seq=1)))
                channel.receive_message(await second.receive_message())
                assert channel.next_event() == control.HeartbeatAck(seq=1)
                assert broker.sample("relay_devices_connected") == 1
    assert broker.sample("relay_device_disconnects_total", reason="replaced") == 1


async def test_revocation_closes_live_connection(
    broker: RunningBroker, pki: PKI
) -> None:
    """Revoking a connected device closes its channel with 4001 well within 5 s."""
    device = pki.enroll("dev-live")
    with trio.fail_after(10):
        async with open_device(broker, pki, device) as ws:
            await say_hello(ws, "dev-live")
            with pki.store() as store:
                store.revoke_device("dev-live", at=datetime.now(UTC), reason="stolen")
            start = trio.current_time()
            with pytest.raises(ConnectionClosed) as info:
                await ws.receive_message()
            elapsed = trio.current_time() - start
    assert info.value.code == CloseCode.REVOKED
    assert elapsed < 5.0
    assert broker.sample("relay_device_disconnects_total", reason="revoked") == 1


async def test_oversized_message_closes_1009(broker: RunningBroker, pki: PKI) -> None:
    """A message above the device frame cap (64 KiB) closes the channel with 1009."""
    device = pki.enroll("dev-big")
    with trio.fail_after(5):
        async with open_device(broker, pki, device) as ws:
            await say_hello(ws, "dev-big")
            await ws.send_message(b"\x00" * (64 * 1024 + 1))
            with pytest.raises(ConnectionClosed) as info:
                await ws.receive_message()
    assert info.value.code == CloseCode.MESSAGE_TOO_BIG


async def test_text_frame_closes_1003(broker: RunningBroker, pki: PKI) -> None:
    """A text frame on the binary-only control channel closes it with 1003."""
    device = pki.enroll("dev-text")
    with trio.fail_after(5):
        async with open_device(broker, pki, device) as ws:
            await say_hello(ws, "dev-text")
            ws._protocol.send_text(b'{"type":"heartbeat","seq":1}')
            ws._pump()
            with pytest.raises(ConnectionClosed) as info:
                await ws.receive_message()
    assert info.value.code == CloseCode.UNSUPPORTED_DATA


async def test_garbage_message_is_a_protocol_error(
    broker: RunningBroker, pki: PKI
) -> None:
    """A binary message that is not a control message closes the channel with 1002."""
    device = pki.enroll("dev-garbage")
    with trio.fail_after(5):
        async with open_device(broker, pki, device) as ws:
            await say_hello(ws, "dev-garbage")
            await ws.send_message(b"\xff\xfe not json")
            with pytest.raises(ConnectionClosed) as info:
                await ws.receive_message()
    assert info.value.code == CloseCode.PROTOCOL_ERROR
    assert broker.sample("relay_device_disconnects_total", reason="protocol_error") == 1


async def test_stalled_tls_handshake_is_closed_at_deadline(
    broker: RunningBroker, pki: PKI
) -> None:
    """A TCP connection that never starts TLS is closed at the handshake deadline, while a real device still connects."""
    device = pki.enroll("dev-patient")
    deadline = broker.config.device_listener.handshake_timeout_s
    with trio.fail_after(10):
        stalled = await trio.open_tcp_stream(LOOPBACK, broker.ports.device)
        start = trio.current_time()
        async with open_device(broker, pki, device) as ws:
            await say_hello(ws, "dev-patient")
            assert await stalled.receive_some(1024) == b""
            elapsed = trio.current_time() - start
            await stalled.aclose()
            await ws.aclose()
    assert deadline <= elapsed + 0.05
    assert elapsed < deadline + 1.0
    assert (
        broker.sample(
            "relay_tls_handshake_failures_total", listener="device", reason="timeout"
        )
        == 1
    )


async def test_stalled_upgrade_is_closed_at_deadline(
    broker: RunningBroker, pki: PKI
) -> None:
    """TLS done but no HTTP request: closed at the deadline and counted."""
    device = pki.enroll("dev-slow")
    with trio.fail_after(5):
        tls = await _open_tls(broker, pki.client_context(device))
        await tls.send_all(b"GET /v1/device/control HTTP/1.1\r\n")  # never finished
        try:
            # The broker drops the connection: EOF, or a broken TLS stream.
            received = b""
            try:
                while chunk := await tls.receive_some(1024):
                    received += chunk
            except trio.BrokenResourceError:
                pass
            assert received == b"", "no HTTP answer to an unfinished request"
        finally:
            await trio.aclose_forcefully(tls)
    assert broker.sample("relay_device_rejections_total", reason="upgrade_timeout") == 1


async def test_per_source_cap_drops_extra_pending_connections(
    broker: RunningBroker, pki: PKI
) -> None:
    """Connections beyond the per-source pending cap are dropped at accept and counted."""
    cap = broker.config.device_listener.max_pending_per_source
    with trio.fail_after(5):
        held = [
            await trio.open_tcp_stream(LOOPBACK, broker.ports.device)
            for _ in range(cap)
        ]
        await wait_until(
            lambda: broker.sample("relay_pending_handshakes", listener="device") == cap
        )
        extra = await trio.open_tcp_stream(LOOPBACK, broker.ports.device)
        assert await extra.receive_some(1024) == b""
        await extra.aclose()
        for stream in held:
            await stream.aclose()
    assert (
        broker.sample(
            "relay_connections_dropped_total",
            listener="device",
            reason="per_source_cap",
        )
        == 1
    )


async def test_broker_shutdown_closes_devices_with_1001(
    broker: RunningBroker, pki: PKI
) -> None:
    """On shutdown every device is told 1001 "broker shutdown"."""
    device = pki.enroll("dev-bye")
    with trio.fail_after(10):
        async with open_device(broker, pki, device) as ws:
            await say_hello(ws, "dev-bye")
            broker.shutdown.set()
            with pytest.raises(ConnectionClosed) as info:
                await ws.receive_message()
    assert info.value.code == CloseCode.GOING_AWAY
    assert info.value.reason == "broker shutdown"


async def test_trio_websocket_device_interoperates(
    broker: RunningBroker, pki: PKI
) -> None:
    """An independent client (trio-websocket) with a device certificate gets hello/welcome."""
    device = pki.enroll("dev-interop")
    context = pki.client_context(device)
    with trio.fail_after(10):
        async with trio_websocket.open_websocket(
            "localhost", broker.ports.device, "/v1/device/control", use_ssl=context
        ) as ws:
            channel = control.ControlChannel(control.Role.DEVICE)
            await ws.send_message(
                channel.send(
                    control.Hello(
                        version=1,
                        device_id="dev-interop",
                        agent_version="trio-websocket",
                    )
                )
            )
            reply = await ws.get_message()
            assert isinstance(reply, bytes)
            channel.receive_message(reply)
            assert isinstance(channel.next_event(), control.Welcome)


async def test_metrics_listener_routes(broker: RunningBroker, pki: PKI) -> None:
    """/metrics, /healthz and /readyz answer on the metrics listener and nowhere else."""
    base = f"http://{LOOPBACK}:{broker.ports.metrics}"
    async with httpx.AsyncClient() as client:
        metrics = await client.get(f"{base}/metrics")
        assert metrics.status_code == 200
        assert "relay_devices_connected 0.0" in metrics.text
        assert "relay_build_info{python=" in metrics.text
        assert (await client.get(f"{base}/healthz")).text == "ok\n"
        ready = await client.get(f"{base}/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {
            "listeners_bound": True,
            "store_reachable": True,
            "data_dir_writable": True,
            "audit_writable": True,
        }
    async with httpx.AsyncClient(
        verify=ssl.create_default_context(cafile=str(pki.ca_file))
    ) as client:
        engineer = f"https://localhost:{broker.ports.engineer}"
        assert (await client.get(f"{engineer}/metrics")).status_code == 404
        assert (await client.get(f"{engineer}/api/v1/info")).json()[
            "service"
        ] == "remote-care-relay"


async def test_hello_and_close_in_one_write_do_not_crash_the_listener(
    broker: RunningBroker, pki: PKI
) -> None:
    """A device that sends hello and closes at once is handled; the next device still connects."""
    device = pki.enroll("dev-hasty")
    with trio.fail_after(10):
        tls = await _open_tls(broker, pki.client_context(device))
        protocol = ClientProtocol(
            parse_uri(f"wss://localhost:{broker.ports.device}/v1/device/control")
        )
        protocol.send_request(protocol.connect())
        await tls.send_all(b"".join(protocol.data_to_send()))
        response = b""
        while b"\r\n\r\n" not in response:
            response += await tls.receive_some(4096)
        protocol.receive_data(response)
        channel = control.ControlChannel(control.Role.DEVICE)
        protocol.send_binary(
            channel.send(
                control.Hello(version=1, device_id="dev-hasty", agent_version="t")
            )
        )
        protocol.send_close(CloseCode.NORMAL, "")
        await tls.send_all(b"".join(protocol.data_to_send()))
        await trio.aclose_forcefully(tls)
        # The listener survived: a well-behaved device is served afterwards.
        other = pki.enroll("dev-after")
        async with open_device(broker, pki, other) as ws:
            await say_hello(ws, "dev-after")
            await ws.aclose()
    assert broker.sample("relay_handler_errors_total", listener="device") == 0


async def test_revocation_between_handshake_and_hello_keeps_the_device_out(
    broker: RunningBroker, pki: PKI
) -> None:
    """A device revoked after its certificate check but before its hello never goes live."""
    device = pki.enroll("dev-sneaky")
    with trio.fail_after(10):
        async with open_device(broker, pki, device) as ws:
            with pki.store() as store:
                store.revoke_device("dev-sneaky", at=datetime.now(UTC), reason="stolen")
            # Let the revocation watcher see it (poll 0.1 s) before saying hello.
            await trio.sleep(broker.config.device_listener.revocation_poll_s * 4)
            channel = control.ControlChannel(control.Role.DEVICE)
            await ws.send_message(
                channel.send(
                    control.Hello(version=1, device_id="dev-sneaky", agent_version="t")
                )
            )
            with pytest.raises(ConnectionClosed) as info:
                await ws.receive_message()
    assert info.value.code == CloseCode.REVOKED
    assert broker.sample("relay_device_connects_total") == 0


async def test_revocation_closes_a_device_that_ignores_the_close(
    broker: RunningBroker, pki: PKI
) -> None:
    """A revoked device that never answers the close frame is still cut off within the budget."""
    device = pki.enroll("dev-deaf")
    budget = (
        broker.config.device_listener.revocation_poll_s
        + broker.config.device_listener.kick_close_grace_s
        + 0.5
    )
    with trio.fail_after(10):
        tls = await _open_tls(broker, pki.client_context(device))
        protocol = ClientProtocol(
            parse_uri(f"wss://localhost:{broker.ports.device}/v1/device/control")
        )
        protocol.send_request(protocol.connect())
        await tls.send_all(b"".join(protocol.data_to_send()))
        protocol.receive_data(await tls.receive_some(4096))
        channel = control.ControlChannel(control.Role.DEVICE)
        protocol.send_binary(
            channel.send(
                control.Hello(version=1, device_id="dev-deaf", agent_version="t")
            )
        )
        await tls.send_all(b"".join(protocol.data_to_send()))
        await wait_until(lambda: broker.sample("relay_devices_connected") == 1)
        with pki.store() as store:
            store.revoke_device("dev-deaf", at=datetime.now(UTC), reason="test")
        start = trio.current_time()
        # Read raw bytes and never answer the close: wait for the TCP close.
        try:
            while await tls.receive_some(4096):
                pass
        except trio.BrokenResourceError:
            pass
        elapsed = trio.current_time() - start
        await trio.aclose_forcefully(tls)
    assert elapsed < budget
    assert broker.sample("relay_device_disconnects_total", reason="revoked") == 1


async def test_certificate_expiring_while_connected_ends_the_channel(
    broker: RunningBroker, pki: PKI
) -> None:
    """A channel whose certificate expires while connected is closed with 4003."""
    now = datetime.now(UTC)
    # Issued 5 min in the past (skew allowance) with a lifetime ending ~1.5 s from now.
    device = pki.enroll("dev-ephemeral", now=now, lifetime=timedelta(seconds=1.5))
    with trio.fail_after(10):
        async with open_device(broker, pki, device) as ws:
            await say_hello(ws, "dev-ephemeral")
            # No heartbeats are sent, so the first thing to arrive is the close.
            with pytest.raises(ConnectionClosed) as info:
                await ws.receive_message()
    assert info.value.code == CloseCode.CERTIFICATE_EXPIRED
    assert (
        broker.sample("relay_device_disconnects_total", reason="certificate_expired")
        == 1
    )


async def test_refusals_are_audit_ready_log_events(
    broker: RunningBroker, pki: PKI
) -> None:
    """Each refusal is a structured event with its reason, peer and audit flag."""
    device = pki.enroll("dev-logged")
    with pki.store() as store:
        store.revoke_device("dev-logged", at=datetime.now(UTC), reason="test")
    with structlog.testing.capture_logs() as events:
        with trio.fail_after(5), pytest.raises(HandshakeFailed):
            async with open_device(broker, pki, device):
                pass  # pragma: no cover - refused
        await _expect_tls_refusal(broker, pki.client_context(None))
        await wait_until(lambda: any(e["event"] == "device.tls_failed" for e in events))
    rejected = [e for e in events if e["event"] == "device.rejected"]
    assert rejected[0]["reason"] == "revoked"
    assert rejected[0]["device_id"] == "dev-logged"
    assert rejected[0]["audit"] is True
    assert rejected[0]["peer"].startswith("127.0.0.1:")
    assert len(rejected[0]["fingerprint"]) == 64
    tls_failed = [e for e in events if e["event"] == "device.tls_failed"]
    assert tls_failed[0]["reason"] == "no_certificate"
    assert tls_failed[0]["audit"] is True


async def test_engineer_listener_issues_no_session_tickets(
    broker: RunningBroker, pki: PKI
) -> None:
    """The engineer listener's TLS has no session tickets, like the device listener."""
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    context.maximum_version = (
        ssl.TLSVersion.TLSv1_2
    )  # tickets are visible right after a 1.2 handshake
    with trio.fail_after(5):
        tcp = await trio.open_tcp_stream(LOOPBACK, broker.ports.engineer)
        tls = trio.SSLStream(
            tcp, context, server_hostname="localhost", https_compatible=True
        )
        await tls.do_handshake()
        await tls.send_all(
            b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        while await tls.receive_some(4096):
            pass
        session = tls.session
        await tls.aclose()
    assert session is not None
    assert not session.has_ticket
