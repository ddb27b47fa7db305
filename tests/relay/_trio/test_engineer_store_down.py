"""The engineer API when the database is unavailable: 503, not a bare 500."""

from __future__ import annotations

import os
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

import auth
from relay._trio.engineer_listener import EngineerListener
from relay._trio.enrollment_api import Enroller
from relay._trio.login_service import LoginService
from relay.config import EngineerAuthConfig, EngineerListenerConfig, PKIConfig
from relay.log import get_logger
from relay.metrics import RelayMetrics
from relay.store import Store


async def test_store_failure_answers_503_with_retry_after(tmp_path: Path) -> None:
    """A login while the database cannot be opened gets 503 + Retry-After and is counted."""
    database = tmp_path / "relay.sqlite3"
    store = Store.open(f"sqlite:///{database}")
    with closing(store):
        store.close()
        os.remove(database)
        os.mkdir(database)  # the path is now a directory: every connection fails
        metrics = RelayMetrics()
        service = LoginService(
            store=store,
            hasher=auth.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1),
            sealer=auth.SecretSealer(auth.generate_sealing_key()),
            config=EngineerAuthConfig(),
            metrics=metrics,
            log=get_logger("test"),
            wall_clock=lambda: datetime.now(UTC),
        )
        listener = EngineerListener(
            service,
            store=store,
            config=EngineerListenerConfig(),
            presence_stale_after=timedelta(seconds=90),
            log=get_logger("test"),
            wall_clock=lambda: datetime.now(UTC),
            enroller=Enroller(
                ca=None,
                store=store,
                config=PKIConfig(),
                metrics=metrics,
                log=get_logger("test"),
                wall_clock=lambda: datetime.now(UTC),
            ),
        )
        transport = httpx.ASGITransport(app=listener.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="https://relay.test"
        ) as client:
            response = await client.post(
                "/api/v1/login",
                json={
                    "username": "alice",
                    "password": "correct horse battery",
                    "totp": "123456",
                },
            )
    assert response.status_code == 503
    assert response.json() == {"error": "service unavailable"}
    assert response.headers["retry-after"] == "5"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert (
        metrics.registry.get_sample_value(
            "relay_store_errors_total", {"operation": "engineer_api"}
        )
        == 1
    )
