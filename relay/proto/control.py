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
Rule 4: the channel checks the form of session messages, not their meaning. Which
offer is pending, whether a grant answers it and whether its receipt verifies are
decided by the session state machine and :mod:`relay.proto.receipts`; here a
``Grant`` is only a session id and two base64url fields of bounded length. So the
session messages are all legal in ``State.OPEN`` and leave it there.

Session messages
================
Broker to device: :class:`Offer` (ask the person at the device), :class:`OfferWithdrawn`
(the offer is gone before any answer: cancelled, timed out, ended by the broker) and
:class:`SessionEnd` (the broker ends a granted session). Device to broker:
:class:`Grant` and :class:`Deny` (the answer to an offer) and :class:`SessionEnded`
(the device ended the session, or answers a ``SessionEnd``). ``Grant`` and
``SessionEnded`` carry a signed receipt as two unpadded base64url fields,
``receipt`` and ``signature`` (:meth:`relay.proto.receipts.SignedReceipt.to_wire`).
Broker to device again: :class:`EndReceiptAck` (protocol version 2) says the
broker is done with the end receipt of a session (recorded, already recorded, or
verifiably bad); until then the agent keeps the receipt and sends it again on
every new channel, so that one written into a dead connection is not lost.

Sessions across broker nodes: :class:`OfferWithTunnel` (protocol version 3) is
an :class:`Offer` whose tunnel is opened at another address than the control
channel's: the node the engineer is on, when the device's control channel is
on another node of the fleet. Its ``tunnel_url`` is ``wss://HOST[:PORT]``
only; the agent decides whether it goes there (the host of its own broker,
or one it was told to trust).

Versions
========
``Hello.version`` and ``Welcome.version`` are each side's :data:`PROTOCOL_VERSION`;
the channel's :attr:`ControlChannel.version` is the lower of the two, known once
the channel is OPEN. A message newer than that (its class's ``SINCE_VERSION``) may
be neither sent nor received: version 1 agents refuse unknown message types, so
a broker sends :class:`EndReceiptAck` only on a version 2 channel, and an agent
on a version 1 channel does not wait for acks (it sends each receipt once, as
version 1 did). A session across nodes needs a version 3 channel; to an older
agent such a session is refused before anything is offered.

Monitoring feed (protocol version 4)
====================================
Device to broker: :class:`FeedRecord` (one alarm, one day's statistics, or the
answer to a data request; ``body`` is the record's JSON text, whose meaning
:mod:`relay.proto.feed` checks, so a bad record is refused on its own and the
channel stays up), :class:`FeedStatus` (how many records wait in the agent's
queue, and how many it had to drop) and :class:`DataRequestRefused`. Broker to
device: :class:`FeedAck` (the record is stored, was stored before, is refused
for good, or should be sent again later) and :class:`DataRequest` (a named
user asks for the configuration or the consumables; the device never sends
those otherwise). A broker sends these only on a version 4 channel; an agent
keeps its records queued on an older one.

Certificate renewal
===================
Device to broker: :class:`RenewRequest` (a PEM certificate signing request for a
new key). Broker to device: :class:`RenewResult` (the signed certificate, PEM, and
the CA bundle the agent should trust for the broker's listener, possibly empty),
:class:`RenewRefused` (a bounded reason code and a short text), and
:class:`RenewalAdvised` (the broker asks for a renewal now, e.g. because the
certificate was issued by a CA that is being rolled over). As for sessions, the
channel checks only the form: PEM text of bounded length in the PEM alphabet.
Whether the CSR names the channel's device, and whether the device may renew,
is the broker's decision (see docs/certificates.md).

Field limits
============
Every field has a type (``int``, ``float``, ``str`` or ``tuple[str, ...]``, a JSON
array of strings) and the limits in its class's ``LIMITS`` table; a field not in
the table gets the defaults: strings of at most 256 characters, integers in
0..2**53-1. Fixed forms are checked here because they never vary: session ids are
32 lowercase hex characters, nonces 43 base64url characters (32 bytes), receipts
and signatures canonical unpadded base64url, ``max_seconds`` 1..3600. Channel
names, device ids and end reasons are checked by the session module.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, ClassVar, Final

from relay.proto.close import CloseCode
from relay.proto.errors import LocalProtocolError, RemoteProtocolError
from relay.proto.receipts import MAX_WIRE_RECEIPT_CHARS, MAX_WIRE_SIGNATURE_CHARS

#: Version 2 added :class:`EndReceiptAck`, 3 :class:`OfferWithTunnel`, 4 the
#: monitoring feed; see "Versions" above.
PROTOCOL_VERSION: Final = 4
MAX_CONTROL_MESSAGE_BYTES: Final = 64 * 1024
_MAX_STRING_CHARS: Final = 256
_MAX_INT: Final = 2**53  # JSON-safe integers only
_MAX_SESSION_SECONDS: Final = 3600  # Invariant 2

# Fixed forms, matched with fullmatch.
_SESSION_ID: Final = re.compile(r"[0-9a-f]{32}")
# 32 bytes as unpadded base64url: the 43rd character carries only 2 data bits, so
# its low 4 bits must be zero (one nonce, one spelling).
_NONCE: Final = re.compile(r"[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]")
# Canonical unpadded base64url of at least one byte: whole groups of 4, then an
# optional tail of 2 or 3 characters whose unused low bits are zero. No padding,
# and no "+" or "/" (that would be plain base64).
_BASE64URL: Final = re.compile(
    r"(?=.)(?:[A-Za-z0-9_-]{4})*"
    r"(?:[A-Za-z0-9_-][AQgw]|[A-Za-z0-9_-]{2}[AEIMQUYcgkosw048])?"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class FieldLimit:
    """What one message field may hold beyond its type.

    Attributes:
        max_chars: Longest string; for a list field, longest item.
        pattern: A string (or every item) must match it whole.
        min_items: Fewest items of a list field.
        max_items: Most items of a list field (list fields must set it).
        min_int: Smallest value of an int field.
        max_int: Largest value of an int field.
    """

    max_chars: int = _MAX_STRING_CHARS
    pattern: re.Pattern[str] | None = None
    min_items: int = 0
    max_items: int = 0
    min_int: int = 0
    max_int: int = _MAX_INT - 1


_DEFAULT_LIMIT: Final = FieldLimit()
_SESSION_ID_LIMIT: Final = FieldLimit(pattern=_SESSION_ID)
_RECEIPT_LIMIT: Final = FieldLimit(max_chars=MAX_WIRE_RECEIPT_CHARS, pattern=_BASE64URL)
_SIGNATURE_LIMIT: Final = FieldLimit(
    max_chars=MAX_WIRE_SIGNATURE_CHARS, pattern=_BASE64URL
)
_END_REASON_LIMIT: Final = FieldLimit(max_chars=32)
#: Where a tunnel opens: a scheme and an authority, nothing else (the agent
#: adds the path). A host name or IPv4 address, or an IPv6 one in brackets.
_TUNNEL_URL: Final = re.compile(
    r"wss://(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])"
    r"(?::[0-9]{1,5})?"
)
#: PEM text: base64 lines between ``-----BEGIN ...-----`` and ``-----END ...-----``.
_PEM: Final = re.compile(r"[-A-Za-z0-9+/= \r\n]*")
#: Largest PEM CSR or certificate on the control channel (the broker's own
#: ``max_csr_bytes`` may be lower; 16 KiB is ample for a P-256 or RSA-4096 one).
MAX_PEM_CHARS: Final = 16 * 1024
#: Largest CA bundle (a handful of CA certificates during a rollover).
MAX_CA_BUNDLE_CHARS: Final = 32 * 1024
_PEM_LIMIT: Final = FieldLimit(max_chars=MAX_PEM_CHARS, pattern=_PEM)
_RENEW_REASON: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
#: A reason or result code: lowercase, digits and underscores, at most 32.
_CODE_LIMIT: Final = FieldLimit(max_chars=32, pattern=_RENEW_REASON)
#: A record's idempotency key or a data request's id: 32 lowercase hex.
_ID_LIMIT: Final = _SESSION_ID_LIMIT
#: Longest ``FeedRecord.body``: below the message cap with room for the rest
#: (the broker's ``[feed] max_record_bytes`` is lower and refuses the record).
MAX_FEED_BODY_CHARS: Final = 48 * 1024


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
    #: Per-field limits; fields not named here get :class:`FieldLimit`'s defaults.
    LIMITS: ClassVar[Mapping[str, FieldLimit]] = {}
    #: The first protocol version with this message (see "Versions").
    SINCE_VERSION: ClassVar[int] = 1


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


@dataclass(frozen=True, slots=True, kw_only=True)
class Offer(Event):
    """Ask the person at the device to allow a session (broker to device).

    Attributes:
        session_id: The new session's id (32 lowercase hex characters).
        engineer: The engineer's user name.
        engineer_role: How to present the engineer on the prompt (role, company).
        reason: Why the engineer asks, as typed (at most 500 characters).
        channels: What the engineer wants to reach, in order: 1 to 8 channels of
            at most 16 characters (``"shell"``, ``"tcp:443"``).
        max_seconds: The longest the session may last once granted, 1..3600.
        grant_deadline_ms: When the offer lapses unanswered (broker clock).
        nonce: 32 random bytes as 43 base64url characters; the grant receipt
            must carry it.
    """

    TYPE: ClassVar[str] = "offer"
    LIMITS: ClassVar[Mapping[str, FieldLimit]] = {
        "session_id": _SESSION_ID_LIMIT,
        "engineer": FieldLimit(max_chars=64),
        "engineer_role": FieldLimit(max_chars=64),
        "reason": FieldLimit(max_chars=500),
        "channels": FieldLimit(max_chars=16, min_items=1, max_items=8),
        "max_seconds": FieldLimit(min_int=1, max_int=_MAX_SESSION_SECONDS),
        "nonce": FieldLimit(pattern=_NONCE),
    }
    session_id: str
    engineer: str
    engineer_role: str
    reason: str
    channels: tuple[str, ...]
    max_seconds: int
    grant_deadline_ms: int
    nonce: str


def is_tunnel_url(url: str) -> bool:
    """Whether *url* may be an :class:`OfferWithTunnel`'s ``tunnel_url``."""
    return len(url) <= 300 and _TUNNEL_URL.fullmatch(url) is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class OfferWithTunnel(Offer):
    """An :class:`Offer` whose tunnel opens at *tunnel_url* (broker to device).

    Sent when the engineer is on another broker node than the device's control
    channel: the device opens the session's tunnel to that node directly (the
    node relays nothing to another node). Everything else is as for an offer:
    the grant, the deny and the end receipts still travel on the control
    channel. Protocol version 3.
    """

    TYPE: ClassVar[str] = "offer_with_tunnel"
    LIMITS: ClassVar[Mapping[str, FieldLimit]] = {
        **Offer.LIMITS,
        "tunnel_url": FieldLimit(max_chars=300, pattern=_TUNNEL_URL),
    }
    SINCE_VERSION: ClassVar[int] = 3
    tunnel_url: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OfferWithdrawn(Event):
    """The offer is gone before it was answered (broker to device).

    *reason* is an end reason: ``"cancelled"`` (the engineer withdrew),
    ``"grant_timeout"``, or why the broker ended it (``"admin"``, ...).
    """

    TYPE: ClassVar[str] = "offer_withdrawn"
    LIMITS: ClassVar[Mapping[str, FieldLimit]] = {
        "session_id": _SESSION_ID_LIMIT,
        "reason": _END_REASON_LIMIT,
    }
    session_id: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionEnd(Event):
    """The broker ends a granted session (broker to device).

    The device closes its local streams and answers with :class:`SessionEnded`.
    *reason* is an end reason.
    """

    TYPE: ClassVar[str] = "session_end"
    LIMITS: ClassVar[Mapping[str, FieldLimit]] = {
        "session_id": _SESSION_ID_LIMIT,
        "reason": _END_REASON_LIMIT,
    }
    session_id: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Grant(Event):
    """The person at the device allowed the offer (device to broker).

    *receipt* and *signature* are the signed grant receipt in its wire form
    (:mod:`relay.proto.receipts`), which the broker verifies before it pairs
    anything (Invariant 1).
    """

    TYPE: ClassVar[str] = "grant"
    LIMITS: ClassVar[Mapping[str, FieldLimit]] = {
        "session_id": _SESSION_ID_LIMIT,
        "receipt": _RECEIPT_LIMIT,
        "signature": _SIGNATURE_LIMIT,
    }
    session_id: str
    receipt: str
    signature: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Deny(Event):
    """The person at the device refused the offer (device to broker).

    *reason* is optional free text from the person (at most 200 characters).
    """

    TYPE: ClassVar[str] = "deny"
    LIMITS: ClassVar[Mapping[str, FieldLimit]] = {
        "session_id": _SESSION_ID_LIMIT,
        "reason": FieldLimit(max_chars=200),
    }
    session_id: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionEnded(Event):
    """The session is over on the device (device to broker).

    Sent when the device ended it (on-site End, its own cap timer) and as the
    answer to :class:`SessionEnd`. Carries the signed end receipt, in the same
    wire form as :class:`Grant`.
    """

    TYPE: ClassVar[str] = "session_ended"
    LIMITS: ClassVar[Mapping[str, FieldLimit]] = {
        "session_id": _SESSION_ID_LIMIT,
        "receipt": _RECEIPT_LIMIT,
        "signature": _SIGNATURE_LIMIT,
    }
    session_id: str
    receipt: str
    signature: str


@dataclass(frozen=True, slots=True, kw_only=True)
class EndReceiptAck(Event):
    """The broker is done with the end receipt of *session_id* (broker to device).

    Sent for a receipt it recorded (on time or late), one it had recorded
    before (a resend), and one of this device's own sessions that does not
    verify (it never will: sending it again only fills the log). Not sent for a
    session the broker does not know or that is another device's: the agent
    may try that one again on a later channel. The agent forgets the receipt.
    Protocol version 2.
    """

    TYPE: ClassVar[str] = "end_receipt_ack"
    LIMITS: ClassVar[Mapping[str, FieldLimit]] = {"session_id": _SESSION_ID_LIMIT}
    SINCE_VERSION: ClassVar[int] = 2
    session_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RenewRequest(Event):
    """Ask the broker to sign a new certificate for this device (device to broker).

    *csr* is a PEM certificate signing request made with a new key, of the same
    form as the enrollment one; its device id must be the channel's.
    """

    TYPE: ClassVar[str] = "renew_request"
    LIMITS: ClassVar[Mapping[str, FieldLimit]] = {"csr": _PEM_LIMIT}
    csr: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RenewResult(Event):
    """The renewed certificate (broker to device).

    Attributes:
        certificate: The new device certificate, PEM.
        ca_bundle: The CA certificates (PEM, concatenated) the agent should
            trust for the broker's listener from now on, or ``""`` when the
            broker does not know them (an operator-provided listener
            certificate); see docs/certificates.md.
    """

    TYPE: ClassVar[str] = "renew_result"
    LIMITS: ClassVar[Mapping[str, FieldLimit]] = {
        "certificate": _PEM_LIMIT,
        "ca_bundle": FieldLimit(max_chars=MAX_CA_BUNDLE_CHARS, pattern=_PEM),
    }
    certificate: str
    ca_bundle: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RenewRefused(Event):
    """The broker refused a renewal (broker to device).

    *reason* is a code (``rate_limited``, ``bad_csr``, ``id_mismatch``,
    ``refused_revoked``, ...: lowercase, at most 32 characters); *detail* is a
    short text for the agent's log.
    """

    TYPE: ClassVar[str] = "renew_refused"
    LIMITS: ClassVar[Mapping[str, FieldLimit]] = {
        "reason": FieldLimit(max_chars=32, pattern=_RENEW_REASON),
        "detail": FieldLimit(max_chars=200),
    }
    reason: str
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RenewalAdvised(Event):
    """The broker asks the device to renew now (broker to device).

    *reason* is a code: ``ca_rollover`` (the certificate was issued by a CA that
    is being retired) or ``expiring`` (it ends within the broker's window).
    """

    TYPE: ClassVar[str] = "renewal_advised"
    LIMITS: ClassVar[Mapping[str, FieldLimit]] = {
        "reason": FieldLimit(max_chars=32, pattern=_RENEW_REASON),
    }
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class FeedRecord(Event):
    """One monitoring record (device to broker). Protocol version 4.

    Attributes:
        record_id: The idempotency key the agent gave the record when the
            instrument handed it over (32 lowercase hex); a record sent again
            after a lost ack carries the same key, and the broker drops it as a
            duplicate.
        kind: ``alarm``, ``daily_stats``, ``configuration`` or ``consumables``
            (a code; :mod:`relay.proto.feed` decides which are known).
        body: The record as JSON text (at most :data:`MAX_FEED_BODY_CHARS`).
        request_id: The :class:`DataRequest` this answers, or ``""`` for a
            record the device pushes on its own (alarms, daily statistics).
        queue_depth: Records waiting in the agent's queue, this one included.
    """

    TYPE: ClassVar[str] = "feed_record"
    LIMITS: ClassVar[Mapping[str, FieldLimit]] = {
        "record_id": _ID_LIMIT,
        "kind": _CODE_LIMIT,
        "body": FieldLimit(max_chars=MAX_FEED_BODY_CHARS),
        "request_id": FieldLimit(pattern=re.compile(r"(?:[0-9a-f]{32})?")),
    }
    SINCE_VERSION: ClassVar[int] = 4
    record_id: str
    kind: str
    body: str
    request_id: str
    queue_depth: int


@dataclass(frozen=True, slots=True, kw_only=True)
class FeedAck(Event):
    """What the broker did with a record (broker to device). Protocol version 4.

    *result* is ``stored`` (committed to the database: the agent forgets it),
    ``duplicate`` (stored before: forget it too), ``rejected`` (refused for
    good, *reason* says why: forget it, and log it) or ``retry`` (the broker
    cannot store now: send it again later). *reason* is ``""`` when stored.
    """

    TYPE: ClassVar[str] = "feed_ack"
    LIMITS: ClassVar[Mapping[str, FieldLimit]] = {
        "record_id": _ID_LIMIT,
        "result": FieldLimit(
            max_chars=16, pattern=re.compile(r"stored|duplicate|rejected|retry")
        ),
        "reason": FieldLimit(max_chars=32, pattern=re.compile(r"(?:[a-z][a-z0-9_]*)?")),
    }
    SINCE_VERSION: ClassVar[int] = 4
    record_id: str
    result: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class FeedStatus(Event):
    """The agent's queue (device to broker). Protocol version 4.

    Sent when the channel opens and whenever the queue has drained.
    *queue_depth* counts the records waiting; *dropped* the records the agent
    ever had to drop or fold because its queue was full, a running total kept
    in its queue file (daily statistics first, never an alarm without a
    trace: see docs/instrument-integration.md).
    """

    TYPE: ClassVar[str] = "feed_status"
    SINCE_VERSION: ClassVar[int] = 4
    queue_depth: int
    dropped: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DataRequest(Event):
    """A user asks for request-only data (broker to device). Protocol version 4.

    Attributes:
        request_id: The request's id (32 lowercase hex); the answer is a
            :class:`FeedRecord` with this ``request_id``.
        kind: ``configuration`` or ``consumables``.
        requested_by: The user who asked.
        requester_role: How to present them on the device (role, organisation).
        reason: Why they ask, as typed (may be empty).
    """

    TYPE: ClassVar[str] = "data_request"
    LIMITS: ClassVar[Mapping[str, FieldLimit]] = {
        "request_id": _ID_LIMIT,
        "kind": _CODE_LIMIT,
        "requested_by": FieldLimit(max_chars=64),
        "requester_role": FieldLimit(max_chars=64),
        "reason": FieldLimit(max_chars=200),
    }
    SINCE_VERSION: ClassVar[int] = 4
    request_id: str
    kind: str
    requested_by: str
    requester_role: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DataRequestRefused(Event):
    """The device will not answer a data request (device to broker). Version 4.

    *reason* is a code (``kind_disabled``, ``no_requester``, ``too_soon``,
    ``no_data``, ``unavailable``, ...); *detail* a short text.
    """

    TYPE: ClassVar[str] = "data_request_refused"
    LIMITS: ClassVar[Mapping[str, FieldLimit]] = {
        "request_id": _ID_LIMIT,
        "reason": _CODE_LIMIT,
        "detail": FieldLimit(max_chars=200),
    }
    SINCE_VERSION: ClassVar[int] = 4
    request_id: str
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class ConnectionLost(Event):
    """Pseudo-event: the transport closed (``receive_message(None)``)."""

    TYPE: ClassVar[str] = "connection_lost"


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()

_EVENT_TYPES: Final[dict[str, type[Event]]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Welcome,
        Heartbeat,
        HeartbeatAck,
        Offer,
        OfferWithTunnel,
        OfferWithdrawn,
        SessionEnd,
        Grant,
        Deny,
        SessionEnded,
        EndReceiptAck,
        RenewRequest,
        RenewResult,
        RenewRefused,
        RenewalAdvised,
        FeedRecord,
        FeedAck,
        FeedStatus,
        DataRequest,
        DataRequestRefused,
    )
}

_TRANSITIONS: Final[dict[tuple[State, type[Event]], State]] = {
    (State.AWAIT_HELLO, Hello): State.AWAIT_WELCOME,
    (State.AWAIT_WELCOME, Welcome): State.OPEN,
    (State.OPEN, Heartbeat): State.OPEN,
    (State.OPEN, HeartbeatAck): State.OPEN,
    (State.OPEN, Offer): State.OPEN,
    (State.OPEN, OfferWithTunnel): State.OPEN,
    (State.OPEN, OfferWithdrawn): State.OPEN,
    (State.OPEN, SessionEnd): State.OPEN,
    (State.OPEN, Grant): State.OPEN,
    (State.OPEN, Deny): State.OPEN,
    (State.OPEN, SessionEnded): State.OPEN,
    (State.OPEN, EndReceiptAck): State.OPEN,
    (State.OPEN, RenewRequest): State.OPEN,
    (State.OPEN, RenewResult): State.OPEN,
    (State.OPEN, RenewRefused): State.OPEN,
    (State.OPEN, RenewalAdvised): State.OPEN,
    (State.OPEN, FeedRecord): State.OPEN,
    (State.OPEN, FeedAck): State.OPEN,
    (State.OPEN, FeedStatus): State.OPEN,
    (State.OPEN, DataRequest): State.OPEN,
    (State.OPEN, DataRequestRefused): State.OPEN,
}

_SENDER: Final[dict[type[Event], Role]] = {
    Hello: Role.DEVICE,
    Welcome: Role.BROKER,
    Heartbeat: Role.DEVICE,
    HeartbeatAck: Role.BROKER,
    Offer: Role.BROKER,
    OfferWithTunnel: Role.BROKER,
    OfferWithdrawn: Role.BROKER,
    SessionEnd: Role.BROKER,
    Grant: Role.DEVICE,
    Deny: Role.DEVICE,
    SessionEnded: Role.DEVICE,
    EndReceiptAck: Role.BROKER,
    RenewRequest: Role.DEVICE,
    RenewResult: Role.BROKER,
    RenewRefused: Role.BROKER,
    RenewalAdvised: Role.BROKER,
    FeedRecord: Role.DEVICE,
    FeedAck: Role.BROKER,
    FeedStatus: Role.DEVICE,
    DataRequest: Role.BROKER,
    DataRequestRefused: Role.DEVICE,
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
        _check_field(cls, name, annotation, body[name])
    # JSON arrays arrive as lists; events hold tuples (frozen, hashable).
    return cls(
        **{
            name: tuple(value) if isinstance(value, list) else value
            for name, value in body.items()
        }
    )


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
        _check_field(type(event), item.name, item.type, getattr(event, item.name))


def _check_field(
    cls: type[Event], name: str, annotation: object, value: object
) -> None:
    limit = cls.LIMITS.get(name, _DEFAULT_LIMIT)
    # Annotations are strings (from __future__ import annotations).
    if annotation == "int":
        ok = (
            isinstance(value, int)
            and not isinstance(value, bool)
            and limit.min_int <= value <= limit.max_int
        )
    elif annotation == "float":
        # Every float field is an interval: positive and finite.
        ok = (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and 0 < value < _MAX_INT
        )
    elif annotation == "str":
        ok = _is_text(value, limit)
    elif annotation == "tuple[str, ...]":
        # A list from JSON, a tuple from an event we send.
        ok = (
            isinstance(value, list | tuple)
            and limit.min_items <= len(value) <= limit.max_items
            and all(_is_text(item, limit) for item in value)
        )
    else:  # pragma: no cover - every field type is listed above
        ok = False
    if not ok:
        raise RemoteProtocolError(f"{cls.TYPE}.{name}: bad value {_shorten(value)}")


def _is_text(value: object, limit: FieldLimit) -> bool:
    # The length first: a pattern never runs on more than max_chars characters.
    return (
        isinstance(value, str)
        and len(value) <= limit.max_chars
        and _is_utf8(value)
        and (limit.pattern is None or limit.pattern.fullmatch(value) is not None)
    )


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
        #: The channel's protocol version: the lower of the hello's and the
        #: welcome's, None until both passed (see "Versions").
        self.version: int | None = None
        self._hello_version: int | None = None
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
        if event.SINCE_VERSION > 1 and (
            self.version is None or self.version < event.SINCE_VERSION
        ):
            # Version 1 peers refuse unknown types: never send one to them.
            raise LocalProtocolError(
                f"{event.TYPE} needs protocol version {event.SINCE_VERSION}, "
                f"the channel speaks {self.version}"
            )
        if isinstance(event, Hello):
            self._hello_version = event.version
        elif isinstance(event, Welcome) and self._hello_version is not None:
            self.version = min(self._hello_version, event.version)
        self.state = new_state
