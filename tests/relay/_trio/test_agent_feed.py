"""The agent's monitoring feed (relay._trio.agent_feed) against a fake channel.

Most tests drive :class:`AgentFeed` directly: ``run_channel`` gets a fake
``send`` (a memory channel the test reads as the broker), and the test hands
broker messages to ``handle`` as the agent's receive loop would. One test runs
the real agent (``run_agent``) against the fake broker of test_agent_sessions,
over TLS on loopback, to check the wiring.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import trio

import auth
from relay._trio.agent import AgentSettings, AgentStatus, run_agent
from relay._trio.agent_feed import AgentFeed, make_agent_feed
from relay._trio.agent_sessions import DeviceIdentity, SessionRuntime
from relay._trio.agent_ui import serve_agent_ui
from relay._trio.websocket import WebSocketConnection
from relay.agent_queue import AgentQueue, canonical_body
from relay.config import AgentConfig, ListenAddress, WebSocketLimits
from relay.feed_spool import FeedSpool
from relay.proto import control, feed
from relay.simulated_instrument import (
    configuration_snapshot,
    consumables_snapshot,
    write_record,
    write_snapshot,
)
from tests.relay._trio.test_agent_sessions import (
    LOOPBACK,
    Device,
    FakeBroker,
    agent_config,
    device,
)

__all__ = ["device"]  # the fixture, imported for the wiring test


def seeded(seed: int) -> random.Random:
    """Repeatable simulated readings (not secrets)."""
    return random.Random(seed)  # noqa: S311 - a seeded generator on purpose


T0 = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)


def alarm(n: int) -> feed.Alarm:
    return feed.Alarm(
        code=f"E{n:03d}",
        severity="alarm",
        text=f"alarm {n}",
        device_time=T0 + timedelta(minutes=n),
    )


def request(kind: str = "configuration", by: str = "alice") -> control.DataRequest:
    return control.DataRequest(
        request_id=secrets.token_hex(16),
        kind=kind,
        requested_by=by,
        requester_role="engineer, Example Service",
        reason="ticket 4711",
    )


class FakeClock:
    """The request interval's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    """An AgentFeed on a temporary spool and queue, and the broker's view of it."""

    feed: AgentFeed
    queue: AgentQueue
    spool: FeedSpool
    clock: FakeClock

    def enqueue_alarms(self, count: int, start: int = 0) -> list[str]:
        ids = []
        for n in range(start, start + count):
            intake = self.queue.enqueue("alarm", canonical_body(alarm(n)))
            assert intake.record is not None
            ids.append(intake.record.record_id)
        return ids

    @asynccontextmanager
    async def channel(self, version: int = 4) -> AsyncIterator[Broker]:
        """One open channel: run_channel until the block ends (the channel drops)."""
        send, receive = trio.open_memory_channel[control.Event](1000)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.feed.run_channel, send.send, version)
            yield Broker(receive, self.feed)
            nursery.cancel_scope.cancel()


@dataclass
class Broker:
    """What the broker sees on one channel; acks go to the feed's handle()."""

    received: trio.MemoryReceiveChannel[control.Event]
    feed: AgentFeed

    async def next(self, timeout_s: float = 5.0) -> control.Event:
        with trio.fail_after(timeout_s):
            return await self.received.receive()

    async def records(self, count: int) -> list[control.FeedRecord]:
        records: list[control.FeedRecord] = []
        while len(records) < count:
            event = await self.next()
            if isinstance(event, control.FeedRecord):
                records.append(event)
        return records

    async def quiet(self, seconds: float = 0.2) -> list[control.Event]:
        """Everything sent within *seconds* (real time; the feed is idle by then)."""
        events: list[control.Event] = []
        with trio.move_on_after(seconds):
            while True:
                events.append(await self.received.receive())
        return events

    def ack(self, record_id: str, result: str = "stored", reason: str = "") -> None:
        self.feed.handle(
            control.FeedAck(record_id=record_id, result=result, reason=reason)
        )


@pytest.fixture
def make_harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    made: list[AgentQueue] = []

    def make(**changes: object) -> Harness:
        config = dataclasses.replace(
            AgentConfig(feed_window=4, feed_retry_s=60.0, feed_queue_max_records=100),
            **changes,  # type: ignore[arg-type]
        )
        spool = FeedSpool(tmp_path / "feed", max_record_bytes=16 * 1024)
        spool.create()
        queue = AgentQueue(tmp_path / "q.sqlite3", max_records=100)
        made.append(queue)
        clock = FakeClock()
        agent_feed = AgentFeed(config=config, spool=spool, queue=queue, clock=clock)
        return Harness(feed=agent_feed, queue=queue, spool=spool, clock=clock)

    yield make
    for queue in made:
        queue.close()


# Delivery ------------------------------------------------------------------------


async def test_queued_records_are_delivered_in_order_within_the_window(
    make_harness: Callable[..., Harness],
) -> None:
    """Records queued offline all go out when a channel opens: status first, in order,
    never more than feed_window unacknowledged, each acked one never again; the
    drained queue is reported."""
    h = make_harness(feed_window=3)
    ids = h.enqueue_alarms(7)
    async with h.channel() as broker:
        status = await broker.next()
        assert status == control.FeedStatus(queue_depth=7, dropped=0)
        delivered: list[str] = []
        for batch_size in (3, 3, 1):
            batch = await broker.records(batch_size)
            # The window: nothing more comes until an ack makes room.
            assert not [
                e for e in await broker.quiet(0.1) if isinstance(e, control.FeedRecord)
            ]
            delivered += [r.record_id for r in batch]
            for record in batch:
                assert record.request_id == ""
                broker.ack(record.record_id)
        assert delivered == ids
        # The last ack drains the queue: a fresh status says so.
        tail = await broker.next()
        assert tail == control.FeedStatus(queue_depth=0, dropped=0)
        assert not await broker.quiet()
    assert h.queue.depth() == 0


async def test_window_is_respected(make_harness: Callable[..., Harness]) -> None:
    """With feed_window 2 and no ack, exactly two records are sent."""
    h = make_harness(feed_window=2)
    h.enqueue_alarms(5)
    async with h.channel() as broker:
        await broker.next()  # status
        events = await broker.quiet(0.3)
    assert len([e for e in events if isinstance(e, control.FeedRecord)]) == 2


async def test_a_record_whose_ack_was_lost_is_resent_on_the_next_channel(
    make_harness: Callable[..., Harness],
) -> None:
    """Unacknowledged records go again on the next channel with the same key;
    acknowledged ones do not."""
    h = make_harness()
    ids = h.enqueue_alarms(3)
    async with h.channel() as broker:
        await broker.next()
        first = await broker.records(3)
        broker.ack(first[0].record_id)
        await trio.sleep(0.1)  # the ack is applied; the others' acks are lost
    async with h.channel() as broker:
        assert await broker.next() == control.FeedStatus(queue_depth=2, dropped=0)
        again = await broker.records(2)
    assert [r.record_id for r in again] == ids[1:]
    assert [r.body for r in again] == [r.body for r in first[1:]]


async def test_retry_is_honoured(make_harness: Callable[..., Harness]) -> None:
    """An ack 'retry' makes the record go again after feed_retry_s, not before."""
    h = make_harness(feed_retry_s=0.5)
    (record_id,) = h.enqueue_alarms(1)
    async with h.channel() as broker:
        await broker.next()
        (_first,) = await broker.records(1)
        broker.ack(record_id, "retry", "store_unavailable")
        started = trio.current_time()
        (second,) = await broker.records(1)
        assert trio.current_time() - started >= 0.45
        assert second.record_id == record_id
        broker.ack(record_id)
        assert await broker.next() == control.FeedStatus(queue_depth=0, dropped=0)
    assert h.queue.depth() == 0


async def test_a_busy_broker_pauses_the_whole_feed(
    make_harness: Callable[..., Harness],
) -> None:
    """'retry' with reason busy (the node is at its record rate) stops every
    pushed record, not only that one, for at least half of feed_retry_s."""
    h = make_harness(feed_retry_s=0.6, feed_window=2)
    first, second, third = h.enqueue_alarms(3)
    async with h.channel() as broker:
        await broker.next()
        sent = await broker.records(2)
        assert [r.record_id for r in sent] == [first, second]
        broker.ack(first, "retry", "busy")
        broker.ack(second)  # room in the window, but the broker is busy
        started = trio.current_time()
        assert not [
            e for e in await broker.quiet(0.25) if isinstance(e, control.FeedRecord)
        ]
        resumed = await broker.records(2)
        assert trio.current_time() - started >= 0.29
        assert {r.record_id for r in resumed} == {first, third}
        broker.ack(first)
        broker.ack(third)
        assert await broker.next() == control.FeedStatus(queue_depth=0, dropped=0)


async def test_a_rejected_record_is_forgotten(
    make_harness: Callable[..., Harness],
) -> None:
    """An ack 'rejected' removes the record for good (it would never be taken)."""
    h = make_harness()
    (record_id,) = h.enqueue_alarms(1)
    async with h.channel() as broker:
        await broker.next()
        await broker.records(1)
        broker.ack(record_id, "rejected", "bad_field")
        assert await broker.next() == control.FeedStatus(queue_depth=0, dropped=0)
        assert not await broker.quiet()


async def test_a_version_3_channel_gets_no_feed_messages(
    make_harness: Callable[..., Harness],
) -> None:
    """An older broker gets nothing from the feed; the records stay queued."""
    h = make_harness()
    h.enqueue_alarms(2)
    async with h.channel(version=3) as broker:
        assert not await broker.quiet(0.3)
    assert h.queue.depth() == 2


async def test_the_scanner_feeds_the_queue_and_the_channel(
    make_harness: Callable[..., Harness],
) -> None:
    """An outbox file written while a channel is up is queued and sent; the file goes."""
    h = make_harness(feed_scan_s=0.05)
    async with trio.open_nursery() as nursery, h.channel() as broker:
        await nursery.start(h.feed.run)
        assert await broker.next() == control.FeedStatus(queue_depth=0, dropped=0)
        write_record(h.spool.root, alarm(1), "now")
        (record,) = await broker.records(1)
        assert record.kind == "alarm"
        assert feed.parse_record("alarm", record.body, max_bytes=16384) == alarm(1)
        assert not list(h.spool.outbox.glob("*.json"))
        nursery.cancel_scope.cancel()


async def test_a_failing_queue_keeps_the_file_and_the_agent_running(
    make_harness: Callable[..., Harness],
) -> None:
    """A queue that cannot commit (here: closed) leaves the outbox file for the
    next scan; the scan reports it instead of raising."""
    h = make_harness()
    write_record(h.spool.root, alarm(1), "kept")
    h.queue.close()
    assert await h.feed.scan_once() is False
    assert (h.spool.outbox / "kept.alarm.json").exists()


async def test_the_summary_alarm_reaches_the_broker(
    make_harness: Callable[..., Harness], tmp_path: Path
) -> None:
    """Alarms collapsed by a full queue arrive as one RC-QUEUE-FULL alarm; the
    status counts the drops."""
    h = make_harness()
    queue = AgentQueue(tmp_path / "small.sqlite3", max_records=3)
    h.feed.queue = queue
    for n in range(5):
        queue.enqueue("alarm", canonical_body(alarm(n)))
    async with h.channel() as broker:
        assert await broker.next() == control.FeedStatus(queue_depth=3, dropped=3)
        records = await broker.records(3)
    summary = feed.parse_record("alarm", records[0].body, max_bytes=16384)
    assert isinstance(summary, feed.Alarm)
    assert summary.code == "RC-QUEUE-FULL"
    assert "3 alarms were dropped" in summary.text
    queue.close()


# Data requests -------------------------------------------------------------------


async def refusal(broker: Broker, req: control.DataRequest) -> control.Event:
    broker.feed.handle(req)
    event = await broker.next()
    assert isinstance(event, control.DataRequestRefused)
    assert event.request_id == req.request_id
    return event


async def test_a_request_without_a_user_is_refused(
    make_harness: Callable[..., Harness],
) -> None:
    """An unsolicited pull (no named user) is refused: no_requester."""
    h = make_harness()
    write_snapshot(h.spool.root, configuration_snapshot(T0))
    async with h.channel() as broker:
        await broker.next()
        refused = await refusal(broker, request(by=""))
        assert isinstance(refused, control.DataRequestRefused)
        assert refused.reason == "no_requester"
        assert not await broker.quiet()
    assert h.queue.depth() == 0
    (note,) = h.feed.recent_requests()
    assert note["outcome"] == "refused"
    assert note["refusal"] == "no_requester"


async def test_a_kind_the_owner_disabled_is_refused(
    make_harness: Callable[..., Harness],
) -> None:
    """Configuration not in feed_request_kinds, or a pushed kind, is refused: kind_disabled."""
    h = make_harness(feed_request_kinds=("consumables",))
    write_snapshot(h.spool.root, configuration_snapshot(T0))
    async with h.channel() as broker:
        await broker.next()
        for kind in ("configuration", "alarm", "daily_stats"):
            refused = await refusal(broker, request(kind))
            assert isinstance(refused, control.DataRequestRefused)
            assert refused.reason == "kind_disabled"
        assert not await broker.quiet()
    assert h.queue.depth() == 0


async def test_nothing_is_given_out_when_no_kind_is_enabled(
    make_harness: Callable[..., Harness],
) -> None:
    """An owner who enabled nothing has every request refused."""
    h = make_harness(feed_request_kinds=())
    write_snapshot(h.spool.root, consumables_snapshot(T0, seeded(1)))
    async with h.channel() as broker:
        await broker.next()
        refused = await refusal(broker, request("consumables"))
        assert isinstance(refused, control.DataRequestRefused)
        assert refused.reason == "kind_disabled"


async def test_an_accepted_request_is_answered_with_the_snapshot(
    make_harness: Callable[..., Harness],
) -> None:
    """The answer is a feed_record with the request's id and the snapshot, ahead
    of the backlog; the device page lists who asked."""
    h = make_harness(feed_window=1)
    h.enqueue_alarms(3)
    snapshot = configuration_snapshot(T0)
    write_snapshot(h.spool.root, snapshot)
    req = request()
    async with h.channel() as broker:
        await broker.next()
        (first,) = await broker.records(1)  # the backlog's first, in flight
        h.feed.handle(req)
        await trio.sleep(0.1)  # the answer is queued
        broker.ack(first.record_id)
        (answer,) = await broker.records(1)
    assert answer.request_id == req.request_id
    assert answer.kind == "configuration"
    assert feed.parse_record("configuration", answer.body, max_bytes=16384) == snapshot
    (note,) = h.feed.recent_requests()
    assert note["outcome"] == "answered"
    assert note["requested_by"] == "alice"
    assert note["kind"] == "configuration"


async def test_a_request_too_soon_after_an_answered_one_is_refused(
    make_harness: Callable[..., Harness],
) -> None:
    """Within feed_request_min_interval_s of an answer, the same kind is refused
    (too_soon); another kind, or later, is answered."""
    h = make_harness(feed_request_min_interval_s=60.0)
    write_snapshot(h.spool.root, configuration_snapshot(T0))
    write_snapshot(h.spool.root, consumables_snapshot(T0, seeded(1)))
    async with h.channel() as broker:
        await broker.next()
        h.feed.handle(request())
        (answer,) = await broker.records(1)
        h.clock.now += 59
        refused = await refusal(broker, request())
        assert isinstance(refused, control.DataRequestRefused)
        assert refused.reason == "too_soon"
        h.feed.handle(request("consumables"))
        (other,) = await broker.records(1)
        assert other.kind == "consumables"
        h.clock.now += 2
        h.feed.handle(request())
        (later,) = await broker.records(1)
        assert later.kind == "configuration"
    outcomes = [n["outcome"] for n in h.feed.recent_requests()]
    assert outcomes == ["answered", "answered", "refused", "answered"]  # newest first
    assert answer.request_id != later.request_id


async def test_two_requests_at_once_answer_only_one(
    make_harness: Callable[..., Harness],
) -> None:
    """A second request of a kind being answered is too soon: no burst of reads."""
    h = make_harness(feed_request_min_interval_s=0.0)
    write_snapshot(h.spool.root, configuration_snapshot(T0))
    first, second = request(), request()
    async with h.channel() as broker:
        await broker.next()
        h.feed.handle(first)
        h.feed.handle(second)
        events = [await broker.next(), await broker.next()]
    refused = [e for e in events if isinstance(e, control.DataRequestRefused)]
    answers = [e for e in events if isinstance(e, control.FeedRecord)]
    assert [r.request_id for r in refused] == [second.request_id]
    assert refused[0].reason == "too_soon"
    assert [a.request_id for a in answers] == [first.request_id]


async def test_missing_and_bad_snapshots_are_refused(
    make_harness: Callable[..., Harness],
) -> None:
    """No snapshot file: no_data; one that fails the check: bad_snapshot."""
    h = make_harness(feed_request_min_interval_s=0.0)
    async with h.channel() as broker:
        await broker.next()
        missing = await refusal(broker, request())
        assert isinstance(missing, control.DataRequestRefused)
        assert missing.reason == "no_data"
        h.spool.snapshot_path("configuration").write_text(
            json.dumps({"device_time": "now", "parameters": []})
        )
        bad = await refusal(broker, request())
        assert isinstance(bad, control.DataRequestRefused)
        assert bad.reason == "bad_snapshot"
    assert h.queue.depth() == 0


# Wiring --------------------------------------------------------------------------


@pytest.mark.slow
async def test_the_agent_carries_the_feed_over_its_control_channel(
    device: Device, nursery: trio.Nursery
) -> None:
    """run_agent with a feed: status and records reach the broker; its acks empty
    the queue; a data request is answered on the same channel."""
    broker = FakeBroker(device)
    port = await nursery.start(broker.serve)
    config = agent_config(feed_scan_s=0.05)
    agent_feed = make_agent_feed(device.agent_dir.root, config)
    write_record(agent_feed.spool.root, alarm(1), "first")
    write_snapshot(agent_feed.spool.root, configuration_snapshot(T0))
    await nursery.start(agent_feed.run)
    settings = AgentSettings(
        broker_url=f"wss://{LOOPBACK}:{port}",
        agent_dir=device.agent_dir.root,
        ca_file=device.ca_file,
        limits=config,
        websocket=WebSocketLimits(ping_interval_s=0.5, close_timeout_s=1.0),
    )
    nursery.start_soon(
        lambda: run_agent(
            settings,
            status=AgentStatus(),
            rng=random.Random(1),  # noqa: S311 - repeatable jitter
            feed=agent_feed,
        )
    )
    events: list[control.Event] = []
    while not any(isinstance(e, control.FeedRecord) for e in events):
        events.append(await broker.next_event())
    record = next(e for e in events if isinstance(e, control.FeedRecord))
    assert isinstance(events[0], control.FeedStatus)
    assert record.kind == "alarm"
    await broker.send(
        control.FeedAck(record_id=record.record_id, result="stored", reason="")
    )
    assert await broker.next_event() == control.FeedStatus(queue_depth=0, dropped=0)
    req = request()
    await broker.send(req)
    answer = await broker.next_event()
    assert isinstance(answer, control.FeedRecord)
    assert answer.request_id == req.request_id
    assert date.fromisoformat(json.loads(answer.body)["device_time"][:10]) == T0.date()


@pytest.mark.slow
async def test_the_device_page_lists_recent_data_requests(
    make_harness: Callable[..., Harness], nursery: trio.Nursery
) -> None:
    """/api/state carries the recent requests (who, what, when, the answer) and
    the page has the place that lists them."""
    h = make_harness(feed_request_kinds=("configuration",))
    key = auth.generate_private_key()

    def no_tunnel(
        _session_id: str, _tunnel_url: str | None
    ) -> AbstractAsyncContextManager[WebSocketConnection]:
        raise AssertionError("no tunnel here")

    runtime = SessionRuntime(
        config=AgentConfig(shell_command=("/bin/sh",)),
        load_identity=lambda: DeviceIdentity(device_id="dev-ui", private_key=key),
        open_tunnel=no_tunnel,
    )
    await nursery.start(runtime.run)
    port = await nursery.start(
        functools.partial(serve_agent_ui, data_requests=h.feed.recent_requests),
        runtime,
        ListenAddress(host="127.0.0.1", port=0),
    )
    h.feed.handle(request("consumables", by="bob"))  # refused at once: disabled
    h.feed.handle(request(by=""))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        state = (await client.get("/api/state")).json()
        page = (await client.get("/")).text
    requests = state["data_requests"]
    assert [r["requested_by"] for r in requests] == ["", "bob"]
    assert requests[0]["outcome"] == "refused"
    assert requests[0]["words"] == "refused: the request named no user"
    assert requests[1]["kind"] == "consumables"
    assert requests[1]["refusal"] == "kind_disabled"
    assert datetime.fromisoformat(requests[1]["at"]).tzinfo is not None
    assert 'id="data-requests-list"' in page
    nursery.cancel_scope.cancel()
