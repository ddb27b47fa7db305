"""The broker's side of the monitoring feed: records in, acks out.

Theory of operation
===================
The device listener hands every :class:`~relay.proto.control.FeedRecord`,
:class:`~relay.proto.control.FeedStatus` and
:class:`~relay.proto.control.DataRequestRefused` of a control channel to the
one :class:`FeedIntake` of the broker, and never waits for the database on
the way: the channel's receive loop must stay free for what matters more (a
grant, a deny, a session's end, heartbeats), whatever an instrument's backlog.

:meth:`FeedIntake.record` checks a record at once
(:func:`relay.proto.feed.parse_record`: nothing from a device is trusted). A
bad one is answered there and then, ``rejected`` with its reason, counted, and
logged as an audit event; the channel stays up. Before any of that, the
node's rate (``[feed] max_records_per_s``, a token bucket) is checked: a
record beyond it is answered ``retry`` (``busy``) unparsed, and the agent
pauses its feed for a while. Receiving, checking and storing a record costs
the broker milliseconds of CPU and the event loop's time; without the cap, a
node whose instruments all come back with a day's backlog would spend the
loop on records while a session's grant or an on-site End waits (measured in
bench/analysis.md). Answers to data requests are not counted: they are
rare, and a user waits for each. A good one joins the intake's
bounded queue, together with the function that sends on its channel; when the
queue is full the record is answered ``retry`` (``busy``) and the agent sends
it again later.

One writer task (:meth:`FeedIntake.run`) takes everything queued while its
last commit ran and writes it in one worker-thread call: the pushed records
of all channels in one transaction (group commit: one fsync for many
records), each answer to a data request in a transaction of its own (the
store checks the request), then the devices' refusals. Only then are the acks
sent: ``stored`` or ``duplicate`` (the unique key kept a resent record out),
so "acknowledged" always means "stored"; ``retry`` (``store_unavailable``)
when the store failed. Acks go out from short tasks, one per channel and
batch, so one device that does not read cannot hold up the others.

The writer has one worker thread of its own (a limiter of 1): a flood of
records uses one database connection and one thread, and every other store
call of the broker (logins, sessions) finds the rest free. Records that were
queued but not written when the broker stops were never acknowledged: the
agents send them again.

The queue depths the agents report are kept per connected device and summed
into gauges when Prometheus scrapes; a device's entry goes when its channel
does, so the gauges describe the devices on this node now, with no label per
device.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import trio

from auth.limits import RateLimit, TokenBucket
from relay._trio.websocket import ConnectionClosed
from relay.config import FeedConfig
from relay.metrics import RelayMetrics
from relay.proto import control, feed
from relay.store import NewFeedRecord, Store, StoreError, UnknownDataRequest

__all__ = ["FeedIntake"]

#: Sends one control message on the record's own channel.
Reply = Callable[[control.Event], Awaitable[None]]
#: Most records one transaction writes.
MAX_BATCH: Final = 500


@dataclass(frozen=True, slots=True)
class _Queued:
    """A checked record, or a device's refusal, waiting for the writer."""

    device_id: str
    reply: Reply | None
    record: feed.Record | None = None
    record_id: str = ""
    request_id: str | None = None
    refusal: control.DataRequestRefused | None = None


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What the writer's thread did with one queued item."""

    result: (
        str  # stored, duplicate, unknown_request, retry, refusal_known, refusal_unknown
    )
    error: str = ""


class FeedIntake:
    """Stores what the devices' feeds deliver and answers each record.

    Args:
        store: Where records go.
        config: ``[feed]``: the record size limit and the queue bound.
        metrics: Counters and the queue-depth gauges.
        log: The audit-capable logger.
        wall_clock: Arrival times.
    """

    def __init__(
        self,
        *,
        store: Store,
        config: FeedConfig,
        metrics: RelayMetrics,
        log: Any,
        wall_clock: Callable[[], datetime],
    ) -> None:
        self.store = store
        self.config = config
        self.metrics = metrics
        self.log = log
        self.wall_clock = wall_clock
        self._send, self._receive = trio.open_memory_channel[_Queued](
            config.intake_queue_records
        )
        self._limiter = trio.CapacityLimiter(1)
        self._bucket = TokenBucket(
            limit=RateLimit(
                per_minute=60 * config.max_records_per_s,
                burst=max(1, int(2 * config.max_records_per_s)),
            )
        )
        # device id -> (queue depth, dropped) as last reported, connected only.
        self._queues: dict[str, tuple[int, int]] = {}
        metrics.feed_queue_depth.set_function(
            lambda: sum(depth for depth, _ in self._queues.values())
        )
        metrics.feed_queue_depth_max.set_function(
            lambda: max((depth for depth, _ in self._queues.values()), default=0)
        )
        metrics.feed_agent_dropped.set_function(
            lambda: sum(dropped for _, dropped in self._queues.values())
        )

    # The channel's side: never waits for the store -------------------------------

    def record(
        self, device_id: str, event: control.FeedRecord, reply: Reply
    ) -> control.FeedAck | None:
        """Take one record from a channel.

        Returns:
            The ack to send now (the record is refused, or the queue is
            full), or ``None``: it is queued, and *reply* gets the ack after
            the commit.
        """
        self._report(device_id, event.queue_depth, None)
        if not event.request_id and self._bucket.check(now=trio.current_time()) > 0:
            self.metrics.feed_deferred.inc()
            return control.FeedAck(
                record_id=event.record_id, result="retry", reason="busy"
            )
        try:
            parsed = feed.parse_record(
                event.kind, event.body, max_bytes=self.config.max_record_bytes
            )
        except feed.RecordRejected as exc:
            return self._reject(device_id, event, exc.reason, exc.detail)
        kind = feed.kind_of(parsed)
        request_id = event.request_id or None
        if kind in feed.REQUESTED_KINDS and request_id is None:
            return self._reject(
                device_id, event, "unsolicited", f"{kind} is sent only when asked"
            )
        if kind in feed.PUSHED_KINDS and request_id is not None:
            return self._reject(
                device_id, event, "bad_field", f"{kind} answers no request"
            )
        queued = _Queued(
            device_id=device_id,
            reply=reply,
            record=parsed,
            record_id=event.record_id,
            request_id=request_id,
        )
        try:
            self._send.send_nowait(queued)
        except trio.WouldBlock:
            self.metrics.feed_deferred.inc()
            return control.FeedAck(
                record_id=event.record_id, result="retry", reason="busy"
            )
        return None

    def status(self, device_id: str, event: control.FeedStatus) -> None:
        """The agent reported its queue."""
        self._report(device_id, event.queue_depth, event.dropped)

    def refused(self, device_id: str, event: control.DataRequestRefused) -> None:
        """The device refused a data request: recorded by the writer."""
        try:
            self._send.send_nowait(
                _Queued(device_id=device_id, reply=None, refusal=event)
            )
        except trio.WouldBlock:
            # The request lapses instead; the refusal is still in the log.
            self.log.warning(
                "feed.refusal_not_recorded",
                device_id=device_id,
                request_id=event.request_id,
                reason=event.reason,
            )

    def disconnected(self, device_id: str) -> None:
        """The device's channel is gone: its queue no longer counts here."""
        self._queues.pop(device_id, None)

    # The writer ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Write what the channels queue, and send the acks, until cancelled."""
        async with trio.open_nursery() as acks:
            task_status.started()
            async for first in self._receive:
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                received_at = self.wall_clock()
                outcomes = await trio.to_thread.run_sync(
                    self._write, batch, received_at, limiter=self._limiter
                )
                replies: dict[Reply, list[control.FeedAck]] = defaultdict(list)
                for item, outcome in zip(batch, outcomes, strict=True):
                    ack = self._account(item, outcome)
                    if ack is not None and item.reply is not None:
                        replies[item.reply].append(ack)
                for reply, answers in replies.items():
                    acks.start_soon(_send_all, reply, answers)

    def _write(self, batch: Sequence[_Queued], received_at: datetime) -> list[_Outcome]:
        """One worker-thread call: the batch's pushed records in one
        transaction, then each answer and each refusal in its own."""
        outcomes: dict[int, _Outcome] = {}
        pushed = [
            (i, item.record)
            for i, item in enumerate(batch)
            if item.record is not None and item.request_id is None
        ]
        new_records = [
            NewFeedRecord(
                device_id=batch[i].device_id,
                record=record,
                record_id=batch[i].record_id,
                received_at=received_at,
            )
            for i, record in pushed
        ]
        try:
            stored = self.store.add_feed_records(new_records) if new_records else []
            for (i, _), new in zip(pushed, stored, strict=True):
                outcomes[i] = _Outcome("stored" if new else "duplicate")
        except StoreError as exc:
            for i, _ in pushed:
                outcomes[i] = _Outcome("retry", str(exc)[:200])
        for i, item in enumerate(batch):
            if i in outcomes:
                continue
            outcomes[i] = self._write_one(item, received_at)
        return [outcomes[i] for i in range(len(batch))]

    def _write_one(self, item: _Queued, received_at: datetime) -> _Outcome:
        try:
            if item.refusal is not None:
                known = self.store.refuse_data_request(
                    item.refusal.request_id,
                    item.device_id,
                    refusal=item.refusal.reason,
                    at=received_at,
                )
                return _Outcome("refusal_known" if known else "refusal_unknown")
            assert item.record is not None  # noqa: S101 - a queued item is one or the other
            new = self.store.add_feed_record(
                item.device_id,
                item.record,
                record_id=item.record_id,
                request_id=item.request_id,
                received_at=received_at,
            )
            return _Outcome("stored" if new else "duplicate")
        except UnknownDataRequest:
            return _Outcome("unknown_request")
        except StoreError as exc:
            return _Outcome("retry", str(exc)[:200])

    def _account(self, item: _Queued, outcome: _Outcome) -> control.FeedAck | None:
        """Metrics and log lines for one outcome; the ack to send, if any."""
        if item.refusal is not None:
            self._account_refusal(item, outcome)
            return None
        assert item.record is not None  # noqa: S101 - a queued item is one or the other
        record_id = item.record_id
        if outcome.result == "retry":
            self.metrics.feed_store_failures.inc()
            self.metrics.store_errors.labels("feed_record").inc()
            self.log.error("store.failed", operation="feed_record", error=outcome.error)
            return control.FeedAck(
                record_id=record_id, result="retry", reason="store_unavailable"
            )
        if outcome.result == "unknown_request":
            self.metrics.feed_rejected.labels("unknown_request").inc()
            self._log_rejection(
                item.device_id,
                record_id,
                feed.kind_of(item.record),
                "unknown_request",
                "no open request of this kind",
            )
            return control.FeedAck(
                record_id=record_id, result="rejected", reason="unknown_request"
            )
        if outcome.result == "duplicate":
            self.metrics.feed_duplicates.inc()
            return control.FeedAck(record_id=record_id, result="duplicate", reason="")
        kind = feed.kind_of(item.record)
        self.metrics.feed_records.labels(kind).inc()
        if isinstance(item.record, feed.Alarm):
            self.metrics.feed_alarms.labels(item.record.severity).inc()
        if item.request_id is not None:
            self.metrics.feed_data_requests.labels("answered").inc()
            self.log.info(
                "feed.data_answered",
                device_id=item.device_id,
                request_id=item.request_id,
                kind=kind,
                record_id=record_id,
                audit=True,
            )
        return control.FeedAck(record_id=record_id, result="stored", reason="")

    def _account_refusal(self, item: _Queued, outcome: _Outcome) -> None:
        refusal = item.refusal
        assert refusal is not None  # noqa: S101 - the caller checked
        if outcome.result == "retry":
            self.metrics.store_errors.labels("feed_refusal").inc()
            self.log.error(
                "store.failed", operation="feed_refusal", error=outcome.error
            )
        known = outcome.result == "refusal_known"
        if known:
            self.metrics.feed_data_requests.labels("refused").inc()
        self.log.info(
            "feed.data_request_refused",
            device_id=item.device_id,
            request_id=refusal.request_id,
            reason=refusal.reason,
            detail=refusal.detail,
            known=known,
            audit=True,
        )

    def _reject(
        self, device_id: str, event: control.FeedRecord, reason: str, detail: str
    ) -> control.FeedAck:
        self.metrics.feed_rejected.labels(reason).inc()
        self._log_rejection(
            device_id, event.record_id, event.kind, reason, detail, size=len(event.body)
        )
        return control.FeedAck(
            record_id=event.record_id, result="rejected", reason=reason
        )

    def _log_rejection(
        self,
        device_id: str,
        record_id: str,
        kind: str,
        reason: str,
        detail: str,
        *,
        size: int | None = None,
    ) -> None:
        self.log.warning(
            "feed.record_rejected",
            device_id=device_id,
            record_id=record_id,
            kind=kind,
            reason=reason,
            detail=detail,
            size=size,
            audit=True,
        )

    def _report(self, device_id: str, depth: int, dropped: int | None) -> None:
        _, known_dropped = self._queues.get(device_id, (0, 0))
        self._queues[device_id] = (
            depth,
            known_dropped if dropped is None else dropped,
        )


async def _send_all(reply: Reply, acks: Sequence[control.FeedAck]) -> None:
    """Send one channel's acks of a batch; a channel that closed gets none
    (its agent sends those records again on its next channel)."""
    try:
        for ack in acks:
            await reply(ack)
    except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
        return
