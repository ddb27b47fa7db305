"""The remote-session state machine, as the broker sees it (pure, sans-I/O).

Theory of operation
===================
One :class:`Session` holds the life of one remote session, from the engineer's
request to its one end. Like h11 it never touches a socket, a clock or trio: the
shell feeds it events with :meth:`Session.handle`, each stamped with the time
``now_ms`` the shell read from its clock, and acts on the outputs it gets back
(tell the engineer, start relaying, warn both sides, tear everything down).

States::

    REQUESTED --OfferSent--> OFFERED --Granted--> GRANTED --both legs--> ACTIVE
        |                     |   |                  |                      |
        |                     |   +--Denied--------> DENIED                 |
        +---------------------+--grant deadline----> EXPIRED                |
        +---------------------+--any other end-----> ENDED <----------------+

- REQUESTED: the engineer asked, policy passed, the broker is about to send the
  offer. The grant deadline (``requested_at_ms + grant_timeout_ms``) is fixed
  here, because the offer carries it to the device.
- OFFERED: the offer is on the device's control channel; the person at the
  instrument is being asked.
- GRANTED: the shell verified the device-signed grant. The countdown starts
  now: ``ends_at_ms = granted_at_ms + max_seconds * 1000``. The session waits for
  its two legs, the device tunnel and the engineer's attach socket.
- ACTIVE: both legs attached and paired; bytes may flow (Invariant 1).
- ENDED, DENIED, EXPIRED: terminal. Each carries exactly one :class:`EndReason`:
  DENIED is ``denied``, EXPIRED is ``grant_timeout``, ENDED is any other.

How the shell drives it: after every :meth:`~Session.handle` it acts on the
outputs in order, then arms one timer for :meth:`~Session.next_deadline_ms` and
feeds a :class:`Tick` when it fires. ``None`` means the session has ended. The
shell should take ``now_ms`` from a monotonic clock anchored once to the wall
clock, so that a wall-clock step can neither stretch nor cut the cap; the
machine refuses a ``now_ms`` smaller than one it has already seen.

Timers: the grant deadline (before the grant), the warnings (by default at
T-10 min and T-1 min; ``warning_seconds`` sets them), the cap at ``ends_at_ms``,
and the engineer's reattach grace. A timer is due at its instant
(``now_ms >= t``). Due timers run *before* the event that carries ``now_ms``, so
the answer depends only on the times in the events, not on when the shell's timer
woke up: a grant stamped one millisecond after the deadline finds the session
EXPIRED, and a Tick that comes late still ends the session with the reason whose
instant came first.

Warnings go out once each. A warning whose instant is not after the grant is
never scheduled (a 5-minute session gets only the T-1 warning; a 10-minute one
too, since its T-10 instant is the grant itself). When the shell ticks late and
both are due at once, only the T-1 warning goes out: "10 minutes left" would be
false by then.

The engineer's leg may drop and come back. With ``reattach_grace_ms`` 0 (the
default) a drop ends the session at once with ``engineer_disconnect``; with a
grace the session stays in its state, detached, and ends when the grace runs out
unless the engineer attaches again. The grace never moves ``ends_at_ms``: if the
cap comes first, the reason is ``time_cap``. The device leg has no grace: the
device losing its tunnel (or, before it has one, its control channel) ends the
session with ``device_disconnect``.

Rule 1: every event-triggered move is in ``_TRANSITIONS``; an event missing there
raises :class:`LocalProtocolError` (a bug in the shell), except after the end
(Rule 4) and for legs the session cannot take (Rule 5).
Rule 2: one state-triggered move, as in h11: GRANTED with both legs attached
becomes ACTIVE and emits :class:`Pair`.
Rule 3: exactly one end reason. Every end goes through ``_end``, which records the
reason, takes the terminal state from ``_END_STATES`` and emits the session's
only :class:`EndSession`; nothing changes after it.
Rule 4: ends race with everything in an async shell, so after the end every
event is a no-op that returns ``[]`` and keeps the first reason; only a leg that
tries to attach is refused (Rule 5), so that the shell closes it.
Rule 5: a leg the session cannot take (a tunnel before the grant, a second
tunnel, a second engineer socket, any leg after the end) raises
:class:`LegRefused`, a :class:`RemoteProtocolError`: the peer is at fault, the
shell closes that one socket and the session goes on unchanged.
Rule 6: the cap counts from the grant and is fixed there, at most
:data:`MAX_SESSION_SECONDS` (Invariant 2). Nothing else moves it: not the time
the legs attach, not the reattach grace.
Rule 7: time never goes backwards.
Rule 8: an event that raises changes nothing, not even the timers that had come
due; the shell's next Tick runs them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Final, Literal

from relay.proto.close import CloseCode
from relay.proto.errors import (
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)

MAX_SESSION_SECONDS: Final = 3600  # Invariant 2: no session is ever longer
MAX_CHANNELS: Final = 8
SESSION_ID_BYTES: Final = 16
#: Seconds before the cap at which both sides are warned (T-10 min, T-1 min).
WARNING_SECONDS: Final = (600, 60)
MAX_WARNINGS: Final = 4

# Forms from the shared vocabulary, used with fullmatch (re's "$" would also
# accept a trailing newline); the other pure modules (receipts, tunnel) take
# them from here. Device ids and user names repeat auth.DEVICE_ID_PATTERN and
# relay.users.USERNAME_PATTERN, so that relay.proto imports neither auth (which
# needs socket) nor the broker's modules; tests/relay/proto/test_session.py holds
# the copies equal.
SESSION_ID_FORM: Final = re.compile(r"[0-9a-f]{32}")
DEVICE_ID_FORM: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
USERNAME_FORM: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_SESSION_ID: Final = SESSION_ID_FORM
_DEVICE_ID: Final = DEVICE_ID_FORM
_USERNAME: Final = USERNAME_FORM
_TCP_CHANNEL: Final = re.compile(r"tcp:([1-9][0-9]{0,4})")
_MAX_PORT: Final = 65535


# Identifiers and channels
# ========================


def new_session_id(random_bytes: bytes) -> str:
    """A session id made from 16 random bytes the caller drew (32 lowercase hex).

    Raises:
        ValueError: *random_bytes* is not exactly 16 bytes long.
    """
    if len(random_bytes) != SESSION_ID_BYTES:
        raise ValueError(
            f"a session id needs {SESSION_ID_BYTES} random bytes, "
            f"got {len(random_bytes)}"
        )
    return random_bytes.hex()


def is_session_id(text: object) -> bool:
    """Whether *text* has the form of a session id: 32 lowercase hex characters."""
    return isinstance(text, str) and _SESSION_ID.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class Channel:
    """One channel a session may open: the device's shell or one of its TCP ports."""

    kind: Literal["shell", "tcp"]
    port: int | None = None

    def __str__(self) -> str:
        return "shell" if self.kind == "shell" else f"tcp:{self.port}"


SHELL: Final = Channel("shell")


def parse_channel(text: object) -> Channel:
    """Parse one channel: ``"shell"`` or ``"tcp:PORT"``.

    PORT is 1..65535 in decimal without leading zeros or a sign, so every channel
    has exactly one spelling (``tcp:22``, never ``tcp:022``) and comparing the
    strings compares the channels.

    Raises:
        ValueError: *text* is not a channel.
    """
    if not isinstance(text, str):
        raise ValueError(f"a channel is a string, not {type(text).__name__}")
    if text == "shell":
        return SHELL
    match = _TCP_CHANNEL.fullmatch(text)
    if match is not None and int(match[1]) <= _MAX_PORT:
        return Channel("tcp", int(match[1]))
    if text.startswith("tcp:"):
        raise ValueError(
            f"channel {_shorten(text)}: the port must be 1..65535, "
            "written in decimal without leading zeros"
        )
    raise ValueError(
        f"unknown channel {_shorten(text)}: expected 'shell' or 'tcp:PORT'"
    )


def validate_channels(channels: object) -> tuple[str, ...]:
    """Check a session's channel list and return it as a tuple, order kept.

    A session asks for 1 to :data:`MAX_CHANNELS` distinct channels (see
    :func:`parse_channel` for the form of one).

    Raises:
        ValueError: The list or one of its channels is not valid.
    """
    if not isinstance(channels, list | tuple):
        raise ValueError(
            f"channels must be a list of strings, not {type(channels).__name__}"
        )
    if not channels:
        raise ValueError("at least one channel is required")
    if len(channels) > MAX_CHANNELS:
        raise ValueError(
            f"at most {MAX_CHANNELS} channels per session, got {len(channels)}"
        )
    seen: list[str] = []
    for item in channels:
        text = str(parse_channel(item))
        if text in seen:
            raise ValueError(f"channel {text!r} is listed twice")
        seen.append(text)
    return tuple(seen)


def _shorten(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# States, end reasons, events and outputs
# =======================================


class State(Enum):
    """Session states; the value is the form the API shows."""

    REQUESTED = "requested"
    OFFERED = "offered"
    GRANTED = "granted"
    ACTIVE = "active"
    ENDED = "ended"
    DENIED = "denied"
    EXPIRED = "expired"

    @property
    def is_terminal(self) -> bool:
        """Whether the session is over (ENDED, DENIED or EXPIRED)."""
        return self in _TERMINAL


_TERMINAL: Final = frozenset({State.ENDED, State.DENIED, State.EXPIRED})
_LIVE: Final = (State.REQUESTED, State.OFFERED, State.GRANTED, State.ACTIVE)
_BEFORE_GRANT: Final = frozenset({State.REQUESTED, State.OFFERED})
_AFTER_GRANT: Final = frozenset({State.GRANTED, State.ACTIVE})


class EndReason(StrEnum):
    """Why a session ended; the value is the exact string of the audit event."""

    ENGINEER = "engineer"
    ONSITE = "onsite"
    DEVICE_SHUTDOWN = "device_shutdown"
    TIME_CAP = "time_cap"
    ADMIN = "admin"
    DEVICE_DISCONNECT = "device_disconnect"
    ENGINEER_DISCONNECT = "engineer_disconnect"
    REVOKED = "revoked"
    POLICY_REVOKED = "policy_revoked"
    LOGIN_ENDED = "login_ended"
    BROKER_SHUTDOWN = "broker_shutdown"
    BROKER_CRASH = "broker_crash"
    AUDIT_FAILURE = "audit_failure"
    DENIED = "denied"
    GRANT_TIMEOUT = "grant_timeout"
    CANCELLED = "cancelled"

    @property
    def before_grant(self) -> bool:
        """Whether this reason can only end a session that was never granted.

        True for ``denied``, ``grant_timeout`` and ``cancelled``. A session that
        ended for one of these never had a byte flow.
        """
        return self in (EndReason.DENIED, EndReason.GRANT_TIMEOUT, EndReason.CANCELLED)


# Which terminal state each reason leads to; the rest lead to ENDED.
_END_STATES: Final[dict[EndReason, State]] = {
    EndReason.DENIED: State.DENIED,
    EndReason.GRANT_TIMEOUT: State.EXPIRED,
}

# The reasons the shell may give in EndRequested, and the states they may end.
# The others come from the machine's own events: Denied, the timers, the
# Detached events. "cancelled" is the engineer withdrawing before the grant,
# "engineer" the engineer ending after it; the person on site refuses an offer
# with Denied and ends a granted session with "onsite"; "device_shutdown" is the
# agent stopping (SIGTERM) with a granted session (it denies a pending offer).
_REQUESTABLE: Final[dict[EndReason, frozenset[State]]] = {
    EndReason.CANCELLED: _BEFORE_GRANT,
    EndReason.ENGINEER: _AFTER_GRANT,
    EndReason.ONSITE: _AFTER_GRANT,
    EndReason.DEVICE_SHUTDOWN: _AFTER_GRANT,
    EndReason.ADMIN: frozenset(_LIVE),
    EndReason.REVOKED: frozenset(_LIVE),
    EndReason.POLICY_REVOKED: frozenset(_LIVE),
    EndReason.LOGIN_ENDED: frozenset(_LIVE),
    EndReason.BROKER_SHUTDOWN: frozenset(_LIVE),
    # Another node the session needed (the device's, for a session across
    # nodes) stopped answering; also what a restart writes for a crashed one.
    EndReason.BROKER_CRASH: frozenset(_LIVE),
    EndReason.AUDIT_FAILURE: frozenset(_LIVE),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Something that happened to the session, at ``now_ms`` (shell's clock)."""

    now_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class OfferSent(Event):
    """The shell put the offer on the device's control channel."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Granted(Event):
    """The device granted the session; the shell has verified the signed receipt.

    ``max_seconds`` is the cap the device granted, when it chose a shorter one
    than offered (its own limit); the session then ends at the shorter cap.
    """

    max_seconds: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Denied(Event):
    """The person at the instrument refused the offer."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceAttached(Event):
    """The device opened this session's tunnel (same device, checked by the shell)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineerAttached(Event):
    """The engineer's attach socket for this session is open."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineerDetached(Event):
    """The engineer's attach socket dropped."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceDetached(Event):
    """The device is gone: its tunnel dropped, or, before it had one, its control
    channel did."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EndRequested(Event):
    """Someone or something ends the session for *reason*.

    See ``_REQUESTABLE`` for the reasons allowed here and when.
    """

    reason: EndReason


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick(Event):
    """The shell's timer fired (at or after :meth:`Session.next_deadline_ms`)."""


class Output:
    """Base class of what the session asks the shell to do."""


@dataclass(frozen=True, slots=True)
class NotifyEngineer(Output):
    """Tell the engineer the session is now in *state* (offered, granted, active)."""

    state: State


@dataclass(frozen=True, slots=True)
class Pair(Output):
    """Both legs are attached: start relaying between them."""


@dataclass(frozen=True, slots=True)
class Warn(Output):
    """Warn both sides that *seconds_left* seconds remain."""

    seconds_left: int

    @property
    def minutes_left(self) -> int:
        """The time left in whole minutes, rounded up (60 s is 1 min, 30 s too)."""
        return -(-self.seconds_left // 60)


@dataclass(frozen=True, slots=True)
class EndSession(Output):
    """The session is over for *reason*: close both legs and every stream.

    Emitted exactly once per session (Rule 3).
    """

    reason: EndReason


class LegRefused(RemoteProtocolError):
    """The session cannot take this leg now: close that socket, nothing else."""

    def __init__(self, message: str) -> None:
        super().__init__(message, close_code=CloseCode.POLICY_VIOLATION)


class TunnelAlreadyAttached(LegRefused):
    """The device opened this session's tunnel a second time (it opens it once)."""


_TRANSITIONS: Final[dict[tuple[State, type[Event]], State]] = {
    (State.REQUESTED, OfferSent): State.OFFERED,
    (State.OFFERED, Granted): State.GRANTED,
    (State.OFFERED, Denied): State.DENIED,
    # The state-triggered move to ACTIVE follows (Rule 2).
    (State.GRANTED, DeviceAttached): State.GRANTED,
    # The engineer may attach early and wait there for the grant, and come back
    # after a drop; a drop ends the session through the grace timer (at once
    # with no grace).
    **{(state, EngineerAttached): state for state in _LIVE},
    **{(state, EngineerDetached): state for state in _LIVE},
    **{(state, DeviceDetached): State.ENDED for state in _LIVE},
    **{(state, EndRequested): State.ENDED for state in _LIVE},
    **{(state, Tick): state for state in _LIVE},
}


@dataclass(slots=True, kw_only=True)
class _Vars:
    """Everything that changes, in one place so that a refused event can undo."""

    state: State = State.REQUESTED
    end_reason: EndReason | None = None
    last_now_ms: int
    granted_at_ms: int | None = None
    ends_at_ms: int | None = None
    device_attached: bool = False
    engineer_attached: bool = False
    grace_ends_at_ms: int | None = None
    # (instant, seconds left) of the warnings still to send, earliest first.
    warnings: tuple[tuple[int, int], ...] = ()


class Session:
    """The state of one remote session, from request to end (see module doc).

    Args:
        session_id: 32 lowercase hex characters (:func:`new_session_id`).
        device_id: The device's id, as in its certificate.
        engineer: The engineer's user name.
        channels: What the session may open (:func:`validate_channels`).
        max_seconds: The cap, 1..3600, counted from the grant.
        grant_timeout_ms: How long the device has to answer, from the request.
        requested_at_ms: When the engineer asked; no event may be earlier.
        reattach_grace_ms: How long an engineer whose socket dropped may take to
            attach again before the session ends (0: it ends at once).

    Raises:
        ValueError: An argument is out of range or has the wrong form.
    """

    def __init__(
        self,
        session_id: str,
        device_id: str,
        engineer: str,
        channels: object,
        max_seconds: int,
        grant_timeout_ms: int,
        requested_at_ms: int,
        reattach_grace_ms: int = 0,
        warning_seconds: tuple[int, ...] = WARNING_SECONDS,
    ) -> None:
        if not is_session_id(session_id):
            raise ValueError(f"bad session id {_shorten(session_id)}")
        if not _DEVICE_ID.fullmatch(device_id):
            raise ValueError(f"bad device id {_shorten(device_id)}")
        if not _USERNAME.fullmatch(engineer):
            raise ValueError(f"bad engineer user name {_shorten(engineer)}")
        _check_int("max_seconds", max_seconds, 1, MAX_SESSION_SECONDS)
        _check_int("grant_timeout_ms", grant_timeout_ms, 1)
        _check_int("requested_at_ms", requested_at_ms, 0)
        _check_int("reattach_grace_ms", reattach_grace_ms, 0)
        self.warning_seconds: Final = check_warnings(warning_seconds)
        self.session_id: Final = session_id
        self.device_id: Final = device_id
        self.engineer: Final = engineer
        self.channels: Final = validate_channels(channels)
        self.max_seconds: Final = max_seconds
        self.requested_at_ms: Final = requested_at_ms
        self.grant_deadline_ms: Final = requested_at_ms + grant_timeout_ms
        self.reattach_grace_ms: Final = reattach_grace_ms
        self._vars = _Vars(last_now_ms=requested_at_ms)

    def __repr__(self) -> str:
        return (
            f"<Session {self.session_id} device={self.device_id} "
            f"state={self.state.name} end_reason={self.end_reason}>"
        )

    # Read-only views
    # ---------------

    @property
    def state(self) -> State:
        """The current state."""
        return self._vars.state

    @property
    def end_reason(self) -> EndReason | None:
        """Why the session ended; ``None`` while it is live."""
        return self._vars.end_reason

    @property
    def granted_at_ms(self) -> int | None:
        """When the grant was accepted; ``None`` if it never was."""
        return self._vars.granted_at_ms

    @property
    def ends_at_ms(self) -> int | None:
        """When the cap ends the session: grant + ``max_seconds``; set at the grant."""
        return self._vars.ends_at_ms

    @property
    def device_attached(self) -> bool:
        """Whether the device tunnel is attached (False again after the end)."""
        return self._vars.device_attached

    @property
    def engineer_attached(self) -> bool:
        """Whether the engineer's socket is attached (False again after the end)."""
        return self._vars.engineer_attached

    @property
    def grace_ends_at_ms(self) -> int | None:
        """When a detached engineer's grace runs out; ``None`` if none is running."""
        return self._vars.grace_ends_at_ms

    def next_deadline_ms(self) -> int | None:
        """The earliest time the shell must feed a :class:`Tick`; ``None`` once ended.

        Every live state has a timer: the grant deadline before the grant, the cap
        after it.
        """
        v = self._vars
        if v.state.is_terminal:
            return None
        times = [instant for instant, _ in self._end_timers()]
        times.extend(instant for instant, _ in v.warnings)
        return min(times)

    # Driving
    # -------

    def handle(self, event: Event) -> list[Output]:
        """Apply *event* (after any timers due by its time); return what to do.

        Raises:
            LocalProtocolError: The event is not allowed now, or its time goes
                backwards; a bug in the shell. Nothing changed.
            LegRefused: A leg this session cannot take (Rule 5); close that
                socket. :class:`TunnelAlreadyAttached` for a second tunnel.
                Nothing changed.
        """
        saved = dataclasses.replace(self._vars)
        try:
            return self._handle(event)
        except ProtocolError:
            self._vars = saved
            raise

    def _handle(self, event: Event) -> list[Output]:
        v = self._vars
        now = event.now_ms
        if now < v.last_now_ms:
            raise LocalProtocolError(
                f"time went backwards: {type(event).__name__} at {now} ms "
                f"after an event at {v.last_now_ms} ms"
            )
        v.last_now_ms = now
        outputs = self._run_timers(now)
        outputs += self._apply(event)
        outputs += self._run_timers(now)  # a detach with no grace ends here
        return outputs

    def _apply(self, event: Event) -> list[Output]:
        v = self._vars
        if isinstance(event, DeviceAttached | EngineerAttached):
            self._check_leg(event)
        if v.state.is_terminal:
            return []
        new_state = _TRANSITIONS.get((v.state, type(event)))
        if new_state is None:
            raise LocalProtocolError(
                f"{type(event).__name__} is not allowed in state {v.state.name}"
            )
        match event:
            case OfferSent():
                v.state = new_state
                return [NotifyEngineer(new_state)]
            case Granted(now_ms=now, max_seconds=granted_cap):
                cap = self.max_seconds if granted_cap is None else granted_cap
                if not 1 <= cap <= self.max_seconds:
                    # The receipt check refuses a cap beyond the offer: a shell bug.
                    raise LocalProtocolError(
                        f"granted cap {cap} s is outside 1..{self.max_seconds} s"
                    )
                v.state = new_state
                v.granted_at_ms = now
                v.ends_at_ms = now + cap * 1000
                v.warnings = tuple(
                    (v.ends_at_ms - seconds * 1000, seconds)
                    for seconds in self.warning_seconds
                    if v.ends_at_ms - seconds * 1000 > now
                )
                return [NotifyEngineer(new_state)]
            case Denied():
                return self._end(EndReason.DENIED)
            case DeviceAttached():
                v.device_attached = True
                return self._pair_if_ready()
            case EngineerAttached():
                v.engineer_attached = True
                v.grace_ends_at_ms = None
                if v.state is State.ACTIVE:
                    return [Pair()]  # back within the grace
                return self._pair_if_ready()
            case EngineerDetached(now_ms=now):
                if not v.engineer_attached:
                    raise LocalProtocolError(
                        "EngineerDetached with no engineer attached"
                    )
                v.engineer_attached = False
                v.grace_ends_at_ms = now + self.reattach_grace_ms
                return []
            case DeviceDetached():
                return self._end(EndReason.DEVICE_DISCONNECT)
            case EndRequested(reason=reason):
                if v.state not in _REQUESTABLE.get(reason, ()):
                    raise LocalProtocolError(
                        f"EndRequested({_shorten(reason)}) is not allowed in state "
                        f"{v.state.name}"
                    )
                # A plain "admin" found its entry; record the enum member.
                return self._end(EndReason(reason))
            case _:  # Tick: its work is the timers
                return []

    def _check_leg(self, event: DeviceAttached | EngineerAttached) -> None:
        v = self._vars
        if v.state.is_terminal:
            raise LegRefused(f"session {self.session_id} has ended")
        if isinstance(event, EngineerAttached):
            if v.engineer_attached:
                raise LegRefused("an engineer socket is already attached")
        elif v.device_attached:
            raise TunnelAlreadyAttached("the tunnel of this session is already open")
        elif v.state in _BEFORE_GRANT:
            # Invariant 1: no tunnel before a verified grant.
            raise LegRefused(f"session {self.session_id} is not granted")

    def _pair_if_ready(self) -> list[Output]:
        # Rule 2, the one state-triggered move.
        v = self._vars
        if v.state is State.GRANTED and v.device_attached and v.engineer_attached:
            v.state = State.ACTIVE
            return [NotifyEngineer(State.ACTIVE), Pair()]
        return []

    def _end_timers(self) -> list[tuple[int, EndReason]]:
        # In priority order: on a tie the cap (or the grant deadline) wins over
        # the grace, so the grace can never be the reason past ends_at.
        v = self._vars
        timers: list[tuple[int, EndReason]] = []
        if v.ends_at_ms is None:
            timers.append((self.grant_deadline_ms, EndReason.GRANT_TIMEOUT))
        else:
            timers.append((v.ends_at_ms, EndReason.TIME_CAP))
        if v.grace_ends_at_ms is not None:
            timers.append((v.grace_ends_at_ms, EndReason.ENGINEER_DISCONNECT))
        return timers

    def _run_timers(self, now: int) -> list[Output]:
        v = self._vars
        if v.state.is_terminal:
            return []
        due = [
            (instant, reason)
            for instant, reason in self._end_timers()
            if instant <= now
        ]
        if due:
            # min() keeps the first of equal instants: priority order.
            _, reason = min(due, key=lambda timer: timer[0])
            return self._end(reason)
        sent = [seconds for instant, seconds in v.warnings if instant <= now]
        if not sent:
            return []
        v.warnings = tuple(w for w in v.warnings if w[0] > now)
        return [Warn(min(sent))]

    def _end(self, reason: EndReason) -> list[Output]:
        # Rule 3: the only place that ends a session; callers check it is live.
        v = self._vars
        v.state = _END_STATES.get(reason, State.ENDED)
        v.end_reason = reason
        v.device_attached = False
        v.engineer_attached = False
        v.grace_ends_at_ms = None
        v.warnings = ()
        return [EndSession(reason)]


def check_warnings(warning_seconds: object) -> tuple[int, ...]:
    """*warning_seconds* as a validated tuple, largest first.

    Each is an integer number of seconds before the cap in 1..3599, at most
    :data:`MAX_WARNINGS` of them, no two equal; an empty tuple means no warnings.

    Raises:
        ValueError: Not such a tuple.
    """
    if (
        not isinstance(warning_seconds, tuple | list)
        or len(warning_seconds) > MAX_WARNINGS
    ):
        raise ValueError(
            f"warning_seconds must be a list of at most {MAX_WARNINGS} integers, "
            f"got {_shorten(warning_seconds)}"
        )
    for seconds in warning_seconds:
        _check_int("each of warning_seconds", seconds, 1, MAX_SESSION_SECONDS - 1)
    if len(set(warning_seconds)) != len(warning_seconds):
        raise ValueError(
            f"warning_seconds repeats a value: {_shorten(warning_seconds)}"
        )
    return tuple(sorted(warning_seconds, reverse=True))


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < low
        or (high is not None and value > high)
    ):
        limit = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {limit}, got {_shorten(value)}")
