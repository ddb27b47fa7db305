"""The broker's side of the monitoring feed: records in, acks out.

Theory of operation
===================
The device listener hands every :class:`~relay.proto.control.FeedRecord`,
:class:`~relay.proto.control.FeedStatus` and
:class:`~relay.proto.control.DataRequestRefused` of a control channel to one
:class:`FeedIntake` per broker, in the channel's order, and sends back the
:class:`~relay.proto.control.FeedAck` it returns.

A record is checked by :func:`relay.proto.feed.parse_record` (nothing from a
device is trusted), then stored in a worker thread; the ack says ``stored``
or ``duplicate`` only after the store's transaction committed, so
"acknowledged" always means "stored" and the agent may forget the record. A
record the store cannot take now gets ``retry`` (the agent keeps it and sends
it again later); a bad record gets ``rejected`` with the reason, is counted,
and is an audit event (a device sending what its agent should never have
taken is worth an auditor's look). None of these closes the channel: one bad
record costs that record only.

Request-only data stays request-only here too: a configuration or consumables
record must answer a request the store holds for this device and kind
(``unsolicited`` without a request id, ``unknown_request`` with a wrong one),
and a pushed kind may not claim to answer one.

The queue depths the agents report are kept per connected device and summed
into gauges when Prometheus scrapes (not at every record); a device's entry
goes when its channel does, so the gauges describe the devices on this node
now, with no label per device.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import trio

from relay.config import FeedConfig
from relay.metrics import RelayMetrics
from relay.proto import control, feed
from relay.store import Store, StoreError, UnknownDataRequest

__all__ = ["FeedIntake"]


class FeedIntake:
    """Stores what the devices' feeds deliver and answers each record.

    Args:
        store: Where records go.
        config: ``[feed]``: the record size limit.
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

    async def record(
        self, device_id: str, event: control.FeedRecord
    ) -> control.FeedAck:
        """Check and store one record; the ack to send back."""
        self._report(device_id, event.queue_depth, None)
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
        received_at = self.wall_clock()
        try:
            stored = await trio.to_thread.run_sync(
                lambda: self.store.add_feed_record(
                    device_id,
                    parsed,
                    record_id=event.record_id,
                    request_id=request_id,
                    received_at=received_at,
                ),
                abandon_on_cancel=True,
            )
        except UnknownDataRequest:
            return self._reject(
                device_id, event, "unknown_request", "no open request of this kind"
            )
        except StoreError as exc:
            # Not acknowledged as stored: the agent keeps it and sends it again.
            self.metrics.feed_store_failures.inc()
            self.metrics.store_errors.labels("feed_record").inc()
            self.log.error(
                "store.failed", operation="feed_record", error=str(exc)[:200]
            )
            return control.FeedAck(
                record_id=event.record_id, result="retry", reason="store_unavailable"
            )
        if not stored:
            self.metrics.feed_duplicates.inc()
            return control.FeedAck(
                record_id=event.record_id, result="duplicate", reason=""
            )
        self.metrics.feed_records.labels(kind).inc()
        if isinstance(parsed, feed.Alarm):
            self.metrics.feed_alarms.labels(parsed.severity).inc()
        if request_id is not None:
            self.metrics.feed_data_requests.labels("answered").inc()
            self.log.info(
                "feed.data_answered",
                device_id=device_id,
                request_id=request_id,
                kind=kind,
                record_id=event.record_id,
                audit=True,
            )
        return control.FeedAck(record_id=event.record_id, result="stored", reason="")

    def status(self, device_id: str, event: control.FeedStatus) -> None:
        """The agent reported its queue."""
        self._report(device_id, event.queue_depth, event.dropped)

    async def refused(self, device_id: str, event: control.DataRequestRefused) -> None:
        """The device refused a data request: record it, and say so in the log."""
        at = self.wall_clock()
        try:
            known = await trio.to_thread.run_sync(
                lambda: self.store.refuse_data_request(
                    event.request_id, device_id, refusal=event.reason, at=at
                ),
                abandon_on_cancel=True,
            )
        except StoreError as exc:
            self.metrics.store_errors.labels("feed_refusal").inc()
            self.log.error(
                "store.failed", operation="feed_refusal", error=str(exc)[:200]
            )
            known = False
        if known:
            self.metrics.feed_data_requests.labels("refused").inc()
        self.log.info(
            "feed.data_request_refused",
            device_id=device_id,
            request_id=event.request_id,
            reason=event.reason,
            detail=event.detail,
            known=known,
            audit=True,
        )

    def disconnected(self, device_id: str) -> None:
        """The device's channel is gone: its queue no longer counts here."""
        self._queues.pop(device_id, None)

    def _reject(
        self, device_id: str, event: control.FeedRecord, reason: str, detail: str
    ) -> control.FeedAck:
        self.metrics.feed_rejected.labels(reason).inc()
        self.log.warning(
            "feed.record_rejected",
            device_id=device_id,
            record_id=event.record_id,
            kind=event.kind,
            reason=reason,
            detail=detail,
            size=len(event.body),
            audit=True,
        )
        return control.FeedAck(
            record_id=event.record_id, result="rejected", reason=reason
        )

    def _report(self, device_id: str, depth: int, dropped: int | None) -> None:
        _, known_dropped = self._queues.get(device_id, (0, 0))
        self._queues[device_id] = (
            depth,
            known_dropped if dropped is None else dropped,
        )
