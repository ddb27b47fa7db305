"""The broker side of remote sessions: offers, grants, the two legs, the relay.

Theory of operation
===================
:class:`SessionBroker` is the trio shell around :class:`relay.proto.session.Session`.
It holds the live sessions by id, at most one pending or active session per device,
and runs each one in a task of its own with **one nursery per session**: the
driver (this task) and the relay pumps of both legs live in it, so when a session
is over and its nursery exits, no task of it is left.

The driver owns the state machine. Everything that happens to a session (a
control message from the device, a leg that attaches or drops, an engineer's or
admin's DELETE, a login that ends, a revocation, shutdown) is posted to the
session's inbox with :meth:`_post` (never blocks), and only the driver calls
``Session.handle``; it sleeps until the inbox has something or the machine's
next deadline comes (then it feeds a ``Tick``), and acts on the outputs in order.
Time: ``now_ms`` is trio's monotonic clock anchored once to the wall clock
(:class:`SessionClock`), so a wall-clock step neither stretches nor cuts a cap.

Flow: :meth:`request` checks policy and that the device is connected and idle,
then starts the session task, which sends the ``Offer`` on the device's control
channel (through :class:`DeviceControl`, implemented by the device listener) and
feeds ``OfferSent`` before the request returns. The device answers on its
control channel; the listener hands ``Grant``, ``Deny`` and ``SessionEnded`` to
:meth:`device_message`. A ``Grant`` is verified with
:func:`relay.proto.receipts.verify_grant` against the certificate the control
channel authenticated (never one named in a message, Invariant 6); the granted
channels narrow the session's :class:`~relay.proto.tunnel.StreamTable`.

Legs: the device opens ``/v1/device/tunnel/{id}`` (the listener asks
:meth:`admit_tunnel` before it answers the upgrade, then runs
:meth:`serve_tunnel`), the engineer opens the attach socket (the route asks
:meth:`admit_attach`, then runs :meth:`serve_attach`). A leg's handler task owns
its socket; it posts the attach to the driver, waits until its leg is released
(the session ended, or its own leg dropped) and then closes the socket with 4005
SESSION_ENDED and the end reason. The pumps, in the session's nursery, read one
leg, check every frame with the session's one ``StreamTable`` (Rule 1 of the
tunnel module: checked in full before relayed), count DATA payload bytes, and
send the unchanged message on the other leg. A pump holds the first message it
reads until the session is paired (ACTIVE): no byte flows before that
(Invariant 1).

Decisions (see also docs/architecture.md):

- A grant whose receipt does not verify (forged, another offer's nonce,
  channels or cap beyond the offer) counts as no grant: the session ends as
  ``denied``, the refusal is an audit event ``session.grant_rejected`` with the
  receipt's reason, and the device gets ``SessionEnd(denied)`` (it believes it
  granted, so it must close whatever it opened).
- A malformed or rule-breaking tunnel frame is a protocol error of the leg that
  sent it: that leg is treated as gone, so the session ends with
  ``engineer_disconnect`` or ``device_disconnect``.
- A tunnel closed by the device with 4005 "onsite" is the on-site End (the
  device closes its tunnel before it sends ``SessionEnded``): reason ``onsite``;
  4005 "device_shutdown" is the agent stopping (SIGTERM) in the same order.
  Any other loss of the tunnel, or of the control channel the session's offer
  went out on, is ``device_disconnect``.
- Login ended: the engineer's socket is closed by the socket registry with 4004
  (log in again) after the broker sent ``{"type": "end", "reason":
  "login_ended"}``; the device side gets ``SessionEnd(login_ended)`` and 4005.
- The device learns of warnings from its own timer (the control protocol has no
  warning message; its cap timer runs even when the broker is unreachable); the
  engineer gets ``{"type": "warning", "seconds_left", "minutes_left"}`` at the
  instants of ``SessionConfig.warning_seconds``.
- After a granted session ends, the driver waits up to
  :data:`END_RECEIPT_WAIT_S` for the device's ``SessionEnded`` and logs its byte
  counts beside the broker's own (``session.end_receipt``); then the session is
  dropped. A short summary of the last :data:`ENDED_KEPT` ended sessions stays for
  ``GET /api/v1/sessions/{id}`` (a dict, no task, socket or buffer).
- Late end receipts: a device cut off at the end (a partition outlasting the
  keepalives) sends its receipt when it is back, minutes later. For that the
  broker keeps, for the last :data:`ENDED_RECEIPTS_KEPT` granted sessions, what
  the on-time path verifies against (device id, nonce, the certificate the
  session was granted under) and whether the receipt is recorded
  (:class:`_EndedSession`, in memory: a restarted broker, or another node of a
  cluster, does not know the session and refuses the receipt as unexpected). A
  late receipt of the same device's session is verified as an on-time one,
  logged ``session.end_receipt`` with ``late: true`` and kept with the session;
  one naming another device's session or an unknown one is
  ``session.unexpected_device_message`` as before. Late receipts are handled one
  at a time by one task (:meth:`_serve_late`) from a bounded queue; a full
  queue drops the receipt (the device sends it again on its next channel).
- End receipt acks (``end_receipt_ack``, control protocol version 2; the
  device listener sends it only on a channel that speaks version 2): the
  agent keeps a receipt until it is acked. The broker acks a receipt it
  recorded, on time or late; a duplicate of one it recorded (not recorded
  twice); and one of the device's own known session that does not verify
  (``session.end_receipt_rejected``): it never will, and an agent that kept
  sending it would only fill the log. It does not ack a receipt it refused
  without verifying (unknown session, another device's, or one that came
  unasked while the session was live), so the agent tries again on its next
  channel. An ack goes to the device's live control channel.
- The device may grant a shorter cap than offered (its signed receipt says so);
  the broker then times that shorter cap as well.
- Sessions across nodes (:mod:`relay._trio.cross_node`): when the device's
  control channel is on another node, the request claims it there (after the
  fleet lock) and the session runs here as any other, with
  ``_Live.control_node`` naming that node: its control messages go through
  the other node (the offer as an ``OfferWithTunnel`` naming this node's
  device address), the device's answers come back through
  :meth:`remote_device_message`, the channel's loss through
  :meth:`remote_control_lost`, and the other node's death ends it with
  ``broker_crash`` (:meth:`node_lost`). Acks of its end receipts are sent at
  once by the driver, before the claim is given back in ``_forget``.

Rule 1: only the driver calls ``Session.handle``.
Rule 2: no frame is relayed before the machine said Pair, and every frame is
checked by the session's table first.
Rule 3: every await in a ``finally`` is shielded and bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from starlette.websockets import WebSocket

import auth
from auth.limits import RateLimit, TokenBucket
from policies import Decision
from relay import __version__
from relay._trio.cross_node import Claim, ClaimRefused
from relay._trio.node_bus import CommandNotConfirmed
from relay._trio.redis_state import SharedStateUnavailable
from relay._trio.session_archive import SessionArchive
from relay._trio.websocket import ConnectionClosed, WebSocketConnection
from relay.config import SessionConfig
from relay.metrics import RelayMetrics
from relay.proto import control, receipts, tunnel
from relay.proto.close import CloseCode
from relay.proto.errors import ProtocolError, RemoteProtocolError
from relay.proto.session import (
    Denied,
    DeviceAttached,
    DeviceDetached,
    EndReason,
    EndRequested,
    EndSession,
    EngineerAttached,
    EngineerDetached,
    Event,
    Granted,
    LegRefused,
    NotifyEngineer,
    OfferSent,
    Output,
    Pair,
    Session,
    State,
    Tick,
    Warn,
    new_session_id,
    validate_channels,
)
from relay.recordings import RecordingError, SessionRecording
from relay.store import StoreError

__all__ = [
    "DeviceControl",
    "RequestRefused",
    "SessionBroker",
    "SessionClock",
]

#: How long the driver waits for the device's end receipt after a granted session.
END_RECEIPT_WAIT_S: Final = 2.0
#: Ended granted sessions whose late end receipt can still be verified.
ENDED_RECEIPTS_KEPT: Final = 1024
#: Late receipts and acks waiting for the task that handles them.
_LATE_QUEUE_SIZE: Final = 256
#: How long a leg's handler may take to close its socket at the end.
LEG_CLOSE_S: Final = 1.0
#: How long the broker waits for the engineer to take one message.
ENGINEER_SEND_S: Final = 5.0
#: Ended sessions whose summary GET still answers.
ENDED_KEPT: Final = 256
_INBOX_SIZE: Final = 64
#: The ends a device may decide on its own, by the reason it closes its tunnel
#: with (4005) and puts in its end receipt: the on-site End, the agent stopping,
#: and the device losing (or never getting) its tunnel after the grant. Without
#: the last, a granted session whose tunnel connection failed waited for a
#: tunnel until the cap (found by bench/: 100 grants at once, some tunnel
#: handshakes dropped by admission). A device may always end a session; no
#: reason here can extend one.
_DEVICE_END_REASONS: Final = {
    reason.value: reason
    for reason in (
        EndReason.ONSITE,
        EndReason.DEVICE_SHUTDOWN,
        EndReason.DEVICE_DISCONNECT,
    )
}


def _device_end(reason: EndReason, now: int) -> Event:
    """The machine's event for an end the device decided: a lost tunnel is the
    machine's own DeviceDetached, the others are requested ends."""
    if reason is EndReason.DEVICE_DISCONNECT:
        return DeviceDetached(now_ms=now)
    return EndRequested(now_ms=now, reason=reason)


class PolicyDecider(Protocol):
    """What the session broker needs of the access policy (a ``PolicyGate``)."""

    async def decide(
        self,
        *,
        engineer: str,
        role: str,
        device_id: str,
        channels: tuple[str, ...],
        reason: str,
        live_sessions: int,
    ) -> Decision: ...


class FleetLocks(Protocol):
    """The fleet-wide half of one session per device (a ``ClusterNode``)."""

    async def acquire_device(self, device_id: str, session_id: str) -> str | None:
        """None once taken for *session_id*; else the session that holds it.
        Raises SharedStateUnavailable when the shared state is away."""
        ...

    def release_device(self, device_id: str, session_id: str) -> None:
        """Give the lock back without waiting."""
        ...

    async def device_node(self, device_id: str) -> str | None:
        """The node holding *device_id*'s control channel, if any."""
        ...

    async def end_session_on(self, node_id: str, session_id: str) -> None:
        """Have *node_id* end *session_id* as an admin would; return once it
        confirmed. Raises SharedStateUnavailable or CommandNotConfirmed."""
        ...


class Crossing(Protocol):
    """Sessions across nodes (a :class:`relay._trio.cross_node.CrossNode`)."""

    @property
    def node_id(self) -> str: ...

    @property
    def tunnel_url(self) -> str | None: ...

    async def claim(self, node_id: str, device_id: str, session_id: str) -> Claim: ...

    async def send_control(
        self,
        node_id: str,
        device_id: str,
        session_id: str,
        connection_id: int,
        event: control.Event,
    ) -> bool: ...

    def release(self, node_id: str, device_id: str, session_id: str) -> None: ...

    def forward_device_message(self, device_id: str, event: control.Event) -> bool: ...

    def forward_control_lost(self, device_id: str, connection_id: int) -> None: ...


class DeviceControl(Protocol):
    """What the session broker needs of the device listener."""

    def control_certificate(
        self, device_id: str
    ) -> tuple[int, x509.Certificate] | None:
        """(connection id, certificate) of the device's live control channel."""

    async def send_control(
        self, device_id: str, connection_id: int, event: control.Event
    ) -> bool:
        """Send *event* on that control channel; False if it is gone, or if
        its protocol version predates *event* (then nothing is sent)."""


class RequestRefused(Exception):
    """A session request was refused; ``status`` and ``error`` are the answer."""

    def __init__(
        self, status: int, error: str, outcome: str, *, decision: Decision | None = None
    ) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.outcome = outcome
        self.decision = decision


class SessionClock:
    """Milliseconds on trio's monotonic clock, anchored once to the wall clock."""

    def __init__(
        self,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = trio.current_time,
    ) -> None:
        self._monotonic = monotonic
        self._anchor_s = monotonic()
        self._anchor_ms = int(wall_clock().timestamp() * 1000)

    def now_ms(self) -> int:
        """The current time in ms since the epoch, never going backwards."""
        return self._anchor_ms + int((self._monotonic() - self._anchor_s) * 1000)

    def trio_time(self, ms: int) -> float:
        """The trio clock value at which :meth:`now_ms` reaches *ms* (or just after)."""
        return self._anchor_s + (ms - self._anchor_ms + 1) / 1000


# Inputs to a session's driver ---------------------------------------------------


@dataclass(eq=False, slots=True)
class _Leg:
    """One attached leg: its socket's send side and the event its handler waits on."""

    side: tunnel.Side
    send: Callable[[bytes], Any]
    released: trio.Event = field(default_factory=trio.Event)
    refusal: tuple[int, str] | None = None
    decided: trio.Event = field(default_factory=trio.Event)
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    # Set once its handler closed the socket (relay_teardown_seconds).
    closed: bool = False
    # Set on the engineer leg: sends JSON status text.
    send_text: Callable[[str], Any] | None = None


@dataclass(frozen=True, slots=True)
class _Attach:
    leg: _Leg
    receive: Callable[[], Any]


@dataclass(frozen=True, slots=True)
class _LegGone:
    leg: _Leg
    code: int | None = None
    reason: str = ""
    protocol_error: str | None = None


@dataclass(frozen=True, slots=True)
class _End:
    reason: EndReason
    done: trio.Event | None = None


@dataclass(frozen=True, slots=True)
class _DeviceMessage:
    event: control.Event


@dataclass(frozen=True, slots=True)
class _ControlLost:
    pass


_Input = _Attach | _LegGone | _End | _DeviceMessage | _ControlLost


@dataclass(slots=True)
class _EndedSession:
    """What the broker keeps of an ended granted session for its late end receipt."""

    device_id: str
    nonce: str
    #: DER, parsed again only when a late receipt comes (rare): a parsed
    #: certificate with its extensions is several KiB, and 1,024 of them were
    #: the largest thing the soak's resident memory grew by.
    certificate_der: bytes
    bytes_to_device: int
    bytes_from_device: int
    granted_max_seconds: int | None
    recorded: bool


@dataclass(frozen=True, slots=True)
class _LateReceipt:
    device_id: str
    event: control.SessionEnded


@dataclass(frozen=True, slots=True)
class _Ack:
    device_id: str
    session_id: str


_LateItem = _LateReceipt | _Ack


@dataclass(eq=False, slots=True)
class _Live:
    """One session and everything the shell keeps for it."""

    session: Session
    engineer_role: str
    reason: str
    nonce: str
    connection_id: int
    certificate: x509.Certificate
    # The node that lends the device's control channel (a session across
    # nodes); None when the channel is on this node.
    control_node: str | None
    inbox: trio.MemorySendChannel[_Input]
    inbox_out: trio.MemoryReceiveChannel[_Input]
    nursery: trio.Nursery | None = None
    table: tunnel.StreamTable | None = None
    granted_channels: tuple[str, ...] = ()
    granted_max_seconds: int | None = None
    offered_at_s: float = 0.0
    granted_at_s: float | None = None
    engineer: _Leg | None = None
    device: _Leg | None = None
    tunnel_reserved: bool = False
    paired: trio.Event = field(default_factory=trio.Event)
    ended: trio.Event = field(default_factory=trio.Event)
    state_changed: trio.Event = field(default_factory=trio.Event)
    pump_scopes: list[trio.CancelScope] = field(default_factory=list)
    bytes_to_device: int = 0
    bytes_from_device: int = 0
    end_receipt: trio.Event = field(default_factory=trio.Event)
    control_lost: bool = False
    metric_state: str | None = None
    source: str = "unknown"
    fingerprint: str = ""
    decided_by: str | None = None
    # The policy's decision at the request (its rules and limits).
    decision: Decision | None = None
    recording: SessionRecording | None = None
    end_signed: receipts.SignedReceipt | None = None
    archived: bool = False
    recording_failed: bool = False
    # An end the full inbox could not take (see _post).
    forced_end: EndReason | None = None
    # The channel of each stream the engineer opened, until it closes.
    stream_channels: dict[int, str] = field(default_factory=dict)
    # Teardown: when the end was decided and the legs attached then, until
    # all of them are closed (relay_teardown_seconds).
    teardown_from_s: float | None = None
    teardown_legs: tuple[_Leg, ...] = ()


class SessionBroker:
    """The live remote sessions of this broker; see the module docstring.

    Args:
        config: Cap, grant timeout, channel policy, reattach grace.
        control: The device listener's side (send control messages, certificates).
        metrics: Where sessions are counted.
        log: Structured logger (``audit=True`` marks audit events).
        clock: The session clock.
        archive: Rows, recordings and receipts (none: nothing is kept beyond
            the log, as in tests of the relay alone).
        audit_ok: Whether the audit log is being written; while it is not, no
            session starts (Invariant 7, fail closed).
        audit_seq: The audit log's last seq (where a session's timeline starts).
        policy: Decides each request and rechecks live sessions
            (:class:`relay._trio.policy_gate.PolicyGate`).
    """

    def __init__(
        self,
        *,
        config: SessionConfig,
        control: DeviceControl,
        metrics: RelayMetrics,
        log: Any,
        policy: PolicyDecider,
        clock: SessionClock | None = None,
        archive: SessionArchive | None = None,
        audit_ok: Callable[[], bool] = lambda: True,
        audit_seq: Callable[[], int] = lambda: 0,
        fleet: FleetLocks | None = None,
        crossing: Crossing | None = None,
    ) -> None:
        self.config = config
        self._fleet = fleet
        self._crossing = crossing
        self._policy = policy
        self._archive = archive
        self._audit_ok = audit_ok
        self._audit_seq = audit_seq
        self._control = control
        self._metrics = metrics
        # Bound once: the pumps count every relayed message.
        self._bytes_to_device = metrics.tunnel_bytes.labels("to_device")
        self._bytes_from_device = metrics.tunnel_bytes.labels("from_device")
        self._messages_to_device = metrics.tunnel_messages.labels("to_device")
        self._messages_from_device = metrics.tunnel_messages.labels("from_device")
        self._log = log
        self._clock = clock if clock is not None else SessionClock()
        self._sessions: dict[str, _Live] = {}
        self._by_device: dict[str, str] = {}
        self._ended: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._ended_receipts: OrderedDict[str, _EndedSession] = OrderedDict()
        self._late: trio.MemorySendChannel[_LateItem] | None = None
        self._nursery: trio.Nursery | None = None
        self._stopping = False
        self._idle = trio.lowlevel.ParkingLot()

    def __len__(self) -> int:
        """Sessions this broker holds (live, or ending)."""
        return len(self._sessions)

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Host the session tasks until cancelled."""
        late, late_out = trio.open_memory_channel[_LateItem](_LATE_QUEUE_SIZE)
        # The late receipts' task lives beside the sessions' nursery, not in
        # it: that one holds the sessions' tasks only.
        async with trio.open_nursery() as beside:
            beside.start_soon(self._serve_late, late_out)
            self._late = late
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    self._nursery = None
                    self._late = None

    # Requests from the API ----------------------------------------------------

    async def request(
        self,
        *,
        device_id: str,
        engineer: str,
        engineer_role: str,
        reason: str,
        channels: object,
        source: str = "unknown",
    ) -> dict[str, Any]:
        """Start a session; returns its view once the offer is on its way.

        Every refusal is an audit event ``session.refused`` (the policy's
        decision, or why the broker could not take the session).

        Raises:
            RequestRefused: 400 bad channels, 403 a channel the policy does not
                allow, 404 the device is not connected, 409 it is busy, 503 the
                broker is not taking sessions (shutting down, or the audit log
                or the store cannot record it).
        """
        try:
            return await self._request(
                device_id=device_id,
                engineer=engineer,
                engineer_role=engineer_role,
                reason=reason,
                channels=channels,
                source=source,
            )
        except RequestRefused as refused:
            self._log.warning(
                "session.refused",
                device_id=device_id,
                engineer=engineer,
                source=source,
                status=refused.status,
                outcome=refused.outcome,
                error=refused.error,
                **(refused.decision.flat_fields() if refused.decision else {}),
                audit=True,
            )
            raise

    async def _request(
        self,
        *,
        device_id: str,
        engineer: str,
        engineer_role: str,
        reason: str,
        channels: object,
        source: str,
    ) -> dict[str, Any]:
        try:
            wanted = validate_channels(channels)
        except ValueError as exc:
            raise RequestRefused(400, str(exc), "bad_request") from None
        try:
            decision = await self._policy.decide(
                engineer=engineer,
                role=engineer_role,
                device_id=device_id,
                channels=wanted,
                reason=reason,
                live_sessions=self._live_sessions_of(engineer),
            )
        except StoreError:
            raise RequestRefused(
                503, "store unavailable", "store_unavailable"
            ) from None
        if not decision.allowed or decision.limits is None:
            raise RequestRefused(403, decision.message, "policy", decision=decision)
        limits = decision.limits
        if device_id in self._by_device:
            raise RequestRefused(409, "busy", "busy")
        found = self._control.control_certificate(device_id)
        control_node = None if found is not None else await self._not_here(device_id)
        if self._nursery is None or self._stopping:
            raise RequestRefused(503, "not taking sessions", "unavailable")
        if not self._audit_ok():
            raise RequestRefused(503, "audit log unavailable", "audit_unavailable")
        session_id = new_session_id(os.urandom(16))
        if self._fleet is not None:
            await self._take_fleet_lock(self._fleet, device_id, session_id)
            if device_id in self._by_device or self._stopping:  # changed meanwhile
                self._fleet.release_device(device_id, session_id)
                raise RequestRefused(409, "busy", "busy")
        if control_node is not None:
            found = await self._claim(control_node, device_id, session_id)
        assert found is not None  # noqa: S101 - here, or claimed on its node
        connection_id, certificate = found
        session = Session(
            session_id,
            device_id,
            engineer,
            wanted,
            limits.max_session_seconds,
            max(1, round(limits.grant_timeout_s * 1000)),
            self._clock.now_ms(),
            round(self.config.reattach_grace_s * 1000),
            self.config.warning_seconds,
        )
        inbox, inbox_out = trio.open_memory_channel[_Input](_INBOX_SIZE)
        live = _Live(
            session=session,
            engineer_role=engineer_role,
            reason=reason,
            nonce=secrets.token_urlsafe(32),
            connection_id=connection_id,
            certificate=certificate,
            control_node=control_node,
            inbox=inbox,
            inbox_out=inbox_out,
            source=source,
            fingerprint=auth.certificate_fingerprint(certificate),
            decision=decision,
        )
        self._sessions[session.session_id] = live
        self._by_device[device_id] = session.session_id
        start_seq = self._audit_seq()
        if self._archive is not None:
            try:
                await self._archive.requested(
                    session_id=session.session_id,
                    device_id=device_id,
                    engineer=engineer,
                    reason=reason,
                    channels=wanted,
                    source=source,
                    device_fingerprint=live.fingerprint,
                    start_seq=start_seq,
                )
            except StoreError:
                self._forget(live)
                raise RequestRefused(
                    503, "store unavailable", "store_unavailable"
                ) from None
        self._set_metric_state(live)
        self._log.info(
            "session.requested",
            session_id=session.session_id,
            device_id=device_id,
            engineer=engineer,
            reason=reason,
            channels=list(wanted),
            source=source,
            device_fingerprint=live.fingerprint,
            broker_version=__version__,
            **decision.flat_fields(),
            audit=True,
        )
        if not self._audit_ok():
            # The start could not be recorded: the session ends before its
            # offer goes out (its end waits in the audit backlog with its start).
            await self._abort(live, EndReason.AUDIT_FAILURE)
            raise RequestRefused(503, "audit log unavailable", "audit_unavailable")
        nursery = self._running_nursery()
        if nursery is None or self._stopping:  # it began to stop during the awaits
            await self._abort(live, EndReason.BROKER_SHUTDOWN)
            raise RequestRefused(503, "not taking sessions", "unavailable")
        await nursery.start(self._run_session, live)
        return self.view(session.session_id) or {}

    async def _not_here(self, device_id: str) -> str:
        """The node that holds the control channel of a device that is not
        connected here, for a session across nodes.

        Raises:
            RequestRefused: 404 not connected anywhere; 503 on another node
                when this node has no advertised device address (then the
                device could not open its tunnel here).
        """
        node = None
        if self._fleet is not None:
            with contextlib.suppress(SharedStateUnavailable):
                node = await self._fleet.device_node(device_id)
        crossing = self._crossing
        if node is None or (crossing is not None and node == crossing.node_id):
            raise RequestRefused(404, "device not connected", "not_connected")
        if crossing is None or crossing.tunnel_url is None:
            raise RequestRefused(
                503,
                f"the device is connected to broker node {node}, and this node "
                "has no advertised device address ([cluster] "
                "advertise_device_url) for sessions across nodes",
                "other_node",
            )
        return node

    async def _claim(
        self, node_id: str, device_id: str, session_id: str
    ) -> tuple[int, x509.Certificate]:
        """Borrow the device's control channel from *node_id* (the fleet lock
        is held); on a refusal the lock is given back."""
        assert self._crossing is not None  # noqa: S101 - checked by _not_here
        assert self._fleet is not None  # noqa: S101 - so was this
        try:
            claim = await self._crossing.claim(node_id, device_id, session_id)
        except ClaimRefused as exc:
            self._fleet.release_device(device_id, session_id)
            if str(exc) == "busy":
                raise RequestRefused(409, "busy", "busy") from None
            raise RequestRefused(
                503, f"broker node {node_id}: {exc}", "other_node"
            ) from None
        except (SharedStateUnavailable, CommandNotConfirmed) as exc:
            self._fleet.release_device(device_id, session_id)
            raise RequestRefused(
                503,
                f"broker node {node_id} holds the device and did not answer: {exc}",
                "node_unconfirmed",
            ) from None
        if device_id in self._by_device or self._stopping:  # changed meanwhile
            self._crossing.release(node_id, device_id, session_id)
            self._fleet.release_device(device_id, session_id)
            raise RequestRefused(409, "busy", "busy")
        return claim.connection_id, claim.certificate

    @staticmethod
    async def _take_fleet_lock(
        fleet: FleetLocks, device_id: str, session_id: str
    ) -> None:
        try:
            holder = await fleet.acquire_device(device_id, session_id)
        except SharedStateUnavailable:
            raise RequestRefused(
                503,
                "shared state unavailable (Redis): no new sessions until it is back",
                "shared_state_unavailable",
            ) from None
        if holder is not None:
            raise RequestRefused(409, "busy", "busy")

    def _live_sessions_of(self, engineer: str) -> int:
        """The engineer's sessions on this broker now (pending, live or ending)."""
        return sum(
            1 for live in self._sessions.values() if live.session.engineer == engineer
        )

    async def recheck_policy(self, why: str) -> None:
        """Hold every live session against the policy again (after *why* changed).

        A session the policy no longer allows ends with ``policy_revoked``. A
        store that cannot answer leaves the sessions as they are: the next
        change rechecks them.
        """
        for live in list(self._sessions.values()):
            session = live.session
            if session.state.is_terminal:
                continue
            try:
                decision = await self._policy.decide(
                    engineer=session.engineer,
                    role=live.engineer_role,
                    device_id=session.device_id,
                    channels=tuple(session.channels),
                    reason=live.reason,
                    live_sessions=0,
                )
            except StoreError:
                self._log.warning(
                    "session.policy_recheck_failed", session_id=session.session_id
                )
                continue
            if decision.allowed or live.ended.is_set():
                continue
            self._log.warning(
                "session.policy_revoked",
                session_id=session.session_id,
                device_id=session.device_id,
                engineer=session.engineer,
                change=why,
                **decision.flat_fields(),
                audit=True,
            )
            self._post(live, _End(EndReason.POLICY_REVOKED))

    def _running_nursery(self) -> trio.Nursery | None:
        return self._nursery

    def _forget(self, live: _Live) -> None:
        session = live.session
        self._sessions.pop(session.session_id, None)
        if self._by_device.get(session.device_id) == session.session_id:
            del self._by_device[session.device_id]
        if live.control_node is not None and self._crossing is not None:
            self._crossing.release(
                live.control_node, session.device_id, session.session_id
            )
        if self._fleet is not None:
            self._fleet.release_device(session.device_id, session.session_id)
        self._set_metric_state(live, gone=True)
        self._idle.unpark_all()

    async def _abort(self, live: _Live, reason: EndReason) -> None:
        """End a session that never got its task (nothing was offered)."""
        live.session.handle(EndRequested(now_ms=self._clock.now_ms(), reason=reason))
        self._metrics.session_ends.labels(reason.value).inc()
        self._log_end(live, reason)
        self._forget(live)
        await self._archive_end(live)

    def view(self, session_id: str) -> dict[str, Any] | None:
        """The API's view of a session, live or recently ended; None if unknown."""
        live = self._sessions.get(session_id)
        if live is None:
            return self._ended.get(session_id)
        return self._view(live)

    def _view(self, live: _Live) -> dict[str, Any]:
        s = live.session
        return {
            "session_id": s.session_id,
            "device_id": s.device_id,
            "engineer": s.engineer,
            "state": s.state.value,
            "grant_deadline": _iso(s.grant_deadline_ms),
            "granted_at": _iso(s.granted_at_ms),
            "ends_at": _iso(s.ends_at_ms),
            "end_reason": None if s.end_reason is None else s.end_reason.value,
        }

    async def end(
        self, session_id: str, *, by_admin: bool, by_owner: bool
    ) -> dict[str, Any] | None:
        """End a live session for its engineer or an admin; None if it is not live."""
        live = self._sessions.get(session_id)
        if live is None or live.session.state.is_terminal:
            return None
        if live.session.granted_at_ms is None:
            reason = EndReason.CANCELLED
        else:
            reason = EndReason.ENGINEER if by_owner or not by_admin else EndReason.ADMIN
        done = trio.Event()
        self._post(live, _End(reason, done))
        with trio.move_on_after(LEG_CLOSE_S * 2):
            await done.wait()
        return self._view(live)

    async def end_on_its_node(self, session_id: str, *, admin: str) -> str | None:
        """An admin ends a session that another node holds.

        Returns:
            The node that held it, once that node confirmed the end; None if
            no other node has it (unknown, or this node's).

        Raises:
            RequestRefused: 409 when it has ended; 503 when the store cannot
                be read or the other node did not confirm within
                ``[cluster] command_deadline_s``.
        """
        if self._fleet is None or self._archive is None:
            return None
        try:
            row = await self._archive.row(session_id)
        except StoreError:
            raise RequestRefused(
                503, "store unavailable", "store_unavailable"
            ) from None
        if row is None or row.node_id == self._archive.node_id:
            return None
        if row.ended_at is not None:
            raise RequestRefused(409, "session has ended", "ended")
        try:
            await self._fleet.end_session_on(row.node_id, session_id)
        except (SharedStateUnavailable, CommandNotConfirmed) as exc:
            self._log.warning(
                "session.end_forward_failed",
                session_id=session_id,
                node=row.node_id,
                admin=admin,
                error=str(exc),
                audit=True,
            )
            raise RequestRefused(
                503,
                f"broker node {row.node_id} holds the session and did not "
                f"confirm its end: {exc}",
                "node_unconfirmed",
            ) from None
        # The end itself is in the audit records of the node that held it.
        self._log.info(
            "session.end_forwarded",
            session_id=session_id,
            node=row.node_id,
            admin=admin,
            audit=True,
        )
        return row.node_id

    def end_all(self, reason: EndReason) -> None:
        """End every live session (broker shutdown, audit failure)."""
        for live in list(self._sessions.values()):
            self._post(live, _End(reason))

    def stop(self) -> None:
        """The broker is stopping: every request from now on is refused (503)
        and every live session ends with ``broker_shutdown``."""
        self._stopping = True
        self.end_all(EndReason.BROKER_SHUTDOWN)

    async def wait_idle(self) -> None:
        """Return once no session is held."""
        while self._sessions:
            await self._idle.park()

    def device_in_session(self, device_id: str) -> bool:
        """Whether *device_id* has a pending or active session (the device list's
        ``in_session``); false again as soon as its session ended."""
        return device_id in self._by_device

    def session_engineer(self, session_id: str) -> str | None:
        """The engineer of a held session, or None."""
        live = self._sessions.get(session_id)
        return None if live is None else live.session.engineer

    # Events from the device listener -----------------------------------------

    def device_message(self, device_id: str, event: control.Event) -> None:
        """A session message from *device_id*'s control channel."""
        session_id = getattr(event, "session_id", None)
        live = self._sessions.get(session_id) if isinstance(session_id, str) else None
        if (
            live is None
            and self._crossing is not None
            and self._crossing.forward_device_message(device_id, event)
        ):
            return  # a session of another node, whose channel this node lends
        if live is not None and live.control_node is not None:
            live = None  # its device is on another node: not through this channel
        if live is None and isinstance(event, control.SessionEnded):
            ended = self._ended_receipts.get(event.session_id)
            if ended is not None and ended.device_id == device_id:
                self._post_late(_LateReceipt(device_id, event))
                return
        if live is None or live.session.device_id != device_id:
            # Late (the session is gone) or not this device's: never another's.
            self._log.warning(
                "session.unexpected_device_message",
                device_id=device_id,
                type=event.TYPE,
                audit=True,
            )
            return
        self._post(live, _DeviceMessage(event))

    def control_lost(self, device_id: str, connection_id: int) -> None:
        """The control channel *connection_id* of *device_id* ended."""
        for live in list(self._sessions.values()):
            if (
                live.session.device_id == device_id
                and live.connection_id == connection_id
                and live.control_node is None
            ):
                self._post(live, _ControlLost())
        if self._crossing is not None:
            self._crossing.forward_control_lost(device_id, connection_id)

    # Sessions across nodes (relay._trio.cross_node) ----------------------------

    def _crossing_live(
        self, node_id: str, device_id: str, session_id: str
    ) -> _Live | None:
        live = self._sessions.get(session_id)
        if (
            live is None
            or live.control_node != node_id
            or live.session.device_id != device_id
        ):
            return None
        return live

    def remote_device_message(
        self, node_id: str, device_id: str, event: control.Event
    ) -> None:
        """A session message from *device_id*, forwarded by the node that
        holds its control channel."""
        live = self._crossing_live(node_id, device_id, getattr(event, "session_id", ""))
        if live is None:
            self._log.warning(
                "session.unexpected_device_message",
                device_id=device_id,
                type=event.TYPE,
                node=node_id,
                audit=True,
            )
            return
        self._post(live, _DeviceMessage(event))

    def remote_control_lost(
        self, node_id: str, device_id: str, session_id: str
    ) -> None:
        """The control channel a crossing session's offer went out on ended."""
        live = self._crossing_live(node_id, device_id, session_id)
        if live is not None:
            self._post(live, _ControlLost())

    def crossing_nodes(self) -> set[str]:
        """The nodes whose control channels this node's sessions borrow."""
        return {
            live.control_node
            for live in self._sessions.values()
            if live.control_node is not None
        }

    def node_lost(self, node_id: str) -> None:
        """*node_id* is gone: the sessions that crossed it end (``broker_crash``);
        nothing more is sent through it."""
        for live in list(self._sessions.values()):
            if live.control_node == node_id:
                live.control_lost = True
                self._post(live, _End(EndReason.BROKER_CRASH))

    def device_revoked(self, device_id: str) -> None:
        """*device_id* was revoked: its session ends with ``revoked``."""
        for live in list(self._sessions.values()):
            if live.session.device_id == device_id:
                self._post(live, _End(EndReason.REVOKED))

    async def admit_tunnel(
        self, device_id: str, session_id: str
    ) -> tuple[int, str] | None:
        """Whether *device_id* may open the tunnel of *session_id*: None, or an
        HTTP refusal (404 unknown or another device's, 409 already opened,
        410 ended, 403 not granted). Waits while the grant is being verified;
        the caller bounds the wait with its handshake deadline."""
        live = self._sessions.get(session_id)
        if live is None or live.session.device_id != device_id:
            return 404, "unknown session"
        while live.session.state in (State.REQUESTED, State.OFFERED):
            await live.state_changed.wait()
        if live.session.state.is_terminal:
            return 410, "session ended"
        if live.tunnel_reserved:
            return 409, "tunnel already open"
        live.tunnel_reserved = True
        return None

    async def serve_tunnel(
        self, device_id: str, session_id: str, ws: WebSocketConnection
    ) -> None:
        """Run the device leg of *session_id* on *ws* until it is released, then
        close *ws* with 4005 and the end reason (1008 if the session refused it)."""
        live = self._sessions.get(session_id)
        if live is None or live.session.device_id != device_id:
            await _close_device(ws, CloseCode.POLICY_VIOLATION, "unknown session")
            return
        leg = _Leg(tunnel.Side.DEVICE, ws.send_message)
        await self._run_leg(live, leg, _Attach(leg, ws.receive_message))
        code, reason = leg.refusal or (CloseCode.SESSION_ENDED, _reason(live))
        await _close_device(ws, code, reason)
        self._leg_closed(live, leg)

    # Events from the engineer listener ---------------------------------------

    def admit_attach(self, session_id: str, username: str) -> tuple[int, str] | None:
        """Whether *username* may attach to *session_id*: None, or an HTTP
        refusal (404 unknown or not theirs, 410 ended, 409 already attached)."""
        live = self._sessions.get(session_id)
        if live is None or live.session.engineer != username:
            return 404, "unknown session"
        if live.session.state.is_terminal:
            return 410, "session ended"
        if live.engineer is not None:
            return 409, "already attached"
        return None

    async def serve_attach(
        self,
        session_id: str,
        websocket: WebSocket,
        *,
        on_input: Callable[[], None] = lambda: None,
        after_close: list[Callable[[], None]] | None = None,
    ) -> tuple[int, str] | None:
        """Run the engineer leg on *websocket*; returns the close the route sends.

        *on_input* is called for every message from the engineer: typing in the
        terminal is use of the login session (against its idle timeout). The
        route calls what this adds to *after_close* once it has closed the
        socket (the end of the session's teardown on this side).

        Cancellation: when the login session ends the route cancels this; the
        session then ends with ``login_ended`` and the engineer is told so
        before the route closes the socket.
        """
        live = self._sessions.get(session_id)
        if live is None:
            return int(CloseCode.POLICY_VIOLATION), "unknown session"
        leg = _Leg(
            tunnel.Side.ENGINEER, websocket.send_bytes, send_text=websocket.send_text
        )
        if after_close is not None:
            after_close.append(lambda: self._leg_closed(live, leg))
        try:
            await self._run_leg(
                live,
                leg,
                _Attach(leg, self._engineer_receiver(websocket, on_input)),
            )
        finally:
            if leg.refusal is None and not leg.released.is_set():
                # Cancelled from outside: the login session ended.
                self._post(live, _End(EndReason.LOGIN_ENDED))
                with trio.CancelScope(shield=True), trio.move_on_after(LEG_CLOSE_S):
                    await leg.released.wait()
                    await self._send_end(live, leg)
        if leg.refusal is not None:
            return leg.refusal
        if live.session.state.is_terminal:
            await self._send_end(live, leg)
        return int(CloseCode.SESSION_ENDED), _reason(live)

    async def _send_end(self, live: _Live, leg: _Leg) -> None:
        if live.session.end_reason is not None:
            await self._engineer_text(
                leg, {"type": "end", "reason": live.session.end_reason.value}
            )

    def _leg_closed(self, live: _Live, leg: _Leg) -> None:
        """*leg*'s socket is closed; the teardown is timed once the last of the
        legs attached at the end decision is."""
        leg.closed = True
        if live.teardown_from_s is None:
            return
        if all(attached.closed for attached in live.teardown_legs):
            self._metrics.teardown.observe(trio.current_time() - live.teardown_from_s)
            live.teardown_from_s = None

    async def _run_leg(self, live: _Live, leg: _Leg, attach: _Attach) -> None:
        self._post(live, attach)
        await leg.decided.wait()
        if leg.refusal is None:
            await leg.released.wait()

    # The session task ----------------------------------------------------------

    def _post(self, live: _Live, item: _Input) -> None:
        try:
            live.inbox.send_nowait(item)
        except trio.WouldBlock:
            # Only a device flooding its control channel fills the inbox; its
            # messages are dropped, the broker's own ends are not: the driver
            # takes a forced end before its next input.
            self._log.warning("session.inbox_full", session_id=live.session.session_id)
            if isinstance(item, _End):
                if live.forced_end is None:
                    live.forced_end = item.reason
                if item.done is not None:
                    item.done.set()
            if isinstance(item, _Attach):
                item.leg.refusal = (int(CloseCode.TRY_AGAIN_LATER), "busy")
                item.leg.decided.set()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            if isinstance(item, _Attach):
                item.leg.refusal = (int(CloseCode.SESSION_ENDED), _reason(live))
                item.leg.decided.set()
            elif isinstance(item, _End) and item.done is not None:
                item.done.set()

    async def _run_session(
        self, live: _Live, *, task_status: trio.TaskStatus[None]
    ) -> None:
        session = live.session
        try:
            async with trio.open_nursery() as nursery:
                live.nursery = nursery
                offer = control.Offer(
                    session_id=session.session_id,
                    engineer=session.engineer,
                    engineer_role=live.engineer_role,
                    reason=live.reason,
                    channels=session.channels,
                    max_seconds=session.max_seconds,
                    grant_deadline_ms=session.grant_deadline_ms,
                    nonce=live.nonce,
                )
                live.offered_at_s = trio.current_time()
                sent = await self._send_control(live, offer)
                self._log.info(
                    "session.offered",
                    session_id=session.session_id,
                    device_id=session.device_id,
                    sent=sent,
                    max_seconds=session.max_seconds,
                    grant_deadline=_iso(session.grant_deadline_ms),
                    audit=True,
                )
                await self._apply(live, OfferSent(now_ms=self._clock.now_ms()))
                if not sent:
                    await self._apply(live, DeviceDetached(now_ms=self._clock.now_ms()))
                task_status.started()
                await self._drive(live)
                await self._linger(live)
                await self._archive_end(live)
                nursery.cancel_scope.cancel()
        finally:
            if not live.archived and live.session.state.is_terminal:
                # Cancelled (the broker is going down) after the end: still keep
                # what the session left, bounded.
                with trio.CancelScope(shield=True), trio.move_on_after(LEG_CLOSE_S * 2):
                    await self._archive_end(live)
            self._keep_for_late_receipt(live)
            live.inbox.close()
            while True:
                try:
                    self._refuse_late(live, live.inbox_out.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            live.inbox_out.close()
            self._ended[session.session_id] = self._view(live)
            while len(self._ended) > ENDED_KEPT:
                self._ended.popitem(last=False)
            self._forget(live)

    async def _drive(self, live: _Live) -> None:
        session = live.session
        while not session.state.is_terminal:
            if live.forced_end is not None:
                reason, live.forced_end = live.forced_end, None
                with contextlib.suppress(ProtocolError):
                    await self._apply(
                        live, EndRequested(now_ms=self._clock.now_ms(), reason=reason)
                    )
                continue
            deadline_ms = session.next_deadline_ms()
            assert deadline_ms is not None  # noqa: S101 - live sessions always have a timer
            item: _Input | None = None
            with trio.move_on_at(self._clock.trio_time(deadline_ms)):
                item = await live.inbox_out.receive()
            try:
                if item is None:
                    await self._apply(live, Tick(now_ms=self._clock.now_ms()))
                else:
                    await self._on_input(live, item)
            except ProtocolError as exc:
                # A bug in this shell (an event the machine does not take now):
                # this input is dropped, the session and the broker go on.
                self._log.error(
                    "session.shell_error",
                    session_id=session.session_id,
                    detail=str(exc)[:200],
                )

    async def _linger(self, live: _Live) -> None:
        """After the end: release the legs, wait for the end receipt, refuse the rest."""
        want_receipt = (
            live.session.granted_at_ms is not None
            and not live.control_lost
            and live.session.end_reason
            not in (EndReason.DEVICE_DISCONNECT, EndReason.REVOKED)
        )
        deadline = trio.current_time() + (END_RECEIPT_WAIT_S if want_receipt else 0)
        with trio.move_on_at(deadline):
            while want_receipt and not live.end_receipt.is_set():
                item = await live.inbox_out.receive()
                if isinstance(item, _DeviceMessage) and isinstance(
                    item.event, control.SessionEnded
                ):
                    done, _ = self._end_receipt(live, item.event)
                    if done:
                        await self._ack(live, item.event.session_id)
                else:
                    self._refuse_late(live, item)
        if want_receipt and not live.end_receipt.is_set():
            self._log.warning(
                "session.end_receipt_missing",
                session_id=live.session.session_id,
                device_id=live.session.device_id,
                audit=True,
            )

    def _refuse_late(self, live: _Live, item: _Input) -> None:
        """Answer an input that came after the end: refuse legs, wake waiters,
        and audit device messages (a grant for an ended session is one)."""
        if isinstance(item, _Attach):
            item.leg.refusal = (int(CloseCode.SESSION_ENDED), _reason(live))
            item.leg.decided.set()
        elif isinstance(item, _End) and item.done is not None:
            item.done.set()
        elif isinstance(item, _DeviceMessage) and isinstance(
            item.event, control.SessionEnded
        ):
            # After the driver: a resend of a recorded receipt, or one that
            # came too late for the linger; the late path takes either.
            self._post_late(_LateReceipt(live.session.device_id, item.event))
        elif isinstance(item, _DeviceMessage):
            self._log.warning(
                "session.late_device_message",
                session_id=live.session.session_id,
                device_id=live.session.device_id,
                type=item.event.TYPE,
                audit=True,
            )

    async def _on_input(self, live: _Live, item: _Input) -> None:
        session = live.session
        now = self._clock.now_ms()
        match item:
            case _Attach(leg=leg, receive=receive):
                event: Event = (
                    DeviceAttached(now_ms=now)
                    if leg.side is tunnel.Side.DEVICE
                    else EngineerAttached(now_ms=now)
                )
                try:
                    outputs = session.handle(event)
                except LegRefused as exc:
                    leg.refusal = (int(CloseCode.POLICY_VIOLATION), str(exc)[:120])
                    leg.decided.set()
                    return
                if leg.side is tunnel.Side.DEVICE:
                    live.device = leg
                else:
                    live.engineer = leg
                leg.decided.set()
                assert live.nursery is not None  # noqa: S101 - set before the driver runs
                live.nursery.start_soon(self._pump, live, leg, receive)
                if leg.side is tunnel.Side.ENGINEER and not any(
                    isinstance(output, NotifyEngineer) for output in outputs
                ):
                    await self._engineer_state(live, leg)
                await self._act(live, outputs)
            case _LegGone(leg=leg):
                await self._leg_gone(live, item, now)
            case _End(reason=reason, done=done):
                with contextlib.suppress(ProtocolError):
                    await self._apply(live, EndRequested(now_ms=now, reason=reason))
                if done is not None:
                    done.set()
            case _DeviceMessage():
                await self._device_event(live, item.event, now)
            case _ControlLost():
                live.control_lost = True
                await self._apply(live, DeviceDetached(now_ms=now))

    async def _leg_gone(self, live: _Live, gone: _LegGone, now: int) -> None:
        leg = gone.leg
        if gone.protocol_error is not None:
            self._log.warning(
                "session.protocol_error",
                session_id=live.session.session_id,
                side=leg.side.value,
                detail=gone.protocol_error[:200],
                audit=True,
            )
        if leg.side is tunnel.Side.DEVICE:
            if live.device is not leg:
                return
            device_reason = _DEVICE_END_REASONS.get(gone.reason)
            if (
                gone.code == CloseCode.SESSION_ENDED
                and device_reason is not None
                and live.session.granted_at_ms is not None
            ):
                await self._apply(live, _device_end(device_reason, now))
            else:
                await self._apply(live, DeviceDetached(now_ms=now))
        else:
            if live.engineer is not leg:
                return
            live.engineer = None
            leg.released.set()
            await self._apply(live, EngineerDetached(now_ms=now))

    async def _device_event(self, live: _Live, event: control.Event, now: int) -> None:
        session = live.session
        if isinstance(event, control.Deny):
            with contextlib.suppress(ProtocolError):
                await self._apply(live, Denied(now_ms=now))
            return
        if isinstance(event, control.SessionEnded):
            if live.end_receipt.is_set():
                # A resend (its ack was lost): acked again, recorded once.
                await self._ack(live, event.session_id)
                return
            done, ended = self._end_receipt(live, event)
            if done:
                await self._ack(live, event.session_id)
            if ended is not None and live.end_receipt.is_set():
                with contextlib.suppress(ProtocolError):
                    await self._apply(live, _device_end(ended, now))
            return
        if not isinstance(event, control.Grant):
            return
        if session.state is not State.OFFERED:
            self._log.warning(
                "session.late_grant", session_id=session.session_id, audit=True
            )
            return
        try:
            grant = receipts.verify_grant(
                live.certificate,
                receipts.SignedReceipt.from_wire(event.receipt, event.signature),
                session_id=session.session_id,
                device_id=session.device_id,
                nonce=live.nonce,
                engineer=session.engineer,
                offered_channels=session.channels,
                offered_max_seconds=session.max_seconds,
            )
        except receipts.ReceiptError as exc:
            self._log.warning(
                "session.grant_rejected",
                session_id=session.session_id,
                device_id=session.device_id,
                reason=exc.reason,
                detail=str(exc)[:200],
                audit=True,
            )
            await self._apply(live, Denied(now_ms=now))
            await self._send_control(
                live,
                control.SessionEnd(
                    session_id=session.session_id, reason=EndReason.DENIED.value
                ),
            )
            return
        live.granted_channels = grant.channels
        live.granted_max_seconds = grant.max_seconds
        live.decided_by = grant.decided_by
        live.table = tunnel.StreamTable(channels=grant.channels)
        live.granted_at_s = trio.current_time()
        self._metrics.grant_wait.observe(live.granted_at_s - live.offered_at_s)
        self._log.info(
            "session.granted",
            session_id=session.session_id,
            device_id=session.device_id,
            channels=list(grant.channels),
            max_seconds=grant.max_seconds,
            decided_by=grant.decided_by,
            audit=True,
        )
        kept = await self._archive_grant(live, grant, event, now)
        # The device may grant a shorter cap than offered (its own limit); the
        # broker then ends the session at that one too.
        await self._apply(live, Granted(now_ms=now, max_seconds=grant.max_seconds))
        if not kept:
            # Its receipt or its recording cannot be kept: no byte may flow.
            await self._apply(
                live, EndRequested(now_ms=now, reason=EndReason.AUDIT_FAILURE)
            )

    async def _archive_grant(
        self, live: _Live, grant: receipts.GrantReceipt, event: control.Grant, now: int
    ) -> bool:
        if self._archive is None:
            return True
        granted_at = datetime.fromtimestamp(now / 1000, UTC)
        live.recording = self._archive.recording(live.session.session_id, granted_at)
        return await self._archive.granted(
            live.session.session_id,
            at=granted_at,
            grant=grant,
            signed=receipts.SignedReceipt.from_wire(event.receipt, event.signature),
            certificate=live.certificate,
        )

    def _end_receipt(
        self, live: _Live, event: control.SessionEnded
    ) -> tuple[bool, EndReason | None]:
        """Verify and keep the device's end receipt.

        Returns whether the broker is done with it (kept, or it does not
        verify: to be acked), and the device's own end reason (on-site End,
        agent stopping) when it ends the session unasked, else None.
        """
        session = live.session
        try:
            end = receipts.verify_end(
                live.certificate,
                receipts.SignedReceipt.from_wire(event.receipt, event.signature),
                session_id=session.session_id,
                device_id=session.device_id,
                nonce=live.nonce,
            )
        except receipts.ReceiptError as exc:
            self._log.warning(
                "session.end_receipt_rejected",
                session_id=session.session_id,
                device_id=session.device_id,
                reason=exc.reason,
                detail=str(exc)[:200],
                late=False,
                audit=True,
            )
            return True, None
        device_reason = _DEVICE_END_REASONS.get(end.reason)
        if device_reason is None and not session.state.is_terminal:
            # Only the device's own ends may come unasked; anything else is
            # logged, and not acked: once the session is over, the device's
            # next channel brings it again.
            self._log.warning(
                "session.end_receipt_unexpected",
                session_id=session.session_id,
                reason=end.reason,
                audit=True,
            )
            return False, None
        live.end_receipt.set()
        live.end_signed = receipts.SignedReceipt.from_wire(
            event.receipt, event.signature
        )
        self._log_end_receipt(
            session.session_id,
            session.device_id,
            end,
            bytes_to_device=live.bytes_to_device,
            bytes_from_device=live.bytes_from_device,
            granted_max_seconds=live.granted_max_seconds,
            late=False,
        )
        return True, device_reason

    def _log_end_receipt(
        self,
        session_id: str,
        device_id: str,
        end: receipts.EndReceipt,
        *,
        bytes_to_device: int,
        bytes_from_device: int,
        granted_max_seconds: int | None,
        late: bool,
    ) -> None:
        """The ``session.end_receipt`` record: the device's counts beside ours."""
        self._log.info(
            "session.end_receipt",
            session_id=session_id,
            device_id=device_id,
            reason=end.reason,
            device_bytes_to_device=end.bytes_to_device,
            device_bytes_from_device=end.bytes_from_device,
            device_streams_opened=end.streams_opened,
            broker_bytes_to_device=bytes_to_device,
            broker_bytes_from_device=bytes_from_device,
            granted_max_seconds=granted_max_seconds,
            late=late,
            audit=True,
        )

    # Late end receipts and acks ------------------------------------------------

    def _keep_for_late_receipt(self, live: _Live) -> None:
        """Remember what a late end receipt of *live* is verified against."""
        session = live.session
        if session.granted_at_ms is None:
            return  # never granted: the device signs no end receipt
        self._ended_receipts[session.session_id] = _EndedSession(
            device_id=session.device_id,
            nonce=live.nonce,
            certificate_der=live.certificate.public_bytes(Encoding.DER),
            bytes_to_device=live.bytes_to_device,
            bytes_from_device=live.bytes_from_device,
            granted_max_seconds=live.granted_max_seconds,
            recorded=live.end_receipt.is_set(),
        )
        while len(self._ended_receipts) > ENDED_RECEIPTS_KEPT:
            self._ended_receipts.popitem(last=False)

    def _post_late(self, item: _LateItem) -> None:
        """Hand a late receipt or an ack to :meth:`_serve_late` (never blocks)."""
        late = self._late
        try:
            if late is None:
                raise trio.ClosedResourceError
            late.send_nowait(item)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            # Not handled now: the device keeps an unacked receipt and sends
            # it again on its next control channel.
            self._log.warning(
                "session.late_queue_full",
                device_id=item.device_id,
                type=type(item).__name__,
            )

    async def _serve_late(self, items: trio.MemoryReceiveChannel[_LateItem]) -> None:
        """Verify late end receipts and send acks, one at a time, until cancelled."""
        async for item in items:
            if isinstance(item, _LateReceipt):
                await self._late_receipt(item.device_id, item.event)
            else:
                await self._send_ack(item.device_id, item.session_id)

    async def _late_receipt(self, device_id: str, event: control.SessionEnded) -> None:
        """A receipt for a session that is over: verified as an on-time one."""
        session_id = event.session_id
        ended = self._ended_receipts.get(session_id)
        if ended is None or ended.device_id != device_id:
            # Forgotten since it was queued (or never this device's).
            self._log.warning(
                "session.unexpected_device_message",
                device_id=device_id,
                type=event.TYPE,
                audit=True,
            )
            return
        self._ended_receipts.move_to_end(session_id)
        if ended.recorded:
            self._log.info(
                "session.end_receipt_duplicate",
                session_id=session_id,
                device_id=device_id,
            )
            await self._send_ack(device_id, session_id)
            return
        try:
            signed = receipts.SignedReceipt.from_wire(event.receipt, event.signature)
            end = receipts.verify_end(
                x509.load_der_x509_certificate(ended.certificate_der),
                signed,
                session_id=session_id,
                device_id=device_id,
                nonce=ended.nonce,
            )
        except receipts.ReceiptError as exc:
            self._log.warning(
                "session.end_receipt_rejected",
                session_id=session_id,
                device_id=device_id,
                reason=exc.reason,
                detail=str(exc)[:200],
                late=True,
                audit=True,
            )
            # Acked all the same: it will never verify (see the module docstring).
            await self._send_ack(device_id, session_id)
            return
        ended.recorded = True
        self._log_end_receipt(
            session_id,
            device_id,
            end,
            bytes_to_device=ended.bytes_to_device,
            bytes_from_device=ended.bytes_from_device,
            granted_max_seconds=ended.granted_max_seconds,
            late=True,
        )
        if self._archive is not None:
            # A file that cannot be written is audited (session.archive_failed);
            # the receipt is in the log all the same, so it is acked.
            await self._archive.end_receipt(session_id, signed)
        await self._send_ack(device_id, session_id)

    async def _ack(self, live: _Live, session_id: str) -> None:
        """Ack an end receipt of *live*: through the late task for a device
        here; at once for one on another node (before the claim is given back,
        which would leave the ack nowhere to go)."""
        if live.control_node is None:
            self._post_late(_Ack(live.session.device_id, session_id))
        else:
            await self._send_control(live, control.EndReceiptAck(session_id=session_id))

    async def _send_ack(self, device_id: str, session_id: str) -> None:
        """Ack an end receipt on the device's live control channel, if any."""
        found = self._control.control_certificate(device_id)
        if found is None:
            return  # gone: its next channel brings the receipt again
        with trio.move_on_after(LEG_CLOSE_S * 2):
            await self._control.send_control(
                device_id, found[0], control.EndReceiptAck(session_id=session_id)
            )

    async def _apply(self, live: _Live, event: Event) -> None:
        outputs = live.session.handle(event)
        await self._act(live, outputs)

    async def _act(self, live: _Live, outputs: list[Output]) -> None:
        live.state_changed.set()
        live.state_changed = trio.Event()
        self._set_metric_state(live)
        for output in outputs:
            match output:
                case NotifyEngineer():
                    if live.engineer is not None:
                        await self._engineer_state(live, live.engineer)
                case Pair():
                    # Pair comes again when the engineer is back within the
                    # reattach grace: the session started once.
                    self._log.info(
                        "session.reattached"
                        if live.paired.is_set()
                        else "session.started",
                        session_id=live.session.session_id,
                        device_id=live.session.device_id,
                        engineer=live.session.engineer,
                        ends_at=_iso(live.session.ends_at_ms),
                        audit=True,
                    )
                    live.paired.set()
                case Warn(seconds_left=seconds, minutes_left=minutes):
                    if live.engineer is not None:
                        await self._engineer_text(
                            live.engineer,
                            {
                                "type": "warning",
                                "seconds_left": seconds,
                                "minutes_left": minutes,
                            },
                        )
                case EndSession(reason=reason):
                    await self._finish(live, reason)

    async def _finish(self, live: _Live, reason: EndReason) -> None:
        session = live.session
        for scope in live.pump_scopes:
            scope.cancel()
        if self._by_device.get(session.device_id) == session.session_id:
            del self._by_device[session.device_id]
        self._metrics.session_ends.labels(reason.value).inc()
        if live.granted_at_s is not None:
            self._metrics.session_duration.observe(
                trio.current_time() - live.granted_at_s
            )
        for stream_id, channel in sorted(live.stream_channels.items()):
            # Streams still open go with the tunnel: each gets its close.
            self._log.info(
                "stream.closed",
                session_id=session.session_id,
                stream_id=stream_id,
                channel=channel,
                closed_by="session_end",
                audit=True,
            )
        live.stream_channels.clear()
        self._log_end(live, reason)
        attached = tuple(
            leg
            for leg in (live.engineer, live.device)
            if leg is not None and not leg.closed
        )
        if attached:
            live.teardown_from_s = trio.current_time()
            live.teardown_legs = attached
        live.ended.set()
        for leg in (live.engineer, live.device):
            if leg is not None:
                leg.released.set()
        if live.control_lost or reason is EndReason.DEVICE_DISCONNECT:
            return
        if session.granted_at_ms is None:
            if reason is not EndReason.DENIED:
                await self._send_control(
                    live,
                    control.OfferWithdrawn(
                        session_id=session.session_id, reason=reason.value
                    ),
                )
        elif reason.value not in _DEVICE_END_REASONS:
            await self._send_control(
                live,
                control.SessionEnd(session_id=session.session_id, reason=reason.value),
            )

    def _log_end(self, live: _Live, reason: EndReason) -> None:
        """The one ``session.end`` record of a session (BRIEF, session flow 6)."""
        session = live.session
        duration_ms = None
        if session.granted_at_ms is not None:
            duration_ms = max(0, self._clock.now_ms() - session.granted_at_ms)
        self._log.info(
            "session.end",
            session_id=session.session_id,
            device_id=session.device_id,
            engineer=session.engineer,
            reason=reason.value,
            granted=session.granted_at_ms is not None,
            decided_by=live.decided_by,
            granted_at=_iso(session.granted_at_ms),
            duration_ms=duration_ms,
            bytes_to_device=live.bytes_to_device,
            bytes_from_device=live.bytes_from_device,
            device_fingerprint=live.fingerprint,
            source=live.source,
            broker_version=__version__,
            audit=True,
        )

    async def _archive_end(self, live: _Live) -> None:
        """Keep the end receipt, close the recording, end the row; once."""
        if self._archive is None or live.archived:
            return
        live.archived = True
        session = live.session
        if live.end_signed is not None:
            await self._archive.end_receipt(session.session_id, live.end_signed)
        elapsed = 0.0
        if live.granted_at_s is not None:
            elapsed = max(0.0, trio.current_time() - live.granted_at_s)
        reason = session.end_reason
        await self._archive.ended(
            session.session_id,
            reason=(reason or EndReason.BROKER_SHUTDOWN).value,
            bytes_to_device=live.bytes_to_device,
            bytes_from_device=live.bytes_from_device,
            recording=live.recording,
            t=elapsed,
            audit_ok=self._audit_ok,
        )

    async def _send_control(self, live: _Live, event: control.Event) -> bool:
        if live.control_lost:
            return False
        with trio.move_on_after(LEG_CLOSE_S * 2):
            if live.control_node is None:
                return await self._control.send_control(
                    live.session.device_id, live.connection_id, event
                )
            return await self._send_through(live, live.control_node, event)
        return False

    async def _send_through(
        self, live: _Live, node_id: str, event: control.Event
    ) -> bool:
        """Send *event* on the control channel another node lends; an offer
        names this node's device address for the tunnel."""
        crossing = self._crossing
        if crossing is None or crossing.tunnel_url is None:
            return False
        if isinstance(event, control.Offer):
            event = control.OfferWithTunnel(
                **{item.name: getattr(event, item.name) for item in fields(event)},
                tunnel_url=crossing.tunnel_url,
            )
        return await crossing.send_control(
            node_id,
            live.session.device_id,
            live.session.session_id,
            live.connection_id,
            event,
        )

    async def _engineer_state(self, live: _Live, leg: _Leg) -> None:
        state = live.session.state
        if state.is_terminal or state is State.REQUESTED:
            return
        await self._engineer_text(
            leg,
            {
                "type": "state",
                "state": state.value,
                "ends_at_ms": live.session.ends_at_ms,
            },
        )

    async def _engineer_text(self, leg: _Leg, message: dict[str, Any]) -> None:
        assert leg.send_text is not None  # noqa: S101 - engineer legs send text
        with trio.move_on_after(ENGINEER_SEND_S):
            async with leg.send_lock:
                with contextlib.suppress(*_GONE):
                    await leg.send_text(json.dumps(message))

    # The relay -------------------------------------------------------------------

    async def _pump(self, live: _Live, leg: _Leg, receive: Callable[[], Any]) -> None:
        """Relay *leg*'s frames to the other leg until cancelled or the leg fails."""
        side = leg.side
        gone: _LegGone | None = None
        scope = trio.CancelScope()
        live.pump_scopes.append(scope)
        if live.ended.is_set():
            scope.cancel()
        with scope:
            try:
                while True:
                    data = await receive()
                    await live.paired.wait()
                    assert live.table is not None  # noqa: S101 - paired sessions are granted
                    frame = tunnel.decode(data)
                    if (
                        live.table.receive(frame, sender=side)
                        is tunnel.Disposition.DROP
                    ):
                        continue
                    if not self._record(live, frame, side):
                        continue  # unrecorded: not relayed; the session ends
                    to_device = side is tunnel.Side.ENGINEER
                    if to_device:
                        self._messages_to_device.inc()
                    else:
                        self._messages_from_device.inc()
                    if isinstance(frame, tunnel.StreamData):
                        size = len(frame.payload)
                        if to_device:
                            live.bytes_to_device += size
                            self._bytes_to_device.inc(size)
                        else:
                            live.bytes_from_device += size
                            self._bytes_from_device.inc(size)
                    peer = (
                        live.device if side is tunnel.Side.ENGINEER else live.engineer
                    )
                    while peer is None:
                        # The engineer is away within the reattach grace.
                        await live.state_changed.wait()
                        peer = live.engineer
                    try:
                        async with peer.send_lock:
                            await peer.send(data)
                    except _GONE:
                        # The other leg's socket failed; its own pump reports it.
                        await trio.sleep_forever()
            except ConnectionClosed as exc:
                # Closed by our transport (not the keepalive): the leg broke the
                # WebSocket protocol (a text frame, over the cap ...), audited
                # like a malformed tunnel frame.
                broken = exc.by_us and exc.code != CloseCode.INTERNAL_ERROR
                gone = _LegGone(
                    leg,
                    exc.code,
                    exc.reason,
                    protocol_error=f"{exc.code} {exc.reason}" if broken else None,
                )
            except _EngineerGone as exc:
                gone = _LegGone(leg, protocol_error=exc.protocol_error)
            except RemoteProtocolError as exc:
                gone = _LegGone(leg, protocol_error=str(exc))
        if gone is not None:
            self._post(live, gone)

    def _record(self, live: _Live, frame: tunnel.Frame, side: tunnel.Side) -> bool:
        """Audit stream opens and closes, and hand *frame* to the recording;
        False if the recording failed (then the session is ending)."""
        session_id = live.session.session_id
        match frame:
            case tunnel.StreamOpen(stream_id=stream_id, channel=channel):
                live.stream_channels[stream_id] = channel
            case tunnel.StreamOpenOk(stream_id=stream_id):
                self._log.info(
                    "stream.opened",
                    session_id=session_id,
                    stream_id=stream_id,
                    channel=live.stream_channels.get(stream_id),
                    audit=True,
                )
            case tunnel.StreamOpenFail(stream_id=stream_id):
                self._log.info(
                    "stream.refused",
                    session_id=session_id,
                    stream_id=stream_id,
                    channel=live.stream_channels.pop(stream_id, ""),
                    audit=True,
                )
            case tunnel.StreamClose(stream_id=stream_id):
                channel = live.stream_channels.pop(stream_id, "")
                if channel:
                    self._log.info(
                        "stream.closed",
                        session_id=session_id,
                        stream_id=stream_id,
                        channel=channel,
                        closed_by=side.value,
                        audit=True,
                    )
        if live.recording_failed:
            return False
        if live.recording is None or live.granted_at_s is None:
            return True
        try:
            live.recording.observe(
                frame, side, max(0.0, trio.current_time() - live.granted_at_s)
            )
        except RecordingError as exc:
            # Fail closed: a session that cannot be recorded does not go on,
            # and this frame is not relayed.
            live.recording = None
            live.recording_failed = True
            self._log.error(
                "session.recording_failed",
                session_id=session_id,
                detail=str(exc)[:200],
                audit=True,
            )
            self._post(live, _End(EndReason.AUDIT_FAILURE))
            return False
        return True

    def _engineer_receiver(
        self, websocket: WebSocket, on_input: Callable[[], None]
    ) -> Callable[[], Any]:
        limit = RateLimit(
            per_minute=60.0 * self.config.engineer_messages_per_s,
            burst=self.config.engineer_message_burst,
        )
        return _engineer_receiver(
            websocket,
            on_input,
            TokenBucket(limit=limit),
            self._metrics.engineer_messages_throttled.inc,
        )

    def _set_metric_state(self, live: _Live, *, gone: bool = False) -> None:
        state = live.session.state
        new = None if gone or state.is_terminal else state.value
        if new == live.metric_state:
            return
        if live.metric_state is not None:
            self._metrics.sessions.labels(live.metric_state).dec()
        if new is not None:
            self._metrics.sessions.labels(new).inc()
        live.metric_state = new


_GONE: Final = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    RuntimeError,  # starlette: send after close
    ConnectionClosed,
)


class _EngineerGone(Exception):
    def __init__(self, protocol_error: str | None) -> None:
        super().__init__(protocol_error or "disconnected")
        self.protocol_error = protocol_error


def _engineer_receiver(
    websocket: WebSocket,
    on_input: Callable[[], None],
    bucket: TokenBucket,
    throttled: Callable[[], None],
) -> Callable[[], Any]:
    """The attach socket's reader: one engineer message per call.

    Messages are read at most at the bucket's rate. When it is empty the
    reader sleeps before reading on, so the engineer's messages wait in TCP
    buffers and the sender is slowed down (BRIEF: engineer messages are rate
    limited); nothing is dropped and the session goes on.
    """

    async def receive() -> bytes:
        while (wait := bucket.check(now=trio.current_time())) > 0:
            throttled()
            await trio.sleep(wait)
        try:
            message = await websocket.receive()
        except RuntimeError:
            raise _EngineerGone(None) from None
        if message["type"] == "websocket.disconnect":
            raise _EngineerGone(None)
        data = message.get("bytes")
        if data is None:
            raise _EngineerGone("text message on the attach socket")
        on_input()
        return bytes(data)

    return receive


def _reason(live: _Live) -> str:
    reason = live.session.end_reason
    return "" if reason is None else reason.value


async def _close_device(ws: WebSocketConnection, code: int, reason: str) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(LEG_CLOSE_S):
        await ws.aclose(code, reason)


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()
