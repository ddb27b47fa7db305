"""The monitoring feed end to end: the simulated instrument's files, the real
agent (spool, on-disk queue, sender) and a real broker that goes away and
comes back; a user's data request answered from the instrument's snapshot."""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import trio

from relay import simulated_instrument as instrument
from relay._trio.agent import AgentSettings, AgentStatus, run_agent
from relay._trio.agent_feed import AgentFeed, make_agent_feed
from relay._trio.broker import BrokerPorts, serve_broker
from relay.config import AgentConfig, FeedConfig, ListenAddress
from relay.metrics import RelayMetrics
from relay.pki_files import AgentDir
from relay.proto.feed import Record
from tests.e2e.conftest import (
    LOOPBACK,
    PKI,
    add_engineer,
    api_client,
    fast_agent_config,
    login_token,
    wait_until,
)

pytestmark = pytest.mark.slow

T0 = datetime(2026, 11, 27, 7, 0, tzinfo=UTC)


def _agent_config(spool: Path) -> AgentConfig:
    return dataclasses.replace(
        fast_agent_config(), feed_dir=spool, feed_scan_s=0.05, feed_retry_s=0.5
    )


async def _start_agent(
    nursery: trio.Nursery, broker_url: str, device: AgentDir, pki: PKI
) -> tuple[AgentStatus, AgentFeed]:
    config = _agent_config(device.root / "feed")
    settings = AgentSettings(
        broker_url=broker_url, agent_dir=device.root, ca_file=pki.ca_file, limits=config
    )
    feed = make_agent_feed(device.root, config)
    await nursery.start(feed.run)
    status = AgentStatus()
    nursery.start_soon(
        lambda: run_agent(settings, status=status, feed=feed, rng=random.Random(3))  # noqa: S311 - repeatable jitter
    )
    return status, feed


async def test_records_written_while_the_broker_is_down_arrive_once_when_it_returns(
    pki: PKI, nursery: trio.Nursery
) -> None:
    device = pki.enroll("dev-sf")
    spool = device.root / "feed"
    rng = random.Random(12)  # noqa: S311 - a repeatable instrument

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

    def stored() -> list[str]:
        with pki.store() as store:
            return [
                row.record_id
                for row in store.list_feed_records(
                    "dev-sf", kinds=["alarm", "daily_stats"], limit=10_000
                )
            ]

    ports, shutdown, _ = await start_broker(0)
    status, feed = await _start_agent(
        nursery, f"wss://{LOOPBACK}:{ports.device}", device, pki
    )
    await wait_until(lambda: status.connected)
    instrument.write_record(spool, instrument.random_alarm(T0, rng), "first")
    await wait_until(lambda: len(stored()) == 1)
    await wait_until(lambda: feed.queue.depth() == 0)  # its ack arrived

    # The broker goes away; the instrument goes on reporting.
    shutdown.set()
    await wait_until(lambda: not status.connected)
    written: list[Record] = [
        instrument.random_alarm(T0 + timedelta(minutes=n), rng) for n in range(1, 11)
    ]
    written += instrument.daily_stats_history(date(2026, 11, 26), 10, rng)
    for n, record in enumerate(written):
        instrument.write_record(spool, record, f"offline-{n:02d}")
    # All taken from the spool into the agent's queue, none delivered yet.
    await wait_until(lambda: not list((spool / "outbox").glob("*.json")))
    assert len(stored()) == 1
    assert await trio.to_thread.run_sync(feed.queue.depth) == len(written)

    _, shutdown2, metrics2 = await start_broker(ports.device)
    with trio.fail_after(20):
        await wait_until(lambda: len(stored()) == 1 + len(written), timeout_s=20)
    # Once and only once: every record one row, under its own key.
    ids = stored()
    assert len(set(ids)) == len(ids) == 1 + len(written)
    await wait_until(lambda: feed.queue.depth() == 0)
    sample = metrics2.registry.get_sample_value
    assert sample("relay_feed_records_stored_total", {"kind": "daily_stats"}) == 10
    assert sample("relay_feed_records_stored_total", {"kind": "alarm"}) == 10
    # Nothing comes again later: the agent resends nothing once acknowledged.
    await trio.sleep(1.0)
    assert len(stored()) == 1 + len(written)
    assert not list((spool / "rejected").glob("*"))
    shutdown2.set()
    nursery.cancel_scope.cancel()


async def test_a_users_request_is_answered_from_the_instruments_snapshot(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """An engineer presses "request now" (the API); the device answers from
    the instrument's snapshot, or refuses when there is none; all audited."""
    device = pki.enroll("dev-snap")
    spool = device.root / "feed"
    secret = add_engineer(pki, "alice")
    config = dataclasses.replace(pki.config, feed=FeedConfig(request_timeout_s=10.0))
    shutdown, metrics = trio.Event(), RelayMetrics()
    ports: BrokerPorts = await nursery.start(
        lambda task_status: serve_broker(
            config, shutdown, metrics=metrics, task_status=task_status
        )
    )
    status, _ = await _start_agent(
        nursery, f"wss://{LOOPBACK}:{ports.device}", device, pki
    )
    instrument.write_snapshot(
        spool,
        instrument.consumables_snapshot(datetime.now(UTC), random.Random(4)),  # noqa: S311 - repeatable
    )
    await wait_until(lambda: status.connected)
    async with api_client(pki, ports.engineer) as api:
        token = await login_token(api, "alice", secret)
        auth = {"Authorization": f"Bearer {token}"}
        url = "/api/v1/devices/dev-snap/data-requests"
        with structlog.testing.capture_logs() as events:
            made = await api.post(
                url,
                json={"kind": "consumables", "reason": "filter change"},
                headers=auth,
            )
            assert made.status_code == 202, made.text
            request_id = made.json()["request_id"]
            await _wait_for_status(api, f"{url}/{request_id}", auth, "answered")
            # No configuration snapshot written: the agent refuses, and says why.
            made = await api.post(url, json={"kind": "configuration"}, headers=auth)
            assert made.status_code == 202, made.text
            refused = await _wait_for_status(
                api, f"{url}/{made.json()['request_id']}", auth, "refused"
            )
            assert refused["refusal"] == "no_data"
            snapshots = await api.get(
                "/api/v1/devices/dev-snap/snapshots", headers=auth
            )
    assert snapshots.status_code == 200
    names = {item["name"] for item in snapshots.json()["consumables"]["items"]}
    assert {"purification_cartridge", "final_filter", "uv_lamp"} <= names
    audited = {e["event"] for e in events if e.get("audit")}
    assert {
        "feed.data_requested",
        "feed.data_answered",
        "feed.data_request_refused",
    } <= audited
    sample = metrics.registry.get_sample_value
    assert sample("relay_feed_data_requests_total", {"outcome": "sent"}) == 2
    assert sample("relay_feed_data_requests_total", {"outcome": "answered"}) == 1
    shutdown.set()
    nursery.cancel_scope.cancel()


async def _wait_for_status(
    api: httpx.AsyncClient, url: str, headers: dict[str, str], wanted: str
) -> dict[str, Any]:
    with trio.fail_after(10):
        while True:
            got = await api.get(url, headers=headers)
            assert got.status_code == 200, got.text
            body: dict[str, Any] = got.json()
            if body["status"] == wanted:
                return body
            assert body["status"] == "pending", body
            await trio.sleep(0.05)
