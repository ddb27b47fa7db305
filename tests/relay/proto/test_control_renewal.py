"""The certificate renewal messages of the control channel (relay/proto/control.py)."""

from __future__ import annotations

import json
from typing import Final

import pytest

from relay.proto.control import (
    MAX_PEM_CHARS,
    PROTOCOL_VERSION,
    ControlChannel,
    Event,
    Hello,
    RenewalAdvised,
    RenewRefused,
    RenewRequest,
    RenewResult,
    Role,
    State,
    Welcome,
    decode,
    encode,
)
from relay.proto.errors import LocalProtocolError, RemoteProtocolError

PEM: Final = "-----BEGIN CERTIFICATE REQUEST-----\nMIIBAz+/=\n-----END CERTIFICATE REQUEST-----\n"
RENEWAL_EVENTS: Final[tuple[Event, ...]] = (
    RenewRequest(csr=PEM),
    RenewResult(certificate=PEM, ca_bundle=""),
    RenewResult(certificate=PEM, ca_bundle=PEM + PEM),
    RenewRefused(reason="rate_limited", detail="ask again in 3600 s"),
    RenewalAdvised(reason="ca_rollover"),
)


def _open_pair() -> tuple[ControlChannel, ControlChannel]:
    device, broker = ControlChannel(Role.DEVICE), ControlChannel(Role.BROKER)
    broker.receive_message(
        device.send(
            Hello(version=PROTOCOL_VERSION, device_id="dev-1", agent_version="1")
        )
    )
    broker.next_event()
    device.receive_message(
        broker.send(
            Welcome(
                version=PROTOCOL_VERSION, heartbeat_interval_s=30.0, broker_version="1"
            )
        )
    )
    device.next_event()
    return device, broker


@pytest.mark.parametrize("event", RENEWAL_EVENTS)
def test_renewal_messages_round_trip(event: Event) -> None:
    """Each renewal message decodes to exactly the event that was encoded."""
    assert decode(encode(event)) == event


@pytest.mark.parametrize("event", RENEWAL_EVENTS)
def test_renewal_messages_flow_in_their_direction_only(event: Event) -> None:
    """The device sends requests, the broker the answers; both on an open channel."""
    device, broker = _open_pair()
    sender, receiver = (
        (device, broker) if isinstance(event, RenewRequest) else (broker, device)
    )
    receiver.receive_message(sender.send(event))
    assert receiver.next_event() == event
    assert receiver.state is State.OPEN
    device, broker = _open_pair()
    wrong_sender = broker if isinstance(event, RenewRequest) else device
    with pytest.raises(LocalProtocolError):
        wrong_sender.send(event)


def test_renew_request_before_welcome_is_refused() -> None:
    """A renewal request before the channel is open is a protocol error."""
    broker = ControlChannel(Role.BROKER)
    broker.receive_message(encode(RenewRequest(csr=PEM)))
    with pytest.raises(RemoteProtocolError):
        broker.next_event()
    assert broker.state is State.ERROR


@pytest.mark.parametrize(
    "body",
    [
        {"type": "renew_request", "csr": "x" * (MAX_PEM_CHARS + 1)},
        {"type": "renew_request", "csr": "<script>"},
        {"type": "renew_request", "csr": 5},
        {"type": "renew_request"},
        {"type": "renew_request", "csr": PEM, "device_id": "dev-2"},
        {"type": "renew_result", "certificate": PEM},
        {"type": "renew_result", "certificate": PEM, "ca_bundle": "é"},
        {"type": "renew_refused", "reason": "Rate Limited", "detail": ""},
        {"type": "renew_refused", "reason": "x" * 33, "detail": ""},
        {"type": "renew_refused", "reason": "bad_csr", "detail": "d" * 201},
        {"type": "renewal_advised", "reason": ""},
    ],
)
def test_malformed_renewal_messages_are_refused(body: dict[str, object]) -> None:
    """Oversized, wrongly typed, non-PEM, extra or missing fields never decode."""
    with pytest.raises(RemoteProtocolError):
        decode(json.dumps(body).encode())


def test_a_csr_naming_a_device_is_not_an_identity_claim() -> None:
    """The request carries no device id field: identity stays the certificate's."""
    assert set(json.loads(encode(RenewRequest(csr=PEM)))) == {"type", "csr"}
