"""Requests for request-only data (configuration, consumables), and the feed's upkeep.

Theory of operation
===================
An instrument sends its configuration and consumables only when a user asks
(docs/monitoring.md). :meth:`DataRequester.request` is the only place that
asks: it runs for an authorised user's API call, records the request in the
store (``pending``), writes the audit event ``feed.data_requested`` (who, which
device, what, why, from where), and sends a
:class:`~relay.proto.control.DataRequest` naming the user on the device's
control channel. Nothing in the broker asks on its own: there is no timer, no
retry and no "refresh" that sends one.

The device's channel may be on this node or, in a cluster, on another: then
the request goes to that node as a ``data_request`` node command, which
hands it to its own channel and confirms (the answer comes back through the
shared store, like every record). A device that is offline, or whose agent
predates the feed (protocol < 4), is told to the user at once and the request
is recorded as refused (``undelivered``) so that nobody waits for it.

The device answers with a record carrying the request id (taken by
:class:`~relay._trio.feed_intake.FeedIntake`), or refuses. A request still
pending after ``request_timeout_s`` is marked ``lapsed`` by :meth:`run`,
which also deletes records and requests older than ``retention_days``.

While a request of one kind is pending for a device, asking again returns it
instead of sending another: a user pressing "request now" twice makes one
request.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

import trio

from relay.config import FeedConfig
from relay.metrics import RelayMetrics
from relay.proto import control, feed
from relay.proto.errors import RemoteProtocolError
from relay.proto.node_command import CommandKind
from relay.store import DataRequestRow, Store, StoreError

__all__ = ["DataRequestUnavailable", "DataRequester"]

_T = TypeVar("_T")


class DataRequestUnavailable(Exception):
    """The request cannot be made now.

    Attributes:
        reason: ``offline`` (the device has no control channel),
            ``agent_too_old`` (its agent predates the feed), ``store_unavailable``
            or ``other_node`` (its node did not confirm).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Channels(Protocol):
    """The device listener, as far as requests need it."""

    def control_version(self, device_id: str) -> int | None: ...

    def control_certificate(self, device_id: str) -> tuple[int, Any] | None: ...

    async def send_control(
        self, device_id: str, connection_id: int, event: control.Event
    ) -> bool: ...


class _Fleet(Protocol):
    """The cluster node, as far as requests need it."""

    @property
    def node_id(self) -> str: ...

    async def device_node(self, device_id: str) -> str | None: ...

    async def send(
        self, node_id: str, kind: CommandKind, args: Mapping[str, str] | None = None
    ) -> Mapping[str, str]: ...


class DataRequester:
    """Asks devices for request-only data on behalf of users.

    Args:
        store: Where requests are recorded.
        channels: This node's device listener.
        config: ``[feed]``: the answer timeout and the retention.
        metrics: ``relay_feed_data_requests_total``.
        log: The audit-capable logger.
        wall_clock: Request times.
        fleet: The cluster node, or ``None`` on a single node.
    """

    def __init__(
        self,
        *,
        store: Store,
        channels: _Channels,
        config: FeedConfig,
        metrics: RelayMetrics,
        log: Any,
        wall_clock: Callable[[], datetime],
        fleet: _Fleet | None = None,
    ) -> None:
        self.store = store
        self.channels = channels
        self.config = config
        self.metrics = metrics
        self.log = log
        self.wall_clock = wall_clock
        self.fleet = fleet

    async def request(
        self,
        *,
        device_id: str,
        kind: str,
        username: str,
        role_text: str,
        reason: str,
        source: str,
    ) -> DataRequestRow:
        """Ask *device_id* for *kind* on behalf of *username*.

        Returns:
            The request, ``pending`` (or the one already pending of that kind).

        Raises:
            ValueError: *kind* is not request-only.
            DataRequestUnavailable: The device cannot be asked now.
        """
        if kind not in feed.REQUESTED_KINDS:
            raise ValueError(f"kind must be one of {feed.REQUESTED_KINDS}")
        now = self.wall_clock()
        pending = await self._store_call(
            lambda: self.store.pending_data_request(device_id, kind)
        )
        timeout = timedelta(seconds=self.config.request_timeout_s)
        if pending is not None and now - pending.requested_at < timeout:
            return pending
        row = await self._store_call(
            lambda: self.store.create_data_request(
                request_id=secrets.token_hex(16),
                device_id=device_id,
                kind=kind,
                requested_by=username,
                reason=reason,
                at=now,
            )
        )
        self.log.info(
            "feed.data_requested",
            device_id=device_id,
            request_id=row.request_id,
            kind=kind,
            requested_by=username,
            reason=row.reason,
            source=source,
            audit=True,
        )
        message = control.DataRequest(
            request_id=row.request_id,
            kind=kind,
            requested_by=username,
            requester_role=role_text[:64],
            reason=row.reason,
        )
        outcome = await self._deliver(device_id, message)
        if outcome != "sent":
            # Closed at once, so nobody waits for an answer that cannot come
            # (if the store fails here too, the request lapses instead).
            with contextlib.suppress(DataRequestUnavailable):
                await self._store_call(
                    lambda: self.store.refuse_data_request(
                        row.request_id, device_id, refusal="undelivered", at=now
                    )
                )
            self.metrics.feed_data_requests.labels(outcome).inc()
            self.log.info(
                "feed.data_request_undelivered",
                device_id=device_id,
                request_id=row.request_id,
                outcome=outcome,
                audit=True,
            )
            raise DataRequestUnavailable(outcome, _WORDING[outcome])
        self.metrics.feed_data_requests.labels("sent").inc()
        return row

    async def deliver_here(self, device_id: str, message: control.DataRequest) -> str:
        """Send *message* on this node's channel of *device_id*.

        Returns:
            ``sent``, ``offline`` or ``agent_too_old``.
        """
        version = self.channels.control_version(device_id)
        held = self.channels.control_certificate(device_id)
        if version is None or held is None:
            return "offline"
        if version < control.DataRequest.SINCE_VERSION:
            return "agent_too_old"
        sent = await self.channels.send_control(device_id, held[0], message)
        return "sent" if sent else "offline"

    async def carry_out(self, args: Mapping[str, str]) -> Mapping[str, str]:
        """A ``data_request`` node command from the node the user is on."""
        try:
            message = control.decode(args["message"].encode())
        except RemoteProtocolError:
            return {"outcome": "bad_message"}
        if not isinstance(message, control.DataRequest):
            return {"outcome": "bad_message"}
        return {"outcome": await self.deliver_here(args["device_id"], message)}

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Lapse unanswered requests and apply the retention, until cancelled."""
        task_status.started()
        every_s = min(5.0, self.config.request_timeout_s / 4)
        next_purge = trio.current_time()
        while True:
            await self._lapse()
            if trio.current_time() >= next_purge:
                await self._purge()
                next_purge = trio.current_time() + self.config.retention_check_s
            await trio.sleep(every_s)

    async def _deliver(self, device_id: str, message: control.DataRequest) -> str:
        outcome = await self.deliver_here(device_id, message)
        if outcome != "offline" or self.fleet is None:
            return outcome
        try:
            node = await self.fleet.device_node(device_id)
            if node is None or node == self.fleet.node_id:
                return "offline"
            result = await self.fleet.send(
                node,
                CommandKind.DATA_REQUEST,
                {
                    "device_id": device_id,
                    "message": control.encode(message).decode(),
                },
            )
        except Exception as exc:
            self.log.warning(
                "feed.data_request_not_confirmed",
                device_id=device_id,
                error=str(exc)[:200],
            )
            return "other_node"
        outcome = result.get("outcome", "other_node")
        return outcome if outcome in _WORDING or outcome == "sent" else "other_node"

    async def _lapse(self) -> None:
        now = self.wall_clock()
        before = now - timedelta(seconds=self.config.request_timeout_s)
        try:
            lapsed = await trio.to_thread.run_sync(
                lambda: self.store.lapse_data_requests(requested_before=before, at=now),
                abandon_on_cancel=True,
            )
        except StoreError as exc:
            self.metrics.store_errors.labels("feed_lapse").inc()
            self.log.error("store.failed", operation="feed_lapse", error=str(exc)[:200])
            return
        for row in lapsed:
            self.metrics.feed_data_requests.labels("lapsed").inc()
            self.log.info(
                "feed.data_request_lapsed",
                device_id=row.device_id,
                request_id=row.request_id,
                kind=row.kind,
                requested_by=row.requested_by,
                audit=True,
            )

    async def _purge(self) -> None:
        before = self.wall_clock() - timedelta(days=self.config.retention_days)
        try:
            deleted = await trio.to_thread.run_sync(
                lambda: self.store.purge_feed(before=before), abandon_on_cancel=True
            )
        except StoreError as exc:
            self.metrics.store_errors.labels("feed_purge").inc()
            self.log.error("store.failed", operation="feed_purge", error=str(exc)[:200])
            return
        if deleted:
            self.log.info(
                "feed.retention_applied",
                records_deleted=deleted,
                before=before.isoformat(),
                audit=True,
            )

    async def _store_call(self, call: Callable[[], _T]) -> _T:
        try:
            return await trio.to_thread.run_sync(call, abandon_on_cancel=True)
        except StoreError as exc:
            self.metrics.store_errors.labels("feed_request").inc()
            self.log.error(
                "store.failed", operation="feed_request", error=str(exc)[:200]
            )
            self.metrics.feed_data_requests.labels("store_unavailable").inc()
            raise DataRequestUnavailable(
                "store_unavailable", "the database cannot be reached; try again"
            ) from exc


_WORDING = {
    "offline": "the instrument is not connected; ask again when it is online",
    "agent_too_old": "the instrument's agent predates the monitoring feed",
    "other_node": "the broker node that holds the instrument did not confirm",
}
