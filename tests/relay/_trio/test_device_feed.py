"""DeviceFeed: one reader for every listener, only while anybody listens; and the
event feed handler that sends it."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from relay._trio.device_feed import DeviceFeed
from relay._trio.engineer_ws import events_handler
from relay.log import get_logger
from relay.metrics import RelayMetrics
from relay.proto.close import CloseCode
from relay.store import StoreError


class FakeStore:
    """Device lists to hand out, and a count of reads."""

    def __init__(self) -> None:
        self.devices: list[dict[str, Any]] = [{"device_id": "dev-1"}]
        self.reads = 0
        self.failing = False

    async def read(self) -> list[dict[str, Any]]:
        self.reads += 1
        if self.failing:
            raise StoreError("database is locked")
        return list(self.devices)


def _feed(store: FakeStore, metrics: RelayMetrics | None = None) -> DeviceFeed:
    return DeviceFeed(
        read=store.read,
        interval_s=1.0,
        metrics=metrics or RelayMetrics(),
        log=get_logger("test"),
    )


async def test_no_listener_no_reads(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Without a listener the feed sleeps; the first listener wakes it."""
    store = FakeStore()
    feed = _feed(store)
    await nursery.start(feed.run)
    await trio.sleep(60)
    assert store.reads == 0
    with feed.listening():
        version, devices = await feed.newer_than(0)
    assert (version, devices) == (1, [{"device_id": "dev-1"}])
    reads = store.reads
    await trio.sleep(60)
    assert store.reads <= reads + 1  # at most the read that was already due


async def test_unchanged_list_is_not_published_again(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A new version only when the list changed; many listeners, one read per interval."""
    store = FakeStore()
    feed = _feed(store)
    await nursery.start(feed.run)
    with feed.listening(), feed.listening():
        version, _ = await feed.newer_than(0)
        await trio.sleep(10.5)
        assert 10 <= store.reads <= 12
        with trio.move_on_after(5):
            await feed.newer_than(version)
            raise AssertionError("an unchanged list was published")
        store.devices.append({"device_id": "dev-2"})
        newer, devices = await feed.newer_than(version)
    assert newer == version + 1
    assert [d["device_id"] for d in devices] == ["dev-1", "dev-2"]


async def test_slow_listener_gets_the_newest_list_not_a_backlog(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """Versions published while a listener was busy are skipped, not queued."""
    store = FakeStore()
    feed = _feed(store)
    await nursery.start(feed.run)
    with feed.listening():
        version, _ = await feed.newer_than(0)
        for n in range(5):
            store.devices = [{"device_id": f"dev-{n}"}]
            await trio.sleep(2.0)  # two read intervals: each list is seen
        latest, devices = await feed.newer_than(version)
    assert latest == version + 5
    assert devices == [{"device_id": "dev-4"}]


async def test_store_failure_is_counted_and_the_feed_goes_on(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A failed read is a metric and a log line; the next good read is published."""
    store = FakeStore()
    store.failing = True
    metrics = RelayMetrics()
    feed = _feed(store, metrics)
    await nursery.start(feed.run)
    with feed.listening():
        await trio.sleep(2.5)
        failures = metrics.registry.get_sample_value(
            "relay_store_errors_total", {"operation": "device_feed"}
        )
        assert failures is not None
        assert failures >= 2
        store.failing = False
        version, devices = await feed.newer_than(0)
    assert (version, devices) == (1, [{"device_id": "dev-1"}])


class StalledSocket:
    """A client that never reads: every send blocks; it never sends anything."""

    def __init__(self) -> None:
        self.sends = 0

    async def send_text(self, _text: str) -> None:
        self.sends += 1
        await trio.sleep_forever()

    async def receive(self) -> dict[str, Any]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def test_events_socket_of_a_client_that_does_not_read_is_closed(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A send not taken within websocket_send_timeout_s ends the socket with 1008."""
    feed = _feed(FakeStore())
    await nursery.start(feed.run)
    handler = events_handler(feed, send_timeout_s=10.0)
    socket = StalledSocket()
    started = trio.current_time()
    close = await handler(socket, None, None)  # type: ignore[arg-type]
    assert close == (CloseCode.POLICY_VIOLATION, "client too slow")
    assert trio.current_time() - started == pytest.approx(10.0)
    assert socket.sends == 1
