"""The monitoring feed, agent side: spool to queue, queue to broker, data requests.

Theory of operation
===================
:class:`AgentFeed` outlives the control-channel attempts, as
:class:`~relay._trio.agent_sessions.SessionRuntime` does. It has two kinds of
task:

* :meth:`AgentFeed.run`, for the agent's lifetime: every ``feed_scan_s`` it
  takes the instrument's outbox files (:mod:`relay.feed_spool`) into the
  on-disk queue (:mod:`relay.agent_queue`). Records queue whether or not a
  channel is up.
* :meth:`AgentFeed.run_channel`, once per open control channel of protocol
  version 4 or later (an older broker does not know the feed: records stay
  queued for a newer one). It sends ``feed_status`` at once; then the queued
  records in order (answers to data requests first), at most ``feed_window``
  not yet acknowledged; and ``feed_status`` again each time the queue drains.

The channel's receive loop hands :class:`~relay.proto.control.FeedAck` and
:class:`~relay.proto.control.DataRequest` to :meth:`AgentFeed.handle`, which
never blocks: it notes them, and the channel task does the work (SQLite and
file reads happen in worker threads). Acks:

* ``stored``, ``duplicate``: the record leaves the queue;
* ``rejected``: it leaves too, and the refusal is logged (the broker will
  never take it; sending it again would loop);
* ``retry``: it is sent again after ``feed_retry_s``; a record that got no ack
  at all is sent again after ``feed_retry_s`` too.

Records unacknowledged when a channel ends are sent again on the next one with
the same key; the broker drops what it already stored. Delivery is at least
once, with duplicates removed by the key: in effect, once.

Data requests: request-only data stays request-only. A request is refused
(``data_request_refused``) when it names no user (``no_requester``), asks for a
kind the owner did not enable in ``feed_request_kinds`` or that is not
request-only (``kind_disabled``), comes less than
``feed_request_min_interval_s`` after an answered request of that kind, or
while one of that kind is being answered (``too_soon``), finds no snapshot
(``no_data``) or a snapshot that fails the record check (``bad_snapshot``).
An accepted request is answered with the snapshot as a ``feed_record`` that
carries the ``request_id``: queued like every record (it survives a lost
channel), sent ahead of the backlog. Every request, answered or refused, is
logged and kept in a short list that the device's local page shows
(:meth:`AgentFeed.recent_requests`), so the person at the instrument sees who
read what.

Local rules: one channel task at a time (the agent has one channel at a
time; a new channel starts with nothing in flight); the queue is used by one
worker thread at a time (``_db_lock``); what ``handle`` notes is bounded (acks
by the window and :data:`MAX_PENDING_REQUESTS`, requests and refusals by
:data:`MAX_PENDING_REQUESTS`); the request interval follows ``clock``, resends
follow trio's clock.
"""

from __future__ import annotations

import collections
import random
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Final

import trio

from relay._trio.websocket import ConnectionClosed
from relay.agent_queue import AgentQueue, Intake, QueuedRecord, canonical_body
from relay.config import AgentConfig
from relay.feed_spool import FeedSpool, SnapshotUnavailable, Taken
from relay.log import get_logger
from relay.proto import control, feed

__all__ = [
    "FEED_EVENTS",
    "MAX_PENDING_REQUESTS",
    "RECENT_REQUESTS",
    "AgentFeed",
    "DataRequestNote",
    "make_agent_feed",
]

#: The control messages the agent hands to :meth:`AgentFeed.handle`.
FEED_EVENTS: Final = (control.FeedAck, control.DataRequest)
#: Data requests (and refusals to send) noted and not yet dealt with, at most;
#: more are dropped with a log line (the broker lets them lapse).
MAX_PENDING_REQUESTS: Final = 32
#: Data requests the device page lists.
RECENT_REQUESTS: Final = 10
#: The file name of the queue in the agent directory.
QUEUE_FILE: Final = "feed-queue.sqlite3"

ControlSender = Callable[[control.Event], Awaitable[None]]

_REFUSAL_WORDS: Final = {
    "no_requester": "refused: the request named no user",
    "kind_disabled": "refused: not enabled on this instrument",
    "too_soon": "refused: asked again too soon",
    "no_data": "refused: the instrument has no such data",
    "bad_snapshot": "refused: the instrument's data did not pass the check",
    "busy": "refused: too many requests at once",
}


@dataclass(frozen=True, slots=True)
class DataRequestNote:
    """One data request as the device page shows it."""

    at: datetime
    kind: str
    requested_by: str
    requester_role: str
    reason: str
    outcome: str  # "answered" or "refused"
    refusal: str = ""  # the reason code when refused

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(timespec="seconds"),
            "kind": self.kind,
            "requested_by": self.requested_by,
            "requester_role": self.requester_role,
            "reason": self.reason,
            "outcome": self.outcome,
            "refusal": self.refusal,
            "words": "answered"
            if self.outcome == "answered"
            else _REFUSAL_WORDS.get(self.refusal, f"refused: {self.refusal}"),
        }


class AgentFeed:
    """The agent's monitoring feed; one per agent, shared by its attempts.

    Args:
        config: The ``feed_*`` settings.
        spool: The spool directory.
        queue: The on-disk queue (this object closes it in :meth:`run`'s end).
        log: Structured logger.
        clock: Monotonic seconds for ``feed_request_min_interval_s``
            (``trio.current_time``; tests pass their own). Resends after
            ``feed_retry_s`` always follow trio's clock: they are deadlines.
        wall_clock: The time shown on the device page for a request.

    Attributes:
        records_sent: Feed records sent so far, resends included.
    """

    def __init__(
        self,
        *,
        config: AgentConfig,
        spool: FeedSpool,
        queue: AgentQueue,
        log: Any = None,
        clock: Callable[[], float] = trio.current_time,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.config = config
        self.spool = spool
        self.queue = queue
        self._log = log if log is not None else get_logger("agent.feed")
        self._clock = clock
        self._wall_clock = wall_clock
        self._db_lock = trio.Lock()
        self._wake = trio.Event()
        # Noted by handle(), worked off by the channel task.
        self._acks: collections.deque[control.FeedAck] = collections.deque()
        self._requests: collections.deque[control.DataRequest] = collections.deque()
        self._refusals: collections.deque[control.DataRequestRefused] = (
            collections.deque()
        )
        # The kinds being answered now, and when each was last answered.
        self._answering: set[str] = set()
        self._answered_at: dict[str, float] = {}
        self._recent: collections.deque[DataRequestNote] = collections.deque(
            maxlen=RECENT_REQUESTS
        )
        # record_id -> when to send it again (sent, no final ack yet). Reset
        # for each channel: what the last one had in flight is sent again.
        self._in_flight: dict[str, float] = {}
        # Until when the broker said it is busy: no pushed record goes before.
        self._busy_until = 0.0
        self.records_sent = 0

    # Lifetime task: the spool ------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Take outbox files into the queue every ``feed_scan_s``, until cancelled.

        Resource handling:
            Closes the queue when it ends.
        Cancellation:
            A file being taken is finished first (the worker thread is not
            abandoned), so a record is never half-queued.
        """
        await trio.to_thread.run_sync(self.spool.create)
        task_status.started()
        try:
            while True:
                more = await self.scan_once()
                if not more:
                    await trio.sleep(self.config.feed_scan_s)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                async with self._db_lock:
                    await trio.to_thread.run_sync(self.queue.close)

    async def scan_once(self) -> bool:
        """Take the outbox files once; whether more wait than one pass takes."""
        async with self._db_lock:
            in_flight = frozenset(self._in_flight)
            intakes: list[Intake] = []

            def accept(record: feed.Record) -> None:
                intakes.append(
                    self.queue.enqueue(
                        feed.kind_of(record),
                        canonical_body(record),
                        in_flight=in_flight,
                    )
                )

            try:
                taken: Taken = await trio.to_thread.run_sync(
                    self.spool.take_outbox, accept
                )
            except (OSError, sqlite3.Error) as exc:
                # A full disk or a broken spool must not stop the agent (its
                # sessions matter more): the files stay, the next scan retries.
                self._log.error("feed.intake_failed", detail=str(exc))
                return False
        for refused in taken.refused:
            self._log.warning(
                "feed.record_refused_locally",
                file=refused.name,
                reason=refused.reason,
                detail=refused.detail,
                moved_to=str(self.spool.rejected),
            )
        for intake in intakes:
            self._log_drops(intake)
        if taken.accepted:
            self._log.info("feed.records_queued", count=taken.accepted)
            self._poke()
        return taken.more

    # Per-channel task ---------------------------------------------------------------

    async def run_channel(self, send: ControlSender, version: int) -> None:
        """Send the feed on one open channel until cancelled (the channel ended).

        Args:
            send: Sends one control message on this channel.
            version: The channel's protocol version; below 4 nothing is sent
                and records stay queued.

        Cancellation:
            Safe at any point: a record sent and not acknowledged stays queued
            and is sent again on the next channel.

        A closed channel ends this quietly: the channel's receive loop sees
        the close and reports it. A queue that fails (a full disk) pauses the
        feed for ``feed_retry_s``, then it starts over on the same channel;
        it never ends the channel, which sessions need.
        """
        while True:
            try:
                await self._run_channel(send, version)
                return
            except ConnectionClosed:
                return
            except sqlite3.Error as exc:
                self._log.error("feed.queue_failed", detail=str(exc))
                await trio.sleep(self.config.feed_retry_s)

    async def _run_channel(self, send: ControlSender, version: int) -> None:
        if version < control.FeedRecord.SINCE_VERSION:
            self._log.info(
                "feed.channel_too_old", version=version, queued=await self._depth()
            )
            return
        self._in_flight = {}
        depth = await self._depth()
        await send(control.FeedStatus(queue_depth=depth, dropped=await self._dropped()))
        reported_empty = depth == 0
        while True:
            # A fresh event before the work, so a poke during it is not lost.
            wake = self._wake = trio.Event()
            await self._apply_acks()
            await self._answer_requests()
            while self._refusals:
                await send(self._refusals.popleft())
            await self._send_due(send)
            depth = await self._depth()
            if depth == 0 and not reported_empty:
                await send(
                    control.FeedStatus(queue_depth=0, dropped=await self._dropped())
                )
            reported_empty = depth == 0
            deadline = min(self._in_flight.values(), default=float("inf"))
            if self._busy_until > trio.current_time():
                deadline = min(deadline, self._busy_until)
            with trio.move_on_at(deadline):
                await wake.wait()

    def handle(self, event: control.FeedAck | control.DataRequest) -> None:
        """Note a feed message from the broker; never blocks."""
        if isinstance(event, control.FeedAck):
            if event.record_id in self._in_flight:
                self._acks.append(event)
            elif (
                event.result != "retry"
                and len(self._acks) < self.config.feed_window + MAX_PENDING_REQUESTS
            ):
                # Not in flight on this channel (it was acked twice, or sent on
                # the last one): a final ack still says the broker has it.
                self._acks.append(event)
        else:
            self._note_request(event)
        self._poke()

    def recent_requests(self) -> list[dict[str, Any]]:
        """The last data requests, newest first, for the device page."""
        return [note.to_json() for note in reversed(self._recent)]

    # Internals -----------------------------------------------------------------------

    def _poke(self) -> None:
        self._wake.set()

    async def _depth(self) -> int:
        async with self._db_lock:
            return await trio.to_thread.run_sync(self.queue.depth)

    async def _dropped(self) -> int:
        async with self._db_lock:
            return await trio.to_thread.run_sync(lambda: self.queue.dropped)

    async def _apply_acks(self) -> None:
        while self._acks:
            ack = self._acks.popleft()
            if ack.result == "retry":
                if ack.reason == "busy":
                    # The broker is at its rate: the whole feed pauses (a
                    # jittered share of feed_retry_s), not just this record,
                    # so that a fleet back from an outage does not keep the
                    # broker busy with records it can only turn back.
                    self._busy_until = (
                        trio.current_time()
                        + self.config.feed_retry_s
                        * (
                            0.5 + 0.5 * random.random()  # noqa: S311 - jitter, not a secret
                        )
                    )
                if ack.record_id in self._in_flight:
                    self._in_flight[ack.record_id] = max(
                        trio.current_time() + self.config.feed_retry_s,
                        self._busy_until,
                    )
                    self._log.info(
                        "feed.record_retry", record_id=ack.record_id, reason=ack.reason
                    )
                continue
            self._in_flight.pop(ack.record_id, None)
            async with self._db_lock:
                await trio.to_thread.run_sync(self.queue.remove, ack.record_id)
            if ack.result == "rejected":
                self._log.warning(
                    "feed.record_rejected_by_broker",
                    record_id=ack.record_id,
                    reason=ack.reason,
                )

    async def _send_due(self, send: ControlSender) -> None:
        now = trio.current_time()
        busy = now < self._busy_until
        # Records whose ack did not come (or said retry) in time go again.
        for record_id, due in list(self._in_flight.items()):
            if due <= now and not busy:
                await self._resend(send, record_id)
        room = self.config.feed_window - len(self._in_flight)
        if room <= 0:
            return
        async with self._db_lock:
            records = await trio.to_thread.run_sync(
                partial(
                    self.queue.next_records, room, exclude=frozenset(self._in_flight)
                )
            )
            depth = await trio.to_thread.run_sync(self.queue.depth)
        for record in records:
            # While the broker is busy only answers to requests go (a user
            # waits for them; the broker does not count them).
            if not busy or record.request_id:
                await self._send_record(send, record, depth)

    async def _resend(self, send: ControlSender, record_id: str) -> None:
        async with self._db_lock:
            record = await trio.to_thread.run_sync(self.queue.get, record_id)
            depth = await trio.to_thread.run_sync(self.queue.depth)
        if record is None:
            # Gone from the queue (a final ack came after all): nothing to send.
            self._in_flight.pop(record_id, None)
            return
        self._log.info("feed.record_resent", record_id=record_id)
        await self._send_record(send, record, depth)

    async def _send_record(
        self, send: ControlSender, record: QueuedRecord, depth: int
    ) -> None:
        # In flight before the send: the ack may come before send() returns.
        self._in_flight[record.record_id] = (
            trio.current_time() + self.config.feed_retry_s
        )
        await send(
            control.FeedRecord(
                record_id=record.record_id,
                kind=record.kind,
                body=record.body,
                request_id=record.request_id,
                queue_depth=depth,
            )
        )
        self.records_sent += 1

    def _note_request(self, request: control.DataRequest) -> None:
        """Refuse at once what needs no file; note the rest for the channel task."""
        reason, detail = self._screen(request)
        if not reason and len(self._requests) >= MAX_PENDING_REQUESTS:
            reason, detail = "busy", "too many requests wait"
        if reason:
            self._refuse(request, reason, detail)
            return
        self._answering.add(request.kind)
        self._requests.append(request)

    def _screen(self, request: control.DataRequest) -> tuple[str, str]:
        if not request.requested_by.strip():
            return "no_requester", "a data request must name the user who asks"
        if (
            request.kind not in feed.REQUESTED_KINDS
            or request.kind not in self.config.feed_request_kinds
        ):
            return (
                "kind_disabled",
                f"{request.kind!r} is not given out by this instrument",
            )
        last = self._answered_at.get(request.kind)
        interval = self.config.feed_request_min_interval_s
        if request.kind in self._answering or (
            last is not None and self._clock() - last < interval
        ):
            return (
                "too_soon",
                f"at most one {request.kind} request every {interval:g} s",
            )
        return "", ""

    def _refuse(self, request: control.DataRequest, reason: str, detail: str) -> None:
        self._log.warning(
            "feed.data_request_refused",
            request_id=request.request_id,
            kind=request.kind,
            requested_by=request.requested_by,
            requester_role=request.requester_role,
            reason=reason,
            detail=detail,
        )
        self._note(request, "refused", reason)
        if len(self._refusals) >= MAX_PENDING_REQUESTS:
            return  # a flood: the broker lets the rest lapse
        self._refusals.append(
            control.DataRequestRefused(
                request_id=request.request_id, reason=reason, detail=detail[:200]
            )
        )

    def _note(self, request: control.DataRequest, outcome: str, refusal: str) -> None:
        self._recent.append(
            DataRequestNote(
                at=self._wall_clock(),
                kind=request.kind,
                requested_by=request.requested_by,
                requester_role=request.requester_role,
                reason=request.reason,
                outcome=outcome,
                refusal=refusal,
            )
        )

    async def _answer_requests(self) -> None:
        while self._requests:
            request = self._requests.popleft()
            try:
                await self._answer(request)
            finally:
                self._answering.discard(request.kind)

    async def _answer(self, request: control.DataRequest) -> None:
        try:
            record = await trio.to_thread.run_sync(
                self.spool.read_snapshot, request.kind
            )
        except SnapshotUnavailable as exc:
            self._refuse(request, exc.reason, exc.detail)
            return
        async with self._db_lock:
            intake = await trio.to_thread.run_sync(
                partial(
                    self.queue.enqueue,
                    request.kind,
                    canonical_body(record),
                    request_id=request.request_id,
                    in_flight=frozenset(self._in_flight),
                )
            )
        self._log_drops(intake)
        self._answered_at[request.kind] = self._clock()
        self._log.info(
            "feed.data_request_answered",
            request_id=request.request_id,
            kind=request.kind,
            requested_by=request.requested_by,
            requester_role=request.requester_role,
            reason=request.reason,
        )
        self._note(request, "answered", "")

    def _log_drops(self, intake: Intake) -> None:
        if intake.dropped_kinds:
            self._log.warning(
                "feed.queue_full",
                dropped=len(intake.dropped_kinds),
                kinds=sorted(set(intake.dropped_kinds)),
                max_records=self.queue.max_records,
            )


def make_agent_feed(
    agent_dir: Path, config: AgentConfig, *, log: Any = None
) -> AgentFeed:
    """The feed of an agent in *agent_dir* (start its ``run``).

    The spool is ``feed_dir``, or ``feed/`` in the agent directory; the queue
    is :data:`QUEUE_FILE` in the agent directory.
    """
    spool = FeedSpool(
        config.feed_dir if config.feed_dir is not None else agent_dir / "feed",
        max_record_bytes=config.feed_max_record_bytes,
    )
    queue = AgentQueue(
        agent_dir / QUEUE_FILE, max_records=config.feed_queue_max_records
    )
    return AgentFeed(config=config, spool=spool, queue=queue, log=log)
