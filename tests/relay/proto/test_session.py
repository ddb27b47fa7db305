"""The remote-session state machine (relay/proto/session.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import pytest
from hypothesis import given, settings, strategies as st

from relay.proto.close import CloseCode
from relay.proto.errors import LocalProtocolError, RemoteProtocolError
from relay.proto.session import (
    MAX_CHANNELS,
    MAX_SESSION_SECONDS,
    Channel,
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
    TunnelAlreadyAttached,
    Warn,
    is_session_id,
    new_session_id,
    parse_channel,
    validate_channels,
)

T0: Final = 1_700_000_000_000  # an epoch time in ms
SID: Final = "0123456789abcdef0123456789abcdef"
GRANT_TIMEOUT_MS: Final = 60_000
MINUTE_MS: Final = 60_000
HOUR_MS: Final = 3_600_000

LIVE: Final = (State.REQUESTED, State.OFFERED, State.GRANTED, State.ACTIVE)
TERMINAL: Final = (State.ENDED, State.DENIED, State.EXPIRED)


# Helpers
# =======


def make(**overrides: Any) -> Session:
    """A fresh REQUESTED session at T0 with a one-hour cap, with *overrides*."""
    args: dict[str, Any] = {
        "session_id": SID,
        "device_id": "dev-0001",
        "engineer": "alice",
        "channels": ["shell", "tcp:22"],
        "max_seconds": MAX_SESSION_SECONDS,
        "grant_timeout_ms": GRANT_TIMEOUT_MS,
        "requested_at_ms": T0,
    }
    args.update(overrides)
    return Session(**args)


def session_in(state: State, **overrides: Any) -> Session:
    """A session brought to live *state*; granted at T0 + 1000 if it got there.

    GRANTED has neither leg attached; ACTIVE has both (attached at T0 + 2000).
    """
    session = make(**overrides)
    if state is not State.REQUESTED:
        session.handle(OfferSent(now_ms=T0))
    if state in (State.GRANTED, State.ACTIVE):
        session.handle(Granted(now_ms=T0 + 1000))
    if state is State.ACTIVE:
        session.handle(DeviceAttached(now_ms=T0 + 2000))
        session.handle(EngineerAttached(now_ms=T0 + 2000))
    assert session.state is state
    return session


def again(session: Session) -> Session:
    """*session* itself, through a call, so that mypy drops an earlier narrowing.

    mypy keeps ``session.state is State.OFFERED`` narrowed across a later
    ``handle`` call; reading through ``again(session)`` avoids a false
    "unreachable".
    """
    return session


def now_of(session: Session) -> int:
    """A time no earlier than any event *session* has seen (its grant, if any)."""
    return max(T0 + 2000, session.granted_at_ms or 0)


# Constants and vocabulary
# ========================


def test_end_reasons_are_the_shared_vocabulary() -> None:
    """The end reasons are exactly the strings of the shared vocabulary."""
    assert {reason.value for reason in EndReason} == {
        "engineer",
        "onsite",
        "device_shutdown",
        "time_cap",
        "admin",
        "device_disconnect",
        "engineer_disconnect",
        "revoked",
        "policy_revoked",
        "login_ended",
        "broker_shutdown",
        "broker_crash",
        "audit_failure",
        "denied",
        "grant_timeout",
        "cancelled",
    }
    assert str(EndReason.TIME_CAP) == "time_cap"
    assert "busy" not in {reason.value for reason in EndReason}


def test_before_grant_reasons() -> None:
    """Only denied, grant_timeout and cancelled end sessions that were never granted."""
    assert {reason for reason in EndReason if reason.before_grant} == {
        EndReason.DENIED,
        EndReason.GRANT_TIMEOUT,
        EndReason.CANCELLED,
    }


def test_state_values_and_terminal_flag() -> None:
    """States show as lower-case words; only ENDED, DENIED and EXPIRED are terminal."""
    assert [state.value for state in State] == [
        "requested",
        "offered",
        "granted",
        "active",
        "ended",
        "denied",
        "expired",
    ]
    assert {state for state in State if state.is_terminal} == set(TERMINAL)


def test_limits() -> None:
    """The cap ceiling is one hour (Invariant 2) and a session has at most 8 channels."""
    assert MAX_SESSION_SECONDS == 3600
    assert MAX_CHANNELS == 8


# Session ids
# ===========


def test_new_session_id_is_hex_of_the_given_bytes() -> None:
    """A session id is the 16 caller-drawn bytes as 32 lowercase hex characters."""
    session_id = new_session_id(bytes(range(250, 256)) + bytes(10))
    assert session_id == "fafbfcfdfeff" + "00" * 10
    assert is_session_id(session_id)
    assert is_session_id(new_session_id(b"\xff" * 16))


@pytest.mark.parametrize("size", [0, 15, 17, 32])
def test_new_session_id_needs_16_bytes(size: int) -> None:
    """Fewer or more than 16 random bytes are refused."""
    with pytest.raises(ValueError, match="16 random bytes"):
        new_session_id(bytes(size))


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("0123456789ABCDEF0123456789abcdef", id="upper"),
        pytest.param(SID[:-1], id="31"),
        pytest.param(SID + "0", id="33"),
        pytest.param(SID + "\n", id="newline"),
        pytest.param(SID[:-1] + "g", id="non-hex"),
        pytest.param("", id="empty"),
        pytest.param("\u0660" * 32, id="arabic-digits"),
        pytest.param(None, id="none"),
        pytest.param(SID.encode(), id="bytes"),
    ],
)
def test_is_session_id_rejects(text: object) -> None:
    """Only exactly 32 lowercase hex characters are a session id."""
    assert not is_session_id(text)


# Channels
# ========


@pytest.mark.parametrize(
    ("text", "channel"),
    [
        ("shell", Channel("shell")),
        ("tcp:1", Channel("tcp", 1)),
        ("tcp:22", Channel("tcp", 22)),
        ("tcp:443", Channel("tcp", 443)),
        ("tcp:65535", Channel("tcp", 65535)),
    ],
)
def test_parse_channel_accepts(text: str, channel: Channel) -> None:
    """'shell' and 'tcp:PORT' parse, and print back to the same text."""
    assert parse_channel(text) == channel
    assert str(parse_channel(text)) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tcp:0", "1..65535"),
        ("tcp:65536", "1..65535"),
        ("tcp:99999", "1..65535"),
        ("tcp:022", "leading zeros"),
        ("tcp:", "1..65535"),
        ("tcp:+22", "1..65535"),
        ("tcp:-1", "1..65535"),
        ("tcp:22 ", "1..65535"),
        ("tcp:٢٢", "1..65535"),
        ("tcp:123456", "1..65535"),
        ("shell ", "unknown channel"),
        (" shell", "unknown channel"),
        ("Shell", "unknown channel"),
        ("shell\n", "unknown channel"),
        ("TCP:22", "unknown channel"),
        ("udp:53", "unknown channel"),
        ("", "unknown channel"),
        ("x" * 1000, "unknown channel 'xxx"),
        (22, "not int"),
        (None, "not NoneType"),
    ],
)
def test_parse_channel_rejects(text: object, message: str) -> None:
    """Anything else is a ValueError naming the problem."""
    with pytest.raises(ValueError, match=message) as exc_info:
        parse_channel(text)
    assert len(str(exc_info.value)) < 200  # long input is shortened


def test_validate_channels_keeps_order() -> None:
    """A valid list comes back as a tuple in the same order."""
    assert validate_channels(["tcp:443", "shell", "tcp:22"]) == (
        "tcp:443",
        "shell",
        "tcp:22",
    )
    eight = [f"tcp:{port}" for port in range(1, 9)]
    assert validate_channels(eight) == tuple(eight)
    assert validate_channels(("shell",)) == ("shell",)


@pytest.mark.parametrize(
    ("channels", "message"),
    [
        ([], "at least one"),
        (
            [f"tcp:{port}" for port in range(1, 10)],
            "at most 8 channels per session, got 9",
        ),
        (["shell", "shell"], "'shell' is listed twice"),
        (["tcp:22", "shell", "tcp:22"], "'tcp:22' is listed twice"),
        (["shell", "tcp:022"], "leading zeros"),
        (["shell "], "unknown channel"),
        ("shell", "not str"),
        ({"shell"}, "not set"),
        (None, "not NoneType"),
        ([["shell"]], "not list"),
    ],
)
def test_validate_channels_rejects(channels: object, message: str) -> None:
    """Empty, too long, duplicated or malformed lists are refused clearly."""
    with pytest.raises(ValueError, match=message):
        validate_channels(channels)


# Construction
# ============


def test_new_session_is_requested() -> None:
    """A new session is REQUESTED, with its grant deadline fixed and no cap yet."""
    session = make(grant_timeout_ms=30_000, channels=("tcp:443",))
    assert session.state is State.REQUESTED
    assert session.end_reason is None
    assert session.granted_at_ms is None
    assert session.ends_at_ms is None
    assert session.grant_deadline_ms == T0 + 30_000
    assert session.next_deadline_ms() == T0 + 30_000
    assert not session.device_attached
    assert not session.engineer_attached
    assert session.grace_ends_at_ms is None
    assert session.channels == ("tcp:443",)
    assert (session.session_id, session.device_id, session.engineer) == (
        SID,
        "dev-0001",
        "alice",
    )
    assert session.max_seconds == MAX_SESSION_SECONDS
    assert session.requested_at_ms == T0
    assert session.reattach_grace_ms == 0
    assert repr(session) == (
        f"<Session {SID} device=dev-0001 state=REQUESTED end_reason=None>"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_seconds": 0}, "max_seconds must be an integer 1..3600"),
        ({"max_seconds": 3601}, "max_seconds"),
        ({"max_seconds": -1}, "max_seconds"),
        ({"max_seconds": True}, "max_seconds"),
        ({"max_seconds": 60.0}, "max_seconds"),
        ({"grant_timeout_ms": 0}, "grant_timeout_ms must be an integer >= 1"),
        ({"requested_at_ms": -1}, "requested_at_ms"),
        ({"reattach_grace_ms": -1}, "reattach_grace_ms"),
        ({"session_id": SID.upper()}, "bad session id"),
        ({"device_id": "-dev"}, "bad device id"),
        ({"device_id": "d" * 65}, "bad device id"),
        ({"engineer": "Alice"}, "bad engineer"),
        ({"engineer": ""}, "bad engineer"),
        ({"channels": []}, "at least one channel"),
        ({"channels": ["tcp:0"]}, "1..65535"),
    ],
)
def test_constructor_refuses(overrides: dict[str, Any], message: str) -> None:
    """Out-of-range caps, bad forms and bad channels are refused at construction."""
    with pytest.raises(ValueError, match=message):
        make(**overrides)


@pytest.mark.parametrize("max_seconds", [1, 3600])
def test_constructor_accepts_cap_bounds(max_seconds: int) -> None:
    """1 and 3600 seconds are both valid caps."""
    assert make(max_seconds=max_seconds).max_seconds == max_seconds


# The happy path
# ==============

HAPPY_PATH: Final[list[tuple[Event, list[Output], State]]] = [
    (OfferSent(now_ms=T0 + 5), [NotifyEngineer(State.OFFERED)], State.OFFERED),
    (EngineerAttached(now_ms=T0 + 10), [], State.OFFERED),
    (Granted(now_ms=T0 + 20_000), [NotifyEngineer(State.GRANTED)], State.GRANTED),
    (
        DeviceAttached(now_ms=T0 + 20_100),
        [NotifyEngineer(State.ACTIVE), Pair()],
        State.ACTIVE,
    ),
    (Tick(now_ms=T0 + 20_000 + HOUR_MS - 10 * MINUTE_MS), [Warn(600)], State.ACTIVE),
    (Tick(now_ms=T0 + 20_000 + HOUR_MS - MINUTE_MS), [Warn(60)], State.ACTIVE),
    (
        EndRequested(reason=EndReason.ONSITE, now_ms=T0 + 20_000 + HOUR_MS - 1),
        [EndSession(EndReason.ONSITE)],
        State.ENDED,
    ),
]


def test_happy_path() -> None:
    """Request, offer, grant, both legs, two warnings, the person on site ends it."""
    session = make()
    for event, outputs, state in HAPPY_PATH:
        assert session.handle(event) == outputs, event
        assert session.state is state, event
    assert session.end_reason is EndReason.ONSITE
    assert session.granted_at_ms == T0 + 20_000
    assert session.ends_at_ms == T0 + 20_000 + HOUR_MS
    assert session.next_deadline_ms() is None
    assert not session.device_attached
    assert not session.engineer_attached


def test_legs_pair_in_either_order() -> None:
    """Whichever leg attaches second makes the session ACTIVE and pairs them."""
    session = session_in(State.GRANTED)
    assert session.handle(EngineerAttached(now_ms=T0 + 1500)) == []
    assert session.state is State.GRANTED
    assert session.engineer_attached
    assert not session.device_attached
    assert session.handle(DeviceAttached(now_ms=T0 + 1600)) == [
        NotifyEngineer(State.ACTIVE),
        Pair(),
    ]
    assert session.device_attached


def test_engineer_attached_before_grant_waits() -> None:
    """An engineer attached early stays attached through the grant; no Pair yet."""
    session = make()
    assert session.handle(EngineerAttached(now_ms=T0)) == []
    assert session.state is State.REQUESTED
    session.handle(OfferSent(now_ms=T0))
    assert session.handle(Granted(now_ms=T0 + 1)) == [NotifyEngineer(State.GRANTED)]
    assert session.handle(DeviceAttached(now_ms=T0 + 2)) == [
        NotifyEngineer(State.ACTIVE),
        Pair(),
    ]


# Every end reason, once
# ======================


END_PATHS: Final[dict[str, tuple[State, Callable[[Session], list[Output]], State]]] = {
    # reason id: (start state, action, terminal state)
    "engineer": (
        State.ACTIVE,
        lambda s: s.handle(EndRequested(reason=EndReason.ENGINEER, now_ms=T0 + 3000)),
        State.ENDED,
    ),
    "onsite": (
        State.ACTIVE,
        lambda s: s.handle(EndRequested(reason=EndReason.ONSITE, now_ms=T0 + 3000)),
        State.ENDED,
    ),
    "device_shutdown": (
        State.GRANTED,
        lambda s: s.handle(
            EndRequested(reason=EndReason.DEVICE_SHUTDOWN, now_ms=T0 + 3000)
        ),
        State.ENDED,
    ),
    "time_cap": (
        State.ACTIVE,
        lambda s: s.handle(Tick(now_ms=T0 + 1000 + HOUR_MS)),
        State.ENDED,
    ),
    "admin": (
        State.OFFERED,
        lambda s: s.handle(EndRequested(reason=EndReason.ADMIN, now_ms=T0 + 3000)),
        State.ENDED,
    ),
    "device_disconnect": (
        State.ACTIVE,
        lambda s: s.handle(DeviceDetached(now_ms=T0 + 3000)),
        State.ENDED,
    ),
    "engineer_disconnect": (
        State.ACTIVE,
        lambda s: s.handle(EngineerDetached(now_ms=T0 + 3000)),
        State.ENDED,
    ),
    "revoked": (
        State.ACTIVE,
        lambda s: s.handle(EndRequested(reason=EndReason.REVOKED, now_ms=T0 + 3000)),
        State.ENDED,
    ),
    "policy_revoked": (
        State.OFFERED,
        lambda s: s.handle(
            EndRequested(reason=EndReason.POLICY_REVOKED, now_ms=T0 + 3000)
        ),
        State.ENDED,
    ),
    "login_ended": (
        State.GRANTED,
        lambda s: s.handle(
            EndRequested(reason=EndReason.LOGIN_ENDED, now_ms=T0 + 3000)
        ),
        State.ENDED,
    ),
    "broker_shutdown": (
        State.REQUESTED,
        lambda s: s.handle(
            EndRequested(reason=EndReason.BROKER_SHUTDOWN, now_ms=T0 + 3000)
        ),
        State.ENDED,
    ),
    "broker_crash": (
        State.ACTIVE,
        lambda s: s.handle(
            EndRequested(reason=EndReason.BROKER_CRASH, now_ms=T0 + 3000)
        ),
        State.ENDED,
    ),
    "audit_failure": (
        State.ACTIVE,
        lambda s: s.handle(
            EndRequested(reason=EndReason.AUDIT_FAILURE, now_ms=T0 + 3000)
        ),
        State.ENDED,
    ),
    "denied": (
        State.OFFERED,
        lambda s: s.handle(Denied(now_ms=T0 + 3000)),
        State.DENIED,
    ),
    "grant_timeout": (
        State.OFFERED,
        lambda s: s.handle(Tick(now_ms=T0 + GRANT_TIMEOUT_MS)),
        State.EXPIRED,
    ),
    "cancelled": (
        State.OFFERED,
        lambda s: s.handle(EndRequested(reason=EndReason.CANCELLED, now_ms=T0 + 3000)),
        State.ENDED,
    ),
}


def test_every_end_reason_has_a_path() -> None:
    """END_PATHS covers every end reason."""
    assert set(END_PATHS) == {reason.value for reason in EndReason}


@pytest.mark.parametrize("reason", list(EndReason), ids=str)
def test_every_end_reason_is_reachable_and_recorded_once(reason: EndReason) -> None:
    """Each reason ends the session in its terminal state, with one EndSession."""
    start, action, terminal = END_PATHS[reason.value]
    session = session_in(start)
    assert action(session) == [EndSession(reason)]
    assert session.state is terminal
    assert session.end_reason is reason
    assert session.next_deadline_ms() is None
    # Whatever races in afterwards changes nothing and emits nothing.
    late = T0 + 2 * HOUR_MS
    for event in [
        Tick(now_ms=late),
        DeviceDetached(now_ms=late),
        EngineerDetached(now_ms=late),
        Denied(now_ms=late),
        Granted(now_ms=late),
        OfferSent(now_ms=late),
        *(EndRequested(reason=other, now_ms=late) for other in EndReason),
    ]:
        assert session.handle(event) == [], event
    assert session.state is terminal
    assert session.end_reason is reason


@pytest.mark.parametrize("reason", list(EndReason), ids=str)
def test_end_state_matches_reason(reason: EndReason) -> None:
    """DENIED is 'denied', EXPIRED is 'grant_timeout', ENDED every other reason."""
    expected = {
        EndReason.DENIED: State.DENIED,
        EndReason.GRANT_TIMEOUT: State.EXPIRED,
    }.get(reason, State.ENDED)
    assert END_PATHS[reason.value][2] is expected


@pytest.mark.parametrize(
    ("state", "reason"),
    [(state, reason) for state in LIVE for reason in EndReason],
    ids=str,
)
def test_end_requested_reasons_by_state(state: State, reason: EndReason) -> None:
    """Which reasons EndRequested may carry, and before or after the grant."""
    anytime = {
        EndReason.ADMIN,
        EndReason.REVOKED,
        EndReason.POLICY_REVOKED,
        EndReason.LOGIN_ENDED,
        EndReason.BROKER_SHUTDOWN,
        EndReason.BROKER_CRASH,
        EndReason.AUDIT_FAILURE,
    }
    granted = state in (State.GRANTED, State.ACTIVE)
    allowed = (
        reason in anytime
        or (reason is EndReason.CANCELLED and not granted)
        or (
            reason in (EndReason.ENGINEER, EndReason.ONSITE, EndReason.DEVICE_SHUTDOWN)
            and granted
        )
    )
    session = session_in(state)
    event = EndRequested(reason=reason, now_ms=now_of(session))
    if allowed:
        assert session.handle(event) == [EndSession(reason)]
        assert session.end_reason is reason
    else:
        with pytest.raises(LocalProtocolError, match="not allowed in state"):
            session.handle(event)
        assert session.state is state
        assert session.end_reason is None


def test_end_requested_accepts_plain_string_reason() -> None:
    """A reason given as its plain string is recorded as the enum member."""
    session = session_in(State.ACTIVE)
    reason: Any = "admin"
    assert session.handle(EndRequested(reason=reason, now_ms=T0 + 3000)) == [
        EndSession(EndReason.ADMIN)
    ]
    assert type(session.end_reason) is EndReason


def test_end_requested_rejects_unknown_reason() -> None:
    """A reason outside the vocabulary is a shell bug."""
    session = session_in(State.ACTIVE)
    reason: Any = "busy"
    with pytest.raises(LocalProtocolError, match="'busy'"):
        session.handle(EndRequested(reason=reason, now_ms=T0 + 3000))
    assert session.state is State.ACTIVE


@pytest.mark.parametrize("state", LIVE, ids=str)
def test_device_detached_ends_any_live_state(state: State) -> None:
    """The device leaving (tunnel, or control channel before it) ends the session."""
    session = session_in(state)
    assert session.handle(DeviceDetached(now_ms=now_of(session))) == [
        EndSession(EndReason.DEVICE_DISCONNECT)
    ]
    assert session.state is State.ENDED


# Grant deadline
# ==============


def test_grant_deadline_runs_from_the_request() -> None:
    """No answer by requested_at + grant_timeout: EXPIRED with grant_timeout."""
    session = session_in(State.OFFERED)
    assert session.next_deadline_ms() == T0 + GRANT_TIMEOUT_MS
    assert session.handle(Tick(now_ms=T0 + GRANT_TIMEOUT_MS - 1)) == []
    assert again(session).state is State.OFFERED
    assert session.handle(Tick(now_ms=T0 + GRANT_TIMEOUT_MS)) == [
        EndSession(EndReason.GRANT_TIMEOUT)
    ]
    assert again(session).state is State.EXPIRED


def test_grant_deadline_also_runs_while_requested() -> None:
    """An offer that never got sent still expires at the deadline."""
    session = make()
    assert session.handle(Tick(now_ms=T0 + GRANT_TIMEOUT_MS)) == [
        EndSession(EndReason.GRANT_TIMEOUT)
    ]
    assert session.handle(OfferSent(now_ms=T0 + GRANT_TIMEOUT_MS)) == []


def test_grant_at_the_deadline_is_too_late() -> None:
    """A grant stamped at the deadline finds the session EXPIRED, without a Tick."""
    session = session_in(State.OFFERED)
    assert session.handle(Granted(now_ms=T0 + GRANT_TIMEOUT_MS)) == [
        EndSession(EndReason.GRANT_TIMEOUT)
    ]
    assert session.state is State.EXPIRED
    assert session.granted_at_ms is None
    assert session.ends_at_ms is None


def test_grant_just_before_the_deadline_counts() -> None:
    """A grant one millisecond before the deadline is in time."""
    session = session_in(State.OFFERED)
    assert session.handle(Granted(now_ms=T0 + GRANT_TIMEOUT_MS - 1)) == [
        NotifyEngineer(State.GRANTED)
    ]
    assert session.ends_at_ms == T0 + GRANT_TIMEOUT_MS - 1 + HOUR_MS


# The cap and the warnings
# ========================


def test_cap_counts_from_grant_not_from_active() -> None:
    """ACTIVE 30 s after the grant still ends at grant + cap."""
    session = session_in(State.OFFERED, max_seconds=120)
    granted = T0 + 1000
    session.handle(Granted(now_ms=granted))
    session.handle(DeviceAttached(now_ms=granted + 30_000))
    session.handle(EngineerAttached(now_ms=granted + 30_000))
    assert session.state is State.ACTIVE
    assert session.ends_at_ms == granted + 120_000
    assert session.next_deadline_ms() == granted + 60_000  # the T-1 warning
    assert session.handle(Tick(now_ms=granted + 60_000)) == [Warn(60)]
    assert session.next_deadline_ms() == granted + 120_000
    assert session.handle(Tick(now_ms=granted + 119_999)) == []
    assert session.handle(Tick(now_ms=granted + 120_000)) == [
        EndSession(EndReason.TIME_CAP)
    ]


def test_a_shorter_cap_granted_by_the_device_is_the_cap() -> None:
    """The device may grant less than offered (its own limit): the session ends
    then, and its warnings follow the shorter cap."""
    session = session_in(State.OFFERED, max_seconds=3600)
    granted = T0 + 1000
    session.handle(Granted(now_ms=granted, max_seconds=300))
    assert session.ends_at_ms == granted + 300_000
    assert session.next_deadline_ms() == granted + 240_000  # T-1; T-10 is past


@pytest.mark.parametrize("cap", [0, 3601])
def test_a_granted_cap_beyond_the_offer_is_a_shell_bug(cap: int) -> None:
    """The receipt check refuses such a grant; reaching the machine is a bug, and
    nothing changes."""
    session = session_in(State.OFFERED, max_seconds=3600)
    with pytest.raises(LocalProtocolError, match="granted cap"):
        session.handle(Granted(now_ms=T0 + 1000, max_seconds=cap))
    assert session.state is State.OFFERED


def test_cap_runs_while_waiting_for_legs() -> None:
    """A granted session whose legs never come still ends at the cap."""
    session = session_in(State.GRANTED, max_seconds=30)
    assert session.next_deadline_ms() == T0 + 1000 + 30_000
    assert session.handle(Tick(now_ms=T0 + 1000 + 30_000)) == [
        EndSession(EndReason.TIME_CAP)
    ]


def test_late_event_past_the_cap_ends_with_time_cap_first() -> None:
    """An event stamped past ends_at is too late: the cap ended the session first."""
    session = session_in(State.ACTIVE, max_seconds=60)
    late = T0 + 1000 + 60_000
    assert session.handle(EndRequested(reason=EndReason.ENGINEER, now_ms=late)) == [
        EndSession(EndReason.TIME_CAP)
    ]
    assert session.end_reason is EndReason.TIME_CAP


@pytest.mark.parametrize(
    ("max_seconds", "warnings"),
    [
        pytest.param(3600, [10, 1], id="hour"),
        pytest.param(601, [10, 1], id="just-over-10-min"),
        pytest.param(600, [1], id="10-min"),
        pytest.param(300, [1], id="5-min"),
        pytest.param(61, [1], id="just-over-1-min"),
        pytest.param(60, [], id="1-min"),
        pytest.param(1, [], id="1-s"),
    ],
)
def test_warnings_once_each_skipped_when_past_at_grant(
    max_seconds: int, warnings: list[int]
) -> None:
    """T-10 and T-1 warnings go out once each; those not after the grant never do."""
    session = make(max_seconds=max_seconds)
    for event in (
        OfferSent(now_ms=T0),
        Granted(now_ms=T0),
        DeviceAttached(now_ms=T0),
        EngineerAttached(now_ms=T0),
    ):
        session.handle(event)
    seen: list[Output] = []
    while (deadline := session.next_deadline_ms()) is not None:
        outputs = session.handle(Tick(now_ms=deadline))
        assert outputs, "a Tick at the deadline always does something"
        seen += outputs
        # A second Tick at the same time does nothing more.
        if session.state is State.ACTIVE:
            assert session.handle(Tick(now_ms=deadline)) == []
    assert seen == [Warn(minutes * 60) for minutes in warnings] + [
        EndSession(EndReason.TIME_CAP)
    ]


def test_warning_instants() -> None:
    """Warnings are due exactly at ends_at - 10 min and ends_at - 1 min."""
    session = session_in(State.ACTIVE)
    ends_at = T0 + 1000 + HOUR_MS
    assert session.ends_at_ms == ends_at
    assert session.next_deadline_ms() == ends_at - 10 * MINUTE_MS
    assert session.handle(Tick(now_ms=ends_at - 10 * MINUTE_MS - 1)) == []
    assert session.handle(Tick(now_ms=ends_at - 10 * MINUTE_MS)) == [Warn(600)]
    assert session.next_deadline_ms() == ends_at - MINUTE_MS
    assert session.handle(Tick(now_ms=ends_at - MINUTE_MS - 1)) == []
    assert session.handle(Tick(now_ms=ends_at - MINUTE_MS)) == [Warn(60)]
    assert session.next_deadline_ms() == ends_at


def test_late_tick_sends_only_the_last_due_warning() -> None:
    """When both warnings are due at once, only 'one minute left' goes out."""
    session = session_in(State.ACTIVE)
    ends_at = T0 + 1000 + HOUR_MS
    assert session.handle(Tick(now_ms=ends_at - 30_000)) == [Warn(60)]
    assert session.next_deadline_ms() == ends_at


def test_warnings_are_configurable_in_seconds() -> None:
    """``warning_seconds`` sets the instants (largest first); ``()`` means none."""
    session = session_in(State.ACTIVE, max_seconds=10, warning_seconds=(2, 5))
    assert session.warning_seconds == (5, 2)
    ends_at = T0 + 1000 + 10_000
    assert session.next_deadline_ms() == ends_at - 5000
    assert session.handle(Tick(now_ms=ends_at - 5000)) == [Warn(5)]
    assert session.handle(Tick(now_ms=ends_at - 2000)) == [Warn(2)]
    assert session.handle(Tick(now_ms=ends_at)) == [EndSession(EndReason.TIME_CAP)]
    quiet = session_in(State.ACTIVE, warning_seconds=())
    assert quiet.next_deadline_ms() == T0 + 1000 + HOUR_MS


@pytest.mark.parametrize(
    ("seconds_left", "minutes_left"), [(600, 10), (60, 1), (59, 1), (1, 1), (61, 2)]
)
def test_warning_minutes_round_up(seconds_left: int, minutes_left: int) -> None:
    """Shown in minutes, a warning never claims more time is left than there is."""
    assert Warn(seconds_left).minutes_left == minutes_left


@pytest.mark.parametrize(
    "warning_seconds",
    [
        pytest.param((0,), id="zero"),
        pytest.param((3600,), id="the-whole-hour"),
        pytest.param((60, 60), id="repeated"),
        pytest.param((1, 2, 3, 4, 5), id="too-many"),
        pytest.param((True,), id="bool"),
        pytest.param((1.5,), id="float"),
        pytest.param("60", id="not-a-list"),
    ],
)
def test_bad_warnings_are_refused(warning_seconds: object) -> None:
    with pytest.raises(ValueError, match="warning_seconds"):
        make(warning_seconds=warning_seconds)


def test_very_late_tick_skips_warnings_and_ends() -> None:
    """A Tick past the cap ends the session without stale warnings."""
    session = session_in(State.ACTIVE)
    assert session.handle(Tick(now_ms=T0 + 5 * HOUR_MS)) == [
        EndSession(EndReason.TIME_CAP)
    ]


def test_warning_due_with_another_event() -> None:
    """A warning that came due goes out before the event that carried the time."""
    session = session_in(State.ACTIVE, max_seconds=120)
    assert session.handle(
        EndRequested(reason=EndReason.ENGINEER, now_ms=T0 + 1000 + 60_000)
    ) == [Warn(60), EndSession(EndReason.ENGINEER)]


# Engineer reattach grace
# =======================


def test_engineer_disconnect_without_grace_ends_at_once() -> None:
    """With no grace (the default) the engineer's drop ends the session."""
    session = session_in(State.ACTIVE)
    assert session.handle(EngineerDetached(now_ms=T0 + 5000)) == [
        EndSession(EndReason.ENGINEER_DISCONNECT)
    ]


@pytest.mark.parametrize("state", LIVE, ids=str)
def test_engineer_disconnect_in_any_live_state(state: State) -> None:
    """An engineer who attached and dropped ends the session in any live state."""
    session = session_in(state)
    if not session.engineer_attached:
        session.handle(EngineerAttached(now_ms=now_of(session)))
    assert session.handle(EngineerDetached(now_ms=now_of(session))) == [
        EndSession(EndReason.ENGINEER_DISCONNECT)
    ]


def test_grace_reattach_pairs_again() -> None:
    """Back within the grace: still ACTIVE, paired again, the cap unchanged."""
    session = session_in(State.ACTIVE, reattach_grace_ms=10_000)
    ends_at = session.ends_at_ms
    assert ends_at is not None
    assert session.handle(EngineerDetached(now_ms=T0 + 5000)) == []
    assert session.state is State.ACTIVE
    assert not session.engineer_attached
    assert session.device_attached
    assert session.grace_ends_at_ms == T0 + 15_000
    assert session.next_deadline_ms() == T0 + 15_000
    assert session.handle(EngineerAttached(now_ms=T0 + 14_999)) == [Pair()]
    assert again(session).engineer_attached
    assert again(session).grace_ends_at_ms is None
    assert session.ends_at_ms == ends_at
    assert session.next_deadline_ms() == ends_at - 10 * MINUTE_MS


def test_grace_expiry_ends_with_engineer_disconnect() -> None:
    """Not back by the grace's end: engineer_disconnect."""
    session = session_in(State.ACTIVE, reattach_grace_ms=10_000)
    session.handle(EngineerDetached(now_ms=T0 + 5000))
    assert session.handle(Tick(now_ms=T0 + 14_999)) == []
    assert session.handle(Tick(now_ms=T0 + 15_000)) == [
        EndSession(EndReason.ENGINEER_DISCONNECT)
    ]
    # Reattaching after that is refused like any leg after the end.
    with pytest.raises(LegRefused, match="has ended"):
        session.handle(EngineerAttached(now_ms=T0 + 15_000))


def test_reattach_at_grace_end_is_too_late() -> None:
    """An attach stamped at the grace's end finds the session ended."""
    session = session_in(State.ACTIVE, reattach_grace_ms=10_000)
    session.handle(EngineerDetached(now_ms=T0 + 5000))
    with pytest.raises(LegRefused):
        session.handle(EngineerAttached(now_ms=T0 + 15_000))
    # Rule 8: the refusal undid the timer too; the next Tick runs it.
    assert session.state is State.ACTIVE
    assert session.handle(Tick(now_ms=T0 + 15_000)) == [
        EndSession(EndReason.ENGINEER_DISCONNECT)
    ]


@pytest.mark.parametrize("grace_past_cap_ms", [0, 1, 30_000])
def test_grace_never_extends_the_cap(grace_past_cap_ms: int) -> None:
    """A grace reaching to or past ends_at ends at ends_at with time_cap."""
    session = session_in(State.ACTIVE, max_seconds=600, reattach_grace_ms=120_000)
    ends_at = T0 + 1000 + 600_000
    detach_at = ends_at - 120_000 + grace_past_cap_ms
    session.handle(EngineerDetached(now_ms=detach_at))
    assert session.grace_ends_at_ms == detach_at + 120_000
    assert session.next_deadline_ms() == ends_at - MINUTE_MS
    assert session.handle(Tick(now_ms=ends_at - MINUTE_MS)) == [Warn(60)]
    assert session.next_deadline_ms() == ends_at
    assert session.handle(Tick(now_ms=ends_at + 10 * MINUTE_MS)) == [
        EndSession(EndReason.TIME_CAP)
    ]


def test_grace_before_cap_wins_on_a_late_tick() -> None:
    """The timer whose instant came first gives the reason, however late the Tick."""
    session = session_in(State.ACTIVE, max_seconds=600, reattach_grace_ms=1000)
    session.handle(EngineerDetached(now_ms=T0 + 5000))
    assert session.handle(Tick(now_ms=T0 + HOUR_MS)) == [
        EndSession(EndReason.ENGINEER_DISCONNECT)
    ]


def test_grace_before_grant() -> None:
    """An engineer who drops while waiting for the grant gets the grace too."""
    session = session_in(State.OFFERED, reattach_grace_ms=5000)
    session.handle(EngineerAttached(now_ms=T0 + 100))
    session.handle(EngineerDetached(now_ms=T0 + 200))
    assert session.next_deadline_ms() == T0 + 5200
    assert session.handle(Granted(now_ms=T0 + 300)) == [NotifyEngineer(State.GRANTED)]
    assert session.handle(EngineerAttached(now_ms=T0 + 400)) == []
    assert session.grace_ends_at_ms is None
    assert session.handle(DeviceAttached(now_ms=T0 + 500)) == [
        NotifyEngineer(State.ACTIVE),
        Pair(),
    ]


def test_grant_deadline_beats_grace_on_a_tie() -> None:
    """Grace and grant deadline at the same instant: grant_timeout."""
    session = session_in(State.OFFERED, reattach_grace_ms=GRANT_TIMEOUT_MS - 100)
    session.handle(EngineerAttached(now_ms=T0 + 50))
    session.handle(EngineerDetached(now_ms=T0 + 100))
    assert session.grace_ends_at_ms == T0 + GRANT_TIMEOUT_MS
    assert session.handle(Tick(now_ms=T0 + GRANT_TIMEOUT_MS)) == [
        EndSession(EndReason.GRANT_TIMEOUT)
    ]


# Legs the session cannot take
# ============================


def test_second_tunnel_is_refused() -> None:
    """The tunnel opens once; a second one is refused and the session goes on."""
    session = session_in(State.ACTIVE)
    with pytest.raises(TunnelAlreadyAttached) as exc_info:
        session.handle(DeviceAttached(now_ms=T0 + 3000))
    assert isinstance(exc_info.value, LegRefused)
    assert isinstance(exc_info.value, RemoteProtocolError)
    assert exc_info.value.close_code == CloseCode.POLICY_VIOLATION
    assert session.state is State.ACTIVE
    assert session.device_attached


def test_second_tunnel_refused_while_waiting_for_engineer() -> None:
    """A second tunnel is refused in GRANTED too."""
    session = session_in(State.GRANTED)
    session.handle(DeviceAttached(now_ms=T0 + 1500))
    with pytest.raises(TunnelAlreadyAttached):
        session.handle(DeviceAttached(now_ms=T0 + 1600))
    assert session.state is State.GRANTED


@pytest.mark.parametrize("state", [State.REQUESTED, State.OFFERED], ids=str)
def test_tunnel_before_grant_is_refused(state: State) -> None:
    """Invariant 1: no tunnel is taken before a verified grant."""
    session = session_in(state)
    with pytest.raises(LegRefused, match="not granted") as exc_info:
        session.handle(DeviceAttached(now_ms=T0 + 10))
    assert type(exc_info.value) is LegRefused
    assert not session.device_attached


def test_second_engineer_socket_is_refused() -> None:
    """One engineer socket per session; the second is refused."""
    session = session_in(State.ACTIVE)
    with pytest.raises(LegRefused, match="already attached"):
        session.handle(EngineerAttached(now_ms=T0 + 3000))
    assert session.engineer_attached


@pytest.mark.parametrize("attach", [DeviceAttached, EngineerAttached])
@pytest.mark.parametrize("reason", ["denied", "grant_timeout", "cancelled", "engineer"])
def test_legs_after_end_are_refused(attach: type[Event], reason: str) -> None:
    """A leg arriving after the end is refused, and the reason stays."""
    start, action, _ = END_PATHS[reason]
    session = session_in(start)
    action(session)
    with pytest.raises(LegRefused, match="has ended"):
        session.handle(attach(now_ms=T0 + 2 * HOUR_MS))
    assert session.end_reason == reason


# Events the shell must not send
# ==============================

# Which events are legal in which live state (independent of the module's table).
LEGAL: Final[dict[State, set[type[Event]]]] = {
    State.REQUESTED: {OfferSent, EngineerAttached, DeviceDetached, EndRequested, Tick},
    State.OFFERED: {
        Granted,
        Denied,
        EngineerAttached,
        DeviceDetached,
        EndRequested,
        Tick,
    },
    State.GRANTED: {
        DeviceAttached,
        EngineerAttached,
        DeviceDetached,
        EndRequested,
        Tick,
    },
    State.ACTIVE: {EngineerDetached, DeviceDetached, EndRequested, Tick},
}
SIMPLE_EVENTS: Final[list[type[Event]]] = [
    OfferSent,
    Granted,
    Denied,
    DeviceAttached,
    EngineerAttached,
    EngineerDetached,
    DeviceDetached,
    Tick,
]


@pytest.mark.parametrize(
    ("state", "event_type"),
    [
        (state, event_type)
        for state in LIVE
        for event_type in SIMPLE_EVENTS
        if event_type not in LEGAL[state]
        # Attaches that do not fit are refused as legs (LegRefused), tested above.
        and event_type not in (DeviceAttached, EngineerAttached)
    ],
    ids=str,
)
def test_illegal_events_raise(state: State, event_type: type[Event]) -> None:
    """An event not allowed in the state is a LocalProtocolError; nothing changes."""
    session = session_in(state)
    before = (session.state, session.next_deadline_ms())
    with pytest.raises(LocalProtocolError):
        session.handle(event_type(now_ms=now_of(session)))
    assert (session.state, session.next_deadline_ms()) == before
    assert session.end_reason is None


@pytest.mark.parametrize(
    ("state", "event_type"),
    [(state, t) for state in LIVE for t in SIMPLE_EVENTS if t in LEGAL[state]],
    ids=str,
)
def test_legal_events_are_accepted(state: State, event_type: type[Event]) -> None:
    """Every event in the legal set is accepted (the other half of the table)."""
    session = session_in(state)
    session.handle(event_type(now_ms=now_of(session)))


def test_base_event_is_refused() -> None:
    """The bare Event base class is not an event of any state."""
    session = make()
    with pytest.raises(LocalProtocolError, match="Event is not allowed"):
        session.handle(Event(now_ms=T0))


def test_engineer_detached_twice_is_a_shell_bug() -> None:
    """A detach with no engineer attached (during a grace) is refused."""
    session = session_in(State.ACTIVE, reattach_grace_ms=1000)
    session.handle(EngineerDetached(now_ms=T0 + 3000))
    with pytest.raises(LocalProtocolError, match="no engineer attached"):
        session.handle(EngineerDetached(now_ms=T0 + 3000))


def test_refused_event_keeps_due_timers() -> None:
    """Rule 8: a refused event undoes the timers it ran; the next Tick sends them."""
    session = session_in(State.ACTIVE)
    t10 = T0 + 1000 + HOUR_MS - 10 * MINUTE_MS
    with pytest.raises(TunnelAlreadyAttached):
        session.handle(DeviceAttached(now_ms=t10))
    assert session.next_deadline_ms() == t10
    assert session.handle(Tick(now_ms=t10)) == [Warn(600)]


# Time
# ====


@pytest.mark.parametrize("state", LIVE + TERMINAL, ids=str)
def test_time_going_backwards_is_refused(state: State) -> None:
    """An event earlier than one already seen is a shell bug, in every state."""
    if state.is_terminal:
        start, action, _ = END_PATHS[
            {State.ENDED: "admin", State.DENIED: "denied"}.get(state, "grant_timeout")
        ]
        session = session_in(start)
        action(session)
        assert session.state is state
    else:
        session = session_in(state)
    seen = T0 + (GRANT_TIMEOUT_MS if state.is_terminal else 2500)
    session.handle(Tick(now_ms=seen))
    with pytest.raises(LocalProtocolError, match="time went backwards"):
        session.handle(Tick(now_ms=seen - 1))
    assert session.state is state


def test_time_before_request_is_refused() -> None:
    """No event may be earlier than the request."""
    with pytest.raises(LocalProtocolError, match="backwards"):
        make().handle(OfferSent(now_ms=T0 - 1))


def test_equal_times_are_fine() -> None:
    """Many events at the same millisecond are allowed (non-decreasing)."""
    session = make()
    for event in (
        OfferSent(now_ms=T0),
        Granted(now_ms=T0),
        DeviceAttached(now_ms=T0),
        EngineerAttached(now_ms=T0),
    ):
        session.handle(event)
    assert session.state is State.ACTIVE
    assert session.ends_at_ms == T0 + HOUR_MS


# Property: random event sequences
# ================================

# "progress" (the next step towards ACTIVE) is listed several times so that
# random sequences get past the grant often; the rest are uniform.
_KINDS: Final = (
    *("progress",) * 6,
    "offer",
    "grant",
    "deny",
    "device_attach",
    "engineer_attach",
    "engineer_detach",
    "device_detach",
    "end",
    "tick",
    "tick_deadline",
)
# Mostly small steps, so that sequences live long enough to reach every state.
_STEPS_MS: Final = (
    *(0, 1, 10, 999) * 3,
    30_000,
    60_000,
    600_000,
    HOUR_MS,
)
_SIMPLE: Final[dict[str, type[Event]]] = {
    "offer": OfferSent,
    "grant": Granted,
    "deny": Denied,
    "device_attach": DeviceAttached,
    "engineer_attach": EngineerAttached,
    "engineer_detach": EngineerDetached,
    "device_detach": DeviceDetached,
}


def _event(session: Session, kind: str, now: int, reason: EndReason) -> Event:
    if kind == "progress":
        if session.state is State.REQUESTED:
            return OfferSent(now_ms=now)
        if session.state is State.OFFERED:
            return Granted(now_ms=now)
        if not session.engineer_attached:
            return EngineerAttached(now_ms=now)
        if not session.device_attached:
            return DeviceAttached(now_ms=now)
        kind = "tick"
    if kind == "end":
        return EndRequested(reason=reason, now_ms=now)
    if kind in _SIMPLE:
        return _SIMPLE[kind](now_ms=now)
    return Tick(now_ms=now)


@settings(max_examples=300, deadline=None)
@given(
    max_seconds=st.sampled_from([1, 60, 61, 600, 601, MAX_SESSION_SECONDS])
    | st.integers(1, MAX_SESSION_SECONDS),
    grant_timeout_ms=st.sampled_from([60_000, 1_000, 120_000]),
    grace_ms=st.sampled_from([0, 1, 5_000, 2 * HOUR_MS]),
    start_active=st.booleans(),
    data=st.data(),
)
def test_random_event_sequences(
    max_seconds: int,
    grant_timeout_ms: int,
    grace_ms: int,
    start_active: bool,
    data: st.DataObject,
) -> None:
    """Any sequence with non-decreasing times keeps every invariant of the machine.

    Half the runs start from ACTIVE (everything at T0), so that the cap, the
    warnings and the grace get as many random events as the way there.
    """
    session = make(
        max_seconds=max_seconds,
        grant_timeout_ms=grant_timeout_ms,
        reattach_grace_ms=grace_ms,
    )
    if start_active:
        for setup in (
            OfferSent(now_ms=T0),
            Granted(now_ms=T0),
            DeviceAttached(now_ms=T0),
            EngineerAttached(now_ms=T0),
        ):
            session.handle(setup)
    now = T0
    end_outputs: list[EndSession] = []
    warns: list[int] = []
    first_reason: EndReason | None = None
    for _ in range(data.draw(st.integers(0, 40), label="length")):
        kind = data.draw(st.sampled_from(_KINDS), label="kind")
        deadline = session.next_deadline_ms()
        if kind == "tick_deadline" and deadline is not None:
            now = max(now, deadline)
        else:
            now += data.draw(st.sampled_from(_STEPS_MS), label="step")
        reason = data.draw(st.sampled_from(list(EndReason)), label="reason")
        event = _event(session, kind, now, reason)
        before = (
            session.state,
            session.end_reason,
            session.next_deadline_ms(),
            session.device_attached,
            session.engineer_attached,
        )
        try:
            outputs = session.handle(event)
        except (LocalProtocolError, LegRefused):
            # Only these escape (anything else fails the test). Rule 8: nothing changed.
            assert before == (
                session.state,
                session.end_reason,
                session.next_deadline_ms(),
                session.device_attached,
                session.engineer_attached,
            )
            continue
        end_outputs += [o for o in outputs if isinstance(o, EndSession)]
        warns += [o.minutes_left for o in outputs if isinstance(o, Warn)]
        # Terminal states are for good, with their first reason.
        if first_reason is not None:
            assert session.state.is_terminal
            assert session.end_reason is first_reason
            assert outputs == []
        first_reason = session.end_reason
        # Exactly one end reason, announced exactly once, matching the state.
        assert len(end_outputs) == (1 if session.state.is_terminal else 0)
        if session.state.is_terminal:
            assert end_outputs[0].reason is session.end_reason
            assert (session.state is State.DENIED) == (
                session.end_reason is EndReason.DENIED
            )
            assert (session.state is State.EXPIRED) == (
                session.end_reason is EndReason.GRANT_TIMEOUT
            )
        else:
            assert session.end_reason is None
        # The cap: from the grant, at most an hour.
        if session.granted_at_ms is not None:
            assert session.ends_at_ms is not None
            assert session.ends_at_ms - session.granted_at_ms == max_seconds * 1000
            assert session.ends_at_ms - session.granted_at_ms <= HOUR_MS
        else:
            assert session.ends_at_ms is None
        if session.end_reason is not None and session.end_reason.before_grant:
            assert session.granted_at_ms is None
        # The deadline: None exactly when ended; never already due after handle.
        deadline = session.next_deadline_ms()
        assert (deadline is None) == session.state.is_terminal
        assert deadline is None or deadline > now
        # ACTIVE means the tunnel is there; a detached engineer has a grace.
        if session.state is State.ACTIVE:
            assert session.device_attached
            assert session.engineer_attached or session.grace_ends_at_ms is not None
        # Each warning at most once, T-10 before T-1.
        assert len(warns) == len(set(warns))
        assert warns in ([], [10], [1], [10, 1])


def test_shared_forms_equal_the_ones_they_copy() -> None:
    """relay.proto copies the device id and user name forms; they must not drift."""
    import auth
    from relay.proto.session import DEVICE_ID_FORM, USERNAME_FORM
    from relay.users import USERNAME_PATTERN

    # auth anchors its pattern with ^...$; ours are used with fullmatch.
    assert f"^{DEVICE_ID_FORM.pattern}$" == auth.DEVICE_ID_PATTERN.pattern
    assert USERNAME_FORM.pattern == USERNAME_PATTERN.pattern
