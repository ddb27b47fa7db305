"""The device control channel: messages, their codec and the channel state machine.

Theory of operation
===================
A device keeps one control channel to the broker (``/v1/device/control``). It
carries only control messages, never session data (Invariant 4). Each message is
one binary WebSocket message holding one UTF-8 JSON object with a ``type`` field.
The codec is strict: unknown types, unknown or missing fields, wrong types and
oversized strings are protocol errors, so a message can never smuggle data the
broker does not look at.

:class:`ControlChannel` holds the protocol state of one channel as seen from one
side (:class:`Role`), h11 style: the shell hands it whole messages with
:meth:`~ControlChannel.receive_message`, pulls parsed events with
:meth:`~ControlChannel.next_event`, and turns outgoing events into bytes with
:meth:`~ControlChannel.send`. It never touches a socket, a clock or trio.

Rule 1: every legal transition is in ``_TRANSITIONS``; nothing else assigns state.
Rule 2: after any protocol error the channel is in ``State.ERROR`` for good.
Rule 3: identity is not decided here. ``Hello.device_id`` is a claim that the broker
shell compares with the verified certificate (Invariant 6); the channel only checks
its form.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, ClassVar, Final

from relay.proto.close import CloseCode
from relay.proto.errors import LocalProtocolError, RemoteProtocolError

PROTOCOL_VERSION: Final = 1
MAX_CONTROL_MESSAGE_BYTES: Final = 64 * 1024
_MAX_STRING_CHARS: Final = 256
_MAX_INT: Final = 2**53  # JSON-safe integers only


class Role(Enum):
    """Which end of the control channel we are."""

    DEVICE = "device"
    BROKER = "broker"


class State(Enum):
    """Control channel states."""

    AWAIT_HELLO = "AWAIT_HELLO"
    AWAIT_WELCOME = "AWAIT_WELCOME"
    OPEN = "OPEN"
    CLOSED = "CLOSED"
    ERROR = "ERROR"


class Event:
    """Base class of control messages."""

    TYPE: ClassVar[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(Event):
    """First message of a device: who it says it is and what it runs."""

    TYPE: ClassVar[str] = "hello"
    version: int
    device_id: str
    agent_version: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome(Event):
    """The broker's answer to a hello: the channel is open."""

    TYPE: ClassVar[str] = "welcome"
    version: int
    heartbeat_interval_s: float
    broker_version: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(Event):
    """Application-level liveness from the device, answered by HeartbeatAck.

    WebSocket pings already detect dead peers; heartbeats add the agent's own view
    (it is alive above the transport) and let it measure the round trip.
    """

    TYPE: ClassVar[str] = "heartbeat"
    seq: int


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatAck(Event):
    """The broker's echo of a heartbeat's sequence number."""

    TYPE: ClassVar[str] = "heartbeat_ack"
    seq: int


@dataclass(frozen=True, slots=True)
class ConnectionLost(Event):
    """Pseudo-event: the transport closed (``receive_message(None)``)."""

    TYPE: ClassVar[str] = "connection_lost"


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()

_EVENT_TYPES: Final[dict[str, type[Event]]] = {
    cls.TYPE: cls for cls in (Hello, Welcome, Heartbeat, HeartbeatAck)
}

_TRANSITIONS: Final[dict[tuple[State, type[Event]], State]] = {
    (State.AWAIT_HELLO, Hello): State.AWAIT_WELCOME,
    (State.AWAIT_WELCOME, Welcome): State.OPEN,
    (State.OPEN, Heartbeat): State.OPEN,
    (State.OPEN, HeartbeatAck): State.OPEN,
}

_SENDER: Final[dict[type[Event], Role]] = {
    Hello: Role.DEVICE,
    Welcome: Role.BROKER,
    Heartbeat: Role.DEVICE,
    HeartbeatAck: Role.BROKER,
}


def encode(event: Event) -> bytes:
    """Serialise *event* to the wire form (compact JSON)."""
    body: dict[str, Any] = {"type": event.TYPE}
    for item in fields(event):  # type: ignore[arg-type]
        body[item.name] = getattr(event, item.name)
    return json.dumps(
        body, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def decode(data: bytes) -> Event:
    """Parse one wire message.

    Raises:
        RemoteProtocolError: The message is not a valid control message.
    """
    if len(data) > MAX_CONTROL_MESSAGE_BYTES:
        raise RemoteProtocolError(
            "control message too large", close_code=CloseCode.MESSAGE_TOO_BIG
        )
    try:
        body = json.loads(
            data.decode("utf-8"),
            parse_constant=_reject_constant,
            object_pairs_hook=_reject_duplicate_keys,
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise RemoteProtocolError(f"control message is not UTF-8 JSON: {exc}") from None
    except RecursionError:
        # Valid messages are flat; deep nesting is an attack on the parser.
        raise RemoteProtocolError("control message nests too deeply") from None
    if not isinstance(body, dict):
        raise RemoteProtocolError("control message is not a JSON object")
    type_name = body.pop("type", None)
    cls = _EVENT_TYPES.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise RemoteProtocolError(f"unknown control message type {_shorten(type_name)}")
    expected = {item.name: item.type for item in fields(cls)}  # type: ignore[arg-type]
    if set(body) != set(expected):
        missing = sorted(set(expected) - set(body))
        extra = sorted(set(body) - set(expected))
        raise RemoteProtocolError(
            f"{cls.TYPE}: missing fields {missing}, unknown fields {[_shorten(e) for e in extra]}"
        )
    for name, annotation in expected.items():
        _check_field(cls.TYPE, name, annotation, body[name])
    return cls(**body)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys; the first would be data that
    # nobody checks, so a repeated key is refused.
    body = dict(pairs)
    if len(body) != len(pairs):
        raise ValueError("duplicate key")
    return body


def _check_event(event: Event) -> None:
    """Check an event's field values against the same rules as :func:`decode`."""
    for item in fields(event):  # type: ignore[arg-type]
        _check_field(event.TYPE, item.name, item.type, getattr(event, item.name))


def _check_field(type_name: str, name: str, annotation: object, value: object) -> None:
    # Annotations are strings (from __future__ import annotations).
    if annotation == "int":
        ok = (
            isinstance(value, int)
            and not isinstance(value, bool)
            and 0 <= value < _MAX_INT
        )
    elif annotation == "float":
        # Every float field is an interval: positive and finite.
        ok = (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and 0 < value < _MAX_INT
        )
    elif annotation == "str":
        ok = (
            isinstance(value, str)
            and len(value) <= _MAX_STRING_CHARS
            and _is_utf8(value)
        )
    else:  # pragma: no cover - every field type is listed above
        ok = False
    if not ok:
        raise RemoteProtocolError(f"{type_name}.{name}: bad value {_shorten(value)}")


def _is_utf8(text: str) -> bool:
    # Lone surrogates ("\ud800") decode from JSON escapes but cannot be encoded
    # again; they would break whatever logs or stores the string later.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shorten(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class ControlChannel:
    """Protocol state of one control channel, from one side."""

    def __init__(self, our_role: Role) -> None:
        self.our_role = our_role
        self.their_role = Role.BROKER if our_role is Role.DEVICE else Role.DEVICE
        self.state = State.AWAIT_HELLO
        self._inbox: deque[bytes | None] = deque()

    def receive_message(self, data: bytes | None) -> None:
        """Queue one message from the peer; ``None`` means the transport closed."""
        self._inbox.append(data)

    def next_event(self) -> Event | _NeedData:
        """Parse the next queued message, or return :data:`NEED_DATA`.

        Raises:
            RemoteProtocolError: The peer broke the protocol. The channel is now in
                :attr:`State.ERROR`; close the transport with ``exc.close_code``.
        """
        if self.state is State.ERROR:
            raise RemoteProtocolError("channel is in ERROR")
        if not self._inbox:
            return NEED_DATA
        data = self._inbox.popleft()
        if data is None:
            self.state = State.CLOSED
            return ConnectionLost()
        try:
            event = decode(data)
            self._transition(event, sender=self.their_role)
        except RemoteProtocolError:
            self.state = State.ERROR
            raise
        except LocalProtocolError as exc:
            self.state = State.ERROR
            raise RemoteProtocolError(str(exc), close_code=exc.close_code) from None
        return event

    def send(self, event: Event) -> bytes:
        """Turn *event* into a wire message, checking that we may send it now.

        Raises:
            LocalProtocolError: We may not send this event in this state.
        """
        try:
            _check_event(event)
            self._transition(event, sender=self.our_role)
        except RemoteProtocolError as exc:
            self.state = State.ERROR
            raise LocalProtocolError(str(exc), close_code=exc.close_code) from None
        except LocalProtocolError:
            self.state = State.ERROR
            raise
        return encode(event)

    def _transition(self, event: Event, *, sender: Role) -> None:
        event_type = type(event)
        if _SENDER.get(event_type) is not sender:
            raise LocalProtocolError(
                f"{sender.value} may not send {event.TYPE}",
                close_code=CloseCode.POLICY_VIOLATION,
            )
        new_state = _TRANSITIONS.get((self.state, event_type))
        if new_state is None:
            raise LocalProtocolError(
                f"{event.TYPE} is not allowed in state {self.state.name}"
            )
        self.state = new_state
