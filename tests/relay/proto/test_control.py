"""The device control channel: codec and state machine (relay/proto/control.py)."""

from __future__ import annotations

import base64
import dataclasses
import json
from dataclasses import replace
from typing import Any, Final

import pytest
from hypothesis import given, strategies as st

from auth import generate_private_key
from relay.proto.close import CloseCode
from relay.proto.control import (
    MAX_CONTROL_MESSAGE_BYTES,
    NEED_DATA,
    PROTOCOL_VERSION,
    ConnectionLost,
    ControlChannel,
    Deny,
    EndReceiptAck,
    Event,
    FeedRecord,
    Grant,
    Heartbeat,
    HeartbeatAck,
    Hello,
    Offer,
    OfferWithdrawn,
    OfferWithTunnel,
    Role,
    SessionEnd,
    SessionEnded,
    State,
    Welcome,
    decode,
    encode,
)
from relay.proto.errors import LocalProtocolError, RemoteProtocolError
from relay.proto.receipts import (
    MAX_WIRE_RECEIPT_CHARS,
    MAX_WIRE_SIGNATURE_CHARS,
    GrantReceipt,
    ReceiptError,
    SignedReceipt,
    sign_grant,
)

MAX_INT: Final = 2**53  # first integer the codec refuses
MAX_CHARS: Final = 256  # longest string the codec accepts

HELLO: Final = Hello(
    version=PROTOCOL_VERSION, device_id="dev-0001", agent_version="2.3.0"
)
WELCOME: Final = Welcome(
    version=PROTOCOL_VERSION, heartbeat_interval_s=30.0, broker_version="0.1.0"
)
HEARTBEAT: Final = Heartbeat(seq=7)
HEARTBEAT_ACK: Final = HeartbeatAck(seq=7)


def b64url(data: bytes) -> str:
    """Unpadded base64url text of *data*."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


SESSION_ID: Final = "0123456789abcdef" * 2
NONCE: Final = b64url(bytes(range(32)))
OFFER: Final = Offer(
    session_id=SESSION_ID,
    engineer="alice",
    engineer_role="engineer, Example Service GmbH",
    reason="ticket 4711: conductivity alarm",
    channels=("shell", "tcp:443"),
    max_seconds=3600,
    grant_deadline_ms=1_780_000_060_000,
    nonce=NONCE,
)
OFFER_WITHDRAWN: Final = OfferWithdrawn(session_id=SESSION_ID, reason="cancelled")
SESSION_END: Final = SessionEnd(session_id=SESSION_ID, reason="engineer")
GRANT: Final = Grant(
    session_id=SESSION_ID, receipt=b64url(b"receipt"), signature=b64url(b"sig")
)
DENY: Final = Deny(session_id=SESSION_ID, reason="not now, calibrating")
SESSION_ENDED: Final = SessionEnded(
    session_id=SESSION_ID, receipt=b64url(b"end receipt"), signature=b64url(b"sig")
)
END_RECEIPT_ACK: Final = EndReceiptAck(session_id=SESSION_ID)
BROKER_SESSION_EVENTS: Final = (OFFER, OFFER_WITHDRAWN, SESSION_END, END_RECEIPT_ACK)
DEVICE_SESSION_EVENTS: Final = (GRANT, DENY, SESSION_ENDED)
ALL_EVENTS: Final = (
    HELLO,
    WELCOME,
    HEARTBEAT,
    HEARTBEAT_ACK,
    *BROKER_SESSION_EVENTS,
    *DEVICE_SESSION_EVENTS,
)

WIRE_TYPES: Final = (
    "hello",
    "welcome",
    "heartbeat",
    "heartbeat_ack",
    "offer",
    "offer_withdrawn",
    "session_end",
    "grant",
    "deny",
    "session_ended",
    "end_receipt_ack",
)
FIELD_NAMES: Final = {
    "hello": ("version", "device_id", "agent_version"),
    "welcome": ("version", "heartbeat_interval_s", "broker_version"),
    "heartbeat": ("seq",),
    "heartbeat_ack": ("seq",),
    "offer": (
        "session_id",
        "engineer",
        "engineer_role",
        "reason",
        "channels",
        "max_seconds",
        "grant_deadline_ms",
        "nonce",
    ),
    "offer_withdrawn": ("session_id", "reason"),
    "session_end": ("session_id", "reason"),
    "grant": ("session_id", "receipt", "signature"),
    "deny": ("session_id", "reason"),
    "session_ended": ("session_id", "receipt", "signature"),
    "end_receipt_ack": ("session_id",),
}


# Helpers
# =======


def deliver(sender: ControlChannel, receiver: ControlChannel, event: Event) -> Event:
    """Send *event* from *sender*, hand the bytes to *receiver*, return its event."""
    receiver.receive_message(sender.send(event))
    received = receiver.next_event()
    assert isinstance(received, Event)
    assert receiver.next_event() is NEED_DATA
    return received


def channels_in(state: State) -> tuple[ControlChannel, ControlChannel]:
    """A (device, broker) pair that has exchanged messages up to *state*."""
    device, broker = ControlChannel(Role.DEVICE), ControlChannel(Role.BROKER)
    if state in (State.AWAIT_WELCOME, State.OPEN):
        deliver(device, broker, HELLO)
    if state is State.OPEN:
        deliver(broker, device, WELCOME)
    assert states(device, broker) == (state, state)
    return device, broker


def states(device: ControlChannel, broker: ControlChannel) -> tuple[State, State]:
    """The states of a (device, broker) pair."""
    return device.state, broker.state


def sender_of(event: Event) -> Role:
    """The role the protocol lets send *event*."""
    device_events = Hello | Heartbeat | Grant | Deny | SessionEnded
    return Role.DEVICE if isinstance(event, device_events) else Role.BROKER


def pick(role: Role, device: ControlChannel, broker: ControlChannel) -> ControlChannel:
    """The channel of *role* out of a (device, broker) pair."""
    return device if role is Role.DEVICE else broker


def other(role: Role) -> Role:
    """The peer of *role*."""
    return Role.BROKER if role is Role.DEVICE else Role.DEVICE


def body_of(event: Event, **changes: object) -> dict[str, Any]:
    """The JSON object of *event* with *changes* applied."""
    body: dict[str, Any] = json.loads(encode(event))
    body.update(changes)
    return body


def wire(body: object) -> bytes:
    """*body* (any JSON value) as a wire message."""
    return json.dumps(body).encode()


def without(event: Event, name: str) -> bytes:
    """The wire form of *event* with field *name* removed."""
    body = body_of(event)
    del body[name]
    return wire(body)


# Codec: encode and decode
# ========================


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(HELLO, id="hello"),
        pytest.param(
            Hello(version=0, device_id="", agent_version=""), id="hello-empty"
        ),
        pytest.param(
            Hello(
                version=MAX_INT - 1,
                device_id="é" * MAX_CHARS,
                agent_version="x" * MAX_CHARS,
            ),
            id="hello-max",
        ),
        pytest.param(WELCOME, id="welcome"),
        pytest.param(
            Welcome(version=1, heartbeat_interval_s=30, broker_version="0.1.0"),
            id="welcome-int-interval",
        ),
        pytest.param(
            Welcome(version=1, heartbeat_interval_s=0.25, broker_version=""),
            id="welcome-fraction",
        ),
        pytest.param(HEARTBEAT, id="heartbeat"),
        pytest.param(Heartbeat(seq=0), id="heartbeat-0"),
        pytest.param(HEARTBEAT_ACK, id="heartbeat_ack"),
        pytest.param(HeartbeatAck(seq=MAX_INT - 1), id="heartbeat_ack-max"),
    ],
)
def test_decode_inverts_encode(event: Event) -> None:
    """Every wire event decodes back to an equal event of the same class."""
    decoded = decode(encode(event))
    assert decoded == event
    assert type(decoded) is type(event)


def test_encode_wire_format() -> None:
    """A message is compact JSON with the type first, then the fields in order."""
    assert encode(HELLO) == (
        b'{"type":"hello","version":4,"device_id":"dev-0001","agent_version":"2.3.0"}'
    )
    assert encode(HEARTBEAT_ACK) == b'{"type":"heartbeat_ack","seq":7}'


def test_encode_is_ascii() -> None:
    """Non-ASCII text is escaped, so the wire form is plain ASCII."""
    data = encode(Hello(version=1, device_id="gerät-ü", agent_version="1"))
    assert data.isascii()
    assert b"\\u00e4" in data


def test_decode_accepts_whitespace_and_any_field_order() -> None:
    """Field order and insignificant JSON whitespace do not matter."""
    data = b' { "seq" : 7 ,\n "type" : "heartbeat" } '
    assert decode(data) == HEARTBEAT


def test_decode_accepts_message_of_exactly_max_size() -> None:
    """A message of exactly MAX_CONTROL_MESSAGE_BYTES is not too big."""
    data = encode(HEARTBEAT)
    data += b" " * (MAX_CONTROL_MESSAGE_BYTES - len(data))
    assert len(data) == MAX_CONTROL_MESSAGE_BYTES
    assert decode(data) == HEARTBEAT


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(encode(HEARTBEAT) + b" " * MAX_CONTROL_MESSAGE_BYTES, id="valid"),
        pytest.param(b"\xff" * (MAX_CONTROL_MESSAGE_BYTES + 1), id="garbage"),
    ],
)
def test_decode_rejects_oversized_message_with_1009(data: bytes) -> None:
    """A message over 64 KiB is refused with 1009 before it is parsed."""
    assert len(data) > MAX_CONTROL_MESSAGE_BYTES
    with pytest.raises(RemoteProtocolError) as exc_info:
        decode(data)
    assert exc_info.value.close_code == CloseCode.MESSAGE_TOO_BIG


def test_message_size_limit_is_64_kib() -> None:
    """The control message limit is 64 KiB (OWASP's WebSocket guidance)."""
    assert MAX_CONTROL_MESSAGE_BYTES == 64 * 1024


@pytest.mark.parametrize(
    "data",
    [
        # Not UTF-8 JSON text.
        pytest.param(b"", id="empty"),
        pytest.param(b'{"type":"heartbeat","seq":1\xff}', id="invalid-utf8"),
        pytest.param(
            b"\xff\xfe" + '{"type":"heartbeat","seq":1}'.encode("utf-16-le"), id="utf16"
        ),
        pytest.param(b"\xef\xbb\xbf" + encode(HEARTBEAT), id="utf8-bom"),
        pytest.param(b"not json", id="not-json"),
        pytest.param(b'{"type":"heartbeat","seq":1', id="truncated"),
        pytest.param(encode(HEARTBEAT) + b"x", id="trailing-garbage"),
        pytest.param(encode(HEARTBEAT) * 2, id="two-objects"),
        pytest.param(
            b'{"type":"heartbeat","seq":1' + b"0" * 5000 + b"}", id="int-5000-digits"
        ),
        # JSON's non-standard constants.
        pytest.param(b'{"type":"heartbeat","seq":NaN}', id="nan"),
        pytest.param(
            b'{"type":"welcome","version":1,"heartbeat_interval_s":Infinity,"broker_version":""}',
            id="infinity",
        ),
        pytest.param(
            b'{"type":"welcome","version":1,"heartbeat_interval_s":-Infinity,"broker_version":""}',
            id="minus-infinity",
        ),
        # Valid JSON that is not an object.
        pytest.param(b"[]", id="array"),
        pytest.param(wire([body_of(HEARTBEAT)]), id="array-of-message"),
        pytest.param(b'"heartbeat"', id="string"),
        pytest.param(b"7", id="number"),
        pytest.param(b"null", id="null"),
        # The type field.
        pytest.param(b"{}", id="empty-object"),
        pytest.param(b'{"seq":7}', id="missing-type"),
        pytest.param(wire(body_of(HEARTBEAT, type=None)), id="type-null"),
        pytest.param(wire(body_of(HEARTBEAT, type=1)), id="type-int"),
        pytest.param(wire(body_of(HEARTBEAT, type=["heartbeat"])), id="type-list"),
        pytest.param(wire(body_of(HEARTBEAT, type={"a": 1})), id="type-object"),
        pytest.param(wire(body_of(HEARTBEAT, type="HEARTBEAT")), id="type-wrong-case"),
        pytest.param(wire(body_of(HEARTBEAT, type="ping")), id="type-unknown"),
        pytest.param(wire({"type": "connection_lost"}), id="type-pseudo-event"),
        pytest.param(wire(body_of(HEARTBEAT, type="x" * 10_000)), id="type-long"),
        # Field sets.
        pytest.param(without(HELLO, "device_id"), id="hello-missing-field"),
        pytest.param(
            without(WELCOME, "heartbeat_interval_s"), id="welcome-missing-field"
        ),
        pytest.param(without(HEARTBEAT, "seq"), id="heartbeat-missing-field"),
        pytest.param(wire(body_of(HELLO, serial="SN-1")), id="hello-extra-field"),
        pytest.param(wire(body_of(HEARTBEAT, payload="")), id="heartbeat-extra-field"),
        pytest.param(
            wire(body_of(HEARTBEAT_ACK, **{"x" * 1000: 1})), id="long-extra-field"
        ),
        pytest.param(
            wire(body_of(HELLO, type="heartbeat")), id="hello-fields-as-heartbeat"
        ),
        # Wrong value types and ranges.
        pytest.param(wire(body_of(HELLO, version=True)), id="bool-for-int"),
        pytest.param(wire(body_of(HELLO, version="1")), id="str-for-int"),
        pytest.param(wire(body_of(HELLO, version=None)), id="null-for-int"),
        pytest.param(wire(body_of(HELLO, version=-1)), id="negative-int"),
        pytest.param(wire(body_of(HEARTBEAT, seq=1.0)), id="float-for-int"),
        pytest.param(b'{"type":"heartbeat","seq":1e2}', id="exponent-for-int"),
        pytest.param(wire(body_of(HEARTBEAT, seq=MAX_INT)), id="int-2**53"),
        pytest.param(wire(body_of(HEARTBEAT_ACK, seq=2**64)), id="int-2**64"),
        pytest.param(wire(body_of(HEARTBEAT_ACK, seq=[7])), id="list-for-int"),
        pytest.param(
            wire(body_of(HELLO, device_id="x" * (MAX_CHARS + 1))), id="str-257"
        ),
        pytest.param(
            wire(body_of(HELLO, agent_version="é" * (MAX_CHARS + 1))),
            id="str-257-non-ascii",
        ),
        pytest.param(wire(body_of(HELLO, device_id=1)), id="int-for-str"),
        pytest.param(wire(body_of(HELLO, device_id=None)), id="null-for-str"),
        pytest.param(
            wire(body_of(HELLO, device_id={"id": "dev"})), id="object-for-str"
        ),
        pytest.param(
            wire(body_of(WELCOME, heartbeat_interval_s=True)), id="bool-for-float"
        ),
        pytest.param(
            wire(body_of(WELCOME, heartbeat_interval_s="30")), id="str-for-float"
        ),
        pytest.param(
            wire(body_of(WELCOME, heartbeat_interval_s=-0.5)), id="negative-float"
        ),
        pytest.param(
            wire(body_of(WELCOME, heartbeat_interval_s=float(MAX_INT))),
            id="float-2**53",
        ),
        pytest.param(
            b'{"type":"welcome","version":1,"heartbeat_interval_s":1e400,"broker_version":""}',
            id="float-overflow",
        ),
    ],
)
def test_decode_rejects_with_1002(data: bytes) -> None:
    """Anything but a well-formed, well-typed control message is a 1002 error."""
    with pytest.raises(RemoteProtocolError) as exc_info:
        decode(data)
    assert exc_info.value.close_code == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(wire(body_of(HEARTBEAT, type="x" * 10_000)), id="type"),
        pytest.param(wire(body_of(HEARTBEAT, **{"y" * 10_000: 1})), id="field-name"),
        pytest.param(wire(body_of(HELLO, device_id="z" * 10_000)), id="value"),
    ],
)
def test_decode_error_quotes_peer_data_briefly(data: bytes) -> None:
    """An error message quotes at most 40 characters of each peer-supplied value."""
    with pytest.raises(RemoteProtocolError) as exc_info:
        decode(data)
    message = str(exc_info.value)
    assert "..." in message
    assert len(message) < 200


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(Heartbeat(seq=MAX_INT - 1), id="int-2**53-1"),
        pytest.param(Heartbeat(seq=0), id="int-0"),
        pytest.param(
            Welcome(version=1, heartbeat_interval_s=0.001, broker_version=""),
            id="float-small",
        ),
        pytest.param(
            Welcome(
                version=1, heartbeat_interval_s=float(MAX_INT - 1), broker_version=""
            ),
            id="float-2**53-1",
        ),
        pytest.param(
            Hello(version=1, device_id="d" * MAX_CHARS, agent_version=""), id="str-256"
        ),
    ],
)
def test_decode_accepts_boundary_values(event: Event) -> None:
    """The range ends 0 and 2**53 - 1 and strings of 256 characters are accepted."""
    assert decode(encode(event)) == event


# ControlChannel
# ==============


def test_happy_path() -> None:
    """Hello, Welcome, then heartbeats and acks move both ends in step to OPEN."""
    device, broker = ControlChannel(Role.DEVICE), ControlChannel(Role.BROKER)
    assert device.their_role is Role.BROKER
    assert broker.their_role is Role.DEVICE
    assert states(device, broker) == (State.AWAIT_HELLO, State.AWAIT_HELLO)

    assert deliver(device, broker, HELLO) == HELLO
    assert states(device, broker) == (State.AWAIT_WELCOME, State.AWAIT_WELCOME)

    assert deliver(broker, device, WELCOME) == WELCOME
    assert states(device, broker) == (State.OPEN, State.OPEN)

    for seq in (0, 1, 2):
        assert deliver(device, broker, Heartbeat(seq=seq)) == Heartbeat(seq=seq)
        assert deliver(broker, device, HeartbeatAck(seq=seq)) == HeartbeatAck(seq=seq)
        assert states(device, broker) == (State.OPEN, State.OPEN)


def test_heartbeats_may_run_ahead_of_acks() -> None:
    """Acks are not paired with heartbeats: several heartbeats may be in flight."""
    device, broker = channels_in(State.OPEN)
    for seq in (1, 2, 3):
        deliver(device, broker, Heartbeat(seq=seq))
    for seq in (1, 2, 3):
        deliver(broker, device, HeartbeatAck(seq=seq))
    assert states(device, broker) == (State.OPEN, State.OPEN)


def test_queued_messages_come_out_in_order() -> None:
    """next_event yields queued messages one at a time, in arrival order."""
    device, broker = channels_in(State.OPEN)
    for seq in (1, 2, 3):
        broker.receive_message(device.send(Heartbeat(seq=seq)))
    assert broker.next_event() == Heartbeat(seq=1)
    assert broker.next_event() == Heartbeat(seq=2)
    assert broker.next_event() == Heartbeat(seq=3)
    assert broker.next_event() is NEED_DATA


@pytest.mark.parametrize("role", list(Role))
def test_next_event_without_data_is_need_data(role: Role) -> None:
    """With nothing queued, next_event returns NEED_DATA and changes nothing."""
    channel = ControlChannel(role)
    assert channel.next_event() is NEED_DATA
    assert channel.next_event() is NEED_DATA
    assert channel.state is State.AWAIT_HELLO


def test_need_data_repr() -> None:
    """NEED_DATA shows as its name in logs and test output."""
    assert repr(NEED_DATA) == "NEED_DATA"


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("state", [State.AWAIT_HELLO, State.AWAIT_WELCOME, State.OPEN])
def test_transport_loss_is_connection_lost(role: Role, state: State) -> None:
    """receive_message(None) yields ConnectionLost and leaves the channel CLOSED."""
    channel = pick(role, *channels_in(state))
    channel.receive_message(None)
    assert channel.next_event() == ConnectionLost()
    assert channel.state is State.CLOSED
    assert channel.next_event() is NEED_DATA
    assert channel.state is State.CLOSED


def test_messages_before_transport_loss_are_delivered_first() -> None:
    """A message queued before the transport closed still comes out first."""
    device, broker = ControlChannel(Role.DEVICE), ControlChannel(Role.BROKER)
    broker.receive_message(device.send(HELLO))
    broker.receive_message(None)
    assert broker.next_event() == HELLO
    assert broker.next_event() == ConnectionLost()
    assert broker.state is State.CLOSED


@pytest.mark.parametrize("role", list(Role))
def test_closed_channel_refuses_to_send(role: Role) -> None:
    """After the transport is lost nothing may be sent."""
    device, broker = channels_in(State.OPEN)
    channel = pick(role, device, broker)
    channel.receive_message(None)
    channel.next_event()
    event = HEARTBEAT if role is Role.DEVICE else HEARTBEAT_ACK
    with pytest.raises(LocalProtocolError):
        channel.send(event)


@pytest.mark.parametrize("role", list(Role))
def test_message_after_transport_loss_is_an_error(role: Role) -> None:
    """A message queued after the close marker is a protocol error."""
    device, broker = channels_in(State.OPEN)
    channel = pick(role, device, broker)
    channel.receive_message(None)
    channel.receive_message(encode(HEARTBEAT if role is Role.BROKER else HEARTBEAT_ACK))
    assert channel.next_event() == ConnectionLost()
    with pytest.raises(RemoteProtocolError):
        channel.next_event()
    assert channel.state is State.ERROR


@pytest.mark.parametrize("role", list(Role))
def test_nobody_may_send_connection_lost(role: Role) -> None:
    """ConnectionLost is a pseudo-event: neither side may send it."""
    channel = pick(role, *channels_in(State.OPEN))
    with pytest.raises(LocalProtocolError):
        channel.send(ConnectionLost())


# Sender rule: who may send what (close code 1008).

FORBIDDEN_SENDERS: Final = [
    pytest.param(WELCOME, Role.DEVICE, id="device-sends-welcome"),
    pytest.param(HEARTBEAT_ACK, Role.DEVICE, id="device-sends-heartbeat_ack"),
    pytest.param(HELLO, Role.BROKER, id="broker-sends-hello"),
    pytest.param(HEARTBEAT, Role.BROKER, id="broker-sends-heartbeat"),
    *(
        pytest.param(event, Role.DEVICE, id=f"device-sends-{event.TYPE}")
        for event in BROKER_SESSION_EVENTS
    ),
    *(
        pytest.param(event, Role.BROKER, id=f"broker-sends-{event.TYPE}")
        for event in DEVICE_SESSION_EVENTS
    ),
]
EVERY_STATE: Final = pytest.mark.parametrize(
    "state", [State.AWAIT_HELLO, State.AWAIT_WELCOME, State.OPEN]
)


@EVERY_STATE
@pytest.mark.parametrize(("event", "sender"), FORBIDDEN_SENDERS)
def test_send_refuses_event_of_other_role(
    state: State, event: Event, sender: Role
) -> None:
    """Sending an event reserved for the peer's role is a LocalProtocolError (1008)."""
    channel = pick(sender, *channels_in(state))
    with pytest.raises(LocalProtocolError) as exc_info:
        channel.send(event)
    assert exc_info.value.close_code == CloseCode.POLICY_VIOLATION


@EVERY_STATE
@pytest.mark.parametrize(("event", "sender"), FORBIDDEN_SENDERS)
def test_receive_refuses_event_of_wrong_role(
    state: State, event: Event, sender: Role
) -> None:
    """An event from the wrong role is a RemoteProtocolError (1008) and ERRORs the channel."""
    receiver = pick(other(sender), *channels_in(state))
    receiver.receive_message(encode(event))
    with pytest.raises(RemoteProtocolError) as exc_info:
        receiver.next_event()
    assert exc_info.value.close_code == CloseCode.POLICY_VIOLATION
    assert receiver.state is State.ERROR


# State rule: what may be sent when (close code 1002).

OUT_OF_ORDER: Final = [
    pytest.param(State.AWAIT_HELLO, HEARTBEAT, id="heartbeat-before-hello"),
    pytest.param(State.AWAIT_HELLO, WELCOME, id="welcome-before-hello"),
    pytest.param(State.AWAIT_HELLO, HEARTBEAT_ACK, id="ack-before-hello"),
    pytest.param(State.AWAIT_WELCOME, HELLO, id="second-hello"),
    pytest.param(State.AWAIT_WELCOME, HEARTBEAT, id="heartbeat-before-welcome"),
    pytest.param(State.AWAIT_WELCOME, HEARTBEAT_ACK, id="ack-before-welcome"),
    pytest.param(State.OPEN, HELLO, id="hello-when-open"),
    pytest.param(State.OPEN, WELCOME, id="second-welcome"),
    *(
        pytest.param(state, event, id=f"{event.TYPE}-in-{state.name}")
        for state in (State.AWAIT_HELLO, State.AWAIT_WELCOME)
        for event in (*BROKER_SESSION_EVENTS, *DEVICE_SESSION_EVENTS)
    ),
]


@pytest.mark.parametrize(("state", "event"), OUT_OF_ORDER)
def test_send_refuses_event_out_of_order(state: State, event: Event) -> None:
    """Sending an event its state does not allow is a LocalProtocolError (1002)."""
    channel = pick(sender_of(event), *channels_in(state))
    with pytest.raises(LocalProtocolError) as exc_info:
        channel.send(event)
    assert exc_info.value.close_code == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize(("state", "event"), OUT_OF_ORDER)
def test_receive_refuses_event_out_of_order(state: State, event: Event) -> None:
    """Receiving an event its state does not allow is a RemoteProtocolError (1002)."""
    receiver = pick(other(sender_of(event)), *channels_in(state))
    receiver.receive_message(encode(event))
    with pytest.raises(RemoteProtocolError) as exc_info:
        receiver.next_event()
    assert exc_info.value.close_code == CloseCode.PROTOCOL_ERROR
    assert receiver.state is State.ERROR


# Rule 2: ERROR is for good.


@pytest.mark.parametrize(
    ("role", "bad"),
    [
        pytest.param(Role.BROKER, b"not json", id="broker-codec-error"),
        pytest.param(Role.BROKER, encode(WELCOME), id="broker-sender-error"),
        pytest.param(Role.BROKER, encode(HEARTBEAT), id="broker-state-error"),
        pytest.param(Role.DEVICE, b"[]", id="device-codec-error"),
        pytest.param(Role.DEVICE, encode(HELLO), id="device-sender-error"),
        pytest.param(Role.DEVICE, encode(HEARTBEAT_ACK), id="device-state-error"),
    ],
)
def test_error_state_is_permanent(role: Role, bad: bytes) -> None:
    """After a RemoteProtocolError next_event keeps raising, whatever arrives next."""
    channel = ControlChannel(role)
    channel.receive_message(bad)
    with pytest.raises(RemoteProtocolError):
        channel.next_event()
    assert channel.state is State.ERROR

    channel.receive_message(encode(HELLO if role is Role.BROKER else WELCOME))
    channel.receive_message(None)
    for _ in range(3):
        with pytest.raises(RemoteProtocolError):
            channel.next_event()
        assert channel.state is State.ERROR


@pytest.mark.parametrize("role", list(Role))
def test_error_state_refuses_to_send(role: Role) -> None:
    """A channel in ERROR sends nothing more."""
    channel = ControlChannel(role)
    channel.receive_message(b"not json")
    with pytest.raises(RemoteProtocolError):
        channel.next_event()
    with pytest.raises(LocalProtocolError):
        channel.send(HELLO if role is Role.DEVICE else WELCOME)


# Hostile input found by review (fixed in control.py)
# ===================================================


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"[" * 2_000, id="arrays-2KB"),
        pytest.param(b'{"a":' * 2_000, id="objects-10KB"),
        pytest.param(b"[" * MAX_CONTROL_MESSAGE_BYTES, id="arrays-64KiB"),
    ],
)
def test_decode_rejects_deep_nesting(data: bytes) -> None:
    """Deeply nested JSON within the size limit is a RemoteProtocolError (1002)."""
    assert len(data) <= MAX_CONTROL_MESSAGE_BYTES
    with pytest.raises(RemoteProtocolError) as exc_info:
        decode(data)
    assert exc_info.value.close_code == CloseCode.PROTOCOL_ERROR


def test_deep_nesting_puts_channel_in_error() -> None:
    """A 2 KB message of nested arrays from the device ERRORs the broker channel."""
    broker = ControlChannel(Role.BROKER)
    broker.receive_message(b"[" * 2_000)
    with pytest.raises(RemoteProtocolError):
        broker.next_event()
    assert broker.state is State.ERROR


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(
            b'{"type":"heartbeat","seq":{"smuggled":["any","json"]},"seq":1}',
            id="duplicate-field",
        ),
        pytest.param(
            b'{"type":"hello","device_id":"victim","version":1,'
            b'"device_id":"dev-0001","agent_version":"2.3.0"}',
            id="duplicate-device_id",
        ),
        pytest.param(
            b'{"type":"welcome","type":"heartbeat","seq":1}', id="duplicate-type"
        ),
    ],
)
def test_decode_rejects_duplicate_keys(data: bytes) -> None:
    """A message that names a key twice is a RemoteProtocolError (1002)."""
    with pytest.raises(RemoteProtocolError):
        decode(data)


def test_refused_send_puts_channel_in_error() -> None:
    """After send() refuses an event the channel is in ERROR (Rule 2, as h11)."""
    device = ControlChannel(Role.DEVICE)
    with pytest.raises(LocalProtocolError):
        device.send(HEARTBEAT)
    assert device.state is State.ERROR


# Session messages
# ================

MAX_OFFER: Final = Offer(
    session_id="f" * 32,
    engineer="e" * 64,
    engineer_role="é" * 64,
    reason="r" * 500,
    channels=tuple(f"tcp:{p}".ljust(16, "x") for p in range(8)),
    max_seconds=3600,
    grant_deadline_ms=MAX_INT - 1,
    nonce=b64url(b"\xff" * 32),
)
MAX_GRANT: Final = Grant(
    session_id=SESSION_ID,
    receipt="A" * MAX_WIRE_RECEIPT_CHARS,
    signature="_" * (MAX_WIRE_SIGNATURE_CHARS - 2) + "_w",
)


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(OFFER, id="offer"),
        pytest.param(
            replace(
                OFFER,
                engineer="",
                engineer_role="",
                reason="",
                channels=("",),
                max_seconds=1,
                grant_deadline_ms=0,
            ),
            id="offer-min",
        ),
        pytest.param(MAX_OFFER, id="offer-max"),
        pytest.param(OFFER_WITHDRAWN, id="offer_withdrawn"),
        pytest.param(
            OfferWithdrawn(session_id=SESSION_ID, reason="x" * 32),
            id="offer_withdrawn-max",
        ),
        pytest.param(SESSION_END, id="session_end"),
        pytest.param(GRANT, id="grant"),
        pytest.param(MAX_GRANT, id="grant-max"),
        pytest.param(
            Grant(session_id=SESSION_ID, receipt="AQ", signature="AQI"),
            id="grant-short",
        ),
        pytest.param(DENY, id="deny"),
        pytest.param(Deny(session_id=SESSION_ID, reason=""), id="deny-empty"),
        pytest.param(Deny(session_id=SESSION_ID, reason="ü" * 200), id="deny-max"),
        pytest.param(SESSION_ENDED, id="session_ended"),
        pytest.param(END_RECEIPT_ACK, id="end_receipt_ack"),
    ],
)
def test_session_message_round_trip(event: Event) -> None:
    """Every session message decodes back to an equal event of the same class."""
    data = encode(event)
    assert len(data) <= MAX_CONTROL_MESSAGE_BYTES
    decoded = decode(data)
    assert decoded == event
    assert type(decoded) is type(event)


def test_offer_wire_format() -> None:
    """An offer is compact JSON; its channels are a JSON array, decoded as a tuple."""
    assert encode(OFFER) == (
        b'{"type":"offer","session_id":"0123456789abcdef0123456789abcdef",'
        b'"engineer":"alice","engineer_role":"engineer, Example Service GmbH",'
        b'"reason":"ticket 4711: conductivity alarm","channels":["shell","tcp:443"],'
        b'"max_seconds":3600,"grant_deadline_ms":1780000060000,'
        b'"nonce":"' + NONCE.encode() + b'"}'
    )
    decoded = decode(encode(OFFER))
    assert isinstance(decoded, Offer)
    assert decoded.channels == ("shell", "tcp:443")
    assert isinstance(decoded.channels, tuple)
    assert hash(decoded) == hash(OFFER)


def test_grant_and_session_ended_wire_format() -> None:
    """Grant and SessionEnded carry the session id and the two base64url fields."""
    assert encode(GRANT) == (
        b'{"type":"grant","session_id":"0123456789abcdef0123456789abcdef",'
        b'"receipt":"cmVjZWlwdA","signature":"c2ln"}'
    )
    assert json.loads(encode(SESSION_ENDED)) == {
        "type": "session_ended",
        "session_id": SESSION_ID,
        "receipt": b64url(b"end receipt"),
        "signature": b64url(b"sig"),
    }


def test_signed_receipt_travels_in_a_grant() -> None:
    """A real signed grant receipt fits a Grant and comes out byte for byte."""
    receipt = GrantReceipt(
        session_id=SESSION_ID,
        device_id="dev-0001",
        nonce=NONCE,
        engineer="alice",
        channels=("shell",),
        max_seconds=3600,
        granted_at_ms=1_780_000_000_000,
        decided_by="touchscreen",
    )
    signed = sign_grant(generate_private_key(), receipt)
    text, signature = signed.to_wire()
    device, broker = channels_in(State.OPEN)
    received = deliver(
        device, broker, Grant(session_id=SESSION_ID, receipt=text, signature=signature)
    )
    assert isinstance(received, Grant)
    assert SignedReceipt.from_wire(received.receipt, received.signature) == signed


def test_largest_grant_fits_the_message_cap() -> None:
    """Receipt and signature at their caps make a Grant well under 64 KiB."""
    assert len(encode(MAX_GRANT)) < MAX_CONTROL_MESSAGE_BYTES // 4


BAD_SESSION_IDS: Final = [
    ("upper", SESSION_ID.upper()),
    ("short", SESSION_ID[:-1]),
    ("long", SESSION_ID + "0"),
    ("not-hex", "g" * 32),
    ("newline", SESSION_ID + "\n"),
    ("empty", ""),
    ("int", 1),
    ("null", None),
]
BAD_NONCES: Final = [
    ("short", NONCE[:-1]),
    ("long", NONCE + "A"),
    ("padded", NONCE + "="),
    ("plus", "+" + NONCE[1:]),
    ("slash", "/" + NONCE[1:]),
    ("unused-bits", NONCE[:-1] + "B"),
    ("space", " " + NONCE[1:]),
    ("int", 32),
]
BAD_BASE64URL: Final = [
    ("empty", ""),
    ("padded", "AQ=="),
    ("one-pad", "AQI="),
    ("plus", "+_8"),
    ("slash", "-/8"),
    ("space", "AQ I"),
    ("newline", "AQ\n"),
    ("non-ascii", "AQé"),
    ("length-1-mod-4", "A"),
    ("length-5", "AQIDB"),
    ("unused-bits-2", "AR"),
    ("unused-bits-3", "AQJ"),
    ("list", ["AQ"]),
    ("null", None),
]


def _session_id_cases() -> list[Any]:
    return [
        pytest.param(
            wire(body_of(event, session_id=value)), id=f"{event.TYPE}-session-{name}"
        )
        for event in (*BROKER_SESSION_EVENTS, *DEVICE_SESSION_EVENTS)
        for name, value in BAD_SESSION_IDS
    ]


def _missing_and_extra_cases() -> list[Any]:
    cases = []
    for event in (*BROKER_SESSION_EVENTS, *DEVICE_SESSION_EVENTS):
        for name in FIELD_NAMES[event.TYPE]:
            cases.append(
                pytest.param(without(event, name), id=f"{event.TYPE}-without-{name}")
            )
        cases.append(
            pytest.param(
                wire(body_of(event, device_id="dev-0001")), id=f"{event.TYPE}-extra"
            )
        )
    return cases


def _base64url_cases() -> list[Any]:
    return [
        pytest.param(
            wire(body_of(event, **{field: value})),
            id=f"{event.TYPE}-{field}-{name}",
        )
        for event in (GRANT, SESSION_ENDED)
        for field in ("receipt", "signature")
        for name, value in BAD_BASE64URL
    ]


@pytest.mark.parametrize(
    "data",
    [
        *_session_id_cases(),
        *_missing_and_extra_cases(),
        *_base64url_cases(),
        *(
            pytest.param(wire(body_of(OFFER, nonce=value)), id=f"offer-nonce-{name}")
            for name, value in BAD_NONCES
        ),
        # Offer text caps.
        pytest.param(wire(body_of(OFFER, engineer="e" * 65)), id="offer-engineer-65"),
        pytest.param(
            wire(body_of(OFFER, engineer_role="r" * 65)), id="offer-engineer_role-65"
        ),
        pytest.param(wire(body_of(OFFER, reason="r" * 501)), id="offer-reason-501"),
        pytest.param(wire(body_of(OFFER, reason=None)), id="offer-reason-null"),
        pytest.param(
            wire(body_of(OFFER, reason="\ud800")), id="offer-reason-surrogate"
        ),
        # Offer channels.
        pytest.param(wire(body_of(OFFER, channels=[])), id="offer-no-channels"),
        pytest.param(
            wire(body_of(OFFER, channels=[f"tcp:{p}" for p in range(1, 10)])),
            id="offer-9-channels",
        ),
        pytest.param(
            wire(body_of(OFFER, channels=["tcp:" + "1" * 13])), id="offer-channel-17"
        ),
        pytest.param(wire(body_of(OFFER, channels="shell")), id="offer-channels-str"),
        pytest.param(wire(body_of(OFFER, channels=None)), id="offer-channels-null"),
        pytest.param(
            wire(body_of(OFFER, channels={"shell": True})), id="offer-channels-object"
        ),
        pytest.param(wire(body_of(OFFER, channels=[22])), id="offer-channel-int"),
        pytest.param(wire(body_of(OFFER, channels=[None])), id="offer-channel-null"),
        pytest.param(
            wire(body_of(OFFER, channels=[["shell"]])), id="offer-channel-nested"
        ),
        pytest.param(
            wire(body_of(OFFER, channels=["\udc00"])), id="offer-channel-surrogate"
        ),
        # Offer numbers.
        pytest.param(wire(body_of(OFFER, max_seconds=0)), id="offer-cap-0"),
        pytest.param(wire(body_of(OFFER, max_seconds=3601)), id="offer-cap-3601"),
        pytest.param(wire(body_of(OFFER, max_seconds=-1)), id="offer-cap-negative"),
        pytest.param(wire(body_of(OFFER, max_seconds=60.0)), id="offer-cap-float"),
        pytest.param(wire(body_of(OFFER, max_seconds="60")), id="offer-cap-str"),
        pytest.param(wire(body_of(OFFER, max_seconds=True)), id="offer-cap-bool"),
        pytest.param(
            wire(body_of(OFFER, grant_deadline_ms=-1)), id="offer-deadline-negative"
        ),
        pytest.param(
            wire(body_of(OFFER, grant_deadline_ms=MAX_INT)), id="offer-deadline-2**53"
        ),
        # End reasons and the deny text.
        pytest.param(
            wire(body_of(OFFER_WITHDRAWN, reason="x" * 33)), id="withdrawn-reason-33"
        ),
        pytest.param(
            wire(body_of(SESSION_END, reason="x" * 33)), id="session_end-reason-33"
        ),
        pytest.param(wire(body_of(SESSION_END, reason=1)), id="session_end-reason-int"),
        pytest.param(wire(body_of(DENY, reason="x" * 201)), id="deny-reason-201"),
        # Receipt and signature over their caps (otherwise valid base64url).
        pytest.param(
            wire(body_of(GRANT, receipt="A" * (MAX_WIRE_RECEIPT_CHARS + 2))),
            id="grant-receipt-too-long",
        ),
        pytest.param(
            wire(
                body_of(SESSION_ENDED, signature="A" * (MAX_WIRE_SIGNATURE_CHARS + 2))
            ),
            id="session_ended-signature-too-long",
        ),
    ],
)
def test_session_message_malformed_is_1002(data: bytes) -> None:
    """Any malformed session message is a RemoteProtocolError (1002)."""
    assert len(data) <= MAX_CONTROL_MESSAGE_BYTES
    with pytest.raises(RemoteProtocolError) as exc_info:
        decode(data)
    assert exc_info.value.close_code == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("role", "bad"),
    [
        pytest.param(
            Role.BROKER, replace(OFFER, channels=("shell",) * 9), id="offer-9-channels"
        ),
        pytest.param(Role.BROKER, replace(OFFER, max_seconds=7200), id="offer-cap"),
        pytest.param(Role.BROKER, replace(OFFER, nonce="short"), id="offer-nonce"),
        pytest.param(
            Role.BROKER,
            replace(OFFER_WITHDRAWN, session_id="not-a-session"),
            id="withdrawn-session",
        ),
        pytest.param(Role.DEVICE, replace(GRANT, receipt="AQ=="), id="grant-padding"),
        pytest.param(Role.DEVICE, replace(DENY, reason="x" * 201), id="deny-reason"),
    ],
)
def test_sending_a_malformed_session_message_is_refused(role: Role, bad: Event) -> None:
    """send() applies the same limits: a bad session message is a LocalProtocolError."""
    channel = pick(role, *channels_in(State.OPEN))
    with pytest.raises(LocalProtocolError):
        channel.send(bad)
    assert channel.state is State.ERROR


@pytest.mark.parametrize(
    "exchange",
    [
        pytest.param([OFFER, GRANT, SESSION_END, SESSION_ENDED], id="granted-ended"),
        pytest.param([OFFER, GRANT, SESSION_ENDED], id="granted-device-ends"),
        pytest.param(
            [OFFER, GRANT, SESSION_END, SESSION_ENDED, END_RECEIPT_ACK],
            id="granted-ended-acked",
        ),
        pytest.param(
            [SESSION_ENDED, SESSION_ENDED, END_RECEIPT_ACK, END_RECEIPT_ACK],
            id="receipt-resent-acked-twice",
        ),
        pytest.param([OFFER, DENY], id="denied"),
        pytest.param([OFFER, OFFER_WITHDRAWN], id="withdrawn"),
        pytest.param(
            [OFFER, HEARTBEAT, HEARTBEAT_ACK, GRANT, HEARTBEAT, SESSION_ENDED],
            id="with-heartbeats",
        ),
    ],
)
def test_session_exchanges_keep_the_channel_open(exchange: list[Event]) -> None:
    """Session messages pass in OPEN, in both directions, and leave it OPEN."""
    device, broker = channels_in(State.OPEN)
    for event in exchange:
        if sender_of(event) is Role.DEVICE:
            assert deliver(device, broker, event) == event
        else:
            assert deliver(broker, device, event) == event
        assert states(device, broker) == (State.OPEN, State.OPEN)


def test_end_receipt_ack_wire_format() -> None:
    """An end receipt ack is the session id alone."""
    assert encode(END_RECEIPT_ACK) == (
        b'{"type":"end_receipt_ack","session_id":"0123456789abcdef0123456789abcdef"}'
    )


# Versions: a message newer than the channel's version is refused both ways.


def test_channel_version_is_the_lower_of_hello_and_welcome() -> None:
    """Both ends know the channel's version once OPEN: the lower of the two."""
    device, broker = ControlChannel(Role.DEVICE), ControlChannel(Role.BROKER)
    assert (device.version, broker.version) == (None, None)
    deliver(device, broker, replace(HELLO, version=7))
    assert (device.version, broker.version) == (None, None)
    deliver(broker, device, replace(WELCOME, version=2))
    assert (device.version, broker.version) == (2, 2)
    assert EndReceiptAck.SINCE_VERSION == 2
    assert OfferWithTunnel.SINCE_VERSION == 3
    assert PROTOCOL_VERSION == FeedRecord.SINCE_VERSION == 4


def version_1_channels(old: Role) -> tuple[ControlChannel, ControlChannel]:
    """An OPEN (device, broker) pair where the *old* side speaks version 1."""
    device, broker = ControlChannel(Role.DEVICE), ControlChannel(Role.BROKER)
    deliver(device, broker, replace(HELLO, version=1 if old is Role.DEVICE else 2))
    deliver(broker, device, replace(WELCOME, version=1 if old is Role.BROKER else 2))
    assert (device.version, broker.version) == (1, 1)
    return device, broker


@pytest.mark.parametrize("old", list(Role))
def test_end_receipt_ack_is_not_sent_on_a_version_1_channel(old: Role) -> None:
    """A version 1 agent refuses unknown types: the broker may not send it one
    (LocalProtocolError), whichever side is the old one."""
    _, broker = version_1_channels(old)
    with pytest.raises(LocalProtocolError, match="version 2"):
        broker.send(END_RECEIPT_ACK)
    assert broker.state is State.ERROR


@pytest.mark.parametrize("old", list(Role))
def test_end_receipt_ack_on_a_version_1_channel_is_a_protocol_error(old: Role) -> None:
    """An ack the channel's version does not have is refused (1002), as it
    would be by a version 1 agent."""
    device, _ = version_1_channels(old)
    device.receive_message(encode(END_RECEIPT_ACK))
    with pytest.raises(RemoteProtocolError) as exc_info:
        device.next_event()
    assert exc_info.value.close_code == CloseCode.PROTOCOL_ERROR
    assert device.state is State.ERROR


def test_version_1_channel_carries_every_version_1_message() -> None:
    """The version rule touches only newer messages: a version 1 channel
    carries the whole session exchange as before."""
    device, broker = version_1_channels(Role.DEVICE)
    for event in (OFFER, GRANT, SESSION_END, SESSION_ENDED, HEARTBEAT):
        sender, receiver = (
            (device, broker) if sender_of(event) is Role.DEVICE else (broker, device)
        )
        assert deliver(sender, receiver, event) == event
    assert states(device, broker) == (State.OPEN, State.OPEN)


OFFER_WITH_TUNNEL: Final = OfferWithTunnel(
    **{item.name: getattr(OFFER, item.name) for item in dataclasses.fields(OFFER)},
    tunnel_url="wss://relay.example:8502",
)


def version_2_channels() -> tuple[ControlChannel, ControlChannel]:
    """An OPEN (device, broker) pair on protocol version 2 (an older agent)."""
    device, broker = ControlChannel(Role.DEVICE), ControlChannel(Role.BROKER)
    deliver(device, broker, replace(HELLO, version=2))
    deliver(broker, device, WELCOME)
    assert (device.version, broker.version) == (2, 2)
    return device, broker


def test_offer_with_tunnel_crosses_a_version_3_channel() -> None:
    """The offer of a session across nodes arrives whole, an Offer with a
    tunnel address."""
    device, broker = channels_in(State.OPEN)
    received = deliver(broker, device, OFFER_WITH_TUNNEL)
    assert received == OFFER_WITH_TUNNEL
    assert isinstance(received, Offer)
    assert json.loads(encode(OFFER_WITH_TUNNEL))["type"] == "offer_with_tunnel"


def test_offer_with_tunnel_is_not_sent_to_a_version_2_agent() -> None:
    """An agent before version 3 would refuse the unknown type: the broker may
    not send it one."""
    _, broker = version_2_channels()
    with pytest.raises(LocalProtocolError, match="version 3"):
        broker.send(OFFER_WITH_TUNNEL)


@pytest.mark.parametrize(
    "url",
    [
        "wss://relay.example:8502/v1/device/tunnel/x",  # a path
        "https://relay.example:8502",  # another scheme
        "ws://relay.example:8502",  # no TLS
        "wss://user@relay.example:8502",  # credentials
        "wss://relay.example:85020000",  # not a port
        "wss://-relay.example",
        "wss://relay.example:8502?x=1",
        "wss://" + "a" * 300,
        "wss://relay example",
    ],
)
def test_offer_with_tunnel_takes_only_a_scheme_and_authority(url: str) -> None:
    """The tunnel address is wss:// and a host (and port): nothing the agent
    would have to interpret."""
    device, _ = channels_in(State.OPEN)
    wire = json.loads(encode(OFFER_WITH_TUNNEL))
    wire["tunnel_url"] = url
    device.receive_message(json.dumps(wire).encode())
    with pytest.raises(RemoteProtocolError):
        device.next_event()


@pytest.mark.parametrize(
    "url", ["wss://relay.example", "wss://10.0.0.7:9443", "wss://[fd00::7]:9443"]
)
def test_offer_with_tunnel_takes_names_and_addresses(url: str) -> None:
    device, broker = channels_in(State.OPEN)
    offer = replace(OFFER_WITH_TUNNEL, tunnel_url=url)
    assert deliver(broker, device, offer) == offer


def test_channel_does_not_pair_answers_with_offers() -> None:
    """Which offer a grant answers is the session module's business (Rule 4)."""
    device, broker = channels_in(State.OPEN)
    stray = Grant(session_id="a" * 32, receipt="AQ", signature="AQ")
    assert deliver(device, broker, stray) == stray
    assert deliver(device, broker, DENY) == DENY
    assert broker.state is State.OPEN


@pytest.mark.parametrize("role", list(Role))
def test_closed_channel_refuses_session_messages(role: Role) -> None:
    """After the transport is lost, no session message may be sent."""
    channel = pick(role, *channels_in(State.OPEN))
    channel.receive_message(None)
    assert channel.next_event() == ConnectionLost()
    with pytest.raises(LocalProtocolError):
        channel.send(OFFER if role is Role.BROKER else GRANT)


@given(st.text(st.sampled_from("AQgwBR-_=+/ é"), max_size=12))
def test_codec_and_receipts_agree_on_base64url(text: str) -> None:
    """The codec accepts a receipt field exactly when SignedReceipt.from_wire does.

    (Except the empty text, which from_wire leaves to verification and the codec
    refuses outright.)
    """
    try:
        SignedReceipt.from_wire(text, "AQ")
    except ReceiptError:
        receipts_accept = False
    else:
        receipts_accept = text != ""
    codec_accepts = decode_or_reject(wire(body_of(GRANT, receipt=text))) is not None
    assert codec_accepts == receipts_accept


# Properties
# ==========

# Explicit alphabets: st.text()'s default (characters(codec="utf-8")) builds a
# codec table that takes ~3 s on a fresh .hypothesis directory, which trips the
# too_slow health check on a clean checkout. These use the cheap Unicode charmap.
ANY_CHAR: Final = st.characters()  # lone surrogates included: JSON can carry them
VALID_CHAR: Final = st.characters(exclude_categories=["Cs"])
JSON_SCALARS: Final = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(ANY_CHAR, max_size=300)
)
JSON_VALUES: Final[st.SearchStrategy[object]] = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(ANY_CHAR, max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
# Values of the right type and range, so that some generated messages are valid.
SESSION_IDS: Final = st.text("0123456789abcdef", min_size=32, max_size=32)
NONCES: Final = st.binary(min_size=32, max_size=32).map(b64url)
WIRE_BYTES: Final = st.binary(min_size=1, max_size=300).map(b64url)
CHANNEL_LISTS: Final = st.lists(
    st.text(VALID_CHAR, max_size=16), min_size=1, max_size=8
).map(tuple)
GOOD_VALUES: Final[st.SearchStrategy[object]] = (
    st.integers(min_value=0, max_value=MAX_INT - 1)
    | st.floats(min_value=0, max_value=MAX_INT, exclude_max=True)
    | st.text(VALID_CHAR, max_size=MAX_CHARS)
    | SESSION_IDS
    | NONCES
    | WIRE_BYTES
    | CHANNEL_LISTS.map(list)
)
FIELD_VALUES: Final = GOOD_VALUES | JSON_VALUES
FIELD_KEYS: Final = sorted({n for names in FIELD_NAMES.values() for n in names})
TYPE_VALUES: Final = (
    st.sampled_from([*WIRE_TYPES, "connection_lost", "Hello", ""]) | JSON_VALUES
)


EVENTS: Final[st.SearchStrategy[Event]] = st.one_of(
    st.builds(
        Hello,
        version=st.integers(min_value=0, max_value=MAX_INT - 1),
        device_id=st.text(VALID_CHAR, max_size=MAX_CHARS),
        agent_version=st.text(VALID_CHAR, max_size=MAX_CHARS),
    ),
    st.builds(
        Welcome,
        version=st.integers(min_value=0, max_value=MAX_INT - 1),
        heartbeat_interval_s=st.floats(
            min_value=0, max_value=MAX_INT, exclude_min=True, exclude_max=True
        ),
        broker_version=st.text(VALID_CHAR, max_size=MAX_CHARS),
    ),
    st.builds(Heartbeat, seq=st.integers(min_value=0, max_value=MAX_INT - 1)),
    st.builds(HeartbeatAck, seq=st.integers(min_value=0, max_value=MAX_INT - 1)),
    st.builds(
        Offer,
        session_id=SESSION_IDS,
        engineer=st.text(VALID_CHAR, max_size=64),
        engineer_role=st.text(VALID_CHAR, max_size=64),
        reason=st.text(VALID_CHAR, max_size=500),
        channels=CHANNEL_LISTS,
        max_seconds=st.integers(min_value=1, max_value=3600),
        grant_deadline_ms=st.integers(min_value=0, max_value=MAX_INT - 1),
        nonce=NONCES,
    ),
    st.builds(
        OfferWithdrawn, session_id=SESSION_IDS, reason=st.text(VALID_CHAR, max_size=32)
    ),
    st.builds(
        SessionEnd, session_id=SESSION_IDS, reason=st.text(VALID_CHAR, max_size=32)
    ),
    st.builds(Grant, session_id=SESSION_IDS, receipt=WIRE_BYTES, signature=WIRE_BYTES),
    st.builds(Deny, session_id=SESSION_IDS, reason=st.text(VALID_CHAR, max_size=200)),
    st.builds(
        SessionEnded, session_id=SESSION_IDS, receipt=WIRE_BYTES, signature=WIRE_BYTES
    ),
    st.builds(EndReceiptAck, session_id=SESSION_IDS),
)


@st.composite
def control_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """JSON objects shaped like control messages: valid ones and near misses."""
    body: dict[str, Any] = body_of(draw(EVENTS)) if draw(st.booleans()) else {}
    # Then replace, add or remove a few entries, the type included.
    keys = st.sampled_from(["type", *FIELD_KEYS]) | st.text(ANY_CHAR, max_size=8)
    for key in draw(st.lists(keys, max_size=3)):
        if draw(st.booleans()):
            body.pop(key, None)
        else:
            body[key] = draw(TYPE_VALUES if key == "type" else FIELD_VALUES)
    return body


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    """A valid wire message with a random slice replaced by random bytes."""
    data = encode(draw(EVENTS))
    start = draw(st.integers(0, len(data)))
    end = draw(st.integers(start, len(data)))
    return data[:start] + draw(st.binary(max_size=8)) + data[end:]


def decode_or_reject(data: bytes) -> Event | None:
    """decode(*data*), or None when it raised RemoteProtocolError."""
    try:
        return decode(data)
    except RemoteProtocolError:
        return None


@given(st.binary(max_size=512) | mutated_messages())
def test_decode_arbitrary_bytes_returns_event_or_raises_remote_error(
    data: bytes,
) -> None:
    """decode() of any bytes returns an Event or raises RemoteProtocolError, nothing else."""
    event = decode_or_reject(data)
    assert event is None or type(event) in {type(e) for e in ALL_EVENTS}


@given(control_bodies())
def test_decode_arbitrary_json_object_returns_event_or_raises_remote_error(
    body: dict[str, Any],
) -> None:
    """decode() of any JSON object returns an Event or raises RemoteProtocolError.

    An accepted object re-encodes to exactly the object that was sent.
    """
    event = decode_or_reject(wire(body))
    if event is not None:
        assert body["type"] == event.TYPE
        assert json.loads(encode(event)) == body


@given(EVENTS)
def test_decode_encode_round_trip(event: Event) -> None:
    """decode(encode(e)) == e for every event with in-range field values."""
    assert decode(encode(event)) == event


@given(
    st.lists(
        st.sampled_from([encode(e) for e in ALL_EVENTS])
        | st.none()
        | st.binary(max_size=16),
        max_size=8,
    ),
    st.sampled_from(list(Role)),
)
def test_channel_either_yields_or_errors_for_good(
    messages: list[bytes | None], role: Role
) -> None:
    """Any input gives events, NEED_DATA or RemoteProtocolError; errors leave ERROR."""
    channel = ControlChannel(role)
    for message in messages:
        channel.receive_message(message)
    for _ in range(len(messages) + 1):
        try:
            event = channel.next_event()
        except RemoteProtocolError:
            assert channel.state is State.ERROR
            continue
        assert channel.state is not State.ERROR
        assert event is NEED_DATA or isinstance(event, Event)


def test_lone_surrogate_is_refused_on_the_wire() -> None:
    """A string with a lone surrogate (valid JSON escape, invalid UTF-8) is a protocol error."""
    with pytest.raises(RemoteProtocolError):
        decode(
            b'{"type":"hello","version":1,"device_id":"\\ud800","agent_version":"x"}'
        )


def test_sending_an_invalid_value_is_refused_and_errors_the_channel() -> None:
    """send() checks values like decode() does: a bad value is ours to fix, and ERRORs the channel."""
    device = ControlChannel(Role.DEVICE)
    with pytest.raises(LocalProtocolError):
        device.send(Hello(version=1, device_id="x" * 1000, agent_version=""))
    assert device.state is State.ERROR
