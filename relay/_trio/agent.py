"""``relay agent run``: the device side of the control channel.

Theory of operation
===================
The agent only ever connects out (Invariant 5). Each attempt: check our own
certificate's dates, TCP connect, TLS (the broker's certificate is verified
against ``--ca-file`` and its name), WebSocket upgrade on ``/v1/device/control``,
``hello``, ``welcome``; then heartbeats until the connection ends. Every attempt
ends in an :class:`~relay.proto.backoff.Outcome`, and
:func:`~relay.proto.backoff.plan_retry` turns it into the wait before the next one:
full-jitter exponential backoff for network trouble, a long fixed wait
(``auth_failure_retry_s``, >= 15 min) when the broker refused our certificate,
logged as an error an instrument maker can act on.

The key, certificate and CA are re-read at every attempt, so replacing
``device.crt`` (a renewed certificate) needs no restart. Renewal over the
control channel lives in :mod:`relay._trio.agent_renewal`; a swap that a crash
interrupted is finished or undone before each attempt.

Remote sessions live in a :class:`~relay._trio.agent_sessions.SessionRuntime`
that outlives the attempts: each open channel hands it the session messages
(``offer``, ``offer_withdrawn``, ``session_end``) and lends it a sender for its
answers while the channel is up. The per-session tunnel
(``/v1/device/tunnel/{session}``) is opened by :func:`open_tunnel` with the same
TLS code as the control channel.

The monitoring feed (:class:`~relay._trio.agent_feed.AgentFeed`, when the
caller gives one) outlives the attempts too: each open channel hands it
``feed_ack`` and ``data_request`` and runs its sender while the channel is up.
"""

from __future__ import annotations

import dataclasses
import random
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import trio
from cryptography import x509

import auth
from relay import __version__
from relay._trio.agent_feed import FEED_EVENTS, AgentFeed
from relay._trio.agent_renewal import (
    RENEWAL_EVENTS,
    CertificateRenewal,
    close_renewed,
    finish_pending_swap,
)
from relay._trio.agent_sessions import (
    TUNNEL_PATH,
    Decider,
    SessionRuntime,
    TunnelUnavailable,
    load_device_identity,
)
from relay._trio.websocket import (
    ConnectionClosed,
    HandshakeFailed,
    WebSocketConnection,
    connect_websocket,
)
from relay.config import AgentConfig, WebSocketLimits
from relay.log import get_logger
from relay.pki_files import AgentDir
from relay.proto import control
from relay.proto.backoff import Backoff, Outcome, plan_retry
from relay.proto.close import CloseCode
from relay.proto.errors import RemoteProtocolError
from relay.tls import agent_context

CONTROL_PATH: Final = "/v1/device/control"
USER_AGENT: Final = f"relay-agent/{__version__}"
#: A tunnel's polite close waits at most this long for the broker, so that a
#: session ends on time even when the broker is unreachable (cap + 2 s).
TUNNEL_CLOSE_TIMEOUT_S: Final = 1.0
_CONTROL_SESSION_EVENTS: Final = (
    control.Offer,
    control.OfferWithdrawn,
    control.SessionEnd,
    control.EndReceiptAck,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentSettings:
    """What ``relay agent run`` was told."""

    broker_url: str
    agent_dir: Path
    ca_file: Path
    limits: AgentConfig = field(default_factory=AgentConfig)
    websocket: WebSocketLimits = field(default_factory=WebSocketLimits)


@dataclass(slots=True)
class AgentStatus:
    """Observable state, for the demo and tests."""

    connected: bool = False
    device_id: str | None = None
    attempts: int = 0
    last_outcome: Outcome | None = None
    last_error: str = ""
    heartbeat_rtt_s: float | None = None
    changed: trio.Event = field(default_factory=trio.Event)

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class _AttemptFailed(Exception):
    def __init__(self, outcome: Outcome, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


def parse_broker_url(url: str, path: str = CONTROL_PATH) -> tuple[str, int, str]:
    """Split ``wss://HOST:PORT[/path]`` into host, port and the URL of *path*.

    Raises:
        ValueError: Not a wss:// URL with a host.
    """
    parts = urlsplit(url)
    if parts.scheme != "wss" or not parts.hostname:
        raise ValueError(f"broker must be a wss://HOST:PORT URL, got {url!r}")
    port = parts.port or 443
    host = parts.hostname
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return host, port, f"wss://{netloc}{path}"


async def _client_context(settings: AgentSettings, files: AgentDir) -> ssl.SSLContext:
    """The mTLS client context, re-read from disk (a renewed certificate counts).

    Reads three files and parses a key: off the event loop.
    """
    return await trio.to_thread.run_sync(
        partial(
            agent_context,
            ca_file=settings.ca_file,
            cert_file=files.cert,
            key_file=files.key,
            extra_ca_file=files.trust,
        )
    )


def make_session_runtime(
    settings: AgentSettings,
    *,
    deciders: Sequence[Decider] = (),
    wall_clock_ms: Callable[[], int] | None = None,
) -> SessionRuntime:
    """The session runtime of an agent run with *settings* (start its ``run``).

    *wall_clock_ms* replaces the wall clock (receipts, display) for tests; the
    cap never reads it.
    """
    files = AgentDir(settings.agent_dir)
    clock = {} if wall_clock_ms is None else {"wall_clock_ms": wall_clock_ms}
    return SessionRuntime(
        config=settings.limits,
        load_identity=partial(load_device_identity, files),
        open_tunnel=partial(open_tunnel, settings),
        tunnel_allowed=partial(tunnel_url_allowed, settings),
        deciders=deciders,
        **clock,
    )


def tunnel_url_allowed(settings: AgentSettings, tunnel_url: str) -> bool:
    """Whether a broker node may send this agent's tunnel to *tunnel_url*.

    A session across nodes has its tunnel opened at the engineer's node. The
    agent goes only where it was told it may: the host of its own broker URL
    (any port: one name, a port per node) or a name in ``tunnel_hosts``
    (exact, or ``*.domain`` for a subdomain). The TLS handshake then checks
    that host's certificate as for the broker itself.
    """
    host = (urlsplit(tunnel_url).hostname or "").lower()
    if not host:
        return False
    if host == (urlsplit(settings.broker_url).hostname or "").lower():
        return True
    for pattern in settings.limits.tunnel_hosts:
        pattern = pattern.lower()
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


@asynccontextmanager
async def open_tunnel(
    settings: AgentSettings, session_id: str, tunnel_url: str | None = None
) -> AsyncIterator[WebSocketConnection]:
    """Open the tunnel WebSocket of *session_id* (mTLS, our device certificate),
    at *tunnel_url* (a session across nodes) or at the broker's own address.

    Raises:
        TunnelUnavailable: Key or CA unreadable, network or TLS failure, the
            broker refused the upgrade (404 unknown, 409 already open, 410
            ended), or no connection within ``tunnel_connect_timeout_s``.

    Resource handling:
        The connection is closed when the block ends (politely, bounded by
        :data:`TUNNEL_CLOSE_TIMEOUT_S`).
    """
    path = TUNNEL_PATH.format(session_id=session_id)
    host, port, url = parse_broker_url(tunnel_url or settings.broker_url, path)
    files = AgentDir(settings.agent_dir)
    limits = dataclasses.replace(
        settings.websocket,
        close_timeout_s=min(settings.websocket.close_timeout_s, TUNNEL_CLOSE_TIMEOUT_S),
    )
    try:
        context = await _client_context(settings, files)
    except (OSError, ssl.SSLError) as exc:
        raise TunnelUnavailable(f"cannot load key, certificate or CA: {exc}") from None
    connected = False
    with trio.move_on_after(settings.limits.tunnel_connect_timeout_s) as scope:
        try:
            tls = await _open_tls(host, port, context)
            async with connect_websocket(tls, url, limits, user_agent=USER_AGENT) as ws:
                connected = True
                scope.deadline = float("inf")
                yield ws
        except _AttemptFailed as exc:
            raise TunnelUnavailable(str(exc)) from None
        except HandshakeFailed as exc:
            if connected:
                raise  # pragma: no cover - raised only by the handshake
            raise TunnelUnavailable(f"tunnel refused: {exc}") from None
    if not connected:
        raise TunnelUnavailable("tunnel connect timed out")


async def run_agent(
    settings: AgentSettings,
    *,
    status: AgentStatus | None = None,
    runtime: SessionRuntime | None = None,
    wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    rng: random.Random | None = None,
    stopping: trio.Event | None = None,
    feed: AgentFeed | None = None,
) -> None:
    """Keep the control channel up until cancelled, or until *stopping* is set.

    Args:
        settings: What ``relay agent run`` was told.
        status: Observable connection state.
        runtime: The session runtime, already running (see
            :func:`make_session_runtime`); without one, the agent runs its own,
            which no person can answer (offers lapse).
        wall_clock: For the certificate's validity check.
        rng: The backoff jitter.
        stopping: Set when the agent stops (SIGTERM, after the runtime's
            orderly end): the control channel is closed with 1001 "agent
            stopping", no new attempt is made, and this returns.
        feed: The monitoring feed, its ``run`` already started; without one
            the agent sends no records and leaves data requests unanswered
            (the broker lets them lapse).
    """
    if runtime is None:
        own = make_session_runtime(settings)
        async with trio.open_nursery() as nursery:
            await nursery.start(own.run)
            await run_agent(
                settings,
                status=status,
                runtime=own,
                wall_clock=wall_clock,
                rng=rng,
                stopping=stopping,
                feed=feed,
            )
            nursery.cancel_scope.cancel()
        return
    stopping = stopping if stopping is not None else trio.Event()
    log = get_logger("agent")
    status = status if status is not None else AgentStatus()
    rng = rng if rng is not None else random.SystemRandom()
    limits = settings.limits
    backoff = Backoff(
        base_s=limits.backoff_base_s,
        cap_s=limits.backoff_cap_s,
        auth_failure_s=limits.auth_failure_retry_s,
    )
    eof_streak = 0
    renewal = CertificateRenewal(
        AgentDir(settings.agent_dir),
        limits,
        log=log,
        wall_clock=wall_clock,
        busy=lambda: (
            runtime.offer is not None or runtime.state()["session"] is not None
        ),
    )
    while not stopping.is_set():
        status.attempts += 1
        started = trio.current_time()
        try:
            await _attempt(
                settings, status, runtime, wall_clock, log, renewal, stopping, feed
            )
            outcome, message = (
                Outcome.LOST,
                "connection ended",
            )  # pragma: no cover - _attempt raises
        except _AttemptFailed as exc:
            outcome, message = exc.outcome, str(exc)
        finally:
            if status.connected:
                status.connected = False
                status._notify()
        if stopping.is_set():
            log.info("agent.control_channel_closed", reason="agent stopping")
            return
        connected_for = trio.current_time() - started
        eof_streak = eof_streak + 1 if outcome is Outcome.EOF_AFTER_TLS else 0
        delay, auth_wait = plan_retry(
            backoff,
            outcome,
            eof_streak=eof_streak,
            eof_threshold=limits.eof_after_tls_as_auth_failure,
            connected_for_s=connected_for,
            stable_after_s=limits.stable_after_s,
            draw=rng.random(),
        )
        status.last_outcome, status.last_error = outcome, message
        status._notify()
        if auth_wait:
            log.error(
                "agent.auth_failed",
                detail=message,
                retry_in_s=round(delay, 1),
                hint="the certificate is revoked, expired, or not from the broker's device CA; "
                "ask the operator (`relay device list`): renew it, or re-enroll under a new id "
                "if it was revoked (revoked ids are not reused)",
            )
        else:
            log.warning(
                "agent.retry",
                outcome=outcome.value,
                detail=message,
                retry_in_s=round(delay, 2),
            )
        with trio.move_on_after(delay):
            await stopping.wait()


async def _attempt(
    settings: AgentSettings,
    status: AgentStatus,
    runtime: SessionRuntime,
    wall_clock: Callable[[], datetime],
    log: Any,
    renewal: CertificateRenewal,
    stopping: trio.Event,
    feed: AgentFeed | None,
) -> None:
    """One connection attempt; always ends by raising :class:`_AttemptFailed`."""
    host, port, url = parse_broker_url(settings.broker_url)
    files = AgentDir(settings.agent_dir)
    try:
        swap = await trio.to_thread.run_sync(finish_pending_swap, files)
    except OSError as exc:
        raise _AttemptFailed(
            Outcome.LOCAL_CERTIFICATE, f"cannot finish a certificate swap: {exc}"
        ) from None
    if swap is not None:
        log.warning("agent.certificate_swap_recovered", outcome=swap)
    device_id = await trio.to_thread.run_sync(
        _check_own_certificate, files, wall_clock()
    )
    status.device_id = device_id
    try:
        context = await _client_context(settings, files)
    except (OSError, ssl.SSLError) as exc:
        raise _AttemptFailed(
            Outcome.LOCAL_CERTIFICATE, f"cannot load key, certificate or CA: {exc}"
        ) from None
    channel = control.ControlChannel(control.Role.DEVICE)
    with trio.move_on_after(settings.limits.connect_timeout_s) as connect_scope:
        tls = await _open_tls(host, port, context)
        try:
            async with connect_websocket(
                tls, url, settings.websocket, user_agent=USER_AGENT
            ) as ws:
                await ws.send_message(
                    channel.send(
                        control.Hello(
                            version=control.PROTOCOL_VERSION,
                            device_id=device_id,
                            agent_version=__version__,
                        )
                    )
                )
                welcome = channel.next_event()
                while welcome is control.NEED_DATA:
                    channel.receive_message(await ws.receive_message())
                    welcome = channel.next_event()
                assert isinstance(welcome, control.Welcome)  # noqa: S101 - the state machine admits only Welcome
                connect_scope.deadline = float("inf")
                status.connected = True
                status._notify()
                log.info(
                    "agent.connected", device_id=device_id, broker=f"{host}:{port}"
                )
                await _run_open_channel(
                    ws, channel, welcome, status, runtime, renewal, stopping, feed
                )
        except HandshakeFailed as exc:
            if exc.status == 403:
                raise _AttemptFailed(
                    Outcome.REFUSED,
                    f"broker refused the device: {exc.body.decode(errors='replace').strip()}",
                ) from None
            if exc.status is None:
                raise _AttemptFailed(
                    Outcome.EOF_AFTER_TLS,
                    "broker closed the connection before answering",
                ) from None
            raise _AttemptFailed(
                Outcome.NETWORK, f"broker answered {exc.status}"
            ) from None
        except ConnectionClosed as exc:
            if exc.code == CloseCode.REVOKED:
                raise _AttemptFailed(
                    Outcome.REFUSED, "broker closed the channel: certificate revoked"
                ) from None
            raise _AttemptFailed(
                Outcome.LOST, f"channel closed: {exc.code} {exc.reason}".strip()
            ) from None
        except RemoteProtocolError as exc:
            raise _AttemptFailed(
                Outcome.LOST, f"protocol error from broker: {exc}"
            ) from None
    raise _AttemptFailed(Outcome.NETWORK, "connect timed out")


async def _open_tls(
    host: str, port: int, context: ssl.SSLContext
) -> trio.SSLStream[trio.SocketStream]:
    try:
        tcp = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise _AttemptFailed(
            Outcome.NETWORK, f"cannot connect to {host}:{port}: {exc}"
        ) from None
    tls = trio.SSLStream(tcp, context, server_hostname=host, https_compatible=True)
    try:
        await tls.do_handshake()
    except BaseException as exc:
        # Includes cancellation: the socket is ours until the handshake is done.
        await trio.aclose_forcefully(tls)
        if not isinstance(exc, trio.BrokenResourceError):
            raise
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise _AttemptFailed(
                Outcome.NETWORK,
                f"broker certificate not trusted: {cause.verify_message}",
            ) from None
        if isinstance(cause, ssl.SSLError) and "ALERT" in (cause.reason or ""):
            # TLS 1.2: the broker refused our certificate with an alert.
            raise _AttemptFailed(
                Outcome.REFUSED, f"broker refused the TLS handshake: {cause.reason}"
            ) from None
        # The connection ended before TLS completed. That is what a broker's
        # admission control (pending-handshake caps, shutdown) looks like, so it
        # is a network problem: a refused certificate under TLS 1.3 shows up only
        # after the handshake (EOF_AFTER_TLS, in _attempt).
        raise _AttemptFailed(
            Outcome.NETWORK, f"TLS handshake failed: {cause or 'connection closed'}"
        ) from None
    return tls


def _check_own_certificate(files: AgentDir, now: datetime) -> str:
    """Read our certificate and return the device id; refuse an unusable one."""
    try:
        certificate = x509.load_pem_x509_certificate(files.cert.read_bytes())
    except (OSError, ValueError, x509.InvalidVersion) as exc:
        raise _AttemptFailed(
            Outcome.LOCAL_CERTIFICATE, f"cannot read {files.cert}: {exc}"
        ) from None
    try:
        identity = auth.device_identity(certificate)
    except auth.UntrustedPeer as exc:
        raise _AttemptFailed(
            Outcome.LOCAL_CERTIFICATE,
            f"{files.cert} is not a device certificate: {exc}",
        ) from None
    if now < identity.not_before:
        raise _AttemptFailed(
            Outcome.LOCAL_CERTIFICATE,
            f"{files.cert} is not valid before {identity.not_before:%Y-%m-%d %H:%M}Z",
        )
    if now > identity.not_after:
        raise _AttemptFailed(
            Outcome.LOCAL_CERTIFICATE,
            f"{files.cert} expired on {identity.not_after:%Y-%m-%d %H:%M}Z",
        )
    return identity.device_id


async def _run_open_channel(
    ws: WebSocketConnection,
    channel: control.ControlChannel,
    welcome: control.Welcome,
    status: AgentStatus,
    runtime: SessionRuntime,
    renewal: CertificateRenewal,
    stopping: trio.Event,
    feed: AgentFeed | None,
) -> None:
    sent_at: dict[int, float] = {}

    async def send_event(event: control.Event) -> None:
        await ws.send_message(channel.send(event))

    async def heartbeats() -> None:
        try:
            for seq in range(1, 2**53):
                sent_at[seq] = trio.current_time()
                await ws.send_message(channel.send(control.Heartbeat(seq=seq)))
                await trio.sleep(welcome.heartbeat_interval_s)
        except ConnectionClosed:
            return  # the receive loop sees the close and reports it

    async def close_when_stopping() -> None:
        # The broker learns at once that the device left on purpose (1001, like
        # its own shutdown) instead of waiting for missed heartbeats.
        await stopping.wait()
        await ws.aclose(CloseCode.GOING_AWAY, "agent stopping")

    ended: ConnectionClosed | RemoteProtocolError | None = None
    runtime.attach_control(
        send_event,
        acks=(channel.version or 1) >= control.EndReceiptAck.SINCE_VERSION,
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeats)
            nursery.start_soon(close_when_stopping)
            nursery.start_soon(renewal.run, send_event, partial(close_renewed, ws))
            if feed is not None:
                nursery.start_soon(feed.run_channel, send_event, channel.version or 1)
            try:
                while True:
                    channel.receive_message(await ws.receive_message())
                    event = channel.next_event()
                    if isinstance(event, control.HeartbeatAck) and event.seq in sent_at:
                        status.heartbeat_rtt_s = trio.current_time() - sent_at.pop(
                            event.seq
                        )
                        sent_at.clear()
                    elif isinstance(event, _CONTROL_SESSION_EVENTS):
                        runtime.handle_control(event)
                    elif isinstance(event, RENEWAL_EVENTS):
                        renewal.handle(event)
                    elif isinstance(event, FEED_EVENTS) and feed is not None:
                        feed.handle(event)
            except (ConnectionClosed, RemoteProtocolError) as exc:
                # Raised after the nursery, so the caller sees it alone, not in a group.
                ended = exc
            nursery.cancel_scope.cancel()
    finally:
        runtime.detach_control(send_event)
    raise ended
