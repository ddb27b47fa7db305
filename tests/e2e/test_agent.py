"""The device agent against a real broker: connect, reconnect, and refusals."""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog
import trio
from cryptography.hazmat.primitives import serialization

import auth
from relay._trio.agent import AgentSettings, AgentStatus, run_agent
from relay._trio.broker import BrokerPorts, serve_broker
from relay.config import ListenAddress
from relay.metrics import RelayMetrics
from relay.pki_files import AgentDir
from relay.proto.backoff import Outcome
from relay.tls import agent_context
from tests.e2e.conftest import (
    LOOPBACK,
    PKI,
    RunningBroker,
    fast_agent_config,
    foreign_ca,
    wait_until,
)

pytestmark = pytest.mark.slow


def _settings(broker_url: str, agent_dir: AgentDir, ca_file: Path) -> AgentSettings:
    return AgentSettings(
        broker_url=broker_url,
        agent_dir=agent_dir.root,
        ca_file=ca_file,
        limits=fast_agent_config(),
    )


async def _start_agent(nursery: trio.Nursery, settings: AgentSettings) -> AgentStatus:
    status = AgentStatus()
    nursery.start_soon(lambda: run_agent(settings, status=status, rng=random.Random(1)))  # noqa: S311 - repeatable jitter
    return status


async def test_agent_connects_and_measures_heartbeats(
    broker: RunningBroker, pki: PKI, nursery: trio.Nursery
) -> None:
    """The agent connects out, is counted by the broker, and gets heartbeat acks."""
    device = pki.enroll("dev-agent")
    status = await _start_agent(
        nursery, _settings(broker.device_url, device, pki.ca_file)
    )
    await wait_until(lambda: status.connected)
    assert status.device_id == "dev-agent"
    await wait_until(lambda: status.heartbeat_rtt_s is not None)
    assert broker.sample("relay_devices_connected") == 1
    nursery.cancel_scope.cancel()


async def test_agent_reconnects_after_broker_restart(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """When the broker stops and comes back on the same port, the agent reconnects by itself."""
    device = pki.enroll("dev-restart")

    async def start_broker(port: int) -> tuple[BrokerPorts, trio.Event, RelayMetrics]:
        config = dataclasses.replace(
            pki.config, device_listen=ListenAddress(host=LOOPBACK, port=port)
        )
        shutdown, metrics = trio.Event(), RelayMetrics()
        ports: BrokerPorts = await nursery.start(
            lambda task_status: serve_broker(
                config, shutdown, metrics=metrics, task_status=task_status
            )
        )
        return ports, shutdown, metrics

    ports, shutdown, _ = await start_broker(0)
    status = await _start_agent(
        nursery, _settings(f"wss://{LOOPBACK}:{ports.device}", device, pki.ca_file)
    )
    await wait_until(lambda: status.connected)
    shutdown.set()
    await wait_until(lambda: not status.connected)
    _, shutdown2, metrics2 = await start_broker(ports.device)
    await wait_until(lambda: status.connected)
    assert metrics2.registry.get_sample_value("relay_devices_connected") == 1
    shutdown2.set()
    nursery.cancel_scope.cancel()


async def _assert_auth_wait(status: AgentStatus, outcome: Outcome) -> None:
    """The agent reports *outcome* and then waits (no new attempt) - the >= 15 min wait."""
    await wait_until(lambda: status.last_outcome is outcome)
    attempts = status.attempts
    await trio.sleep(1.0)  # several fast-backoff periods (cap 0.2 s)
    assert status.attempts == attempts, "an auth failure must not be retried quickly"


async def test_revoked_device_waits_long_before_retrying(
    broker: RunningBroker, pki: PKI, nursery: trio.Nursery
) -> None:
    """A revoked device is refused (403) and the agent switches to the slow retry."""
    device = pki.enroll("dev-revoked-agent")
    with pki.store() as store:
        store.revoke_device("dev-revoked-agent", at=datetime.now(UTC), reason="test")
    status = await _start_agent(
        nursery, _settings(broker.device_url, device, pki.ca_file)
    )
    await _assert_auth_wait(status, Outcome.REFUSED)
    assert "certificate revoked" in status.last_error
    nursery.cancel_scope.cancel()


async def test_revocation_while_connected_stops_the_agent(
    broker: RunningBroker, pki: PKI, nursery: trio.Nursery
) -> None:
    """Revoking a connected device closes its channel (4001) and the agent backs off for long."""
    device = pki.enroll("dev-revoked-live")
    status = await _start_agent(
        nursery, _settings(broker.device_url, device, pki.ca_file)
    )
    await wait_until(lambda: status.connected)
    with pki.store() as store:
        store.revoke_device("dev-revoked-live", at=datetime.now(UTC), reason="test")
    await _assert_auth_wait(status, Outcome.REFUSED)
    nursery.cancel_scope.cancel()


async def test_expired_own_certificate_is_not_sent(
    broker: RunningBroker, pki: PKI, nursery: trio.Nursery
) -> None:
    """An agent whose certificate expired says so and waits, without a TLS attempt."""
    device = pki.enroll(
        "dev-expired-agent",
        now=datetime.now(UTC) - timedelta(days=60),
        lifetime=timedelta(days=30),
    )
    status = await _start_agent(
        nursery, _settings(broker.device_url, device, pki.ca_file)
    )
    await _assert_auth_wait(status, Outcome.LOCAL_CERTIFICATE)
    assert "expired" in status.last_error
    assert (
        broker.sample(
            "relay_tls_handshake_failures_total", listener="device", reason="expired"
        )
        == 0
    )
    nursery.cancel_scope.cancel()


async def test_untrusted_broker_is_refused_by_the_agent(
    broker: RunningBroker, pki: PKI, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """An agent that does not trust the broker's certificate never completes TLS, and keeps retrying."""
    device = pki.enroll("dev-careful")
    other_ca = tmp_path / "other-ca.crt"
    other_ca.write_bytes(foreign_ca().certificate_pem())
    status = await _start_agent(nursery, _settings(broker.device_url, device, other_ca))
    await wait_until(lambda: status.attempts >= 3)
    assert status.last_outcome is Outcome.NETWORK
    assert "broker certificate not trusted" in status.last_error
    assert not status.connected
    nursery.cancel_scope.cancel()


def test_agent_context_requires_tls12(pki: PKI) -> None:
    """The agent never offers TLS below 1.2 and checks the broker's name."""
    device = pki.enroll("dev-context")
    context = agent_context(
        ca_file=pki.ca_file, cert_file=device.cert, key_file=device.key
    )
    assert context.minimum_version >= context.minimum_version.TLSv1_2
    assert context.check_hostname


async def test_operator_provided_listener_certificate(
    pki: PKI, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """With --tls-cert/--tls-key the broker serves the operator's certificate; agents trust the operator's CA."""
    operator_ca = foreign_ca()
    key, certificate = auth.issue_server_certificate(
        operator_ca,
        names=["localhost", LOOPBACK],
        now=datetime.now(UTC),
        lifetime=timedelta(days=30),
    )
    cert_file, key_file, ca_file = (
        tmp_path / "op.crt",
        tmp_path / "op.key",
        tmp_path / "op-ca.crt",
    )
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(auth.private_key_pem(key))
    ca_file.write_bytes(operator_ca.certificate_pem())
    config = dataclasses.replace(
        pki.config, tls_cert_file=cert_file, tls_key_file=key_file
    )
    shutdown = trio.Event()
    ports: BrokerPorts = await nursery.start(
        lambda task_status: serve_broker(config, shutdown, task_status=task_status)
    )
    assert not (pki.data_dir / "tls" / "listener.crt").exists(), (
        "no dev certificate in production mode"
    )
    device = pki.enroll("dev-prod")
    status = await _start_agent(
        nursery, _settings(f"wss://{LOOPBACK}:{ports.device}", device, ca_file)
    )
    await wait_until(lambda: status.connected)
    # The device CA alone no longer verifies the broker.
    wrong = await _start_agent(
        nursery,
        _settings(
            f"wss://{LOOPBACK}:{ports.device}", pki.enroll("dev-wrong"), pki.ca_file
        ),
    )
    await wait_until(lambda: wrong.attempts >= 2)
    assert "broker certificate not trusted" in wrong.last_error
    shutdown.set()
    nursery.cancel_scope.cancel()


async def test_drops_at_accept_are_not_taken_for_a_refused_certificate(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """A broker shedding load (closing at accept) keeps the agent on fast backoff, never the 15 min wait."""

    async def drop(stream: trio.SocketStream) -> None:
        await trio.aclose_forcefully(stream)

    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, drop, listeners)
    device = pki.enroll("dev-storm")
    with structlog.testing.capture_logs() as events:
        status = await _start_agent(
            nursery, _settings(f"wss://{LOOPBACK}:{port}", device, pki.ca_file)
        )
        await wait_until(lambda: status.attempts >= 6)
    assert status.last_outcome is Outcome.NETWORK
    assert not any(e["event"] == "agent.auth_failed" for e in events)
    nursery.cancel_scope.cancel()


async def test_auth_failure_is_logged_with_a_hint(
    broker: RunningBroker, pki: PKI, nursery: trio.Nursery
) -> None:
    """A refused certificate is logged as agent.auth_failed with the >= 15 min wait and a hint."""
    device = pki.enroll("dev-hint")
    with pki.store() as store:
        store.revoke_device("dev-hint", at=datetime.now(UTC), reason="test")
    with structlog.testing.capture_logs() as events:
        status = await _start_agent(
            nursery, _settings(broker.device_url, device, pki.ca_file)
        )
        await wait_until(lambda: any(e["event"] == "agent.auth_failed" for e in events))
    failed = next(e for e in events if e["event"] == "agent.auth_failed")
    assert failed["retry_in_s"] >= 15 * 60
    assert "re-enroll" in failed["hint"]
    assert status.attempts == 1
    nursery.cancel_scope.cancel()
