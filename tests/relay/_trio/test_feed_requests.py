"""DataRequester: the only way a data request reaches a device, audited, never
repeated on its own; lapsed when unanswered; across nodes through a node
command; and the feed's retention."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio

from relay._trio.feed_requests import DataRequester, DataRequestUnavailable
from relay.config import FeedConfig
from relay.metrics import RelayMetrics
from relay.proto import control, feed
from relay.proto.node_command import CommandKind
from relay.store import DataRequestRow, Store
from tests.e2e.conftest import wait_until

T0 = datetime(2026, 11, 27, 9, 0, tzinfo=UTC)


@dataclass
class FakeChannels:
    """The device listener's side: which devices are here, at which version."""

    versions: dict[str, int] = field(default_factory=dict)
    sent: list[tuple[str, control.Event]] = field(default_factory=list)

    def control_version(self, device_id: str) -> int | None:
        return self.versions.get(device_id)

    def control_certificate(self, device_id: str) -> tuple[int, Any] | None:
        return (7, object()) if device_id in self.versions else None

    async def send_control(
        self, device_id: str, connection_id: int, event: control.Event
    ) -> bool:
        assert connection_id == 7
        self.sent.append((device_id, event))
        return True


@dataclass
class FakeFleet:
    node_id: str = "node-a"
    where: dict[str, str] = field(default_factory=dict)
    commands: list[tuple[str, CommandKind, Mapping[str, str]]] = field(
        default_factory=list
    )
    other: DataRequester | None = None

    async def device_node(self, device_id: str) -> str | None:
        return self.where.get(device_id)

    async def send(
        self, node_id: str, kind: CommandKind, args: Mapping[str, str] | None = None
    ) -> Mapping[str, str]:
        assert args is not None
        self.commands.append((node_id, kind, args))
        if self.other is None:
            raise TimeoutError("no confirmation")
        return await self.other.carry_out(args)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(f"sqlite:///{tmp_path / 'relay.sqlite3'}")
    for device_id in ("dev-1", "dev-2"):
        opened.record_enrollment(
            device_id=device_id,
            serial_hex=hashlib.sha256(device_id.encode()).hexdigest()[:16],
            fingerprint_sha256=hashlib.sha256(device_id.encode()).hexdigest(),
            not_before=T0,
            not_after=T0 + timedelta(days=365),
            issued_at=T0,
        )
    yield opened
    opened.close()


def requester(
    store: Store,
    channels: FakeChannels,
    clock: Clock,
    *,
    fleet: FakeFleet | None = None,
    metrics: RelayMetrics | None = None,
    timeout_s: float = 60.0,
) -> DataRequester:
    return DataRequester(
        store=store,
        channels=channels,
        config=FeedConfig(request_timeout_s=timeout_s, retention_days=30),
        metrics=metrics or RelayMetrics(),
        log=structlog.get_logger("feed"),
        wall_clock=clock,
        fleet=fleet,
    )


async def ask(
    req: DataRequester, device_id: str = "dev-1", kind: str = "consumables"
) -> DataRequestRow:
    return await req.request(
        device_id=device_id,
        kind=kind,
        username="alice",
        role_text="engineer, Example Service",
        reason="filter change planned",
        source="127.0.0.1",
    )


async def test_a_request_goes_to_the_device_named_and_audited(store: Store) -> None:
    channels, clock, metrics = FakeChannels({"dev-1": 4}), Clock(), RelayMetrics()
    req = requester(store, channels, clock, metrics=metrics)
    with structlog.testing.capture_logs() as events:
        row = await ask(req)
    [(device_id, sent)] = channels.sent
    assert device_id == "dev-1"
    assert sent == control.DataRequest(
        request_id=row.request_id,
        kind="consumables",
        requested_by="alice",
        requester_role="engineer, Example Service",
        reason="filter change planned",
    )
    [event] = [e for e in events if e["event"] == "feed.data_requested"]
    assert event["audit"] is True
    assert (event["requested_by"], event["device_id"], event["source"]) == (
        "alice",
        "dev-1",
        "127.0.0.1",
    )
    assert row.status == "pending"
    # Pressed again while pending: the same request, nothing sent twice.
    assert (await ask(req)).request_id == row.request_id
    assert len(channels.sent) == 1
    # Another kind is another request.
    await ask(req, kind="configuration")
    assert len(channels.sent) == 2
    sample = metrics.registry.get_sample_value
    assert sample("relay_feed_data_requests_total", {"outcome": "sent"}) == 2


@pytest.mark.parametrize(
    ("versions", "reason"), [({}, "offline"), ({"dev-1": 3}, "agent_too_old")]
)
async def test_a_device_that_cannot_be_asked_is_said_at_once(
    store: Store, versions: dict[str, int], reason: str
) -> None:
    channels = FakeChannels(versions)
    req = requester(store, channels, Clock())
    with pytest.raises(DataRequestUnavailable) as caught:
        await ask(req)
    assert caught.value.reason == reason
    assert channels.sent == []
    [row] = store.list_data_requests("dev-1")
    assert (row.status, row.refusal) == ("refused", "undelivered")


async def test_nothing_asks_on_its_own_and_unanswered_requests_lapse(
    store: Store,
) -> None:
    channels, clock = FakeChannels({"dev-1": 4}), Clock()
    # A short answer timeout: the runner looks every timeout / 4 (0.1 s).
    req = requester(store, channels, clock, timeout_s=0.4)
    row = await ask(req)
    async with trio.open_nursery() as nursery:
        await nursery.start(req.run)
        clock.now = T0 + timedelta(seconds=0.3)
        await trio.sleep(0.3)  # the runner has looked, and left it pending
        assert _status(store, row.request_id) == "pending"
        clock.now = T0 + timedelta(seconds=0.5)
        with structlog.testing.capture_logs() as events:
            # The row changes in the runner's thread before it logs: wait for both.
            await wait_until(
                lambda: any(e["event"] == "feed.data_request_lapsed" for e in events)
            )
        nursery.cancel_scope.cancel()
    assert _status(store, row.request_id) == "lapsed"
    assert any(e["event"] == "feed.data_request_lapsed" for e in events)
    # The runner lapsed it and sent nothing: only the user's request went out.
    assert len(channels.sent) == 1
    # A new press after the lapse is a new request.
    assert (await ask(req)).request_id != row.request_id


async def test_a_device_on_another_node_is_asked_through_that_node(
    store: Store,
) -> None:
    here, there = FakeChannels(), FakeChannels({"dev-2": 4})
    clock = Clock()
    node_b = requester(store, there, clock)
    fleet = FakeFleet(where={"dev-2": "node-b"}, other=node_b)
    node_a = requester(store, here, clock, fleet=fleet)
    row = await ask(node_a, "dev-2")
    [(node, kind, args)] = fleet.commands
    assert (node, kind, args["device_id"]) == (
        "node-b",
        CommandKind.DATA_REQUEST,
        "dev-2",
    )
    [(device_id, sent)] = there.sent
    assert device_id == "dev-2"
    assert isinstance(sent, control.DataRequest)
    assert sent.request_id == row.request_id
    # A node that does not confirm: the user hears so, and the request is closed.
    fleet.other = None
    with pytest.raises(DataRequestUnavailable) as caught:
        await ask(node_a, "dev-2", kind="configuration")
    assert caught.value.reason == "other_node"
    # A message that is not a data request is not sent by the device's node.
    assert await node_b.carry_out(
        {
            "device_id": "dev-2",
            "message": control.encode(control.Heartbeat(seq=1)).decode(),
        }
    ) == {"outcome": "bad_message"}


async def test_retention_deletes_old_records(store: Store) -> None:
    clock = Clock()
    alarm = feed.Alarm(code="E1", severity="info", text="t", device_time=T0)
    store.add_feed_record(
        "dev-1", alarm, record_id="0" * 32, request_id=None, received_at=T0
    )
    clock.now = T0 + timedelta(days=31)
    store.add_feed_record(
        "dev-1", alarm, record_id="1" * 32, request_id=None, received_at=clock.now
    )
    req = requester(store, FakeChannels(), clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(req.run)
        await wait_until(
            lambda: len(store.list_feed_records("dev-1", kinds=["alarm"])) == 1
        )
        nursery.cancel_scope.cancel()
    [kept] = store.list_feed_records("dev-1", kinds=["alarm"])
    assert kept.record_id == "1" * 32


def _status(store: Store, request_id: str) -> str:
    row = store.get_data_request(request_id)
    assert row is not None
    return row.status
