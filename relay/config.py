"""Broker and agent configuration: every timeout, size and queue limit lives here.

Each limit is a field with the BRIEF's default, so a test can build a config with a
short value (``dataclasses.replace(config, ping_interval_s=0.05)``) and production
code never carries a bare number. The classes are frozen: a running component sees
one consistent set of limits.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from relay.proto.control import is_tunnel_url
from relay.proto.node_command import check_node_id
from relay.proto.session import WARNING_SECONDS, check_warnings

DEFAULT_DATA_DIR = "./relay-data"


@dataclass(frozen=True, slots=True, kw_only=True)
class WebSocketLimits:
    """Limits of one WebSocket connection, on either side.

    Attributes:
        max_message_bytes: Largest message payload accepted; a larger one closes the
            connection with 1009 (RFC 6455 §7.4.1).
        max_upgrade_request_bytes: Largest HTTP upgrade request (or response, on the
            client) accepted before the handshake completes.
        ping_interval_s: The longest silence (nothing received, no ping sent)
            before a keepalive ping; each wait is 75-100 % of it, at random, so
            that the two ends do not ping together. A busy connection sends none.
        ping_missed_max: The peer is declared dead when nothing has been received for
            ``ping_interval_s * ping_missed_max`` seconds.
        close_timeout_s: How long a polite close waits for the peer's close frame
            before the TCP connection is dropped.
        send_buffer_bytes: Outgoing bytes queued before ``send_message`` waits.
        receive_queue_messages: Received messages queued before the reader stops
            reading the socket (TCP backpressure).
        read_size_bytes: Bytes asked of the socket per read.
    """

    max_message_bytes: int = 64 * 1024
    max_upgrade_request_bytes: int = 8 * 1024
    ping_interval_s: float = 10.0
    ping_missed_max: int = 3
    close_timeout_s: float = 5.0
    send_buffer_bytes: int = 256 * 1024
    receive_queue_messages: int = 16
    read_size_bytes: int = 64 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class PKIConfig:
    """Certificate profiles.

    Attributes:
        device_cert_lifetime_days: Fixed lifetime of a signed device certificate,
            whatever the request asks.
        server_cert_lifetime_days: Lifetime of a dev-mode listener certificate.
        ca_lifetime_days: Lifetime of a newly created CA.
        max_csr_bytes: A CSR larger than this is refused before it is parsed.
        max_concurrent_signings: CSRs parsed and signed at once for the
            engineer API (``POST /api/v1/enrollments``) and for renewals over
            the control channel; further requests wait for a slot instead of
            taking every worker thread.
        renew_before_days: The broker's renewal window: a connected device
            whose certificate ends within it counts in
            ``relay_device_certificates_expiring_soon`` (agents renew at their
            own ``renew_before_days``; keep the two equal).
        renewal_min_interval_s: A device gets at most one renewed certificate
            per this many seconds (read from the store's newest issue time, so
            it holds across nodes and restarts); earlier requests are refused
            with ``rate_limited``.
        tls_reload_poll_s: How often the broker looks at its listener
            certificate and key and the device CA files for changes (content
            hash), loads a changed set into the live TLS contexts, re-issues
            a dev-mode listener certificate due for renewal, and updates the
            certificate expiry metrics.
    """

    device_cert_lifetime_days: int = 365
    server_cert_lifetime_days: int = 90
    ca_lifetime_days: int = 3650
    max_csr_bytes: int = 16 * 1024
    max_concurrent_signings: int = 2
    renew_before_days: float = 30.0
    renewal_min_interval_s: float = 3600.0
    tls_reload_poll_s: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceListenerConfig:
    """The device listener (mTLS WebSocket, ``/v1/device/control``).

    Attributes:
        handshake_timeout_s: Deadline for TCP accept to an open WebSocket (TLS
            handshake, certificate checks and HTTP upgrade together).
        max_pending_handshakes: Hard cap on connections still in the handshake.
        early_drop_pending_handshakes: From this many pending handshakes on, a new
            connection is dropped with a probability that rises linearly to 1 at
            ``max_pending_handshakes`` (OpenSSH ``MaxStartups`` style).
        max_pending_per_source: Cap on pending handshakes from one source address.
        revocation_poll_s: How often the broker re-reads revocations from the store
            to close live connections of revoked devices (budget: <= 5 s).
        presence_flush_s: How often the presence mirror is written to the store.
        presence_touch_s: How often a connected device's ``last_seen`` is written.
        heartbeat_interval_s: Application heartbeat interval the broker asks of
            agents in ``welcome``.
        hello_timeout_s: Deadline for the agent's ``hello`` after the upgrade.
        kick_close_grace_s: How long a channel closed by the broker (revoked,
            replaced, shutdown) waits for the device's close frame before the TCP
            connection is dropped; with ``revocation_poll_s`` it makes the 5 s
            revocation budget.
    """

    handshake_timeout_s: float = 10.0
    max_pending_handshakes: int = 64
    early_drop_pending_handshakes: int = 32
    max_pending_per_source: int = 10
    revocation_poll_s: float = 1.0
    presence_flush_s: float = 1.0
    presence_touch_s: float = 30.0
    heartbeat_interval_s: float = 30.0
    hello_timeout_s: float = 10.0
    kick_close_grace_s: float = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineerListenerConfig:
    """The engineer listener (HTTPS, the API and the engineers' WebSockets).

    Attributes:
        allowed_origins: Web origins (``https://host[:port]``) allowed to open
            the engineers' WebSockets. Empty means the listener's own origins:
            ``https://NAME:PORT`` for every DNS name and IP address in its
            certificate, PORT being the port it is bound to. Set it when the
            console is reached through another name or port (a load balancer).
        max_request_head_bytes: Largest request line plus headers accepted, for
            requests and WebSocket upgrades alike (431 above it).
        max_websocket_message_bytes: Largest message an engineer may send on a
            WebSocket (close 1009 above it).
        revocation_poll_s: How often the broker re-reads the login session
            revocation feed to close WebSockets of sessions ended elsewhere
            (``relay user disable``, another node); with the close itself it
            makes the 5 s budget.
        websocket_send_timeout_s: A WebSocket whose client has not taken a
            message for this long is closed (a stalled reader must not hold
            the broker's memory).
        device_feed_interval_s: How often the device list pushed on
            ``/api/v1/events`` is re-read from the store.
        session_touch_s: How often a WebSocket in use (engineer input) marks
            its login session as used, against the idle timeout.
        handshake_timeout_s: Deadline for a connection's TLS handshake; the
            head of its first request must then arrive within this or
            Hypercorn's 5 s keep-alive timeout, whichever is shorter (the
            keep-alive timer runs until a whole request has arrived). A
            slowloris client is closed at these deadlines.
    """

    allowed_origins: tuple[str, ...] = ()
    max_request_head_bytes: int = 8 * 1024
    max_websocket_message_bytes: int = 64 * 1024
    revocation_poll_s: float = 1.0
    websocket_send_timeout_s: float = 10.0
    device_feed_interval_s: float = 2.0
    session_touch_s: float = 60.0
    handshake_timeout_s: float = 10.0


# A host name, or "*." and a domain of at least two labels (never "*" alone:
# that would let a broker node send the agent's tunnel anywhere).
_TUNNEL_HOST: Final = re.compile(
    r"(?:\*\.)?(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+"
    r"|[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    """The device agent.

    Attributes:
        backoff_base_s: First reconnect delay ceiling (full jitter).
        backoff_cap_s: Largest reconnect delay ceiling.
        auth_failure_retry_s: Delay after the broker refused our certificate.
        connect_timeout_s: Deadline for TCP connect, TLS and upgrade together.
        eof_after_tls_as_auth_failure: Consecutive connections that the broker
            closed right after the TLS handshake, before answering the upgrade,
            that are taken as a refused certificate (a trio server sends no TLS
            alert for a refused client certificate under TLS 1.3).
        stable_after_s: A connection that lasted this long resets the backoff.
        allowed_ports: Local TCP ports (on 127.0.0.1) engineers may reach with a
            ``tcp:PORT`` stream; the device decides, the broker cannot widen it.
        shell_command: The command the ``shell`` channel runs on a PTY, as an
            array of arguments. Unset: the agent user's login shell
            (``$SHELL -l``); empty (``[]``): no shell channel.
        max_session_seconds: The device's own cap on a session (1..3600, measured
            from the moment the agent sent its grant); a grant never allows more.
        ui_listen: Where the local device UI (page and JSON API) listens.
        ui_allow_remote: Allow ``ui_listen`` on a non-loopback address. Anyone who
            reaches that address can grant sessions: only for a screen on a
            private link.
        pty_kill_grace_s: How long a shell gets after SIGHUP/SIGTERM before
            SIGKILL when its stream or session ends (the on-site End closes local
            streams within 1 s).
        tunnel_connect_timeout_s: Deadline for TCP, TLS and upgrade of the
            session tunnel.
        local_connect_timeout_s: Deadline for connecting to a local TCP port.
        warning_seconds: How long before the device's own cap the device page
            shows a warning (default T-10 min and T-1 min); the same form as
            ``SessionConfig.warning_seconds``.
        cap_grace_s: How long after its cap the agent waits for the broker's
            end before it ends the session itself (``time_cap``). The broker
            ends at the cap (<= cap + 1 s), the agent at cap + ``cap_grace_s``
            at the latest, also when the broker is unreachable; 0..1 s, so
            the device's end stays within the BRIEF's cap + 2 s.
        shutdown_grace_s: On SIGTERM/SIGINT, how long the agent's orderly stop
            may take (a live session's end: local streams, then the tunnel,
            then the end receipt to the broker; then the control channel's
            close) before the rest is cut; 0..9 s, inside the BRIEF's 10 s exit
            budget.
        renew_before_days: The agent renews its certificate over the control
            channel when less than this many days of it are left (30 days of a
            365-day certificate); also at once when the broker advises it
            (a CA rollover). See docs/certificates.md.
        renew_check_s: How often a connected agent looks at its certificate's
            end (it also looks at every connect).
        renew_timeout_s: How long the agent waits for the broker's answer to
            a renewal request before it tries again later.
        renew_retry_s: After a refused or unanswered renewal, how long the
            agent waits before it asks again (the broker rate-limits too).
        tunnel_hosts: Other hosts the agent opens a session's tunnel to when a
            broker node asks (sessions across nodes: the tunnel goes to the
            engineer's node). The host of ``--broker`` is always accepted, on
            any port; here exact names (``broker-2.relay.example``) or
            ``*.relay.example`` for its subdomains. Empty: only that host.
        feed_dir: The monitoring feed's spool directory, where the
            instrument's software drops its records and keeps its snapshots
            (docs/monitoring.md); unset, ``feed/`` in the agent directory.
        feed_queue_max_records: Records the agent keeps on disk while it
            cannot deliver them; when full, daily statistics make room first
            (oldest first) and alarms are never dropped without a trace.
        feed_max_record_bytes: Largest record the agent takes from the
            instrument (the broker's ``[feed] max_record_bytes`` should not be
            lower).
        feed_window: Records sent and not yet acknowledged, at most.
        feed_retry_s: How long the agent waits before it sends again a record
            the broker could not store (``retry``), or one not acknowledged.
        feed_scan_s: How often the agent looks into the spool directory.
        feed_request_kinds: The request-only data the owner lets the agent
            give out when a user asks (``configuration``, ``consumables``);
            empty: every request is refused.
        feed_request_min_interval_s: Shortest time between two answered
            requests of one kind; a request sooner is refused (``too_soon``),
            so no broker can turn requests into polling.

    Raises:
        ValueError: A port outside 1..65535, a cap outside 1..3600 s, a
            malformed tunnel host, or a non-loopback ``ui_listen`` without
            ``ui_allow_remote``.
    """

    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0
    auth_failure_retry_s: float = 15 * 60.0
    connect_timeout_s: float = 10.0
    eof_after_tls_as_auth_failure: int = 3
    stable_after_s: float = 60.0
    allowed_ports: tuple[int, ...] = (22, 443)
    shell_command: tuple[str, ...] | None = None
    max_session_seconds: int = 3600
    ui_listen: ListenAddress = field(
        default_factory=lambda: ListenAddress(host="127.0.0.1", port=7070)
    )
    ui_allow_remote: bool = False
    pty_kill_grace_s: float = 0.5
    tunnel_connect_timeout_s: float = 10.0
    local_connect_timeout_s: float = 5.0
    warning_seconds: tuple[int, ...] = WARNING_SECONDS
    cap_grace_s: float = 1.0
    shutdown_grace_s: float = 5.0
    renew_before_days: float = 30.0
    renew_check_s: float = 3600.0
    renew_timeout_s: float = 30.0
    renew_retry_s: float = 3600.0
    tunnel_hosts: tuple[str, ...] = ()
    feed_dir: Path | None = None
    feed_queue_max_records: int = 10_000
    feed_max_record_bytes: int = 16 * 1024
    feed_window: int = 16
    feed_retry_s: float = 30.0
    feed_scan_s: float = 1.0
    feed_request_kinds: tuple[str, ...] = ("configuration", "consumables")
    feed_request_min_interval_s: float = 60.0

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "warning_seconds", check_warnings(self.warning_seconds)
        )
        for kind in self.feed_request_kinds:
            if kind not in ("configuration", "consumables"):
                raise ValueError(
                    "feed_request_kinds: configuration and/or consumables, "
                    f"got {kind!r:.40}"
                )
        if not 1024 <= self.feed_max_record_bytes <= 48 * 1024:
            raise ValueError(
                "feed_max_record_bytes must be in 1024..49152, "
                f"got {self.feed_max_record_bytes!r}"
            )
        if self.feed_request_min_interval_s < 0:
            raise ValueError(
                "feed_request_min_interval_s must be >= 0, "
                f"got {self.feed_request_min_interval_s!r}"
            )
        for pattern in self.tunnel_hosts:
            if not _TUNNEL_HOST.fullmatch(pattern):
                raise ValueError(
                    "tunnel_hosts: host names or *.domain patterns, "
                    f"got {pattern!r:.80}"
                )
        if not self.renew_before_days >= 0:
            raise ValueError(
                f"renew_before_days must be >= 0, got {self.renew_before_days!r}"
            )
        for name in _AGENT_POSITIVE:
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if self.backoff_cap_s < self.backoff_base_s:
            raise ValueError(
                f"backoff_cap_s must be >= backoff_base_s ({self.backoff_base_s!r}), "
                f"got {self.backoff_cap_s!r}"
            )
        if self.pty_kill_grace_s < 0:
            raise ValueError(
                f"pty_kill_grace_s must be >= 0, got {self.pty_kill_grace_s!r}"
            )
        if not 0 <= self.shutdown_grace_s <= _AGENT_MAX_SHUTDOWN_GRACE_S:
            raise ValueError(
                f"shutdown_grace_s must be in 0..{_AGENT_MAX_SHUTDOWN_GRACE_S}, "
                f"got {self.shutdown_grace_s!r}"
            )
        if not 0 <= self.cap_grace_s <= _AGENT_MAX_CAP_GRACE_S:
            raise ValueError(
                f"cap_grace_s must be in 0..{_AGENT_MAX_CAP_GRACE_S}, "
                f"got {self.cap_grace_s!r}"
            )
        for port in self.allowed_ports:
            if not 1 <= port <= 65535:
                raise ValueError(f"allowed port must be in 1..65535, got {port!r}")
        if not 1 <= self.max_session_seconds <= _AGENT_MAX_SESSION_SECONDS:
            raise ValueError(
                f"max_session_seconds must be in 1..{_AGENT_MAX_SESSION_SECONDS}, "
                f"got {self.max_session_seconds}"
            )
        if not self.ui_allow_remote and not is_loopback_host(self.ui_listen.host):
            raise ValueError(
                f"the device UI may listen on a loopback address only, not "
                f"{self.ui_listen.host!r} (allow it explicitly to expose it)"
            )


#: No session lasts longer than an hour (Invariant 2); the agent may only lower it.
_AGENT_MAX_SESSION_SECONDS = 3600
#: The agent's end comes at most this long after its cap (plus a scheduling
#: delay), inside the BRIEF's cap + 2 s for a device cut off from the broker.
_AGENT_MAX_CAP_GRACE_S = 1.0
#: Agent settings that must be above zero.
_AGENT_POSITIVE = (
    "backoff_base_s",
    "backoff_cap_s",
    "auth_failure_retry_s",
    "connect_timeout_s",
    "eof_after_tls_as_auth_failure",
    "stable_after_s",
    "tunnel_connect_timeout_s",
    "local_connect_timeout_s",
    "renew_check_s",
    "renew_timeout_s",
    "renew_retry_s",
    "feed_queue_max_records",
    "feed_window",
    "feed_retry_s",
    "feed_scan_s",
)
#: The agent's orderly stop must fit the BRIEF's 10 s exit budget.
_AGENT_MAX_SHUTDOWN_GRACE_S = 9.0


def is_loopback_host(host: str) -> bool:
    """Whether *host* is a loopback address (``127.0.0.0/8``, ``::1``) or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineerAuthConfig:
    """Engineer login, sessions and abuse limits (the engineer listener).

    Attributes:
        session_idle_s: A login session unused this long expires (ASVS L3: 15 min).
        session_absolute_s: No login session lives longer than this (12 h).
        login_free_failures: Failed logins in a row (per account and address)
            before each further attempt from that address is delayed. A login
            request carries one TOTP code, so this is also how many codes one
            address may try in a row, the password being right, before waiting.
        login_base_delay_s: First delay after the free failures; it doubles.
        login_max_delay_s: Largest delay.
        login_failures_per_hour: Failed logins per account per sliding hour, all
            addresses together; beyond it every login for the account is refused.
        unauthenticated_per_minute: Rate limit per client address on endpoints that
            need no login (the login itself).
        unauthenticated_burst: Burst allowance for the same.
        max_concurrent_password_hashes: argon2 hashes (64 MiB each) allowed to
            run at once; further logins wait for a slot.
        totp_sealing_key: Base64 of the 32-byte key that seals TOTP secrets in the
            store (production: from config or ``RELAY_TOTP_SEALING_KEY``). When
            unset, a key is generated on first use into its own 0600 file in the
            data dir, away from the database file.
        totp_step_s: TOTP time step in seconds, 30 or 60 (what authenticator
            apps support). It and totp_digits go into the URI of the secrets
            that ``relay user add`` and ``relay user reset-totp`` make; after
            changing either, run ``relay user reset-totp`` for every user (their
            apps, and the stored step that refuses reuse, follow the old values).
        totp_digits: Digits per TOTP code, 6 or 8 (see totp_step_s).
        totp_past_steps: 1 accepts the code of the previous step too (typed just
            as it changed), 0 only the current one. Never future steps.

    Raises:
        ValueError: A value is out of range (at construction).
    """

    session_idle_s: float = 15 * 60.0
    session_absolute_s: float = 12 * 3600.0
    login_free_failures: int = 5
    login_base_delay_s: float = 1.0
    login_max_delay_s: float = 15 * 60.0
    login_failures_per_hour: int = 100
    unauthenticated_per_minute: float = 20.0
    unauthenticated_burst: int = 40
    max_concurrent_password_hashes: int = 4
    totp_sealing_key: str | None = None
    totp_step_s: int = 30
    totp_digits: int = 6
    totp_past_steps: int = 1

    def __post_init__(self) -> None:
        # Own checks replace config_file's generic "stays > 0" one for this class.
        for name in (
            "login_free_failures",
            "login_failures_per_hour",
            "unauthenticated_burst",
            "max_concurrent_password_hashes",
        ):
            value = getattr(self, name)
            if type(value) is not int or value < 1:  # bool is an int: refused
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in (
            "session_idle_s",
            "session_absolute_s",
            "login_base_delay_s",
            "login_max_delay_s",
            "unauthenticated_per_minute",
        ):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if type(self.totp_step_s) is not int or self.totp_step_s not in (30, 60):
            raise ValueError(f"totp_step_s must be 30 or 60, got {self.totp_step_s!r}")
        if type(self.totp_digits) is not int or self.totp_digits not in (6, 8):
            raise ValueError(f"totp_digits must be 6 or 8, got {self.totp_digits!r}")
        if type(self.totp_past_steps) is not int or self.totp_past_steps not in (0, 1):
            raise ValueError(
                f"totp_past_steps must be in 0..1, got {self.totp_past_steps!r}"
            )


#: Invariant 2: no remote session lasts longer, whatever the config says.
SESSION_CAP_CEILING_S = 3600


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionConfig:
    """Remote sessions: the interim policy, until the policies package decides.

    Attributes:
        max_session_seconds: The cap of every session, counted from the grant;
            1..3600 (Invariant 2: policy may lower the cap, never raise it).
        grant_timeout_s: How long the person at the device has to answer an
            offer before it lapses (``grant_timeout``).
        allowed_channels: The channels an engineer may ask for; a request for
            any other is refused with 403.
        reattach_grace_s: How long an engineer whose attach socket dropped may
            take to attach again; 0 ends the session at once
            (``engineer_disconnect``). It never extends the cap.
        warning_seconds: How long before the cap the engineer is warned
            (default T-10 min and T-1 min); each 1..3599, at most four, ``()``
            for none. A warning not after the grant is skipped.
        engineer_messages_per_s: The rate at which the broker reads an
            engineer's messages on a session's attach socket (a token bucket,
            ``engineer_message_burst`` deep). Above it the broker reads no
            further until a token is there: the sender is slowed down by TCP
            (backpressure), the session goes on. The default leaves room for a
            bulk transfer in 64 KiB frames at 60 MiB/s and for any typing, and
            bounds the broker CPU one engineer can take with tiny messages.
        engineer_message_burst: How many messages may arrive at once before
            the rate applies.

    Raises:
        ValueError: A value is out of range (at construction).
    """

    max_session_seconds: int = SESSION_CAP_CEILING_S
    grant_timeout_s: float = 60.0
    allowed_channels: tuple[str, ...] = ("shell", "tcp:22", "tcp:443")
    reattach_grace_s: float = 0.0
    warning_seconds: tuple[int, ...] = WARNING_SECONDS
    engineer_messages_per_s: float = 1000.0
    engineer_message_burst: int = 1000

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "warning_seconds", check_warnings(self.warning_seconds)
        )
        if not 0 < self.engineer_messages_per_s < math.inf:
            raise ValueError(
                "engineer_messages_per_s must be > 0 and finite, got "
                f"{self.engineer_messages_per_s!r}"
            )
        if self.engineer_message_burst < 1:
            raise ValueError(
                "engineer_message_burst must be >= 1, got "
                f"{self.engineer_message_burst!r}"
            )
        cap = self.max_session_seconds
        if type(cap) is not int or cap < 1:  # bool is an int subclass: refused
            raise ValueError(
                f"max_session_seconds must be an integer >= 1, got {cap!r}"
            )
        if cap > SESSION_CAP_CEILING_S:
            raise ValueError(
                f"max_session_seconds must be in 1..{SESSION_CAP_CEILING_S}, got "
                f"{cap}: a session never lasts more than {SESSION_CAP_CEILING_S} s"
            )
        if not self.grant_timeout_s > 0:
            raise ValueError(
                f"grant_timeout_s must be > 0, got {self.grant_timeout_s!r}"
            )
        if not self.reattach_grace_s >= 0:
            raise ValueError(
                f"reattach_grace_s must be >= 0, got {self.reattach_grace_s!r}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenAddress:
    """A host and a TCP port; port 0 asks the kernel for a free port."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        """Parse ``HOST:PORT`` (``[::1]:PORT`` for IPv6).

        Raises:
            ValueError: The text is not HOST:PORT with a port in 0..65535.
        """
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or not port_text.isdigit():
            raise ValueError(f"expected HOST:PORT, got {text!r}")
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return cls(host=host, port=port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditConfig:
    """The audit log and the session recordings (see docs/audit.md).

    Attributes:
        checkpoint_every_records: A signed checkpoint after this many records
            of one process.
        checkpoint_every_s: ...and at the latest this long after the first
            record it has not sealed.
        max_file_bytes: The chain moves to a new file after this size.
        backlog_max_records: Records kept in memory while the log cannot be
            written; beyond that they are counted as lost.
        retry_s: How often the broker tries to write again after a failure.
        checkpoint_sink: Where the copy of every checkpoint goes; default
            ``audit/checkpoints.jsonl`` in the data dir. Point it at another
            volume so that cutting the log's tail cannot also cut the sink.
        stdout: Copy every audit record to standard output, one JSON line
            each, for a SIEM shipper (the log itself stays the record).
        record_input: Record what the engineer types in shell sessions, not
            only what the shell prints. Off by default: typed input holds
            passwords and secrets that the output never echoes.
        recording_max_bytes: The most a session's recordings may take on disk;
            past it the recording says so and stops.
        watch_s: How often the broker looks at the log's health: a failure
            ends live sessions within this (BRIEF budget: 2 s).
        mirror_max_lines: Lines of the stdout copy that may wait for a slow
            reader; beyond that they are dropped (and counted).

    Raises:
        ValueError: A value is out of range (at construction).
    """

    checkpoint_every_records: int = 1000
    checkpoint_every_s: float = 60.0
    max_file_bytes: int = 64 * 1024 * 1024
    backlog_max_records: int = 10_000
    retry_s: float = 1.0
    checkpoint_sink: Path | None = None
    stdout: bool = True
    record_input: bool = False
    recording_max_bytes: int = 256 * 1024 * 1024
    watch_s: float = 0.25
    mirror_max_lines: int = 10_000

    def __post_init__(self) -> None:
        for name, low in (
            ("checkpoint_every_records", 1),
            ("max_file_bytes", 4096),
            ("backlog_max_records", 0),
            ("recording_max_bytes", 4096),
            ("mirror_max_lines", 1),
        ):
            value = getattr(self, name)
            if type(value) is not int or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("checkpoint_every_s", "retry_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if not 0 < self.watch_s <= 2:
            raise ValueError(
                f"watch_s must be in (0, 2] (the 2 s fail-closed budget), "
                f"got {self.watch_s!r}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyConfig:
    """Access policies: who may reach which instruments (docs/policies.md).

    Attributes:
        dir: The policy directory (its ``*.toml`` files); unset, the policy
            that ships with the relay (``policies/default/``: engineers and
            admins, any instrument, within ``[sessions]``). A directory that
            does not load stops the broker at start; a later change that does
            not load is refused and the loaded policy stays.
        reload_poll_s: How often the directory is looked at for changed files
            (SIGHUP reloads at once too). 0.1..60.
        recheck_s: How often the broker looks for label and group changes
            (``relay device label``, ``relay user set``); a change, or a
            reload, holds every live session against the policy again and ends
            the ones it no longer allows (``policy_revoked``) within the BRIEF's
            5 s. 0.1..4.

    Raises:
        ValueError: A value is out of range (at construction).
    """

    dir: Path | None = None
    reload_poll_s: float = 2.0
    recheck_s: float = 1.0

    def __post_init__(self) -> None:
        if not 0.1 <= self.reload_poll_s <= 60:
            raise ValueError(
                f"reload_poll_s must be in 0.1..60, got {self.reload_poll_s!r}"
            )
        if not 0.1 <= self.recheck_s <= 4:
            raise ValueError(
                f"recheck_s must be in 0.1..4 (live sessions end within 5 s of "
                f"a change), got {self.recheck_s!r}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class FeedConfig:
    """The monitoring feed: alarms, daily statistics, configuration and
    consumables from the instruments (docs/monitoring.md).

    Attributes:
        max_record_bytes: Largest record stored (its JSON text, UTF-8); a
            larger one is refused (``too_large``) and the channel stays up.
            1024..49152.
        retention_days: Records older than this (by arrival) are deleted;
            answered and lapsed data requests too. 1..3650.
        retention_check_s: How often old records are looked for.
        request_timeout_s: How long a data request waits for the device's
            answer before it is marked lapsed (an offline device, an agent
            without the feed).
        intake_queue_records: Records checked and waiting for the node's
            database writer, at most; one more is answered ``retry`` and the
            agent sends it again later. 100..1000000.
        max_records_per_s: Records this node takes per second, on average
            (bursts of twice that); beyond it a record is answered ``retry``
            (``busy``) before it is parsed, and the agent pauses its feed for
            ``feed_retry_s``. It keeps a flood of backlogs (every instrument
            back after an outage) from taking the event loop that sessions
            and on-site kills need (bench/analysis.md); answers to data
            requests are not counted. 1..100000.
    """

    max_record_bytes: int = 16 * 1024
    retention_days: int = 730
    retention_check_s: float = 3600.0
    request_timeout_s: float = 60.0
    intake_queue_records: int = 20_000
    max_records_per_s: float = 100.0

    def __post_init__(self) -> None:
        if not 1024 <= self.max_record_bytes <= 48 * 1024:
            raise ValueError(
                "max_record_bytes must be in 1024..49152, "
                f"got {self.max_record_bytes!r}"
            )
        if not 1 <= self.retention_days <= 3650:
            raise ValueError(
                f"retention_days must be in 1..3650, got {self.retention_days!r}"
            )
        if not 100 <= self.intake_queue_records <= 1_000_000:
            raise ValueError(
                "intake_queue_records must be in 100..1000000, "
                f"got {self.intake_queue_records!r}"
            )
        if not 1 <= self.max_records_per_s <= 100_000:
            raise ValueError(
                "max_records_per_s must be in 1..100000, "
                f"got {self.max_records_per_s!r}"
            )
        for name in ("retention_check_s", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterConfig:
    """Several broker nodes sharing one fleet (docs/operations.md, "Several nodes").

    Attributes:
        redis_url: The Redis all nodes share (``redis://host:6379/0``,
            ``rediss://`` for TLS; a password as ``redis://:PASSWORD@host``).
            Unset (the default), the broker is a single node: presence and the
            one-session-per-device rule stay in the process.
        node_id: This node's name in presence, locks, commands and the
            session rows; unset, the host name. 1..64 of
            ``A-Z a-z 0-9 _ . : -``, unique among the nodes.
        key_prefix: The first part of every Redis key and channel, so that
            fleets may share a Redis.
        heartbeat_s: How often this node refreshes its presence, its device
            locks and its announcement; each lives for two heartbeats, so what
            a dead node held is gone within two. 0.1..30.
        command_deadline_s: How long a command to another node (end a
            session there) is resent before it counts as failed. 0.5..60.
        redis_timeout_s: The longest a Redis command or connection may take
            before it counts as Redis being away. 0.1..10.
        orphan_after_s: How long a node must be gone from the fleet (not
            announced) before another node ends the sessions it left open in
            the store (``broker_crash``); long enough for a restart to close
            them itself from its own log. 1..86400.
        orphan_check_s: How often a node looks for such sessions. 1..3600.
        presence_refresh_s: How often a device's presence is written again
            while its channel stays up (it lives two of these; a node that
            dies is out of presence within two heartbeats all the same).
            Long, because every write is one per device: 1..3600.
        advertise_device_url: ``wss://HOST[:PORT]`` at which devices reach
            this node's device listener directly (a port or name of its own on
            the load balancer). With it, an engineer on this node reaches a
            device whose control channel is on another node: the device opens
            the session's tunnel here. Unset, such a request is refused (503)
            naming the device's node. The listener certificate must cover HOST.

    Raises:
        ValueError: A value is out of range (at construction).
    """

    redis_url: str | None = None
    node_id: str | None = None
    key_prefix: str = "relay"
    heartbeat_s: float = 2.0
    command_deadline_s: float = 5.0
    redis_timeout_s: float = 1.0
    presence_refresh_s: float = 60.0
    orphan_after_s: float = 300.0
    orphan_check_s: float = 30.0
    advertise_device_url: str | None = None

    def __post_init__(self) -> None:
        if self.advertise_device_url is not None and not is_tunnel_url(
            self.advertise_device_url
        ):
            raise ValueError(
                "advertise_device_url must be wss://HOST or wss://HOST:PORT "
                f"(no path), got {self.advertise_device_url!r:.80}"
            )
        if self.redis_url is not None and not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        if self.node_id is not None:
            check_node_id(self.node_id)
        if not _KEY_PREFIX.fullmatch(self.key_prefix):
            raise ValueError(
                f"key_prefix must be 1..32 of a-z 0-9 _ - (a letter first), "
                f"got {self.key_prefix!r}"
            )
        for name, low, high in (
            ("heartbeat_s", 0.1, 30),
            ("command_deadline_s", 0.5, 60),
            ("redis_timeout_s", 0.1, 10),
            ("presence_refresh_s", 1, 3600),
            ("orphan_after_s", 1, 86400),
            ("orphan_check_s", 1, 3600),
        ):
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"{name} must be in {low:g}..{high:g}, got {value!r}")

    @property
    def effective_node_id(self) -> str:
        """The configured node id, or one made from the host name."""
        if self.node_id is not None:
            return self.node_id
        cleaned = re.sub(r"[^A-Za-z0-9_.:-]", "-", socket.gethostname())[:64]
        return cleaned if cleaned[:1].isalnum() else f"node-{cleaned}"[:64]


_KEY_PREFIX: Final = re.compile(r"[a-z][a-z0-9_-]{0,31}")


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerConfig:
    """Everything ``relay serve`` needs.

    Attributes:
        data_dir: All broker state: CA, listener certificates, database.
        device_listen: Device listener address (mTLS WebSocket).
        engineer_listen: Engineer listener address (HTTPS).
        metrics_listen: Metrics listener address (plain HTTP, keep it internal).
        database_url: SQLAlchemy URL; default is a SQLite file in ``data_dir``.
        server_names: Extra DNS names or IP addresses for dev-mode listener
            certificates (localhost and loopback are always included).
        tls_cert_file: Operator-provided listener certificate chain (production);
            when unset a dev certificate is issued by the local CA.
        tls_key_file: Key for ``tls_cert_file``.
        shutdown_grace_s: On SIGTERM/SIGINT, the time live sessions (ended
            with ``broker_shutdown``) and then control channels (closed with
            1001) get to close in order, all within one deadline; then the rest
            is cut. 0..9 s, so that with the audit log's last checkpoint the
            process is gone within the BRIEF's 10 s.
        memory_upkeep_s: Every this many seconds, collect reference cycles
            (closed connections) and give freed heap pages back to the
            operating system (glibc ``malloc_trim``), so that resident memory
            levels off under session churn; 0 turns it off. 1..3600 otherwise.
        sessions: Remote-session cap, grant timeout and channels: the ceiling
            above every policy rule.
        policy: The access policy directory and how it is reloaded.
        audit: The audit log's checkpoints, files and failure handling, and
            the session recordings.
        cluster: Several nodes on a shared Redis; unset, a single node.
        feed: The monitoring feed's limits and retention.
    """

    data_dir: Path = field(default_factory=lambda: Path(DEFAULT_DATA_DIR))
    device_listen: ListenAddress = field(
        default_factory=lambda: ListenAddress(host="0.0.0.0", port=8443)  # noqa: S104 - devices connect from the network by design
    )
    engineer_listen: ListenAddress = field(
        default_factory=lambda: ListenAddress(host="0.0.0.0", port=9443)  # noqa: S104 - engineers connect from the network by design
    )
    metrics_listen: ListenAddress = field(
        default_factory=lambda: ListenAddress(host="127.0.0.1", port=9464)
    )
    database_url: str | None = None
    server_names: tuple[str, ...] = ()
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    shutdown_grace_s: float = 5.0
    memory_upkeep_s: float = 30.0
    websocket: WebSocketLimits = field(default_factory=WebSocketLimits)
    device_listener: DeviceListenerConfig = field(default_factory=DeviceListenerConfig)
    pki: PKIConfig = field(default_factory=PKIConfig)
    engineer_auth: EngineerAuthConfig = field(default_factory=EngineerAuthConfig)
    engineer_listener: EngineerListenerConfig = field(
        default_factory=EngineerListenerConfig
    )
    sessions: SessionConfig = field(default_factory=SessionConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    feed: FeedConfig = field(default_factory=FeedConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.shutdown_grace_s <= _BROKER_MAX_SHUTDOWN_GRACE_S:
            raise ValueError(
                f"shutdown_grace_s must be in 0..{_BROKER_MAX_SHUTDOWN_GRACE_S}, "
                f"got {self.shutdown_grace_s!r}: the broker exits within 10 s"
            )
        if self.memory_upkeep_s != 0 and not 1 <= self.memory_upkeep_s <= 3600:
            raise ValueError(
                f"memory_upkeep_s must be 0 (off) or in 1..3600, "
                f"got {self.memory_upkeep_s!r}"
            )

    @property
    def effective_database_url(self) -> str:
        """The configured database URL, or the embedded SQLite file."""
        if self.database_url is not None:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'relay.sqlite3').resolve()}"


#: The broker's orderly stop must leave time for the audit log's last
#: checkpoint inside the BRIEF's 10 s exit budget.
_BROKER_MAX_SHUTDOWN_GRACE_S = 9.0


def data_dir_from_env() -> Path:
    """``$RELAY_DATA_DIR``, or ``./relay-data``."""
    return Path(os.environ.get("RELAY_DATA_DIR", DEFAULT_DATA_DIR))
