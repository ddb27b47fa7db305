"""Table definitions of the relay store (SQLAlchemy Core, no ORM).

These objects are what the queries in :mod:`relay.store._store` are written against.
They never create anything: the schema is created and changed only by the Alembic
migrations in ``migrations/versions``, and a test compares the two so they cannot
drift apart.

The same definitions serve SQLite (the embedded default) and PostgreSQL (several
broker nodes), so only portable types are used:

- Timestamps are :class:`UTCDateTime`: ``TIMESTAMP WITH TIME ZONE`` on PostgreSQL, a
  text column on SQLite, always UTC-aware in Python.
- Certificate serials are hex strings, because RFC 5280 §4.1.2.2 allows serials of up
  to 20 octets (159 bits once the sign bit is excluded), more than any SQL integer.
- TOTP time steps are ``BIGINT``: a step is Unix time / 30, which outgrows nothing
  soon, but a 32-bit column would be a needless limit.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)

# Explicit constraint names, so that PostgreSQL and SQLite end up with the same names
# and a later migration can drop or alter a constraint by name on both.
NAMING_CONVENTION: Final[dict[str, str]] = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

DEVICE_ID_LENGTH: Final = 64
SERIAL_HEX_LENGTH: Final = 64
FINGERPRINT_LENGTH: Final = 64
REASON_LENGTH: Final = 200
NODE_ID_LENGTH: Final = 64
AGENT_VERSION_LENGTH: Final = 64
PEER_LENGTH: Final = 100
USERNAME_LENGTH: Final = 64
ROLE_LENGTH: Final = 16
PASSWORD_HASH_LENGTH: Final = 200
SEALED_SECRET_LENGTH: Final = 200
TOKEN_HASH_LENGTH: Final = 64
ORGANISATION_LENGTH: Final = 128
RECORD_ID_LENGTH: Final = 32
FEED_KIND_LENGTH: Final = 16
ALARM_CODE_LENGTH: Final = 32
REQUEST_STATUS_LENGTH: Final = 16
REQUEST_REASON_LENGTH: Final = 200
REFUSAL_LENGTH: Final = 32
SOURCE_LENGTH: Final = 100
SESSION_ID_LENGTH: Final = 64
SESSION_REASON_LENGTH: Final = 500
CHANNELS_LENGTH: Final = 400
END_REASON_LENGTH: Final = 32
# policies.model.LABEL_KEY, LABEL_VALUE and GROUP_NAME bound these; the store
# checks values against those patterns before writing.
LABEL_KEY_LENGTH: Final = 63
LABEL_VALUE_LENGTH: Final = 128
GROUP_NAME_LENGTH: Final = 63
SUBJECT_KIND_LENGTH: Final = 16
SUBJECT_LENGTH: Final = max(DEVICE_ID_LENGTH, USERNAME_LENGTH)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp that is stored and returned in UTC.

    SQLite has no timestamp type: SQLAlchemy stores the wall-clock digits as text and
    drops the offset, so a ``+02:00`` value written as-is would be read back two
    hours off. Binding therefore converts to UTC first, and reading attaches UTC to
    the naive value SQLite returns. On PostgreSQL (``timestamptz``) the same code
    only normalises the returned offset to UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(
        self, value: datetime | None, dialect: Dialect
    ) -> datetime | None:
        """Convert an aware timestamp to UTC before it is written.

        Args:
            value: The timestamp to write, or ``None`` for SQL NULL.
            dialect: The dialect in use (unused).

        Returns:
            The same instant in UTC, or ``None``.

        Raises:
            ValueError: *value* is naive; its instant would be a guess.
        """
        if value is None:
            return None
        if value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}; pass a timezone-aware one")
        return value.astimezone(UTC)

    def process_result_value(
        self, value: datetime | None, dialect: Dialect
    ) -> datetime | None:
        """Return a stored timestamp as an aware UTC datetime.

        Args:
            value: The value read: naive UTC on SQLite, aware on PostgreSQL.
            dialect: The dialect in use (unused).

        Returns:
            The timestamp with ``tzinfo=UTC``, or ``None``.
        """
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


metadata: Final = MetaData(naming_convention=NAMING_CONVENTION)

devices: Final = Table(
    "devices",
    metadata,
    Column("device_id", String(DEVICE_ID_LENGTH), primary_key=True),
    Column("enrolled_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True),
    Column("revoked_reason", String(REASON_LENGTH), nullable=True),
)

certificates: Final = Table(
    "certificates",
    metadata,
    Column("serial_hex", String(SERIAL_HEX_LENGTH), primary_key=True),
    Column(
        "device_id",
        String(DEVICE_ID_LENGTH),
        ForeignKey("devices.device_id"),
        nullable=False,
        index=True,
    ),
    Column(
        "fingerprint_sha256", String(FINGERPRINT_LENGTH), nullable=False, unique=True
    ),
    Column("not_before", UTCDateTime(), nullable=False),
    Column("not_after", UTCDateTime(), nullable=False),
    Column("issued_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True),
    # Set when the device first used a newer certificate (a renewal); refused at
    # the handshake from then on. Not a revocation: not in revocation_events.
    Column("superseded_at", UTCDateTime(), nullable=True),
)

# Append-only. The id is the broker's poll cursor, so it must never be reused:
# sqlite_autoincrement makes SQLite use AUTOINCREMENT (ids strictly increase even if
# the newest row were ever deleted); PostgreSQL ignores the flag and uses a sequence.
revocation_events: Final = Table(
    "revocation_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("device_id", String(DEVICE_ID_LENGTH), nullable=False),
    Column("serial_hex", String(SERIAL_HEX_LENGTH), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=False),
    sqlite_autoincrement=True,
)

# A mirror of the brokers' in-memory presence, for other processes (``relay device
# list``). There is deliberately no foreign key to devices: a mirror write must never
# fail because of a device row, and list_devices joins from devices anyway.
device_presence: Final = Table(
    "device_presence",
    metadata,
    Column("device_id", String(DEVICE_ID_LENGTH), primary_key=True),
    Column("node_id", String(NODE_ID_LENGTH), nullable=False, index=True),
    Column("connected_since", UTCDateTime(), nullable=False),
    Column("last_seen", UTCDateTime(), nullable=False),
    Column("agent_version", String(AGENT_VERSION_LENGTH), nullable=False),
    Column("peer", String(PEER_LENGTH), nullable=False),
)

# Engineer, auditor and admin accounts. The store never sees a plain password or TOTP
# secret: password_hash is an argon2id string and totp_secret_sealed is the secret
# encrypted by the auth layer with a key kept outside the database. totp_last_step
# is the newest accepted TOTP time step; a code of that step or an older one is never
# accepted again (see Store.accept_totp_step). can_enroll lets an engineer enroll
# devices over the API (admins always may, auditors never); permissions_changed_at
# is when it last changed.
users: Final = Table(
    "users",
    metadata,
    Column("username", String(USERNAME_LENGTH), primary_key=True),
    Column("role", String(ROLE_LENGTH), nullable=False),
    Column("password_hash", String(PASSWORD_HASH_LENGTH), nullable=False),
    Column("totp_secret_sealed", String(SEALED_SECRET_LENGTH), nullable=False),
    Column("totp_last_step", BigInteger, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("disabled_at", UTCDateTime(), nullable=True),
    Column("password_changed_at", UTCDateTime(), nullable=False),
    Column("can_enroll", Boolean, nullable=False, server_default=false()),
    Column("permissions_changed_at", UTCDateTime(), nullable=True),
    # A customer's organisation: it sees the devices labelled customer=<this>.
    Column("organisation", String(ORGANISATION_LENGTH), nullable=True),
)

# One row per login. The key is the SHA-256 of the bearer token: the token itself is
# never stored, so a copy of the database lets nobody in.
login_sessions: Final = Table(
    "login_sessions",
    metadata,
    Column("token_hash", String(TOKEN_HASH_LENGTH), primary_key=True),
    Column(
        "username",
        String(USERNAME_LENGTH),
        ForeignKey("users.username"),
        nullable=False,
        index=True,
    ),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("last_used_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True),
    Column("revoked_reason", String(REASON_LENGTH), nullable=True),
    Column("source", String(SOURCE_LENGTH), nullable=False),
)

# Append-only, like revocation_events: every broker node polls it to close the live
# WebSockets of revoked login sessions, so the id must never be reused.
login_session_revocations: Final = Table(
    "login_session_revocations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("token_hash", String(TOKEN_HASH_LENGTH), nullable=False),
    Column("username", String(USERNAME_LENGTH), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=False),
    sqlite_autoincrement=True,
)


# One row per remote session, from the request to its end: the index of the audit
# log for auditors (the log is the evidence; this finds it). ``node_id`` says which
# broker held the session, so that a restarted node closes only its own as
# ``broker_crash``. ``channels``, ``granted_channels`` and ``recordings`` are JSON
# text. ``start_seq`` is the audit seq before the session's first record: reading
# the log for its timeline starts there.
remote_sessions: Final = Table(
    "remote_sessions",
    metadata,
    Column("session_id", String(SESSION_ID_LENGTH), primary_key=True),
    Column("node_id", String(NODE_ID_LENGTH), nullable=False, index=True),
    Column("device_id", String(DEVICE_ID_LENGTH), nullable=False, index=True),
    Column("engineer", String(USERNAME_LENGTH), nullable=False, index=True),
    Column("reason", String(SESSION_REASON_LENGTH), nullable=False),
    Column("channels", String(CHANNELS_LENGTH), nullable=False),
    Column("source", String(SOURCE_LENGTH), nullable=False),
    Column("device_fingerprint", String(FINGERPRINT_LENGTH), nullable=False),
    Column("requested_at", UTCDateTime(), nullable=False, index=True),
    Column("start_seq", BigInteger, nullable=False),
    Column("granted_at", UTCDateTime(), nullable=True),
    Column("decided_by", String(USERNAME_LENGTH), nullable=True),
    Column("granted_channels", String(CHANNELS_LENGTH), nullable=True),
    Column("max_seconds", Integer, nullable=True),
    Column("ended_at", UTCDateTime(), nullable=True),
    Column("end_reason", String(END_REASON_LENGTH), nullable=True, index=True),
    Column("bytes_to_device", BigInteger, nullable=False, server_default="0"),
    Column("bytes_from_device", BigInteger, nullable=False, server_default="0"),
    Column("recordings", Text, nullable=True),
)


# What access policies match on: labels of devices (customer, site, model ...)
# and groups of users. Devices are never deleted today; should that change, their
# labels go with them.
device_labels: Final = Table(
    "device_labels",
    metadata,
    Column(
        "device_id",
        String(DEVICE_ID_LENGTH),
        ForeignKey("devices.device_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("key", String(LABEL_KEY_LENGTH), primary_key=True),
    Column("value", String(LABEL_VALUE_LENGTH), nullable=False),
)

user_groups: Final = Table(
    "user_groups",
    metadata,
    Column(
        "username",
        String(USERNAME_LENGTH),
        ForeignKey("users.username"),
        primary_key=True,
    ),
    Column("group_name", String(GROUP_NAME_LENGTH), primary_key=True),
)

# Append-only, like revocation_events: one row per change of a device's labels
# (kind "device_labels", subject the device id) or a user's groups (kind
# "user_groups", subject the username), so that a broker notices a change the CLI
# made in another process and judges that subject afresh. The id is the cursor.
policy_subject_changes: Final = Table(
    "policy_subject_changes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(SUBJECT_KIND_LENGTH), nullable=False),
    Column("subject", String(SUBJECT_LENGTH), nullable=False),
    Column("changed_at", UTCDateTime(), nullable=False),
    sqlite_autoincrement=True,
)


# The monitoring feed (docs/monitoring.md): one row per record an instrument
# delivered, keyed by its own id for the broker; (device_id, record_id) is the
# agent's idempotency key, unique, so a record sent again after a lost ack is
# dropped by the database itself. body is the canonical JSON
# (relay.proto.feed.to_json); severity, code and day are copies of body fields
# that lists filter on.
feed_records: Final = Table(
    "feed_records",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("device_id", String(DEVICE_ID_LENGTH), nullable=False),
    Column("record_id", String(RECORD_ID_LENGTH), nullable=False),
    Column("kind", String(FEED_KIND_LENGTH), nullable=False),
    Column("received_at", UTCDateTime(), nullable=False, index=True),
    Column("device_time", UTCDateTime(), nullable=False),
    Column("severity", String(FEED_KIND_LENGTH), nullable=True),
    Column("code", String(ALARM_CODE_LENGTH), nullable=True),
    Column("request_id", String(RECORD_ID_LENGTH), nullable=True),
    Column("body", Text, nullable=False),
    UniqueConstraint("device_id", "record_id", name="uq_feed_records_device_record"),
    Index("ix_feed_records_device_kind_time", "device_id", "kind", "device_time"),
    sqlite_autoincrement=True,
)

# A user's request for request-only data (configuration, consumables): made,
# then answered by a record, refused by the device, or lapsed unanswered.
data_requests: Final = Table(
    "data_requests",
    metadata,
    Column("request_id", String(RECORD_ID_LENGTH), primary_key=True),
    Column("device_id", String(DEVICE_ID_LENGTH), nullable=False),
    Column("kind", String(FEED_KIND_LENGTH), nullable=False),
    Column("requested_by", String(USERNAME_LENGTH), nullable=False),
    Column("reason", String(REQUEST_REASON_LENGTH), nullable=False),
    Column("requested_at", UTCDateTime(), nullable=False),
    Column("status", String(REQUEST_STATUS_LENGTH), nullable=False),
    Column("finished_at", UTCDateTime(), nullable=True),
    Column("refusal", String(REFUSAL_LENGTH), nullable=True),
    Column("record_id", String(RECORD_ID_LENGTH), nullable=True),
    Index("ix_data_requests_device_time", "device_id", "requested_at"),
)
