"""The device's side of remote sessions: offer, grant, tunnel, streams, end.

Theory of operation
===================
One :class:`SessionRuntime` lives for the whole life of the agent, above the
control-channel connection attempts: ``relay._trio.agent`` hands it the session
messages it receives (:meth:`~SessionRuntime.handle_control`) and tells it when
a channel is up or down (:meth:`~SessionRuntime.attach_control`,
:meth:`~SessionRuntime.detach_control`). The runtime holds at most one thing at a
time: a pending *offer*, or a *session* (granted, running, or ending). An offer
that arrives while either exists is denied as busy.

Asking. An offer is shown to the on-site person: the device UI reads it from
:meth:`~SessionRuntime.state` and answers with :meth:`~SessionRuntime.grant` or
:meth:`~SessionRuntime.deny`; every :class:`Decider` (the terminal prompt) is
asked in a task of its own, and the first answer wins. The device decides what is
reachable: the channels a grant gives are the offer's channels that this device
allows (``shell`` only when a shell command is configured, ``tcp:P`` only for P on
the allow-list), and the cap is the lower of the offer's and our own. An offer
with nothing this device allows is denied at once, without asking anybody. The
offer is forgotten when the broker withdraws it, when the control channel drops
(the broker ends an offer whose device left), or a little after its deadline.

Granting. The grant receipt is signed with the device key (read from disk at
each grant, as the agent re-reads its certificate at each attempt) and sent as
``grant``; the session's own cap timer starts the moment the grant is sent
(Invariant 2: measured on our monotonic clock, whatever the broker does). It
ends the session ``cap_grace_s`` (1 s) after the cap unless the broker's end
came first: the broker's timer starts when it has checked the grant, a little
later than ours, and it must be the one that ends an ordinary session. Then
the agent opens the tunnel WebSocket ``/v1/device/tunnel/{session}`` through the
:data:`TunnelOpener` it was given (mTLS with the same certificate; for an
:class:`~relay.proto.control.OfferWithTunnel`, a session across broker nodes,
at the offer's ``tunnel_url``, which must pass ``tunnel_allowed`` before the
offer is even shown, else it is denied at once) and serves the
engineer's streams with the device side of a
:class:`~relay._trio.tunnel_mux.TunnelMux`: its reader checks every frame with
the stream table (peer = engineer) and hands it on, and for each OPEN it starts
one task, which decides (the channel must be granted and allowed here), opens
the local end (a PTY running the shell command, or a TCP connection to
``127.0.0.1:P``), answers OPEN_OK or OPEN_FAIL, and moves bytes between the
stream and the local end until the stream is over: the engineer closes it (its
local I/O stops at once), the local end fails (CLOSE as ABORTED), or both
directions are done (a shell: it exited).

Flow control (lead decision 6) is the mux's: data from the engineer waits in the
stream, bounded by the credit we gave; the reader never waits for a local peer
(nor for a connect or a spawn), so one slow stream cannot stall the tunnel; credit
goes back with WINDOW as the stream's task takes the data to hand it on, half the
initial window at a time. Data to the engineer is read from the local end one
frame's worth at a time and sent only within the stream's credit.

Ending, in this order (lead decision 3): (1) something asks for the end with a
reason (the on-site End, the broker's ``session_end``, the cap timer, the tunnel
closing under us); the first reason wins. (2) The local streams are cancelled:
TCP connections close at once, a shell gets ``pty_kill_grace_s`` before SIGKILL,
so local streams are gone within 1 s without waiting for the broker. (3) The
tunnel is closed with 4005 and the reason. (4) A signed end receipt with our byte
counts is queued as ``session_ended``; the queue survives control-channel
reconnects and is sent as soon as a channel is up (it works with the broker
unreachable; the receipt just waits).

End receipts until acked. A write that returned has only reached socket
buffers: through a silent partition the receipt dies with the connection. So
a receipt stays queued until the broker acks it (``end_receipt_ack``, control
protocol version 2), and it is sent once on every channel that comes up (after
the welcome) until then: never twice on one channel, so a broker that does not
ack is not flooded. The queue is bounded and in memory only: at most
:data:`END_RECEIPTS_KEPT` receipts (the oldest is dropped, logged
``session.end_receipt_dropped``), each sent on at most
:data:`END_RECEIPT_MAX_SENDS` channels (then dropped, logged
``session.end_receipt_given_up``: a broker that restarted, or another node,
does not know the session and will never ack), and lost when the agent stops.
On a version 1 channel (an older broker never acks) a receipt is forgotten
once written, as before.

Rule 1: the control channel never carries session data (Invariant 4); streams
        exist only inside the tunnel.
Rule 2: every frame we send goes through the mux's table, under one lock, so the
        wire order is the order the table checked; a frame that lost its point
        (the stream closed meanwhile) is dropped, not an error.
Rule 3: nothing but our own timer, the on-site person and the broker's word
        ends a session; nothing but the broker's word and the on-site person
        starts one.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, Protocol

import trio
from cryptography import x509

import auth
from relay._trio.pty_process import PtyProcess, open_pty_process
from relay._trio.tunnel_mux import MuxStream, StreamClosed, TunnelMux
from relay._trio.websocket import ConnectionClosed, WebSocketConnection
from relay.config import AgentConfig
from relay.log import get_logger
from relay.pki_files import AgentDir
from relay.proto import control, receipts, tunnel
from relay.proto.close import CloseCode
from relay.proto.errors import LocalProtocolError, RemoteProtocolError
from relay.proto.session import EndReason

__all__ = [
    "TUNNEL_PATH",
    "Decider",
    "DeviceIdentity",
    "OfferView",
    "SessionRuntime",
    "StaleSession",
    "TunnelUnavailable",
    "load_device_identity",
]

#: The tunnel's path; ``{session_id}`` is the offer's id.
TUNNEL_PATH: Final = "/v1/device/tunnel/{session_id}"
#: An offer is forgotten this long after its deadline (our clock against the
#: broker's may be off a little; the broker's timeout is what counts).
OFFER_GRACE_S: Final = 2.0
#: Longest an offer is kept, whatever deadline it names.
MAX_OFFER_S: Final = 120.0
#: Unacked end receipts kept (in memory); the oldest is dropped beyond this.
END_RECEIPTS_KEPT: Final = 64
#: Channels an unacked end receipt is sent on before it is given up.
END_RECEIPT_MAX_SENDS: Final = 8

#: A local end that fails in one of these ways closes its stream as ABORTED.
_LOCAL_ERRORS: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

#: Sends one control message; raises ConnectionClosed (or LocalProtocolError)
#: when the channel cannot take it.
ControlSender = Callable[[control.Event], Awaitable[None]]
#: Opens the tunnel WebSocket of a session id; raises TunnelUnavailable.
#: Opens a session's tunnel: (session id, the tunnel address of a session
#: across nodes or None for the broker's own).
TunnelOpener = Callable[
    [str, str | None], AbstractAsyncContextManager[WebSocketConnection]
]


class StaleSession(Exception):
    """The session id is not the current offer or session (answered, gone, other)."""


class TunnelUnavailable(Exception):
    """The tunnel WebSocket could not be opened (network, TLS, refused upgrade)."""


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """The device id from our certificate, and the key that signs receipts."""

    device_id: str
    private_key: receipts.DevicePrivateKey


def load_device_identity(agent_dir: AgentDir) -> DeviceIdentity:
    """Read the device id (from the certificate) and key from *agent_dir*.

    Blocking file I/O: call it in a worker thread.

    Raises:
        OSError: A file cannot be read.
        ValueError: The certificate or key does not parse.
        auth.UntrustedPeer: The certificate is not a device certificate.
    """
    certificate = x509.load_pem_x509_certificate(agent_dir.cert.read_bytes())
    device_id = auth.device_identity(certificate).device_id
    private_key = auth.load_private_key(agent_dir.key.read_bytes())
    return DeviceIdentity(device_id=device_id, private_key=private_key)


@dataclass(frozen=True, slots=True, kw_only=True)
class OfferView:
    """What the on-site person is asked, as the device would grant it.

    Attributes:
        session_id: The offer's session id.
        engineer: Who asks (user name).
        engineer_role: How the broker presents them (role, company).
        reason: Why, as the engineer typed it (untrusted text: escape it).
        channels: What a grant gives: the offered channels this device allows.
        refused_channels: Offered channels this device does not allow.
        max_seconds: The cap a grant gives (the offer's, at most our own).
        grant_deadline_ms: When the offer lapses (broker clock, ms since epoch).
    """

    session_id: str
    engineer: str
    engineer_role: str
    reason: str
    channels: tuple[str, ...]
    refused_channels: tuple[str, ...]
    max_seconds: int
    grant_deadline_ms: int


class Decider(Protocol):
    """Something that asks the on-site person (a terminal prompt, a touchscreen)."""

    #: Who decided, for the grant receipt's ``decided_by`` (at most 64 chars).
    label: str

    async def decide(self, offer: OfferView) -> bool:
        """Ask about *offer*: True grants, False denies.

        Cancellation:
            Cancelled when the offer is answered elsewhere, withdrawn or lapses.
        """
        ...


@dataclass(eq=False, slots=True)
class _QueuedReceipt:
    """An end receipt the broker has not acked yet."""

    event: control.SessionEnded
    sent_on: int = 0  # the channel it was last sent on (0: none yet)
    sends: int = 0  # channels it was sent on


@dataclass(eq=False, slots=True)
class _PendingOffer:
    offer: control.Offer
    view: OfferView
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


@dataclass(eq=False, slots=True)
class _Session:
    offer: control.Offer
    channels: tuple[str, ...]
    max_seconds: int
    identity: DeviceIdentity | None = None
    granted: bool = False  # the grant was sent
    ends_at: float = float("inf")  # trio clock
    ends_at_ms: int | None = None  # wall clock, for display
    end_reason: EndReason | None = None
    end_requested: trio.Event = field(default_factory=trio.Event)
    connect_scope: trio.CancelScope | None = None
    ws: WebSocketConnection | None = None
    mux: TunnelMux | None = None  # the tunnel's streams, and the receipt's counts
    open_streams: int = 0  # streams whose task runs
    close_code: int = CloseCode.SESSION_ENDED
    warning_seconds: int | None = None  # the last warning given, seconds left

    @property
    def session_id(self) -> str:
        return self.offer.session_id

    def request_end(self, reason: EndReason) -> None:
        if self.end_reason is not None:
            return  # the first reason wins
        self.end_reason = reason
        self.end_requested.set()
        if self.connect_scope is not None:
            self.connect_scope.cancel()


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def _login_shell() -> tuple[str, ...]:
    return (os.environ.get("SHELL", "/bin/sh"), "-l")


class SessionRuntime:
    """The device's session runtime; see the module docstring.

    Args:
        config: The agent's limits, allow-list, shell command and cap.
        load_identity: Reads the device id and key (blocking; run in a thread).
        open_tunnel: Opens the tunnel WebSocket of a session id.
        deciders: Asked about every offer, concurrently; the first answer wins.
        wall_clock_ms: Milliseconds since the epoch, for receipts and display.

    Attributes:
        changed: Set (and replaced) whenever the offer or session changes.
    """

    def __init__(
        self,
        *,
        config: AgentConfig,
        load_identity: Callable[[], DeviceIdentity],
        open_tunnel: TunnelOpener,
        tunnel_allowed: Callable[[str], bool] = lambda url: False,
        deciders: Sequence[Decider] = (),
        wall_clock_ms: Callable[[], int] = _wall_clock_ms,
    ) -> None:
        self._config = config
        self._load_identity = load_identity
        self._open_tunnel = open_tunnel
        self._tunnel_allowed = tunnel_allowed
        self._deciders = tuple(deciders)
        self._wall_clock_ms = wall_clock_ms
        self._shell_argv: tuple[str, ...] | None = (
            _login_shell() if config.shell_command is None else config.shell_command
        ) or None
        self._log: Any = get_logger("agent.sessions")
        self._nursery: trio.Nursery | None = None
        self._offer: _PendingOffer | None = None
        self._session: _Session | None = None
        self._last_end: tuple[str, EndReason] | None = None
        self._sender: ControlSender | None = None
        # The channel's number (one per attach_control), and whether its
        # broker acks end receipts (version 2).
        self._channel_no = 0
        self._acks = False
        self._outbox: deque[control.Event] = deque()
        # Unacked end receipts by session id, oldest first.
        self._receipts: OrderedDict[str, _QueuedReceipt] = OrderedDict()
        self._outbox_changed = trio.Event()
        self._outbox_sent = trio.Event()
        self.changed = trio.Event()

    # Lifecycle ----------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the runtime's tasks until cancelled.

        Cancellation:
            Cancelling ends a live session at once (local streams are closed, a
            shell is killed); no end receipt is sent then (the agent is stopping).
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._flush_outbox)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    # Control channel ------------------------------------------------------------

    def attach_control(self, send: ControlSender, *, acks: bool) -> None:
        """A control channel is up (welcomed); queued messages go out on it now.

        *acks* says whether its broker acks end receipts (the channel speaks
        control protocol version 2); then every unacked receipt is sent on it.
        """
        self._sender = send
        self._channel_no += 1
        self._acks = acks
        self._wake_outbox()

    def detach_control(self, send: ControlSender) -> None:
        """The control channel *send* belongs to is gone.

        A pending offer is forgotten (the broker ends an offer whose device left).
        A running session goes on: its tunnel is a connection of its own.
        """
        if self._sender is send:
            self._sender = None
        # Only end receipts (kept apart) wait for the next channel; a grant or
        # deny for an offer the broker has dropped means nothing.
        self._outbox.clear()
        if self._offer is not None:
            self._drop_offer(self._offer, "control channel lost")

    def handle_control(self, event: control.Event) -> None:
        """Act on a session message from the broker (never blocks)."""
        match event:
            case control.Offer():
                self._on_offer(event)
            case control.OfferWithdrawn():
                if (
                    self._offer is not None
                    and self._offer.offer.session_id == event.session_id
                ):
                    self._drop_offer(self._offer, f"withdrawn: {event.reason}")
                else:
                    self._on_broker_end(event.session_id, event.reason)
            case control.SessionEnd():
                if (
                    self._offer is not None
                    and self._offer.offer.session_id == event.session_id
                ):
                    self._drop_offer(self._offer, f"ended: {event.reason}")
                else:
                    self._on_broker_end(event.session_id, event.reason)
            case control.EndReceiptAck():
                if self._receipts.pop(event.session_id, None) is not None:
                    self._log.info(
                        "session.end_receipt_acked", session_id=event.session_id
                    )
                    self._outbox_done()
            case _:
                pass

    # On-site answers --------------------------------------------------------------

    def grant(self, session_id: str, *, decided_by: str = "device-ui") -> None:
        """The on-site person allows the pending offer *session_id*.

        Raises:
            StaleSession: No pending offer has that id.
        """
        pending = self._take_offer(session_id)
        view = pending.view
        session = _Session(
            offer=pending.offer, channels=view.channels, max_seconds=view.max_seconds
        )
        self._session = session
        self._notify()
        self._start(self._run_granted, session, decided_by[:64])

    def deny(self, session_id: str, *, reason: str = "denied on the device") -> None:
        """The on-site person refuses the pending offer *session_id*.

        Raises:
            StaleSession: No pending offer has that id.
        """
        self._take_offer(session_id)
        self._notify()
        self._queue(control.Deny(session_id=session_id, reason=reason[:200]))

    def end(self, session_id: str) -> None:
        """The on-site person ends session *session_id* (reason ``onsite``).

        Local streams are closed first, within 1 s, whatever the broker does.
        Ending a session that is already ending is not an error.

        Raises:
            StaleSession: No session has that id.
        """
        session = self._session
        if session is None or session.session_id != session_id:
            raise StaleSession(f"no session {session_id!r} on this device")
        session.request_end(EndReason.ONSITE)
        self._notify()

    async def shutdown(self) -> None:
        """The agent is stopping (SIGTERM/SIGINT): end what is live, in order.

        A pending offer is denied ("device shutting down"); a granted session
        ends with ``device_shutdown`` like an on-site End: local streams first,
        then the tunnel, then the signed end receipt on the control channel if
        one is up. Returns when that is done, or after the configured
        ``shutdown_grace_s``; the caller then cancels the agent's tasks.
        """
        with trio.move_on_after(self._config.shutdown_grace_s):
            pending = self._offer
            if pending is not None:
                self.deny(pending.view.session_id, reason="device shutting down")
            session = self._session
            if session is not None:
                self._log.info("session.device_shutdown", session_id=session.session_id)
                session.request_end(EndReason.DEVICE_SHUTDOWN)
                self._notify()
            while self._session is not None:
                await self.changed.wait()
            # The deny or the end receipt goes out on a channel that is up; with
            # none up it would wait for a reconnect that is not coming.
            while self._sender is not None and (
                self._outbox or self._receipt_due() is not None
            ):
                await self._outbox_sent.wait()

    # Views ------------------------------------------------------------------------

    @property
    def offer(self) -> OfferView | None:
        """The pending offer, if any."""
        return None if self._offer is None else self._offer.view

    def state(self) -> dict[str, Any]:
        """The offer and session as JSON-ready data (the device UI's ``/api/state``)."""
        offer: dict[str, Any] | None = None
        if self._offer is not None:
            view = self._offer.view
            offer = {
                "session_id": view.session_id,
                "engineer": view.engineer,
                "engineer_role": view.engineer_role,
                "reason": view.reason,
                "channels": list(view.channels),
                "refused_channels": list(view.refused_channels),
                "max_seconds": view.max_seconds,
                "grant_deadline": view.grant_deadline_ms,
                "seconds_to_answer": max(
                    0, (view.grant_deadline_ms - self._wall_clock_ms()) // 1000
                ),
            }
        session: dict[str, Any] | None = None
        if self._session is not None:
            s = self._session
            left = None if not s.granted else max(0.0, s.ends_at - trio.current_time())
            session = {
                "session_id": s.session_id,
                "engineer": s.offer.engineer,
                "engineer_role": s.offer.engineer_role,
                "reason": s.offer.reason,
                "channels": list(s.channels),
                "max_seconds": s.max_seconds,
                "ends_at": s.ends_at_ms,
                "seconds_left": None if left is None else int(left + 0.999),
                "warning_seconds": s.warning_seconds,
                "state": "ending"
                if s.end_reason is not None
                else ("active" if s.ws is not None else "granted"),
                "open_streams": s.open_streams,
            }
        last_end = None
        if self._last_end is not None:
            last_end = {
                "session_id": self._last_end[0],
                "reason": self._last_end[1].value,
            }
        return {"offer": offer, "session": session, "last_end": last_end}

    # Offers -----------------------------------------------------------------------

    def _grantable(self, channel: str) -> bool:
        if channel == "shell":
            return self._shell_argv is not None
        if channel.startswith("tcp:") and channel[4:].isdigit():
            return int(channel[4:]) in self._config.allowed_ports
        return False

    def _on_offer(self, offer: control.Offer) -> None:
        if self._offer is not None or self._session is not None:
            self._log.warning("session.offer_busy", session_id=offer.session_id)
            self._queue(control.Deny(session_id=offer.session_id, reason="busy"))
            return
        if isinstance(offer, control.OfferWithTunnel) and not self._tunnel_allowed(
            offer.tunnel_url
        ):
            # Never shown: nobody on site can judge a tunnel address, and the
            # agent goes only to hosts it was configured for.
            self._log.warning(
                "session.offer_refused",
                session_id=offer.session_id,
                tunnel_url=offer.tunnel_url,
                detail="tunnel address not allowed (agent tunnel_hosts)",
            )
            self._queue(
                control.Deny(
                    session_id=offer.session_id,
                    reason="tunnel address not allowed on this device",
                )
            )
            return
        channels = tuple(c for c in offer.channels if self._grantable(c))
        refused = tuple(c for c in offer.channels if not self._grantable(c))
        if not channels:
            self._log.info(
                "session.offer_refused", session_id=offer.session_id, channels=refused
            )
            self._queue(
                control.Deny(
                    session_id=offer.session_id,
                    reason="none of the channels is allowed on this device",
                )
            )
            return
        view = OfferView(
            session_id=offer.session_id,
            engineer=offer.engineer,
            engineer_role=offer.engineer_role,
            reason=offer.reason,
            channels=channels,
            refused_channels=refused,
            max_seconds=min(offer.max_seconds, self._config.max_session_seconds),
            grant_deadline_ms=offer.grant_deadline_ms,
        )
        pending = _PendingOffer(offer=offer, view=view)
        self._offer = pending
        self._log.info(
            "session.offer",
            session_id=offer.session_id,
            engineer=offer.engineer,
            channels=channels,
            refused=refused,
        )
        self._notify()
        lifetime_s = (offer.grant_deadline_ms - self._wall_clock_ms()) / 1000
        lifetime_s = min(max(lifetime_s, 0.0), MAX_OFFER_S) + OFFER_GRACE_S
        self._start(self._ask, pending, lifetime_s)

    async def _ask(self, pending: _PendingOffer, lifetime_s: float) -> None:
        with pending.scope:
            async with trio.open_nursery() as nursery:
                for decider in self._deciders:
                    nursery.start_soon(self._ask_one, pending, decider)
                await trio.sleep(lifetime_s)
                self._drop_offer(pending, "no answer before the deadline")

    async def _ask_one(self, pending: _PendingOffer, decider: Decider) -> None:
        try:
            granted = await decider.decide(pending.view)
        except Exception as exc:
            self._log.error(
                "session.decider_failed", decider=decider.label, error=repr(exc)
            )
            return
        if self._offer is not pending:
            return
        session_id = pending.view.session_id
        if granted:
            self.grant(session_id, decided_by=decider.label)
        else:
            self.deny(session_id)

    def _take_offer(self, session_id: str) -> _PendingOffer:
        pending = self._offer
        if pending is None or pending.view.session_id != session_id:
            raise StaleSession(f"no pending offer {session_id!r} on this device")
        self._offer = None
        pending.scope.cancel()
        return pending

    def _drop_offer(self, pending: _PendingOffer, why: str) -> None:
        if self._offer is pending:
            self._offer = None
            self._log.info(
                "session.offer_gone", session_id=pending.view.session_id, why=why
            )
            self._notify()
        pending.scope.cancel()

    def _on_broker_end(self, session_id: str, reason_text: str) -> None:
        session = self._session
        if session is None or session.session_id != session_id:
            self._log.info(
                "session.end_unknown", session_id=session_id, reason=reason_text
            )
            return
        try:
            reason = EndReason(reason_text)
        except ValueError:
            reason = EndReason.DEVICE_DISCONNECT
        session.request_end(reason)
        self._notify()

    # A granted session ------------------------------------------------------------

    async def _run_granted(self, session: _Session, decided_by: str) -> None:
        try:
            session.identity = await trio.to_thread.run_sync(self._load_identity)
        except Exception as exc:
            self._log.error("session.key_unreadable", error=repr(exc))
            self._forget(session)
            self._queue(
                control.Deny(
                    session_id=session.session_id, reason="device key unreadable"
                )
            )
            return
        offer = session.offer
        receipt = receipts.GrantReceipt(
            session_id=offer.session_id,
            device_id=session.identity.device_id,
            nonce=offer.nonce,
            engineer=offer.engineer,
            channels=session.channels,
            max_seconds=session.max_seconds,
            granted_at_ms=self._wall_clock_ms(),
            decided_by=decided_by,
        )
        wire_receipt, signature = receipts.sign_grant(
            session.identity.private_key, receipt
        ).to_wire()
        grant = control.Grant(
            session_id=offer.session_id, receipt=wire_receipt, signature=signature
        )
        if not await self._send_now(grant):
            # The broker never saw a grant: for it the offer just lapses.
            self._log.warning("session.grant_not_sent", session_id=offer.session_id)
            self._forget(session)
            return
        # Invariant 2: the cap runs on our own monotonic clock from here.
        session.granted = True
        session.ends_at = trio.current_time() + session.max_seconds
        session.ends_at_ms = self._wall_clock_ms() + session.max_seconds * 1000
        self._log.info(
            "session.granted",
            session_id=offer.session_id,
            channels=session.channels,
            max_seconds=session.max_seconds,
        )
        self._notify()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._cap_timer, session)
                await self._serve_tunnel(session)
                nursery.cancel_scope.cancel()
        finally:
            self._finish(session)

    async def _cap_timer(self, session: _Session) -> None:
        # Largest first; as in the broker's machine, a warning not after the
        # grant is skipped.
        for warn_s in self._config.warning_seconds:
            if session.max_seconds > warn_s:
                await trio.sleep_until(session.ends_at - warn_s)
                session.warning_seconds = warn_s
                self._log.warning(
                    "session.warning",
                    session_id=session.session_id,
                    seconds_left=warn_s,
                )
                self._notify()
        # The broker ends the session at the cap (its timer starts a little
        # later, when it has checked our grant) and tells us; ours is the
        # backstop for a broker that does not, so it waits cap_grace_s more.
        # Were both timers due at once, ours could close the tunnel first and
        # the broker would take that for a lost device.
        await trio.sleep_until(session.ends_at + self._config.cap_grace_s)
        session.request_end(EndReason.TIME_CAP)
        self._notify()

    async def _serve_tunnel(self, session: _Session) -> None:
        """Open the tunnel, serve it until the end is asked for, tear down in order."""
        with trio.CancelScope() as connect_scope:
            session.connect_scope = connect_scope
            if session.end_reason is not None:
                connect_scope.cancel()
            try:
                tunnel_url = (
                    session.offer.tunnel_url
                    if isinstance(session.offer, control.OfferWithTunnel)
                    else None
                )
                async with self._open_tunnel(session.session_id, tunnel_url) as ws:
                    # From here on the end is an orderly teardown, not a cancel.
                    session.connect_scope = None
                    session.ws = ws
                    self._notify()
                    async with trio.open_nursery() as streams:
                        session.mux = TunnelMux(
                            ws,
                            side=tunnel.Side.DEVICE,
                            on_stream=partial(self._on_stream, session, streams),
                        )
                        streams.start_soon(self._read_tunnel, session, session.mux)
                        await session.end_requested.wait()
                        streams.cancel_scope.cancel()
                    # Local streams are gone (a shell reaped); only now the tunnel.
                    reason = session.end_reason or EndReason.DEVICE_DISCONNECT
                    self._log.info(
                        "session.local_streams_closed",
                        session_id=session.session_id,
                        reason=reason.value,
                    )
                    await ws.aclose(session.close_code, reason.value)
            except TunnelUnavailable as exc:
                self._log.warning(
                    "session.tunnel_unavailable",
                    session_id=session.session_id,
                    error=str(exc),
                )
                session.request_end(EndReason.DEVICE_DISCONNECT)
        session.connect_scope = None

    def _finish(self, session: _Session) -> None:
        """Queue the signed end receipt and forget the session (sync: safe in finally)."""
        reason = session.end_reason or EndReason.DEVICE_DISCONNECT
        session.end_reason = reason
        assert session.identity is not None  # noqa: S101 - set before the grant was sent
        mux = session.mux  # None: the tunnel never opened, nothing was counted
        receipt = receipts.EndReceipt(
            session_id=session.session_id,
            device_id=session.identity.device_id,
            nonce=session.offer.nonce,
            reason=reason.value,
            ended_at_ms=self._wall_clock_ms(),
            bytes_to_device=0 if mux is None else mux.data_bytes_received,
            bytes_from_device=0 if mux is None else mux.data_bytes_sent,
            streams_opened=0 if mux is None else mux.streams_opened,
        )
        wire_receipt, signature = receipts.sign_end(
            session.identity.private_key, receipt
        ).to_wire()
        self._queue_receipt(
            control.SessionEnded(
                session_id=session.session_id, receipt=wire_receipt, signature=signature
            )
        )
        self._log.info(
            "session.ended",
            session_id=session.session_id,
            reason=reason.value,
            bytes_to_device=receipt.bytes_to_device,
            bytes_from_device=receipt.bytes_from_device,
            streams_opened=receipt.streams_opened,
        )
        self._last_end = (session.session_id, reason)
        self._forget(session)

    def _forget(self, session: _Session) -> None:
        if self._session is session:
            self._session = None
        self._notify()

    # The tunnel -------------------------------------------------------------------

    async def _read_tunnel(self, session: _Session, mux: TunnelMux) -> None:
        try:
            await mux.run()
        except ConnectionClosed as exc:
            reason = EndReason.DEVICE_DISCONNECT
            if exc.code == CloseCode.SESSION_ENDED:
                with suppress(ValueError):
                    reason = EndReason(exc.reason)
            session.request_end(reason)
        except RemoteProtocolError as exc:
            self._log.warning(
                "session.tunnel_protocol_error",
                session_id=session.session_id,
                error=str(exc),
            )
            session.close_code = CloseCode.PROTOCOL_ERROR
            session.request_end(EndReason.DEVICE_DISCONNECT)
        self._notify()

    # Streams ----------------------------------------------------------------------

    def _allowed(self, session: _Session, channel: str) -> bool:
        # The device decides (issue 4): granted for this session AND allowed here,
        # whatever the broker relays.
        return channel in session.channels and self._grantable(channel)

    def _on_stream(
        self,
        session: _Session,
        streams: trio.Nursery,
        stream: MuxStream,
        frame: tunnel.StreamOpen,
    ) -> None:
        # Called by the tunnel's reader: it must not wait for a connect or a spawn.
        streams.start_soon(self._serve_stream, session, stream, frame)

    async def _serve_stream(
        self, session: _Session, stream: MuxStream, frame: tunnel.StreamOpen
    ) -> None:
        session.open_streams += 1
        self._notify()
        try:
            if not self._allowed(session, frame.channel):
                await stream.refuse(
                    tunnel.OpenFailCode.NOT_ALLOWED, "not allowed on this device"
                )
            elif frame.port is None:
                await self._serve_shell(stream, frame)
            else:
                await self._serve_tcp(stream, frame.port)
        except ConnectionClosed:
            pass  # the tunnel is gone: its reader ends the session
        except LocalProtocolError as exc:
            self._log.error("session.tunnel_bug", error=str(exc))
            session.request_end(EndReason.DEVICE_DISCONNECT)
        finally:
            session.open_streams -= 1
            self._notify()

    async def _serve_shell(self, stream: MuxStream, frame: tunnel.StreamOpen) -> None:
        assert self._shell_argv is not None  # noqa: S101 - _allowed checked it
        env = dict(os.environ)
        env.setdefault("TERM", "xterm-256color")
        async with AsyncExitStack() as stack:
            try:
                pty_process = await stack.enter_async_context(
                    open_pty_process(
                        self._shell_argv,
                        cols=frame.cols,
                        rows=frame.rows,
                        env=env,
                        kill_grace_s=self._config.pty_kill_grace_s,
                    )
                )
            except (OSError, ValueError) as exc:
                self._log.warning("session.shell_failed", error=repr(exc))
                await stream.refuse(
                    tunnel.OpenFailCode.NO_PTY, "cannot start the shell"
                )
                return
            stream.on_resize = partial(self._resize, pty_process)
            try:
                await _carry(stream, pty_process, tcp=None)
            finally:
                # The PTY's fd closes as the block ends, and its number may be
                # reused at once: a late RESIZE must not reach it.
                stream.on_resize = None

    def _resize(self, pty_process: PtyProcess, cols: int, rows: int) -> None:
        try:
            pty_process.resize(cols, rows)
        except (OSError, ValueError) as exc:
            self._log.warning("session.resize_failed", error=repr(exc))

    async def _serve_tcp(self, stream: MuxStream, port: int) -> None:
        try:
            with trio.fail_after(self._config.local_connect_timeout_s):
                connection = await trio.open_tcp_stream("127.0.0.1", port)
        except (OSError, trio.TooSlowError) as exc:
            self._log.info("session.connect_failed", port=port, error=repr(exc))
            await stream.refuse(
                tunnel.OpenFailCode.CONNECT_FAILED, f"cannot connect to port {port}"
            )
            return
        async with connection:
            await _carry(stream, connection, tcp=connection)

    # Plumbing ---------------------------------------------------------------------

    def _start(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        if self._nursery is None:
            raise RuntimeError("SessionRuntime.run() is not running")
        self._nursery.start_soon(fn, *args)

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _queue(self, event: control.Event) -> None:
        self._outbox.append(event)
        self._wake_outbox()

    def _queue_receipt(self, event: control.SessionEnded) -> None:
        self._receipts[event.session_id] = _QueuedReceipt(event)
        while len(self._receipts) > END_RECEIPTS_KEPT:
            session_id, _ = self._receipts.popitem(last=False)
            self._log.warning("session.end_receipt_dropped", session_id=session_id)
        self._wake_outbox()

    def _receipt_due(self) -> _QueuedReceipt | None:
        """The oldest receipt not yet sent on the current channel, if any."""
        if self._sender is None:
            return None
        for queued in self._receipts.values():
            if queued.sent_on != self._channel_no:
                return queued
        return None

    def _wake_outbox(self) -> None:
        self._outbox_changed.set()
        self._outbox_changed = trio.Event()

    async def _send_now(self, event: control.Event) -> bool:
        send = self._sender
        if send is None:
            return False
        try:
            await send(event)
        except (
            ConnectionClosed,
            LocalProtocolError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ):
            if self._sender is send:
                self._sender = None
            return False
        return True

    async def _flush_outbox(self) -> None:
        while True:
            while self._sender is None or (
                not self._outbox and self._receipt_due() is None
            ):
                await self._outbox_changed.wait()
            if self._outbox:
                event = self._outbox[0]
                sent = await self._send_now(event)
                if sent and self._outbox and self._outbox[0] is event:
                    self._outbox.popleft()
            else:
                queued = self._receipt_due()
                assert queued is not None  # noqa: S101 - the wait above found one
                await self._send_receipt(queued)
            # Sent or not (the channel failed): shutdown() looks again.
            self._outbox_done()

    async def _send_receipt(self, queued: _QueuedReceipt) -> None:
        """Send *queued* on the current channel; forget it unless an ack is due."""
        session_id = queued.event.session_id
        channel_no, acks = self._channel_no, self._acks
        if queued.sends >= END_RECEIPT_MAX_SENDS:
            self._log.warning(
                "session.end_receipt_given_up",
                session_id=session_id,
                sends=queued.sends,
            )
            self._drop_receipt(queued)
            return
        if not await self._send_now(queued.event):
            return  # the channel failed: the next one gets it
        queued.sent_on = channel_no
        queued.sends += 1
        if not acks:
            # An older broker never acks: sent once, as protocol version 1 did.
            self._drop_receipt(queued)

    def _drop_receipt(self, queued: _QueuedReceipt) -> None:
        session_id = queued.event.session_id
        if self._receipts.get(session_id) is queued:
            del self._receipts[session_id]

    def _outbox_done(self) -> None:
        self._outbox_sent.set()
        self._outbox_sent = trio.Event()


# Moving bytes between a stream and its local end ------------------------------------

_LocalEnd = PtyProcess | trio.SocketStream


async def _carry(
    stream: MuxStream, local: _LocalEnd, *, tcp: trio.SocketStream | None
) -> None:
    """Answer OPEN_OK, move bytes both ways until the stream is over, then CLOSE.

    *tcp* is *local* when it can half-close (a TCP connection), None for a PTY.
    """
    try:
        await stream.accept()
    except StreamClosed:
        return  # the engineer cancelled the open; our CLOSE has answered it
    code = await _Pumps(stream, local, tcp).run()
    await stream.aclose(code)


class _Pumps:
    """Both directions between an accepted stream and its local end.

    The stream is over when the engineer closes it (local I/O stops at once), when
    the local end fails (then it closes as ABORTED), or when both directions are
    done; a shell is done when it exits, whatever the engineer still types (a
    terminal has no half-close).
    """

    def __init__(
        self, stream: MuxStream, local: _LocalEnd, tcp: trio.SocketStream | None
    ) -> None:
        self._stream = stream
        self._local = local
        self._tcp = tcp
        self._scope = trio.CancelScope()
        self._aborted = False
        self._tunnel_error: ConnectionClosed | LocalProtocolError | None = None

    async def run(self) -> tunnel.StreamCloseCode:
        """Pump until the stream is over; how it ended, for our CLOSE.

        Raises:
            ConnectionClosed: The tunnel closed (the local I/O has stopped).
            relay.proto.errors.LocalProtocolError: A frame of ours broke the
                tunnel's rules (a bug; the local I/O has stopped).
        """
        with self._scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_when_the_engineer_closes)
                async with trio.open_nursery() as directions:
                    directions.start_soon(self._guarded, self._downlink)
                    await self._guarded(self._uplink)
                    if self._tcp is None:
                        directions.cancel_scope.cancel()  # the shell has exited
                nursery.cancel_scope.cancel()
        if self._tunnel_error is not None:
            raise self._tunnel_error
        if self._aborted:
            return tunnel.StreamCloseCode.ABORTED
        return tunnel.StreamCloseCode.NORMAL

    async def _stop_when_the_engineer_closes(self) -> None:
        await self._stream.wait_peer_closed()
        self._scope.cancel()

    async def _guarded(self, pump: Callable[[], Awaitable[None]]) -> None:
        # Errors end the stream here, in its own task: out of a nursery they
        # would arrive as an exception group.
        try:
            await pump()
        except _LOCAL_ERRORS:
            self._aborted = True
        except StreamClosed:
            pass  # the engineer closed the stream, or the tunnel ended
        except (ConnectionClosed, LocalProtocolError) as exc:
            self._tunnel_error = exc
        else:
            return
        self._scope.cancel()

    async def _uplink(self) -> None:
        """Local end to engineer; EOF once the local end has no more."""
        # One frame's worth at a time: send_all waits for credit, so what a
        # stream holds for a slow engineer stays bounded.
        while data := await self._local.receive_some(tunnel.MAX_DATA_BYTES):
            await self._stream.send_all(data)
        await self._stream.send_eof()

    async def _downlink(self) -> None:
        """Engineer to local end (the mux returns credit as we read)."""
        while data := await self._stream.receive_some():
            await self._local.send_all(data)
        # The engineer's EOF: pass it on to a TCP peer; a terminal has no
        # half-close, the shell goes on until it exits.
        if self._tcp is not None and not self._stream.peer_closed:
            await self._tcp.send_eof()
