"""Errors and the immutable records that the relay store hands out."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


class StoreError(Exception):
    """The store could not do what was asked.

    Raised as is for database failures (unreachable, locked for too long, disk full,
    constraint violated); the subclasses name the refusals that callers act on.
    """


class UnknownDevice(StoreError):
    """No device with this id was ever enrolled."""


class DeviceRevoked(StoreError):
    """The device is revoked, and a revoked device id is never enrolled again."""


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
    """

    serial_hex: str
    device_id: str
    fingerprint_sha256: str
    not_after: datetime
    revoked: bool


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
    """

    device_id: str
    enrolled_at: datetime
    revoked_at: datetime | None
    online: bool
    presence: PresenceRow | None


@dataclass(frozen=True, slots=True)
class Revocation:
    """One revoked certificate: the broker closes the device's live connections.

    Attributes:
        device_id: The revoked device.
        serial_hex: The revoked certificate serial.
    """

    device_id: str
    serial_hex: str
