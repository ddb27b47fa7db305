"""Fixtures for end-to-end tests: a real broker on loopback with real TLS.

Certificates come from our own CA code (``auth``), the store is a real SQLite file,
and limits are shortened so that deadline tests take fractions of a second.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import ssl
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
import trio

import auth
from relay._trio.broker import BrokerPorts, serve_broker
from relay.config import (
    AgentConfig,
    BrokerConfig,
    DeviceListenerConfig,
    EngineerListenerConfig,
    ListenAddress,
    WebSocketLimits,
)
from relay.metrics import RelayMetrics
from relay.pki_files import (
    AgentDir,
    DataDir,
    init_ca,
    load_ca,
    load_or_create_sealing_key,
    write_private,
    write_public,
)
from relay.store import Store
from relay.users import create_user

LOOPBACK = "127.0.0.1"


def short_config(data_dir: Path) -> BrokerConfig:
    """A broker config with short limits, all listeners on loopback port 0."""
    return BrokerConfig(
        data_dir=data_dir,
        device_listen=ListenAddress(host=LOOPBACK, port=0),
        engineer_listen=ListenAddress(host=LOOPBACK, port=0),
        metrics_listen=ListenAddress(host=LOOPBACK, port=0),
        shutdown_grace_s=2.0,
        websocket=WebSocketLimits(ping_interval_s=0.5, close_timeout_s=1.0),
        device_listener=DeviceListenerConfig(
            handshake_timeout_s=0.5,
            hello_timeout_s=0.5,
            revocation_poll_s=0.1,
            presence_flush_s=0.1,
            presence_touch_s=0.2,
            heartbeat_interval_s=0.2,
            max_pending_per_source=10,
        ),
        engineer_listener=EngineerListenerConfig(
            revocation_poll_s=0.1,
            device_feed_interval_s=0.1,
            websocket_send_timeout_s=2.0,
        ),
    )


@dataclass
class PKI:
    """The broker's data dir plus helpers to make device identities."""

    data_dir: Path
    config: BrokerConfig

    @property
    def ca_file(self) -> Path:
        return DataDir(self.data_dir).ca_cert

    def store(self) -> closing[Store]:
        return closing(Store.open(self.config.effective_database_url))

    def enroll(
        self,
        device_id: str,
        *,
        now: datetime | None = None,
        lifetime: timedelta = timedelta(days=365),
        record: bool = True,
        ca: auth.CertificateAuthority | None = None,
    ) -> AgentDir:
        """Make a key, CSR and signed certificate for *device_id* in its own dir."""
        agent_dir = AgentDir(self.data_dir.parent / f"agent-{device_id}")
        key = auth.generate_private_key()
        signer = ca if ca is not None else load_ca(DataDir(self.data_dir))
        signed = auth.sign_device_csr(
            signer,
            auth.build_device_csr(key, device_id),
            now=now or datetime.now(UTC),
            lifetime=lifetime,
            max_csr_bytes=16384,
        )
        if record:
            with self.store() as store:
                identity = signed.identity
                store.record_enrollment(
                    device_id=identity.device_id,
                    serial_hex=identity.serial_hex,
                    fingerprint_sha256=identity.fingerprint_sha256,
                    not_before=identity.not_before,
                    not_after=identity.not_after,
                    issued_at=datetime.now(UTC),
                )
        agent_dir.root.mkdir(parents=True, exist_ok=True)
        for path in (agent_dir.key, agent_dir.cert):
            path.unlink(missing_ok=True)
        write_private(agent_dir.key, auth.private_key_pem(key))
        write_public(agent_dir.cert, signed.certificate_pem())
        return agent_dir

    def client_context(self, agent_dir: AgentDir | None) -> ssl.SSLContext:
        """A TLS client context trusting the broker, presenting *agent_dir*'s cert."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if agent_dir is not None:
            context.load_cert_chain(str(agent_dir.cert), str(agent_dir.key))
        return context


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    """Collect garbage after each test, so a leaked socket fails the test that leaked it."""
    yield
    gc.collect()


def make_pki(data_dir: Path, **changes: Any) -> PKI:
    """A data dir with a CA and a migrated store, for ``short_config`` with
    *changes* (a database URL, a cluster table)."""
    config = dataclasses.replace(short_config(data_dir), **changes)
    init_ca(DataDir(data_dir), now=datetime.now(UTC), lifetime=timedelta(days=365))
    with closing(Store.open(config.effective_database_url)):
        pass
    return PKI(data_dir=data_dir, config=config)


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return make_pki(tmp_path / "relay-data")


@dataclass
class RunningBroker:
    """A broker started by the ``broker`` fixture."""

    ports: BrokerPorts
    config: BrokerConfig
    metrics: RelayMetrics
    shutdown: trio.Event

    @property
    def device_url(self) -> str:
        return f"wss://{LOOPBACK}:{self.ports.device}"

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels or None)
        return 0.0 if value is None else value


@pytest.fixture
async def broker(pki: PKI, nursery: trio.Nursery) -> AsyncIterator[RunningBroker]:
    metrics = RelayMetrics()
    shutdown = trio.Event()
    ports = await nursery.start(
        lambda task_status: serve_broker(
            pki.config, shutdown, metrics=metrics, task_status=task_status
        )
    )
    yield RunningBroker(
        ports=ports, config=pki.config, metrics=metrics, shutdown=shutdown
    )
    shutdown.set()


def fast_agent_config() -> AgentConfig:
    """Agent limits for tests: quick retries, a recognisable auth-failure wait."""
    return AgentConfig(
        backoff_base_s=0.05,
        backoff_cap_s=0.2,
        auth_failure_retry_s=900.0,
        connect_timeout_s=2.0,
        stable_after_s=0.5,
    )


def foreign_ca() -> auth.CertificateAuthority:
    """A CA the broker has never heard of."""
    return auth.create_ca(
        common_name="Somebody else's CA",
        now=datetime.now(UTC),
        lifetime=timedelta(days=30),
    )


async def wait_until(
    predicate: Callable[[], bool], *, timeout_s: float = 5.0, step_s: float = 0.02
) -> None:
    """Poll *predicate* until true; fail after *timeout_s* ("eventually within budget")."""
    with trio.fail_after(timeout_s):
        while not predicate():  # noqa: ASYNC110 - state owned by another component
            await trio.sleep(step_s)


def add_engineer(
    pki: PKI,
    username: str,
    *,
    role: str = "engineer",
    password: str = "correct horse battery",  # noqa: S107 - test account
) -> str:
    """Create a user directly in the store (as ``relay user add`` does); return the
    TOTP secret. The sealing key is the data dir's, which a broker started on
    *pki* loads as well."""
    key, _origin = load_or_create_sealing_key(DataDir(pki.data_dir), None)
    with pki.store() as store:
        new_user = create_user(
            store,
            _test_hasher(),
            auth.SecretSealer(key),
            username=username,
            role=role,
            password=password,
            now=datetime.now(UTC),
        )
    secret: str = pyotp.parse_uri(new_user.otpauth_uri).secret
    return secret


async def login_token(api: httpx.AsyncClient, username: str, secret: str) -> str:
    """Log *username* in with the current code of *secret*; return the token.

    The client's cookie jar is cleared again, so each test says which
    credential it sends.
    """
    response = await api.post(
        "/api/v1/login",
        json={
            "username": username,
            "password": "correct horse battery",
            "totp": pyotp.TOTP(secret).now(),
        },
    )
    api.cookies.clear()
    assert response.status_code == 200, response.text
    token: str = response.json()["token"]
    return token


@functools.cache
def _test_hasher() -> auth.PasswordHasher:
    return auth.PasswordHasher()


def api_client(pki: PKI, port: int) -> httpx.AsyncClient:
    """An HTTPS client for the engineer listener on *port*, trusting the dev CA."""
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    return httpx.AsyncClient(
        base_url=f"https://{LOOPBACK}:{port}", verify=context, timeout=30.0
    )


@pytest.fixture
async def client(broker: RunningBroker, pki: PKI) -> AsyncIterator[httpx.AsyncClient]:
    """A client for the ``broker`` fixture's engineer listener."""
    async with api_client(pki, broker.ports.engineer) as api:
        yield api


@asynccontextmanager
async def broker_with(
    pki: PKI,
    nursery: trio.Nursery,
    *,
    wall_clock: Callable[[], datetime] | None = None,
    listener: Mapping[str, Any] | None = None,
    **engineer_auth: Any,
) -> AsyncIterator[tuple[RunningBroker, httpx.AsyncClient]]:
    """A broker of its own with changed engineer-auth limits (and engineer
    listener settings, *listener*), and a client for it."""
    config = dataclasses.replace(
        pki.config,
        engineer_auth=dataclasses.replace(pki.config.engineer_auth, **engineer_auth),
        engineer_listener=dataclasses.replace(
            pki.config.engineer_listener, **(listener or {})
        ),
    )
    metrics, shutdown = RelayMetrics(), trio.Event()
    clock = wall_clock if wall_clock is not None else (lambda: datetime.now(UTC))
    ports = await nursery.start(
        lambda task_status: serve_broker(
            config, shutdown, wall_clock=clock, metrics=metrics, task_status=task_status
        )
    )
    try:
        async with api_client(pki, ports.engineer) as api:
            yield RunningBroker(ports, config, metrics, shutdown), api
    finally:
        shutdown.set()
