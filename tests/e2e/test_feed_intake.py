"""The broker's monitoring feed over a real control channel (TLS, WebSocket):
records stored once and acknowledged after the commit, bad records refused
with a reason while the channel stays up, request-only data refused unasked,
queue depths as gauges, and a device's refusal of a data request."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest
import structlog
import trio

from relay._trio.broker import BrokerPorts, serve_broker
from relay._trio.websocket import ConnectionClosed, WebSocketConnection
from relay.config import FeedConfig
from relay.metrics import RelayMetrics
from relay.proto import control
from relay.proto.control import (
    DataRequestRefused,
    FeedAck,
    FeedRecord,
    FeedStatus,
    Heartbeat,
    HeartbeatAck,
)
from relay.store import NewFeedRecord, Store
from tests.e2e.conftest import PKI, RunningBroker, wait_until
from tests.e2e.test_device_listener import open_device, say_hello

ALARM = {
    "code": "E101",
    "severity": "alarm",
    "text": "Product water resistivity below 10 MΩ·cm",
    "device_time": "2026-11-27T08:00:00+01:00",
}
CONSUMABLES = {
    "device_time": "2026-11-27T08:00:00+01:00",
    "items": [
        {
            "name": "final_filter",
            "part": "Final filter 0.22 µm",
            "remaining_percent": 41,
            "installed_on": "2026-06-01",
        }
    ],
}


def rid(n: int) -> str:
    return f"{n:032x}"


def record(
    n: int, body: object, *, kind: str = "alarm", request_id: str = ""
) -> FeedRecord:
    text = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    return FeedRecord(
        record_id=rid(n), kind=kind, body=text, request_id=request_id, queue_depth=3
    )


async def exchange(
    ws: WebSocketConnection, channel: control.ControlChannel, event: control.Event
) -> control.Event:
    await ws.send_message(channel.send(event))
    channel.receive_message(await ws.receive_message())
    answer = channel.next_event()
    assert isinstance(answer, control.Event)
    return answer


async def test_records_are_stored_once_and_bad_ones_refused_on_a_live_channel(
    broker: RunningBroker, pki: PKI
) -> None:
    device = pki.enroll("dev-feed")
    with structlog.testing.capture_logs() as events, trio.fail_after(20):
        async with open_device(broker, pki, device) as ws:
            channel = await say_hello(ws, "dev-feed")
            assert await exchange(ws, channel, record(1, ALARM)) == FeedAck(
                record_id=rid(1), result="stored", reason=""
            )
            # Sent again (its ack was lost): dropped by its key, acked all the same.
            assert await exchange(ws, channel, record(1, ALARM)) == FeedAck(
                record_id=rid(1), result="duplicate", reason=""
            )
            refusals = {
                "malformed": record(2, "{not json"),
                "bad_field": record(3, {**ALARM, "severity": "apocalyptic"}),
                "too_large": record(4, {**ALARM, "text": "x" * 20_000}),
                "unknown_kind": record(5, ALARM, kind="firmware"),
                "unsolicited": record(6, CONSUMABLES, kind="consumables"),
                "unknown_request": record(
                    7, CONSUMABLES, kind="consumables", request_id=rid(99)
                ),
            }
            for reason, bad in refusals.items():
                assert await exchange(ws, channel, bad) == FeedAck(
                    record_id=bad.record_id, result="rejected", reason=reason
                ), reason
            # The channel is still up and answering.
            assert await exchange(ws, channel, Heartbeat(seq=1)) == HeartbeatAck(seq=1)
            assert broker.sample("relay_feed_agent_queue_depth") == 3
            await ws.send_message(channel.send(FeedStatus(queue_depth=0, dropped=2)))
            await wait_until(
                lambda: broker.sample("relay_feed_agent_dropped_records") == 2
            )
            assert broker.sample("relay_feed_agent_queue_depth") == 0
            await ws.aclose()
    assert broker.sample("relay_feed_records_stored_total", kind="alarm") == 1
    assert broker.sample("relay_feed_alarms_received_total", severity="alarm") == 1
    assert broker.sample("relay_feed_records_duplicate_total") == 1
    for reason in refusals:
        assert broker.sample("relay_feed_records_rejected_total", reason=reason) == 1, (
            reason
        )
    # Every refusal is an audit event naming the device and the reason.
    rejected = [e for e in events if e["event"] == "feed.record_rejected"]
    assert sorted(e["reason"] for e in rejected) == sorted(refusals)
    assert all(e["audit"] and e["device_id"] == "dev-feed" for e in rejected)
    with pki.store() as store:
        [row] = store.list_feed_records("dev-feed", kinds=["alarm", "consumables"])
    assert (row.record_id, row.code, row.body["text"]) == (
        rid(1),
        "E101",
        ALARM["text"],
    )
    # Gone with its channel: a disconnected device's queue counts nowhere.
    await wait_until(lambda: broker.sample("relay_feed_agent_dropped_records") == 0)


async def test_a_requested_snapshot_is_taken_and_a_refusal_recorded(
    broker: RunningBroker, pki: PKI
) -> None:
    device = pki.enroll("dev-asked")
    with pki.store() as store:
        _ask(store, rid(50), "consumables")
        _ask(store, rid(51), "configuration")
    with trio.fail_after(20):
        async with open_device(broker, pki, device) as ws:
            channel = await say_hello(ws, "dev-asked")
            answer = record(8, CONSUMABLES, kind="consumables", request_id=rid(50))
            assert await exchange(ws, channel, answer) == FeedAck(
                record_id=rid(8), result="stored", reason=""
            )
            await ws.send_message(
                channel.send(
                    DataRequestRefused(
                        request_id=rid(51), reason="too_soon", detail="asked 10 s ago"
                    )
                )
            )
            with pki.store() as store:
                await wait_until(
                    lambda: _status(store, rid(51)) == ("refused", "too_soon")
                )
                assert _status(store, rid(50)) == ("answered", None)
            await ws.aclose()
    assert broker.sample("relay_feed_data_requests_total", outcome="answered") == 1
    assert broker.sample("relay_feed_data_requests_total", outcome="refused") == 1


async def test_an_old_agent_may_not_send_feed_messages(
    broker: RunningBroker, pki: PKI
) -> None:
    """On a version 3 channel a feed record is a protocol error (1002)."""
    device = pki.enroll("dev-old")
    with trio.fail_after(10):
        async with open_device(broker, pki, device) as ws:
            await say_hello(ws, "dev-old", version=3)
            await ws.send_message(control.encode(record(1, ALARM)))
            closed = await _closed(ws)
    assert closed == 1002
    with pki.store() as store:
        assert store.list_feed_records("dev-old", kinds=["alarm"]) == []


def _ask(store: Store, request_id: str, kind: str) -> None:
    store.create_data_request(
        request_id=request_id,
        device_id="dev-asked",
        kind=kind,
        requested_by="alice",
        reason="",
        at=datetime.now(UTC),
    )


def _status(store: Store, request_id: str) -> tuple[str, str | None]:
    row = store.get_data_request(request_id)
    assert row is not None
    return row.status, row.refusal


async def _closed(ws: WebSocketConnection) -> int:
    try:
        while True:
            await ws.receive_message()
    except ConnectionClosed as exc:
        return int(exc.code)


async def test_a_slow_store_holds_no_channel_and_a_full_queue_says_retry(
    pki: PKI, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the database takes its time, the channel still answers at once
    (a grant behind an instrument's backlog is not held up); records are
    acknowledged only once stored, and past the intake's bound the device
    hears `retry` (busy) instead of being made to wait."""
    release = threading.Event()
    blocked = threading.Event()
    original = Store.add_feed_records

    def slow(self: Store, records: Sequence[NewFeedRecord]) -> list[bool]:
        blocked.set()
        release.wait(20)
        return original(self, records)

    monkeypatch.setattr(Store, "add_feed_records", slow)
    config = dataclasses.replace(pki.config, feed=FeedConfig(intake_queue_records=100))
    shutdown, metrics = trio.Event(), RelayMetrics()
    ports: BrokerPorts = await nursery.start(
        lambda task_status: serve_broker(
            config, shutdown, metrics=metrics, task_status=task_status
        )
    )
    running = RunningBroker(ports, config, metrics, shutdown)
    device = pki.enroll("dev-backlog")
    try:
        with trio.fail_after(30):
            async with open_device(running, pki, device) as ws:
                channel = await say_hello(ws, "dev-backlog")
                await ws.send_message(channel.send(record(1, ALARM)))
                await trio.to_thread.run_sync(blocked.wait, 10)
                # The writer holds record 1 in the store; 100 more fill the
                # intake, the next one is turned back at once.
                for n in range(2, 103):
                    body = {**ALARM, "text": f"alarm {n}"}
                    await ws.send_message(channel.send(record(n, body)))
                assert await _next_ack(ws, channel) == FeedAck(
                    record_id=rid(102), result="retry", reason="busy"
                )
                # The channel answers while the records wait for the store.
                assert await exchange(ws, channel, Heartbeat(seq=5)) == HeartbeatAck(
                    seq=5
                )
                release.set()
                acks: dict[str, str] = {}
                while len(acks) < 101:
                    ack = await _next_ack(ws, channel)
                    acks[ack.record_id] = ack.result
                assert set(acks) == {rid(n) for n in range(1, 102)}
                assert set(acks.values()) == {"stored"}
                await ws.aclose()
    finally:
        release.set()
        shutdown.set()
    assert metrics.registry.get_sample_value("relay_feed_records_deferred_total") == 1
    with pki.store() as store:
        assert len(store.list_feed_records("dev-backlog", kinds=["alarm"])) == 101


async def _next_ack(
    ws: WebSocketConnection, channel: control.ControlChannel
) -> FeedAck:
    while True:
        channel.receive_message(await ws.receive_message())
        event = channel.next_event()
        if isinstance(event, FeedAck):
            return event


async def test_beyond_the_nodes_record_rate_the_device_hears_busy(
    pki: PKI, nursery: trio.Nursery
) -> None:
    """[feed] max_records_per_s: a burst of twice the rate is taken, the next
    record is turned back unparsed (retry, busy); an answer to a user's data
    request is not counted against it."""
    config = dataclasses.replace(pki.config, feed=FeedConfig(max_records_per_s=1.0))
    shutdown, metrics = trio.Event(), RelayMetrics()
    ports: BrokerPorts = await nursery.start(
        lambda task_status: serve_broker(
            config, shutdown, metrics=metrics, task_status=task_status
        )
    )
    running = RunningBroker(ports, config, metrics, shutdown)
    device = pki.enroll("dev-rate")
    with pki.store() as store:
        store.create_data_request(
            request_id=rid(60),
            device_id="dev-rate",
            kind="consumables",
            requested_by="alice",
            reason="",
            at=datetime.now(UTC),
        )
    try:
        with trio.fail_after(20):
            async with open_device(running, pki, device) as ws:
                channel = await say_hello(ws, "dev-rate")
                results = []
                for n in (1, 2, 3):
                    body = {**ALARM, "text": f"alarm {n}"}
                    ack = await exchange(ws, channel, record(n, body))
                    assert isinstance(ack, FeedAck)
                    results.append((ack.result, ack.reason))
                assert results == [("stored", ""), ("stored", ""), ("retry", "busy")]
                answer = record(4, CONSUMABLES, kind="consumables", request_id=rid(60))
                assert await exchange(ws, channel, answer) == FeedAck(
                    record_id=rid(4), result="stored", reason=""
                )
                await ws.aclose()
    finally:
        shutdown.set()
    assert metrics.registry.get_sample_value("relay_feed_records_deferred_total") == 1
