"""Errors and the immutable records that the relay store hands out."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from relay.proto.feed import Record

# The roles a user can have; anything else is refused before it reaches the database.
USER_ROLES: Final = frozenset({"engineer", "auditor", "admin", "customer"})
#: The most labels one device may carry, and groups one user may be in: policies
#: match on a handful; hundreds would be a mistake (or an attack on the listing).
MAX_DEVICE_LABELS: Final = 32
MAX_USER_GROUPS: Final = 32


class StoreError(Exception):
    """The store could not do what was asked.

    Raised as is for database failures (unreachable, locked for too long, disk full,
    constraint violated); the subclasses name the refusals that callers act on.
    """


class UnknownDevice(StoreError):
    """No device with this id was ever enrolled."""


class DeviceRevoked(StoreError):
    """The device is revoked, and a revoked device id is never enrolled again."""


class DeviceAlreadyEnrolled(StoreError):
    """The device already has a certificate, and this caller may only add new ones."""


class UnknownUser(StoreError):
    """No user with this name exists."""


class UserExists(StoreError):
    """A user with this name exists already."""


class UserDisabled(StoreError):
    """The user is disabled, and a disabled user gets no new login session."""


class TotpSecretChanged(StoreError):
    """The user's TOTP secret was reset after the login's code was checked."""


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    """What the broker needs to know about a presented device certificate.

    Attributes:
        serial_hex: The certificate serial, lowercase hex without leading zeros.
        device_id: The device the certificate was issued to.
        fingerprint_sha256: SHA-256 of the DER certificate, lowercase hex.
        not_after: End of validity, aware UTC.
        revoked: The certificate *or its device* is revoked; either way the
            handshake must be refused.
        superseded: The device has since used a newer certificate (a
            renewal); the handshake must be refused too, with its own reason.
        issued_at: When the CA signed it, aware UTC.
    """

    serial_hex: str
    device_id: str
    fingerprint_sha256: str
    not_after: datetime
    revoked: bool
    superseded: bool = False
    issued_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class PresenceRow:
    """One connected device, as a broker node reports it.

    Attributes:
        device_id: The connected device.
        node_id: The broker node that holds its control channel.
        connected_since: When that control channel was established, aware UTC.
        last_seen: When the node last heard from the device, aware UTC.
        agent_version: The agent version the device announced (informational).
        peer: The device's remote address as the node saw it (informational).
    """

    device_id: str
    node_id: str
    connected_since: datetime
    last_seen: datetime
    agent_version: str
    peer: str


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """One enrolled device, as ``relay device list`` shows it.

    Attributes:
        device_id: The device id from its certificate.
        enrolled_at: Issue time of its first recorded certificate, aware UTC.
        revoked_at: When it was revoked, or ``None``.
        online: A presence row exists, is fresh enough, and the device is not
            revoked.
        presence: The presence row, even when stale or revoked, or ``None``.
        labels: The device's labels, key to value (empty when it has none).
    """

    device_id: str
    enrolled_at: datetime
    revoked_at: datetime | None
    online: bool
    presence: PresenceRow | None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Revocation:
    """One revoked certificate: the broker closes the device's live connections.

    Attributes:
        device_id: The revoked device.
        serial_hex: The revoked certificate serial.
    """

    device_id: str
    serial_hex: str


@dataclass(frozen=True, slots=True)
class UserRecord:
    """One user account.

    Attributes:
        username: The login name.
        role: One of :data:`USER_ROLES`.
        password_hash: The password hash (argon2id), as the auth layer wrote it.
        totp_secret_sealed: The TOTP secret, sealed by the auth layer; the store
            cannot open it.
        totp_last_step: The newest accepted TOTP time step, or ``None`` when no
            code was accepted since the secret was set.
        created_at: When the user was added, aware UTC.
        disabled_at: When the user was disabled, or ``None``.
        can_enroll: The enroll permission as stored: an engineer may enroll
            devices over the API only when it is true. Admins may always enroll
            whatever it says, and auditors never (the store refuses to set it
            for them).
        groups: The user's groups, which access policies match engineers by.
        organisation: A customer's organisation (it sees the devices labelled
            ``customer=<organisation>``); ``None`` for every other role.
    """

    username: str
    role: str
    password_hash: str
    totp_secret_sealed: str
    totp_last_step: int | None
    created_at: datetime
    disabled_at: datetime | None
    can_enroll: bool = False
    groups: frozenset[str] = frozenset()
    organisation: str | None = None


@dataclass(frozen=True, slots=True)
class LoginSessionRecord:
    """One login session, found by the hash of its bearer token.

    Attributes:
        token_hash: SHA-256 of the bearer token, 64 lowercase hex digits.
        username: The user who logged in.
        created_at: Login time, aware UTC.
        last_used_at: When the token was last used, aware UTC.
        revoked_at: When it was revoked (logout, user disabled, TOTP reset), or
            ``None`` while it is live.
        source: The client address at login (informational).
    """

    token_hash: str
    username: str
    created_at: datetime
    last_used_at: datetime
    revoked_at: datetime | None
    source: str


@dataclass(frozen=True, slots=True)
class SessionRevocation:
    """One revoked login session: the broker closes its live WebSockets.

    Attributes:
        token_hash: The revoked session's token hash.
        username: The user it belonged to.
    """

    token_hash: str
    username: str


class PolicySubjectKind(StrEnum):
    """What a :class:`PolicySubjectChange` changed."""

    DEVICE_LABELS = "device_labels"
    USER_GROUPS = "user_groups"


@dataclass(frozen=True, slots=True)
class PolicySubjectChange:
    """One change of what access policies match on: a broker re-reads the subject.

    Attributes:
        kind: Whose attributes changed: a device's labels or a user's groups.
        subject: The device id or the username.
        id: The feed id; pass the last one handled as the next cursor.
    """

    kind: PolicySubjectKind
    subject: str
    id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RemoteSessionRecord:
    """One remote session as the store knows it (see ``remote_sessions``)."""

    session_id: str
    node_id: str
    device_id: str
    engineer: str
    reason: str
    channels: tuple[str, ...]
    source: str
    device_fingerprint: str
    requested_at: datetime
    start_seq: int
    granted_at: datetime | None = None
    decided_by: str | None = None
    granted_channels: tuple[str, ...] | None = None
    max_seconds: int | None = None
    ended_at: datetime | None = None
    end_reason: str | None = None
    bytes_to_device: int = 0
    bytes_from_device: int = 0
    recordings: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The auditor API's view of the row."""
        duration = None
        if self.granted_at is not None and self.ended_at is not None:
            duration = round((self.ended_at - self.granted_at).total_seconds(), 3)
        return {
            "session_id": self.session_id,
            "device_id": self.device_id,
            "engineer": self.engineer,
            "reason": self.reason,
            "channels": list(self.channels),
            "source": self.source,
            "device_fingerprint": self.device_fingerprint,
            "requested_at": self.requested_at.isoformat(),
            "granted_at": _iso(self.granted_at),
            "decided_by": self.decided_by,
            "granted_channels": (
                None if self.granted_channels is None else list(self.granted_channels)
            ),
            "max_seconds": self.max_seconds,
            "ended_at": _iso(self.ended_at),
            "end_reason": self.end_reason,
            "duration_s": duration,
            "bytes_to_device": self.bytes_to_device,
            "bytes_from_device": self.bytes_from_device,
            "recordings": [dict(r) for r in self.recordings],
        }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


@dataclass(frozen=True, slots=True)
class FeedRow:
    """One stored monitoring record (see :mod:`relay.proto.feed`).

    Attributes:
        record_id: The agent's idempotency key.
        device_id: The instrument it came from.
        kind: ``alarm``, ``daily_stats``, ``configuration`` or ``consumables``.
        received_at: When the broker stored it, aware UTC.
        device_time: The instrument's own time of the record, aware UTC.
        body: The record in its canonical JSON form (``relay.proto.feed.to_json``).
        request_id: The data request it answers, or ``None``.
        severity: An alarm's severity, else ``None``.
        code: An alarm's code, else ``None``.
    """

    record_id: str
    device_id: str
    kind: str
    received_at: datetime
    device_time: datetime
    body: dict[str, Any]
    request_id: str | None = None
    severity: str | None = None
    code: str | None = None


#: How a data request can stand.
DATA_REQUEST_STATUSES: Final = ("pending", "answered", "refused", "lapsed")


@dataclass(frozen=True, slots=True)
class DataRequestRow:
    """A user's request for request-only data and how it ended.

    Attributes:
        request_id: 32 lowercase hex.
        device_id: The instrument asked.
        kind: ``configuration`` or ``consumables``.
        requested_by: The user who asked.
        reason: Why, as typed (may be empty).
        requested_at: When, aware UTC.
        status: One of :data:`DATA_REQUEST_STATUSES`.
        finished_at: When it was answered, refused or lapsed.
        refusal: The device's reason code when refused.
        record_id: The answering record when answered.
    """

    request_id: str
    device_id: str
    kind: str
    requested_by: str
    reason: str
    requested_at: datetime
    status: str
    finished_at: datetime | None = None
    refusal: str | None = None
    record_id: str | None = None


class UnknownDataRequest(StoreError):
    """A record names a data request this device was not asked (or of another kind)."""


@dataclass(frozen=True, slots=True)
class NewFeedRecord:
    """A record as ``Store.add_feed_records`` takes it (already checked)."""

    device_id: str
    record: Record
    record_id: str
    received_at: datetime
