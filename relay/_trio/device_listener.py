"""The device listener: mTLS WebSocket control channels from instruments.

Theory of operation
===================
Each accepted TCP connection goes through, in order:

1. **Admission.** Too many pending handshakes overall or from one source address:
   the connection is closed at once (``relay_connections_dropped_total``).
2. **TLS**, client certificate required and verified by OpenSSL against the device
   CA. A failure is counted by reason (``relay_tls_handshake_failures_total``).
3. **Certificate checks**, right after the handshake: the profile (client cert,
   not a CA, device id in CN and SAN) and the store (the certificate was issued
   by ``relay ca sign``, and neither it nor its device is revoked). The device's
   identity comes from here and nowhere else (Invariant 6).
4. **Upgrade** on ``/v1/device/control``, or on ``/v1/device/tunnel/{session}``
   for a remote session's tunnel, which the :class:`SessionBroker` admits (same
   device, granted, once: 404, 409, 410 otherwise) and then runs. Refusals in 3
   and 4 are HTTP answers (403, 404, 409, 410, 503) so that the agent learns why.

Steps 1-4 share one deadline (``handshake_timeout_s``). Then the control channel
runs: ``hello`` within ``hello_timeout_s`` (its ``device_id`` must equal the
certificate's), ``welcome``, then heartbeats until either side closes.

Live channels are kept in ``_live`` by device id. A second connection of the same
device replaces the first, which is closed with 4000. The revocation watcher polls
the store's revocation feed and closes live channels of revoked devices with 4001
within ``revocation_poll_s`` plus a close (budget: 5 s).

Remote sessions: the listener is the session broker's :class:`DeviceControl`. It
sends the broker's messages (offer, withdrawal, end) on a device's live channel
(one send lock per channel, so they never interleave with heartbeat acks), hands
the device's session messages (grant, deny, session ended) to the broker, and
tells it when a channel ends (``device_disconnect``) or a device is revoked
(``revoked``, told before the channel is closed so that reason wins).

Certificates (docs/certificates.md): a device may renew its certificate on
its control channel (:class:`~relay._trio.certificate_renewal.Renewer`); once it
authenticates with the new one, its older certificates are marked superseded and
refused at later handshakes (403, ``certificate_superseded``). The trust set
(device CA, plus the previous CA during a rollover) and the TLS context are
swapped by :class:`~relay._trio.broker_pki.BrokerPKI` (:meth:`set_trust`); a
certificate issued by the previous CA is told to renew at once
(``renewal_advised``).

Rule: every way out of a handler closes the stream, bounded and shielded.
"""

from __future__ import annotations

import random
import ssl
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import count
from typing import Any, Final

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

import auth
from relay import __version__
from relay._trio.certificate_renewal import Renewer
from relay._trio.feed_intake import FeedIntake
from relay._trio.session_broker import SessionBroker
from relay._trio.websocket import (
    ConnectionClosed,
    HandshakeFailed,
    ServerHandshake,
    WebSocketConnection,
)
from relay.config import BrokerConfig
from relay.metrics import RelayMetrics
from relay.presence import DevicePresence, LocalPresence, PresenceRegistry
from relay.proto import control
from relay.proto.admission import Admission, AdmissionLimits, admit
from relay.proto.close import CloseCode, close_code_label
from relay.proto.errors import RemoteProtocolError
from relay.proto.session import is_session_id
from relay.store import PresenceRow, Store, StoreError

CONTROL_PATH: Final = "/v1/device/control"
TUNNEL_PREFIX: Final = "/v1/device/tunnel/"
LISTENER: Final = "device"
# Connections the transport dropped itself, by the reason it gives (metric labels).
_LOCAL_DROP_LABELS: Final = {
    "keepalive timeout": "keepalive_timeout",
    "peer does not read": "peer_not_reading",
}


@dataclass(slots=True)
class _LiveChannel:
    """A handle on one open control channel, so others can close it."""

    device_id: str
    connection_id: int
    serial_hex: str
    cancel_scope: trio.CancelScope
    kicked: tuple[int, str, str] | None = (
        None  # (close code, reason text, metric reason)
    )
    certificate: x509.Certificate | None = None
    ws: WebSocketConnection | None = None
    channel: control.ControlChannel | None = None
    send_lock: trio.Lock = field(default_factory=trio.Lock)

    async def send(self, event: control.Event) -> None:
        """Send *event* on this channel, serialised with every other send."""
        if self.ws is None or self.channel is None:
            raise ConnectionClosed(CloseCode.ABNORMAL, "channel not open")
        async with self.send_lock:
            await self.ws.send_message(self.channel.send(event))

    def kick(self, code: int, reason: str, label: str) -> None:
        if self.kicked is None:
            self.kicked = (code, reason, label)
        self.cancel_scope.cancel()


@dataclass(frozen=True, slots=True)
class _Opened:
    handshake: ServerHandshake
    request: Any
    identity: auth.DeviceIdentity
    certificate: x509.Certificate
    tunnel_session: str | None = None


@dataclass(slots=True)
class DeviceListener:
    """Serves ``/v1/device/control``; see the module docstring."""

    config: BrokerConfig
    ssl_context: ssl.SSLContext
    ca_certificate: x509.Certificate
    store: Store
    presence: PresenceRegistry
    metrics: RelayMetrics
    log: Any
    node_id: str = "local"
    accepting: bool = True
    wall_clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    _live: dict[str, _LiveChannel] = field(default_factory=dict)
    _revoked_devices: set[str] = field(default_factory=set)
    _revocation_cursor: int = 0
    _revocation_lock: trio.Lock = field(default_factory=trio.Lock)
    _live_changed: trio.lowlevel.ParkingLot = field(
        default_factory=trio.lowlevel.ParkingLot
    )
    _pending_total: int = 0
    _pending_by_source: Counter[str] = field(default_factory=Counter)
    _connection_ids: Any = field(default_factory=lambda: count(1))
    _random: random.Random = field(default_factory=random.Random)
    sessions: SessionBroker | None = None
    renewer: Renewer | None = None
    #: Takes the monitoring feed's messages (records, queue reports, refusals).
    feed: FeedIntake | None = None
    #: CAs still trusted beside ``ca_certificate`` (a rollover in progress).
    previous_ca_certificates: tuple[x509.Certificate, ...] = ()

    # Serving -----------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen, and run handlers until cancelled. Reports the bound port."""
        address = self.config.device_listen
        revocation_cursor = await trio.to_thread.run_sync(self.store.revocation_cursor)
        listeners = await trio.open_tcp_listeners(address.port, host=address.host)
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            self._revocation_cursor = revocation_cursor
            nursery.start_soon(self._watch_revocations)
            nursery.start_soon(self._mirror_presence)
            task_status.started(port)
            await trio.serve_listeners(self._handle, listeners)

    def close_all(self, code: int, reason: str, label: str) -> None:
        """Close every live channel (broker shutdown)."""
        for channel in list(self._live.values()):
            channel.kick(code, reason, label)

    async def wait_idle(self) -> None:
        """Return once no control channel is open."""
        while self._live:
            await self._live_changed.park()

    def live_count(self) -> int:
        """Open control channels held by this process."""
        return len(self._live)

    # Certificates ------------------------------------------------------------------

    def set_trust(
        self,
        context: ssl.SSLContext,
        ca_certificate: x509.Certificate,
        previous: tuple[x509.Certificate, ...],
    ) -> None:
        """Use *context* and these device CAs for every new connection."""
        self.ssl_context = context
        self.ca_certificate = ca_certificate
        self.previous_ca_certificates = previous

    def close_untrusted(self) -> None:
        """Close live channels whose certificate no trusted CA verifies (4001)."""
        now = self.wall_clock()
        for live in list(self._live.values()):
            if live.certificate is None or self._verify(live.certificate, now):
                continue
            self.log.warning(
                "device.ca_retired_disconnect",
                device_id=live.device_id,
                serial=live.serial_hex,
                audit=True,
            )
            live.kick(CloseCode.REVOKED, "certificate authority retired", "ca_retired")

    def count_expiring_before(self, moment: datetime) -> int:
        """Live channels whose certificate ends before *moment*."""
        return sum(
            1
            for live in self._live.values()
            if live.certificate is not None
            and live.certificate.not_valid_after_utc < moment
        )

    def _verify(
        self, certificate: x509.Certificate, now: datetime
    ) -> auth.DeviceIdentity | None:
        """The identity if a trusted CA verifies *certificate*, else None."""
        for ca in (self.ca_certificate, *self.previous_ca_certificates):
            try:
                return auth.verify_device_certificate(ca, certificate, now=now)
            except auth.UntrustedPeer:
                continue
        return None

    def _issued_by_previous(self, certificate: x509.Certificate) -> bool:
        for ca in self.previous_ca_certificates:
            try:
                certificate.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                continue
            return True
        return False

    # The session broker's DeviceControl ----------------------------------------------

    def control_certificate(
        self, device_id: str
    ) -> tuple[int, x509.Certificate] | None:
        """(connection id, certificate) of *device_id*'s live control channel."""
        live = self._live.get(device_id)
        if live is None or live.kicked is not None or live.certificate is None:
            return None
        return live.connection_id, live.certificate

    def control_version(self, device_id: str) -> int | None:
        """The protocol version of *device_id*'s live control channel, if any."""
        live = self._live.get(device_id)
        if live is None or live.kicked is not None or live.channel is None:
            return None
        return live.channel.version

    async def send_control(
        self, device_id: str, connection_id: int, event: control.Event
    ) -> bool:
        """Send *event* on *device_id*'s channel *connection_id*; False if gone,
        or if the channel's protocol version predates *event* (a version 1
        agent would take an unknown message for a protocol error)."""
        live = self._live.get(device_id)
        if live is None or live.connection_id != connection_id or live.ws is None:
            return False
        if live.channel is None or (live.channel.version or 1) < event.SINCE_VERSION:
            return False
        try:
            await live.send(event)
        except ConnectionClosed:
            return False
        return True

    # One connection ----------------------------------------------------------------

    async def _handle(self, tcp: trio.SocketStream) -> None:
        """One connection; nothing it does may take the listener down."""
        try:
            await self._handle_connection(tcp)
        except Exception as exc:
            # A bug or an unforeseen peer behaviour: this connection ends, the
            # listener and every other device carry on.
            self.metrics.handler_errors.labels(LISTENER).inc()
            self.log.error(
                "device.handler_failed",
                error=type(exc).__name__,
                detail=str(exc)[:200],
                peer=_peer_address(tcp),
                exc_info=True,
            )
            await trio.aclose_forcefully(tcp)

    async def _handle_connection(self, tcp: trio.SocketStream) -> None:
        peer = _peer_address(tcp)
        if not self.accepting:
            self.metrics.connections_dropped.labels(LISTENER, "shutdown").inc()
            await trio.aclose_forcefully(tcp)
            return
        source = peer.rsplit(":", 1)[0]
        limits = self.config.device_listener
        decision = admit(
            AdmissionLimits(
                early_drop=limits.early_drop_pending_handshakes,
                hard_cap=limits.max_pending_handshakes,
                per_source=limits.max_pending_per_source,
            ),
            pending=self._pending_total,
            pending_from_source=self._pending_by_source[source],
            draw=self._random.random(),
        )
        if decision is not Admission.ADMIT:
            self.metrics.connections_dropped.labels(LISTENER, decision.value).inc()
            self.log.warning(
                "device.dropped", reason=decision.value, peer=peer, audit=True
            )
            await trio.aclose_forcefully(tcp)
            return
        tls = trio.SSLStream(
            tcp, self.ssl_context, server_side=True, https_compatible=True
        )
        self._pending_enter(source)
        try:
            opened = await self._open(tls, peer)
        except BaseException:
            # Cancelled mid-handshake (shutdown): the stream is still ours.
            await trio.aclose_forcefully(tls)
            raise
        finally:
            self._pending_exit(source)
        if opened is None:
            return
        try:
            async with opened.handshake.accept(opened.request) as ws:
                if opened.tunnel_session is not None:
                    assert self.sessions is not None  # noqa: S101 - admitted by it
                    self.log.info(
                        "device.tunnel_opened",
                        device_id=opened.identity.device_id,
                        session_id=opened.tunnel_session,
                        peer=peer,
                        audit=True,
                    )
                    await self.sessions.serve_tunnel(
                        opened.identity.device_id, opened.tunnel_session, ws
                    )
                    return
                await self._run_channel(ws, opened.identity, opened.certificate, peer)
        except HandshakeFailed as exc:
            self._record_rejection(
                "bad_upgrade",
                peer,
                detail=str(exc),
                device_id=opened.identity.device_id,
            )

    def _record_rejection(self, reason: str, peer: str, **fields: Any) -> None:
        """Count a refused device connection and log it as an audit-ready event."""
        self.metrics.device_rejections.labels(reason).inc()
        self.log.warning(
            "device.rejected", reason=reason, peer=peer, audit=True, **fields
        )

    def _pending_enter(self, source: str) -> None:
        self._pending_total += 1
        self._pending_by_source[source] += 1
        self.metrics.pending_handshakes.labels(LISTENER).set(self._pending_total)

    def _pending_exit(self, source: str) -> None:
        self._pending_total -= 1
        self._pending_by_source[source] -= 1
        if self._pending_by_source[source] <= 0:
            del self._pending_by_source[source]
        self.metrics.pending_handshakes.labels(LISTENER).set(self._pending_total)

    async def _open(
        self, tls: trio.SSLStream[trio.SocketStream], peer: str
    ) -> _Opened | None:
        """Steps 2-4 of the module docstring, under one deadline."""
        handshake = ServerHandshake(tls, self.config.websocket)
        stage = "tls"
        with trio.move_on_after(self.config.device_listener.handshake_timeout_s):
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                reason = tls_failure_reason(exc)
                self.metrics.tls_handshake_failures.labels(LISTENER, reason).inc()
                self.log.warning(
                    "device.tls_failed", reason=reason, peer=peer, audit=True
                )
                await trio.aclose_forcefully(tls)
                return None
            stage = "upgrade"
            der = tls.getpeercert(binary_form=True)
            certificate = _load_peer_certificate(der)
            refusal, identity = await self._check_certificate(certificate)
            try:
                request = await handshake.receive_request()
            except HandshakeFailed as exc:
                self._record_rejection("bad_upgrade", peer, detail=str(exc))
                return None
            if refusal is not None:
                status, reason, text = refusal
                self._record_rejection(
                    reason,
                    peer,
                    device_id=identity.device_id if identity else None,
                    fingerprint=auth.certificate_fingerprint(certificate)
                    if certificate
                    else None,
                )
                await handshake.reject(status, text)
                return None
            assert identity is not None  # noqa: S101 - refusal is None implies an identity
            assert certificate is not None  # noqa: S101 - as the identity
            if request.path.startswith(TUNNEL_PREFIX):
                session_id = request.path[len(TUNNEL_PREFIX) :]
                tunnel_refusal: tuple[int, str] | None = (404, "unknown session")
                if self.sessions is not None and is_session_id(session_id):
                    # The session broker waits while a grant is being verified;
                    # this deadline bounds that wait.
                    tunnel_refusal = await self.sessions.admit_tunnel(
                        identity.device_id, session_id
                    )
                if tunnel_refusal is not None:
                    self._record_rejection(
                        "tunnel_refused",
                        peer,
                        device_id=identity.device_id,
                        status=tunnel_refusal[0],
                    )
                    await handshake.reject(*tunnel_refusal)
                    return None
                return _Opened(handshake, request, identity, certificate, session_id)
            if request.path != CONTROL_PATH:
                # The path never names a device (Invariant 6): anything else is 404.
                self._record_rejection(
                    "bad_path",
                    peer,
                    path=request.path[:200],
                    device_id=identity.device_id,
                )
                await handshake.reject(404, "unknown path")
                return None
            return _Opened(handshake, request, identity, certificate)
        # The deadline passed.
        if stage == "tls":
            self.metrics.tls_handshake_failures.labels(LISTENER, "timeout").inc()
            self.log.warning(
                "device.tls_failed", reason="timeout", peer=peer, audit=True
            )
        else:
            self._record_rejection("upgrade_timeout", peer)
        await trio.aclose_forcefully(tls)
        return None

    async def _check_certificate(
        self, certificate: x509.Certificate | None
    ) -> tuple[tuple[int, str, str] | None, auth.DeviceIdentity | None]:
        """Profile, store and revocation checks; returns (refusal, identity)."""
        if certificate is None:
            # OpenSSL verified it, but cryptography cannot parse it (e.g. an
            # unknown version): nothing trustworthy can be read from it.
            return (403, "certificate_unparsable", "certificate not acceptable"), None
        try:
            identity = auth.verify_device_certificate(
                self.ca_certificate, certificate, now=self.wall_clock()
            )
        except auth.UntrustedPeer as exc:
            # During a CA rollover the previous CA still vouches for its devices.
            previous = (
                self._verify(certificate, self.wall_clock())
                if exc.reason == "not_signed_by_ca"
                else None
            )
            if previous is None:
                return (
                    403,
                    f"certificate_{exc.reason}",
                    "certificate not acceptable",
                ), None
            identity = previous
        try:
            # abandon_on_cancel: the handshake deadline must bound this too; a
            # read-only lookup can finish in its thread unobserved.
            record = await trio.to_thread.run_sync(
                self.store.lookup_certificate,
                identity.serial_hex,
                abandon_on_cancel=True,
            )
        except StoreError as exc:
            self.metrics.store_errors.labels("lookup_certificate").inc()
            self.log.error(
                "store.failed", operation="lookup_certificate", error=str(exc)
            )
            return (503, "store_unavailable", "try again later"), identity
        if record is None:
            return (403, "unknown_certificate", "certificate not on record"), identity
        if (
            record.device_id != identity.device_id
        ):  # pragma: no cover - the CA signs one id per cert
            return (403, "id_mismatch", "certificate not on record"), identity
        if record.revoked:
            return (403, "revoked", "certificate revoked"), identity
        if record.superseded:
            return (
                403,
                "certificate_superseded",
                "certificate superseded by a renewed one",
            ), identity
        return None, identity

    async def _run_channel(
        self,
        ws: WebSocketConnection,
        identity: auth.DeviceIdentity,
        certificate: x509.Certificate,
        peer: str,
    ) -> None:
        device_id = identity.device_id
        channel = control.ControlChannel(control.Role.BROKER)
        listener = self.config.device_listener
        hello: control.Hello | None = None
        with trio.move_on_after(listener.hello_timeout_s):
            try:
                channel.receive_message(await ws.receive_message())
                event = channel.next_event()
            except ConnectionClosed as exc:
                if exc.by_us:
                    # The transport failed the channel for its first message
                    # (over the cap, a text or malformed frame): counted and
                    # audited like a bad hello, not lost as a silent drop.
                    await self._refuse_channel(
                        ws,
                        _LOCAL_DROP_LABELS.get(exc.reason, "protocol_error"),
                        exc.code,
                        exc.reason,
                        device_id,
                        peer,
                    )
                return
            except RemoteProtocolError as exc:
                await self._refuse_channel(
                    ws, "protocol_error", exc.close_code, str(exc), device_id, peer
                )
                return
            assert isinstance(event, control.Hello)  # noqa: S101 - the state machine admits only Hello here
            hello = event
        if hello is None:
            await self._refuse_channel(
                ws,
                "hello_timeout",
                CloseCode.HELLO_TIMEOUT,
                "no hello",
                device_id,
                peer,
            )
            return
        if hello.device_id != device_id:
            await self._refuse_channel(
                ws,
                "id_mismatch",
                CloseCode.POLICY_VIOLATION,
                "device id does not match certificate",
                device_id,
                peer,
                claimed=hello.device_id,
            )
            return
        await self._serve_open_channel(ws, channel, identity, certificate, hello, peer)

    async def _serve_open_channel(
        self,
        ws: WebSocketConnection,
        channel: control.ControlChannel,
        identity: auth.DeviceIdentity,
        certificate: x509.Certificate,
        hello: control.Hello,
        peer: str,
    ) -> None:
        device_id = identity.device_id
        if device_id in self._revoked_devices:
            # Revoked after this connection's store check but before its hello:
            # the watcher has seen it, so it must not go live now.
            await self._refuse_channel(
                ws, "revoked", CloseCode.REVOKED, "certificate revoked", device_id, peer
            )
            return
        connection_id = next(self._connection_ids)
        now = self.wall_clock()
        live = _LiveChannel(
            device_id,
            connection_id,
            identity.serial_hex,
            trio.CancelScope(),
            certificate=certificate,
            ws=ws,
            channel=channel,
        )
        previous = self._live.get(device_id)
        self._live[device_id] = live
        self.presence.connected(
            DevicePresence(
                device_id=device_id,
                connection_id=connection_id,
                node_id=self.node_id,
                connected_since=now,
                last_seen=now,
                agent_version=hello.agent_version,
                peer=peer,
            )
        )
        if previous is not None:
            previous.kick(
                CloseCode.REPLACED, "replaced by a newer connection", "replaced"
            )
        self.metrics.device_connects.inc()
        self.metrics.devices_connected.set(len(self._live))
        self.log.info(
            "device.connected",
            device_id=device_id,
            peer=peer,
            agent_version=hello.agent_version,
            fingerprint=identity.fingerprint_sha256,
            replaced=previous is not None,
            audit=True,
        )
        label, reason = "peer_closed", ""
        code: int = CloseCode.NORMAL
        # A certificate that expires while connected ends the channel then
        # (the wall clock decides validity; trio's clock measures the wait).
        live.cancel_scope.deadline = trio.current_time() + max(
            0.0, (identity.not_after - now).total_seconds()
        )
        try:
            with live.cancel_scope:
                # Registered first, welcomed second: from here on the revocation
                # watcher can find this channel, so no revocation slips between.
                await live.send(
                    control.Welcome(
                        version=control.PROTOCOL_VERSION,
                        heartbeat_interval_s=self.config.device_listener.heartbeat_interval_s,
                        broker_version=__version__,
                    )
                )
                await self._after_welcome(live, identity, certificate)
                while True:
                    channel.receive_message(await ws.receive_message())
                    event = channel.next_event()
                    self.presence.touched(device_id, connection_id, self.wall_clock())
                    if isinstance(event, control.Heartbeat):
                        await live.send(control.HeartbeatAck(seq=event.seq))
                    elif (
                        isinstance(
                            event, control.Grant | control.Deny | control.SessionEnded
                        )
                        and self.sessions is not None
                    ):
                        self.sessions.device_message(device_id, event)
                    elif isinstance(event, control.RenewRequest):
                        await live.send(await self._renew(identity, event))
                    elif self.feed is not None:
                        await self._feed_event(live, event)
        except ConnectionClosed as exc:
            # Closed by us here means the transport failed the channel for the
            # device's bad input (1002, 1003, 1007, 1009), unless it dropped a
            # silent or non-reading peer.
            label = _LOCAL_DROP_LABELS.get(
                exc.reason, "protocol_error" if exc.by_us else "peer_closed"
            )
            code, reason = exc.code, exc.reason
        except RemoteProtocolError as exc:
            label, code, reason = "protocol_error", exc.close_code, str(exc)[:120]
        finally:
            if live.kicked is not None:
                code, reason, label = live.kicked
            elif live.cancel_scope.cancelled_caught:
                code, reason, label = (
                    CloseCode.CERTIFICATE_EXPIRED,
                    "certificate expired",
                    "certificate_expired",
                )
            # Close before the bookkeeping: shutdown waits for _live to empty, and
            # the close frame must be on the wire by then.
            # A kicked device (revoked, replaced, shutdown) gets a short grace
            # for the close handshake, so the budgets hold even if it ignores it.
            grace = (
                self.config.device_listener.kick_close_grace_s
                if live.kicked is not None
                else self.config.websocket.close_timeout_s
            )
            with trio.CancelScope(shield=True), trio.move_on_after(grace):
                await ws.aclose(code, reason)
            if self.sessions is not None:
                self.sessions.control_lost(device_id, connection_id)
            if self.feed is not None and self._live.get(device_id) is live:
                self.feed.disconnected(device_id)
            if self._live.get(device_id) is live:
                del self._live[device_id]
                self._live_changed.unpark_all()
            self.presence.disconnected(device_id, connection_id)
            self.metrics.devices_connected.set(len(self._live))
            self.metrics.device_disconnects.labels(label).inc()
            self.metrics.websocket_closes.labels(LISTENER, close_code_label(code)).inc()
            self.log.info(
                "device.disconnected",
                device_id=device_id,
                reason=label,
                code=int(code),
                peer=peer,
                audit=True,
            )

    async def _feed_event(self, live: _LiveChannel, event: object) -> None:
        """A monitoring feed message (protocol 4): handed to the feed intake."""
        assert self.feed is not None  # noqa: S101 - checked by the caller
        # Never waits for the store: the intake's writer does (see
        # relay._trio.feed_intake), so a grant behind a backlog is not held up.
        if isinstance(event, control.FeedRecord):
            ack = self.feed.record(live.device_id, event, live.send)
            if ack is not None:
                await live.send(ack)
        elif isinstance(event, control.FeedStatus):
            self.feed.status(live.device_id, event)
        elif isinstance(event, control.DataRequestRefused):
            self.feed.refused(live.device_id, event)

    async def _after_welcome(
        self,
        live: _LiveChannel,
        identity: auth.DeviceIdentity,
        certificate: x509.Certificate,
    ) -> None:
        """Supersede the device's older certificates; advise a renewal if due."""
        try:
            superseded = await trio.to_thread.run_sync(
                lambda: self.store.supersede_older_certificates(
                    identity.device_id, identity.serial_hex, at=self.wall_clock()
                ),
                abandon_on_cancel=True,
            )
        except StoreError as exc:
            # The old certificate stays usable until a later connect succeeds
            # here; it is still only good until its own end.
            self.metrics.store_errors.labels("supersede_certificates").inc()
            self.log.error(
                "store.failed", operation="supersede_certificates", error=str(exc)
            )
            superseded = []
        if superseded:
            self.log.info(
                "device.certificate_superseded",
                device_id=identity.device_id,
                serials=superseded,
                by_serial=identity.serial_hex,
                by_fingerprint=identity.fingerprint_sha256,
                audit=True,
            )
        if self._issued_by_previous(certificate):
            await live.send(control.RenewalAdvised(reason="ca_rollover"))

    async def _renew(
        self, identity: auth.DeviceIdentity, request: control.RenewRequest
    ) -> control.RenewResult | control.RenewRefused:
        if self.renewer is None:
            self.metrics.certificate_renewals.labels("unavailable").inc()
            return control.RenewRefused(
                reason="unavailable", detail="this broker does not renew certificates"
            )
        return await self.renewer.renew(identity, request)

    async def _refuse_channel(
        self,
        ws: WebSocketConnection,
        label: str,
        code: int,
        text: str,
        device_id: str,
        peer: str,
        **fields: Any,
    ) -> None:
        self.metrics.websocket_closes.labels(LISTENER, close_code_label(code)).inc()
        self._record_rejection(
            label, peer, device_id=device_id, detail=text[:200], **fields
        )
        await ws.aclose(code, text)

    # Background tasks ----------------------------------------------------------------

    async def _watch_revocations(self) -> None:
        """Close live channels of devices revoked by ``relay device revoke``.

        The cursor was read before the listener accepted anything, so a
        revocation is either seen by a handshake's own store check or by this
        feed.
        """
        while True:
            await trio.sleep(self.config.device_listener.revocation_poll_s)
            await self.revocations_now()

    async def revocations_now(self) -> bool:
        """Read the revocation feed now (also what the poll does) and close
        what it names; False if the store could not be read. One reader at a
        time: the cursor is shared."""
        async with self._revocation_lock:
            try:
                revocations, self._revocation_cursor = await trio.to_thread.run_sync(
                    self.store.revocations_after, self._revocation_cursor
                )
            except StoreError as exc:
                self.metrics.store_errors.labels("revocations_after").inc()
                self.log.error(
                    "store.failed", operation="revocations_after", error=str(exc)
                )
                return False
            for revocation in revocations:
                self._revoked_devices.add(revocation.device_id)
                if self.sessions is not None:
                    self.sessions.device_revoked(revocation.device_id)
                live = self._live.get(revocation.device_id)
                if live is not None:
                    self.log.warning(
                        "device.revoked_disconnect",
                        device_id=revocation.device_id,
                        serial=revocation.serial_hex,
                        audit=True,
                    )
                    live.kick(CloseCode.REVOKED, "certificate revoked", "revoked")
            return True

    async def _mirror_presence(self) -> None:
        """Write presence changes to the store for ``relay device list``.

        Only the in-process registry needs this: it is invisible to other
        processes. A shared registry (Redis) is its own mirror.
        """
        presence = self.presence
        if not isinstance(presence, LocalPresence):
            return
        flush_s = self.config.device_listener.presence_flush_s
        touch_every = max(
            1, round(self.config.device_listener.presence_touch_s / flush_s)
        )
        try:
            await self._store_call(
                "clear_presence", self.store.clear_presence, self.node_id
            )
            for tick in count(1):
                await trio.sleep(flush_s)
                upserts, deletes = presence.take_changes(
                    include_touched=tick % touch_every == 0
                )
                await self._write_presence(upserts, deletes)
        finally:
            # Bounded even if the database hangs: the thread is abandoned.
            with trio.CancelScope(shield=True), trio.move_on_after(flush_s * 5):
                await self._store_call(
                    "clear_presence", self.store.clear_presence, self.node_id
                )

    async def _store_call(
        self, operation: str, function: Callable[..., object], *args: object
    ) -> None:
        """Run a store write in a thread; a failure is logged and counted, not raised."""
        try:
            await trio.to_thread.run_sync(function, *args, abandon_on_cancel=True)
        except StoreError as exc:
            self.metrics.store_errors.labels(operation).inc()
            self.log.error("store.failed", operation=operation, error=str(exc))

    async def _write_presence(
        self, upserts: list[DevicePresence], deletes: list[str]
    ) -> None:
        rows = [
            PresenceRow(
                device_id=p.device_id,
                node_id=p.node_id,
                connected_since=p.connected_since,
                last_seen=p.last_seen,
                agent_version=p.agent_version,
                peer=p.peer,
            )
            for p in upserts
        ]
        if rows:
            await self._store_call(
                "presence", self.store.replace_presence, self.node_id, rows
            )
        if deletes:
            await self._store_call(
                "presence", self.store.remove_presence, self.node_id, deletes
            )


def _load_peer_certificate(der: bytes | None) -> x509.Certificate | None:
    if not der:  # pragma: no cover - CERT_REQUIRED guarantees a certificate
        return None
    try:
        with warnings.catch_warnings():
            # Odd-but-valid encodings (e.g. a negative serial) only warn; the
            # profile checks decide, so the warning must not become an error.
            warnings.simplefilter("ignore")
            return x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion):
        return None


def _peer_address(tcp: trio.SocketStream) -> str:
    try:
        host, port = tcp.socket.getpeername()[:2]
    except OSError:
        return "unknown"
    return f"{host}:{port}"


# OpenSSL's verify messages and reasons, mapped to bounded metric labels.
_VERIFY_REASONS: Final = (
    ("certificate has expired", "expired"),
    ("certificate is not yet valid", "not_yet_valid"),
    ("unable to get local issuer certificate", "unknown_ca"),
    ("self-signed certificate", "unknown_ca"),
    ("self signed certificate", "unknown_ca"),
    ("unsupported certificate purpose", "bad_certificate"),
)
_SSL_REASONS: Final = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_certificate",
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "WRONG_VERSION_NUMBER": "not_tls",
    "HTTP_REQUEST": "not_tls",
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "NO_SUITABLE_SIGNATURE_ALGORITHM": "no_shared_cipher",
    "CERTIFICATE_VERIFY_FAILED": "bad_certificate",
    "UNEXPECTED_EOF_WHILE_READING": "eof",
}


def tls_failure_reason(exc: BaseException) -> str:
    """A bounded label for a failed server-side TLS handshake."""
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        message = (cause.verify_message or "").lower()
        for needle, label in _VERIFY_REASONS:
            if needle in message:
                return label
        return "bad_certificate"
    if isinstance(cause, ssl.SSLError):
        return _SSL_REASONS.get(cause.reason or "", "tls_error")
    return "eof"


def presence_stale_after(config: BrokerConfig) -> timedelta:
    """How old a mirrored ``last_seen`` may be before ``device list`` says offline."""
    return timedelta(seconds=config.device_listener.presence_touch_s * 3)
