"""Certificate lifecycle over real TLS: renewal, listener reload, CA rollover, gauges."""

from __future__ import annotations

import dataclasses
import random
import shutil
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

import auth
from relay._trio.agent import AgentSettings, AgentStatus, run_agent
from relay._trio.broker import serve_broker
from relay._trio.websocket import (
    ConnectionClosed,
    HandshakeFailed,
    WebSocketConnection,
    connect_websocket,
)
from relay.config import BrokerConfig, PKIConfig
from relay.metrics import RelayMetrics
from relay.pki_files import (
    AgentDir,
    DataDir,
    load_ca,
    retire_previous_ca,
    rollover_ca,
    write_private,
    write_public,
)
from relay.proto import control
from relay.proto.close import CloseCode
from tests.e2e.conftest import (
    LOOPBACK,
    PKI,
    RunningBroker,
    fast_agent_config,
    wait_until,
)
from tests.e2e.test_device_listener import (
    CLIENT_LIMITS,
    _expect_tls_refusal,
    open_device,
    say_hello,
)

pytestmark = pytest.mark.slow

CSR_OTHER_ID = auth.build_device_csr(auth.generate_private_key(), "dev-other").decode()


def _config(pki: PKI, **changes: Any) -> BrokerConfig:
    base = PKIConfig(tls_reload_poll_s=0.1, renewal_min_interval_s=0.0)
    return dataclasses.replace(pki.config, pki=dataclasses.replace(base, **changes))


@asynccontextmanager
async def _broker(
    config: BrokerConfig, nursery: trio.Nursery
) -> AsyncIterator[RunningBroker]:
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


def _copy(agent_dir: AgentDir, to: Path) -> AgentDir:
    to.mkdir()
    copy = AgentDir(to)
    shutil.copy(agent_dir.key, copy.key)
    shutil.copy(agent_dir.cert, copy.cert)
    return copy


def _serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


async def _heartbeat(
    ws: WebSocketConnection, channel: control.ControlChannel, seq: int
) -> None:
    await ws.send_message(channel.send(control.Heartbeat(seq=seq)))
    channel.receive_message(await ws.receive_message())
    assert channel.next_event() == control.HeartbeatAck(seq=seq)


async def _ask_renewal(
    ws: WebSocketConnection, channel: control.ControlChannel, csr: str
) -> control.Event:
    await ws.send_message(channel.send(control.RenewRequest(csr=csr)))
    channel.receive_message(await ws.receive_message())
    event = channel.next_event()
    assert isinstance(event, control.Event)
    return event


def _csr_for(device_id: str) -> str:
    return auth.build_device_csr(auth.generate_private_key(), device_id).decode()


async def test_agent_renews_reconnects_and_the_old_certificate_is_refused(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """A certificate inside the window is renewed on the control channel; the agent
    reconnects with the new one, after which the old one gets 403 superseded."""
    config = _config(pki, device_cert_lifetime_days=30, renew_before_days=10)
    device = pki.enroll("dev-renew", lifetime=timedelta(days=5))
    old = _copy(device, pki.data_dir.parent / "old-dev-renew")
    old_serial = _serial(old.cert.read_bytes())
    settings = AgentSettings(
        broker_url="",
        agent_dir=device.root,
        ca_file=pki.ca_file,
        limits=dataclasses.replace(fast_agent_config(), renew_before_days=10),
    )
    with structlog.testing.capture_logs() as events, trio.fail_after(15):
        async with _broker(config, nursery) as broker:
            settings = dataclasses.replace(settings, broker_url=broker.device_url)
            status = AgentStatus()
            nursery.start_soon(
                lambda: run_agent(settings, status=status, rng=random.Random(1))  # noqa: S311 - repeatable jitter
            )
            await wait_until(
                lambda: (
                    broker.sample(
                        "relay_device_certificate_renewals_total", outcome="signed"
                    )
                    == 1
                )
            )
            await wait_until(
                lambda: any(
                    e["event"] == "device.certificate_superseded" for e in events
                )
            )
            assert status.connected
            new_certificate = x509.load_pem_x509_certificate(device.cert.read_bytes())
            assert new_certificate.serial_number != old_serial
            assert not device.key_new.exists()
            # The dev-mode listener is issued by the device CA: the bundle came along.
            assert (
                device.trust.read_bytes() == DataDir(pki.data_dir).ca_cert.read_bytes()
            )
            # 30 days left now: outside the 10-day window, so no second renewal.
            await wait_until(
                lambda: broker.sample("relay_device_certificates_expiring_soon") == 0
            )
            with pytest.raises(HandshakeFailed) as info:
                async with open_device(broker, pki, old):
                    pass  # pragma: no cover - refused
            assert info.value.status == 403
            assert info.value.body == b"certificate superseded by a renewed one\n"
            assert (
                broker.sample(
                    "relay_device_rejections_total", reason="certificate_superseded"
                )
                == 1
            )
            nursery.cancel_scope.cancel()
    renewed = next(e for e in events if e["event"] == "device.certificate_renewed")
    assert renewed["audit"] is True
    assert renewed["old_serial"] == format(old_serial, "x")
    assert renewed["new_serial"] == format(new_certificate.serial_number, "x")
    superseded = next(
        e for e in events if e["event"] == "device.certificate_superseded"
    )
    assert superseded["serials"] == [format(old_serial, "x")]


async def test_refused_renewals_keep_the_channel_up(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """Another device's id, a bad or oversized CSR, a revoked device: each one gets
    a clear refusal, a metric and an audit event, and the channel carries on."""
    config = _config(pki, max_csr_bytes=1024)
    config = dataclasses.replace(
        config,
        device_listener=dataclasses.replace(
            config.device_listener, revocation_poll_s=60.0
        ),
    )
    device = pki.enroll("dev-refused")
    cases = [
        (CSR_OTHER_ID, "id_mismatch"),
        ("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END", "bad_csr"),
        ("A" * 2000, "bad_csr"),
    ]
    with structlog.testing.capture_logs() as events, trio.fail_after(10):
        async with _broker(config, nursery) as broker:
            async with open_device(broker, pki, device) as ws:
                channel = await say_hello(ws, "dev-refused")
                for seq, (csr, reason) in enumerate(cases):
                    answer = await _ask_renewal(ws, channel, csr)
                    assert isinstance(answer, control.RenewRefused), answer
                    assert answer.reason == reason
                    await _heartbeat(ws, channel, seq)
                with pki.store() as store:
                    store.revoke_device("dev-refused", at=datetime.now(UTC), reason="t")
                answer = await _ask_renewal(ws, channel, _csr_for("dev-refused"))
                assert answer == control.RenewRefused(
                    reason="refused_revoked",
                    detail="the certificate or device is revoked",
                )
                await _heartbeat(ws, channel, 99)
            for outcome, count in (
                ("id_mismatch", 1),
                ("bad_csr", 2),
                ("refused_revoked", 1),
                ("signed", 0),
            ):
                assert (
                    broker.sample(
                        "relay_device_certificate_renewals_total", outcome=outcome
                    )
                    == count
                ), outcome
    refused = [e for e in events if e["event"] == "device.certificate_renewal_refused"]
    assert [e["reason"] for e in refused] == [
        "id_mismatch",
        "bad_csr",
        "bad_csr",
        "refused_revoked",
    ]
    assert all(e["audit"] is True and e["device_id"] == "dev-refused" for e in refused)
    assert "too_large" in refused[2]["detail"]


async def test_renewals_are_rate_limited(pki: PKI, nursery: trio.Nursery) -> None:
    """A device whose newest certificate is younger than the interval is refused."""
    config = _config(pki, renewal_min_interval_s=3600.0)
    device = pki.enroll("dev-eager")
    with trio.fail_after(10):
        async with _broker(config, nursery) as broker:
            async with open_device(broker, pki, device) as ws:
                channel = await say_hello(ws, "dev-eager")
                answer = await _ask_renewal(ws, channel, _csr_for("dev-eager"))
                assert isinstance(answer, control.RenewRefused)
                assert answer.reason == "rate_limited"
                await _heartbeat(ws, channel, 1)
            assert (
                broker.sample(
                    "relay_device_certificate_renewals_total", outcome="rate_limited"
                )
                == 1
            )


def _issue_listener(pki: PKI, directory: Path) -> tuple[Path, Path, int]:
    """A listener certificate from the device CA, written to *directory*."""
    key, certificate = auth.issue_server_certificate(
        load_ca(DataDir(pki.data_dir)),
        names=["localhost", LOOPBACK],
        now=datetime.now(UTC),
        lifetime=timedelta(days=20),
    )
    directory.mkdir(exist_ok=True)
    cert_file, key_file = directory / "server.crt", directory / "server.key"
    key_file.unlink(missing_ok=True)
    write_private(key_file, auth.private_key_pem(key))
    write_public(cert_file, certificate.public_bytes(Encoding.PEM))
    return cert_file, key_file, certificate.serial_number


async def _served_serial(port: int, context: ssl.SSLContext) -> int:
    tcp = await trio.open_tcp_stream(LOOPBACK, port)
    tls = trio.SSLStream(tcp, context, server_hostname="localhost")
    try:
        await tls.do_handshake()
        der = tls.getpeercert(binary_form=True)
    finally:
        await trio.aclose_forcefully(tls)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_listener_certificate_reloads_without_restart(
    pki: PKI, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """New files are served to new connections within the poll interval on both
    listeners; a live channel carries on; a mismatched pair is refused."""
    cert_file, key_file, first_serial = _issue_listener(pki, tmp_path / "tls")
    config = dataclasses.replace(
        _config(pki), tls_cert_file=cert_file, tls_key_file=key_file
    )
    device = pki.enroll("dev-reload")
    context = pki.client_context(device)
    with structlog.testing.capture_logs() as events, trio.fail_after(15):
        async with _broker(config, nursery) as broker:
            ports = broker.ports
            assert await _served_serial(ports.device, context) == first_serial
            assert await _served_serial(ports.engineer, context) == first_serial
            expiry = broker.sample(
                "relay_certificate_expiry_timestamp_seconds", certificate="listener"
            )
            assert (
                expiry
                == x509.load_pem_x509_certificate(
                    cert_file.read_bytes()
                ).not_valid_after_utc.timestamp()
            )
            async with open_device(broker, pki, device) as ws:
                channel = await say_hello(ws, "dev-reload")
                _, _, second_serial = _issue_listener(pki, tmp_path / "tls")

                async def device_serves_new() -> None:
                    # The broker's poll decides when; nothing here to wait on.
                    while await _served_serial(ports.device, context) != second_serial:  # noqa: ASYNC110 - state owned by the broker
                        await trio.sleep(0.05)

                with trio.fail_after(2):
                    await device_serves_new()
                assert await _served_serial(ports.engineer, context) == second_serial
                await _heartbeat(ws, channel, 1)  # the live channel carries on
                reloaded = broker.sample("relay_tls_reloads_total", outcome="reloaded")
                assert reloaded >= 1
                # A key that does not belong to the certificate: refused.
                key_file.unlink()
                write_private(
                    key_file, auth.private_key_pem(auth.generate_private_key())
                )
                await wait_until(
                    lambda: (
                        broker.sample("relay_tls_reloads_total", outcome="refused") >= 1
                    )
                )
                assert await _served_serial(ports.device, context) == second_serial
                assert await _served_serial(ports.engineer, context) == second_serial
                await _heartbeat(ws, channel, 2)
    refused = [e for e in events if e["event"] == "tls.reload_refused"]
    assert refused
    assert refused[0]["audit"] is True
    assert "does not match" in refused[-1]["detail"]


async def _receive_until_closed(ws: WebSocketConnection) -> None:
    while True:
        await ws.receive_message()


def _trust_both(pki: PKI, agent_dir: AgentDir) -> ssl.SSLContext:
    data_dir = DataDir(pki.data_dir)
    context = ssl.create_default_context(cafile=str(data_dir.ca_cert))
    if data_dir.previous_ca_cert.exists():
        context.load_verify_locations(cafile=str(data_dir.previous_ca_cert))
    context.load_cert_chain(str(agent_dir.cert), str(agent_dir.key))
    return context


@asynccontextmanager
async def _open_with(
    broker: RunningBroker, context: ssl.SSLContext
) -> AsyncIterator[WebSocketConnection]:
    tcp = await trio.open_tcp_stream(LOOPBACK, broker.ports.device)
    tls = trio.SSLStream(
        tcp, context, server_hostname="localhost", https_compatible=True
    )
    await tls.do_handshake()
    async with connect_websocket(
        tls, f"wss://localhost:{broker.ports.device}/v1/device/control", CLIENT_LIMITS
    ) as ws:
        yield ws


async def test_ca_rollover_and_retirement(pki: PKI, nursery: trio.Nursery) -> None:
    """After a rollover the old CA's devices still connect (and are told to renew),
    new enrollments get the new CA and connect, and after retire-previous the
    old CA's certificates fail the TLS handshake; the gauges follow."""
    data_dir = DataDir(pki.data_dir)
    old_device = pki.enroll("dev-old-ca")
    with trio.fail_after(15):
        async with _broker(_config(pki), nursery) as broker:
            old_ca = x509.load_pem_x509_certificate(data_dir.ca_cert.read_bytes())
            previous, new = rollover_ca(
                data_dir, now=datetime.now(UTC), lifetime=timedelta(days=400)
            )
            assert previous == old_ca
            await wait_until(
                lambda: (
                    broker.sample(
                        "relay_certificate_expiry_timestamp_seconds",
                        certificate="device_ca_previous",
                    )
                    == old_ca.not_valid_after_utc.timestamp()
                )
            )
            assert (
                broker.sample(
                    "relay_certificate_expiry_timestamp_seconds",
                    certificate="device_ca",
                )
                == new.not_valid_after_utc.timestamp()
            )
            async with _open_with(broker, _trust_both(pki, old_device)) as ws:
                channel = await say_hello(ws, "dev-old-ca")
                channel.receive_message(await ws.receive_message())
                assert channel.next_event() == control.RenewalAdvised(
                    reason="ca_rollover"
                )
                new_device = pki.enroll("dev-new-ca")
                issued = x509.load_pem_x509_certificate(new_device.cert.read_bytes())
                assert issued.issuer == new.subject
                async with _open_with(broker, _trust_both(pki, new_device)) as ws2:
                    await say_hello(ws2, "dev-new-ca")
                retire_previous_ca(data_dir)
                # The live channel of the retired CA's device is closed (4001).
                with pytest.raises(ConnectionClosed) as info:
                    await _receive_until_closed(ws)
                assert info.value.code == CloseCode.REVOKED
            await wait_until(
                lambda: (
                    broker.sample(
                        "relay_certificate_expiry_timestamp_seconds",
                        certificate="device_ca_previous",
                    )
                    == 0
                )
            )
            await _expect_tls_refusal(broker, _trust_both(pki, old_device))
            async with _open_with(broker, _trust_both(pki, new_device)) as ws3:
                await say_hello(ws3, "dev-new-ca")
