"""The relay store: devices, certificates, revocations, a presence mirror, users.

Theory of operation
===================
The Store is the only code that touches the relay database. It is synchronous on
purpose: the trio shells call each method through ``trio.to_thread.run_sync``, and the
data plane never waits on it. A Store holds nothing but an Engine (thread-safe, with
its own connection pool), so one Store serves every worker thread of the broker, and
another process (the ``relay device revoke`` CLI) opens its own Store on the same
database file.

Rule 1: every public method runs in exactly one short transaction (``_transaction``)
        that is committed or rolled back before the method returns.
Rule 2: a method that writes declares it up front (``write=True``). On SQLite that
        starts the transaction with ``BEGIN IMMEDIATE``: a deferred transaction that
        reads and then writes fails at once with "database is locked" when another
        connection wrote in between (WAL mode cannot upgrade a stale snapshot, and
        the busy timeout does not apply), whereas ``BEGIN IMMEDIATE`` waits up to
        ``SQLITE_BUSY_TIMEOUT_MS`` for the single writer lock. On PostgreSQL the rows
        that decide a write are read with ``SELECT ... FOR UPDATE``.
Rule 3: timestamps go in and come out as aware UTC datetimes (``UTCDateTime``);
        naive ones are refused with ValueError before any SQL runs.
Rule 4: database failures surface as StoreError, never as SQLAlchemy or driver
        exceptions, so the shells have a single exception type to handle.
Rule 5: the schema changes only through the Alembic migrations (``migrate()``).

The revocation feeds: ``revoke_device`` appends one ``revocation_events`` row per
certificate, and each broker polls ``revocations_after(cursor)`` to close the live
connections of revoked devices. Likewise every path that revokes login sessions
(logout, ``revoke_user_sessions``, ``disable_user``, ``reset_totp``) appends to
``login_session_revocations``, polled with ``session_revocations_after(cursor)`` to
close engineers' WebSockets. A feed is only correct if ids become visible in
increasing order. SQLite has a single writer, so they do. On PostgreSQL a sequence
hands out ids at INSERT time but transactions commit in any order, so a poller could
move its cursor past an id whose transaction commits later; the writers therefore
take an EXCLUSIVE lock on the feed table (readers are not blocked) so that event
writers commit one after the other. Revocations are rare, so this costs nothing.

Users and login sessions: the store keeps password hashes, sealed TOTP secrets and
SHA-256 hashes of bearer tokens, never a plain password, secret or token. TOTP
replay is refused by ``accept_totp_step``, one conditional UPDATE that lets exactly
one of several racing logins with the same code win.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Row,
    Table,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry

from policies.model import LABEL_VALUE

from ._feed import Feed
from ._labels import (
    Labels,
    add_new_user_groups,
    check_group_names,
    groups_by_user,
    labels_by_device,
    note_user_change,
)
from ._records import (
    MAX_USER_GROUPS,
    USER_ROLES,
    CertificateRecord,
    DeviceAlreadyEnrolled,
    DeviceRecord,
    DeviceRevoked,
    LoginSessionRecord,
    PresenceRow,
    Revocation,
    SessionRevocation,
    StoreError,
    TotpSecretChanged,
    UnknownDevice,
    UnknownUser,
    UserDisabled,
    UserExists,
    UserRecord,
)
from ._remote_sessions import RemoteSessions
from ._schema import (
    AGENT_VERSION_LENGTH,
    DEVICE_ID_LENGTH,
    NODE_ID_LENGTH,
    PASSWORD_HASH_LENGTH,
    PEER_LENGTH,
    REASON_LENGTH,
    SEALED_SECRET_LENGTH,
    SERIAL_HEX_LENGTH,
    SOURCE_LENGTH,
    TOKEN_HASH_LENGTH,
    USERNAME_LENGTH,
    certificates,
    device_presence,
    devices,
    login_session_revocations,
    login_sessions,
    revocation_events,
    users,
)

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"
#: The newest revision in ``migrations/versions``; a database there needs no
#: migration. tests/relay/store holds it equal to Alembic's own head.
SCHEMA_HEAD: Final = "0007"

# How long a SQLite writer waits for the file's single write lock before giving up
# with "database is locked". Transactions here last milliseconds; 5 s covers a CLI
# write racing the broker with a wide margin.
SQLITE_BUSY_TIMEOUT_MS: Final = 5000

# Execution option carried by the writer engine; the SQLite "begin" hook reads it.
_WRITER_OPTION: Final = "relay_store_writer"

# Rows deleted per statement in remove_presence. SQLite before 3.32 allows at most
# 999 bound parameters per statement; 500 stays well under on every engine.
_DELETE_CHUNK: Final = 500

# PostgreSQL advisory lock id that serialises migrations ("relay" in ASCII).
_MIGRATION_LOCK_KEY: Final = 0x72656C6179

_HEX: Final = re.compile(r"[0-9a-fA-F]+")

# The revoked_reason of the sessions that reset_totp revokes.
_TOTP_RESET_REASON: Final = "TOTP secret reset"

# What get_user and list_users read: everything but password_changed_at and
# permissions_changed_at.
_USER_COLUMNS: Final = (
    users.c.username,
    users.c.role,
    users.c.password_hash,
    users.c.totp_secret_sealed,
    users.c.totp_last_step,
    users.c.created_at,
    users.c.disabled_at,
    users.c.can_enroll,
    users.c.organisation,
)

# The roles that may never hold the enroll permission: auditors watch
# enrollments, they do not make them; customers only look at their instruments.
_NEVER_ENROLLS: Final = frozenset({"auditor", "customer"})


class Store(RemoteSessions, Labels, Feed):
    """Devices, certificates, the revocation feeds, presence, users and sessions.

    Thread safety:
        Every method may be called from any thread, concurrently. The Store holds
        only an Engine; each call checks a connection out of the pool for one
        transaction and returns it.

    Supported databases:
        SQLite files (``sqlite:////abs/path/relay.sqlite3``, driver ``pysqlite``)
        and PostgreSQL. In-memory SQLite is refused: every pooled connection would
        see its own empty database.
    """

    def __init__(self, url: str) -> None:
        """Create the engine; nothing is connected or migrated yet.

        Args:
            url: SQLAlchemy database URL.

        Raises:
            ValueError: The URL names an in-memory SQLite database or a SQLite
                driver other than the standard library's.
        """
        parsed = make_url(url)
        connect_args: dict[str, Any] = {}
        if parsed.get_backend_name() == "sqlite":
            if parsed.get_driver_name() != "pysqlite":
                raise ValueError(f"unsupported SQLite driver in {url!r}")
            if _sqlite_file(url) is None:
                raise ValueError(f"in-memory SQLite is not supported: {url!r}")
            # The pool hands connections to whichever worker thread asks; sqlite3's
            # same-thread check would refuse that, though it is safe because a
            # connection is only ever used by one thread at a time.
            connect_args["check_same_thread"] = False
        # pool_pre_ping replaces connections that a PostgreSQL restart has cut.
        self._engine: Final = create_engine(
            parsed, connect_args=connect_args, pool_pre_ping=True
        )
        if self._engine.dialect.name == "sqlite":
            event.listen(self._engine, "connect", _sqlite_on_connect)
            event.listen(self._engine, "begin", _sqlite_on_begin)
        self._writer: Final = self._engine.execution_options(**{_WRITER_OPTION: True})

    @classmethod
    def open(cls, url: str) -> Store:
        """Open the database at *url* and bring its schema to the newest version.

        For a SQLite file, its directory is created first (mode 0700, so other
        local users cannot read device ids or presence); an existing directory is
        left as it is.

        Args:
            url: SQLAlchemy database URL.

        Returns:
            A migrated Store; the caller must :meth:`close` it.

        Raises:
            StoreError: The database could not be opened or migrated.
            ValueError: See :meth:`__init__`.
        """
        sqlite_path = _sqlite_file(url)
        if sqlite_path is not None:
            try:
                sqlite_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create {sqlite_path.parent}: {exc}") from exc
        store = cls(url)
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
        return store

    def migrate(self) -> None:
        """Apply every pending Alembic migration (``upgrade head``), in one transaction.

        Safe to run concurrently from several processes (broker nodes starting
        together, or a CLI next to the broker): on SQLite the transaction holds the
        write lock from its start, on PostgreSQL it first takes a transaction-level
        advisory lock, and a migration that finds the schema at head does nothing.

        Raises:
            StoreError: The migration failed, or the database carries a schema
                revision this version of the relay does not know (it was written
                by a newer relay).
        """
        if self._schema_at_head():
            return
        # Alembic takes a third of a second to import, and every CLI command
        # opens the store: it is loaded only when there is something to do.
        from alembic import command
        from alembic.config import Config
        from alembic.util import CommandError

        config = Config()
        # ConfigParser interpolates "%", which a directory name may contain.
        config.set_main_option(
            "script_location", str(MIGRATIONS_DIR).replace("%", "%%")
        )
        try:
            with self._transaction(write=True) as connection:
                if connection.dialect.name == "postgresql":
                    # Without it, two nodes migrating an empty database would both
                    # CREATE TABLE and one would fail on the duplicate.
                    connection.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"),
                        {"key": _MIGRATION_LOCK_KEY},
                    )
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
        except CommandError as exc:
            raise StoreError(f"cannot migrate the database: {exc}") from exc

    def _schema_at_head(self) -> bool:
        """Whether the database already carries :data:`SCHEMA_HEAD`.

        Asked in a write transaction, as the upgrade would be: a database whose
        write lock another process holds fails here as it did before the
        shortcut ("database is locked"), so ``relay serve`` still refuses to
        start on a store it cannot write. No version table yet, or another
        revision, answers False, and the Alembic upgrade decides.

        Raises:
            StoreError: The database cannot be reached, opened or locked.
        """
        with self._transaction(write=True) as connection:
            if not inspect(connection).has_table("alembic_version"):
                return False
            versions = connection.execute(
                text("SELECT version_num FROM alembic_version")
            ).scalars()
            return list(versions) == [SCHEMA_HEAD]

    def close(self) -> None:
        """Close every pooled connection; the Store must not be used afterwards."""
        self._engine.dispose()

    def ping(self) -> None:
        """Check that the database answers (readiness probe).

        Not checked: that the schema is migrated, or that a write would succeed.

        Raises:
            StoreError: The database cannot be reached or opened.
        """
        with self._transaction(write=False) as connection:
            connection.execute(text("SELECT 1"))

    def record_enrollment(
        self,
        *,
        device_id: str,
        serial_hex: str,
        fingerprint_sha256: str,
        not_before: datetime,
        not_after: datetime,
        issued_at: datetime,
        new_device_only: bool = False,
    ) -> None:
        """Record a certificate issued to *device_id*, creating the device if new.

        The device's ``enrolled_at`` is the *issued_at* of its first certificate.
        Recording the same certificate again is a no-op, so a retried enrollment
        is harmless.

        Revoked device ids are never reused: once a device is revoked, no new
        certificate is recorded for it, and a replacement instrument must be
        enrolled under a new id. This keeps the audit trail of an id unambiguous.

        Args:
            device_id: The device id from the certificate subject.
            serial_hex: Certificate serial in hex; stored lowercase without leading
                zeros.
            fingerprint_sha256: SHA-256 of the DER certificate, 64 hex digits.
            not_before: Start of validity (aware).
            not_after: End of validity (aware).
            issued_at: When the CA signed it (aware).
            new_device_only: Refuse a device that already has a certificate
                (other than this very one): for callers that may enroll new
                instruments but not re-key existing ones.

        Raises:
            DeviceRevoked: *device_id* is revoked.
            DeviceAlreadyEnrolled: *new_device_only* and the device already has
                a certificate.
            StoreError: The serial is already recorded for a different certificate,
                the fingerprint is already recorded under another serial, or the
                database failed.
            ValueError: A malformed id, serial or fingerprint, or a naive datetime.
        """
        _check_text(device_id, "device_id", DEVICE_ID_LENGTH)
        serial = _canonical_serial(serial_hex)
        fingerprint = _canonical_fingerprint(fingerprint_sha256)
        for name, value in (
            ("not_before", not_before),
            ("not_after", not_after),
            ("issued_at", issued_at),
        ):
            _check_aware(value, name)
        with self._transaction(write=True) as connection:
            _upsert(
                connection,
                devices,
                [{"device_id": device_id, "enrolled_at": issued_at}],
                key="device_id",
                update_columns=(),
            )
            # FOR UPDATE (a no-op on SQLite, which already holds the write lock)
            # serialises this with a concurrent revoke_device on PostgreSQL, so a
            # certificate can never slip in after the revocation swept them.
            revoked_at = connection.execute(
                select(devices.c.revoked_at)
                .where(devices.c.device_id == device_id)
                .with_for_update()
            ).scalar_one()
            if revoked_at is not None:
                raise DeviceRevoked(f"device {device_id!r} is revoked")
            existing = connection.execute(
                select(
                    certificates.c.device_id, certificates.c.fingerprint_sha256
                ).where(certificates.c.serial_hex == serial)
            ).one_or_none()
            if existing is not None:
                if (
                    existing.device_id == device_id
                    and existing.fingerprint_sha256 == fingerprint
                ):
                    return
                raise StoreError(
                    f"certificate serial {serial} is already recorded for another certificate"
                )
            if (
                new_device_only
                and connection.execute(
                    select(certificates.c.serial_hex)
                    .where(certificates.c.device_id == device_id)
                    .limit(1)
                ).first()
            ):
                # The device row is locked above, so of two racing first
                # enrollments the second sees the first's certificate here.
                raise DeviceAlreadyEnrolled(f"device {device_id!r} is already enrolled")
            connection.execute(
                insert(certificates).values(
                    serial_hex=serial,
                    device_id=device_id,
                    fingerprint_sha256=fingerprint,
                    not_before=not_before,
                    not_after=not_after,
                    issued_at=issued_at,
                    revoked_at=None,
                )
            )

    def lookup_certificate(self, serial_hex: str) -> CertificateRecord | None:
        """Find a certificate by serial, with its effective revocation status.

        Args:
            serial_hex: Certificate serial in hex (any case, leading zeros allowed).

        Returns:
            The record, or ``None`` if this serial was never recorded (the caller
            should refuse such a certificate: the store did not see it issued).

        Raises:
            StoreError: The database failed.
            ValueError: *serial_hex* is not a hex serial.
        """
        serial = _canonical_serial(serial_hex)
        with self._transaction(write=False) as connection:
            row = connection.execute(
                select(
                    certificates.c.serial_hex,
                    certificates.c.device_id,
                    certificates.c.fingerprint_sha256,
                    certificates.c.not_after,
                    certificates.c.revoked_at,
                    certificates.c.superseded_at,
                    certificates.c.issued_at,
                    devices.c.revoked_at.label("device_revoked_at"),
                )
                .join(devices, devices.c.device_id == certificates.c.device_id)
                .where(certificates.c.serial_hex == serial)
            ).one_or_none()
        if row is None:
            return None
        return CertificateRecord(
            serial_hex=row.serial_hex,
            device_id=row.device_id,
            fingerprint_sha256=row.fingerprint_sha256,
            not_after=row.not_after,
            revoked=row.revoked_at is not None or row.device_revoked_at is not None,
            superseded=row.superseded_at is not None,
            issued_at=row.issued_at,
        )

    def supersede_older_certificates(
        self, device_id: str, serial_hex: str, *, at: datetime
    ) -> list[str]:
        """Mark *device_id*'s certificates issued before *serial_hex* superseded.

        Called when the device authenticated with *serial_hex*: every older
        certificate of the device that is neither revoked nor superseded yet is
        refused from now on. Only older ones: a device that renewed, lost the
        new files in a crash and came back with its previous certificate does
        not lose the new one (it can still finish the swap).

        Returns:
            The serials marked by this call, oldest first (``[]`` when none).

        Raises:
            StoreError: The database failed.
            ValueError: A malformed id or serial, or a naive *at*.
        """
        _check_text(device_id, "device_id", DEVICE_ID_LENGTH)
        serial = _canonical_serial(serial_hex)
        _check_aware(at, "at")
        # A read first: almost every connect finds nothing to supersede, and
        # must not take the database's write lock for that.
        if not self._older_live_certificates(device_id, serial, write=False):
            return []
        return self._older_live_certificates(device_id, serial, write=True, at=at)

    def _older_live_certificates(
        self, device_id: str, serial: str, *, write: bool, at: datetime | None = None
    ) -> list[str]:
        """The device's live certificates older than *serial*; marked when *write*."""
        with self._transaction(write=write) as connection:
            issued_at = connection.execute(
                select(certificates.c.issued_at).where(
                    certificates.c.serial_hex == serial,
                    certificates.c.device_id == device_id,
                )
            ).scalar_one_or_none()
            if issued_at is None:
                return []
            older = (
                certificates.c.device_id == device_id,
                certificates.c.serial_hex != serial,
                certificates.c.issued_at < issued_at,
                certificates.c.revoked_at.is_(None),
                certificates.c.superseded_at.is_(None),
            )
            serials = list(
                connection.execute(
                    select(certificates.c.serial_hex)
                    .where(*older)
                    .order_by(certificates.c.issued_at, certificates.c.serial_hex)
                ).scalars()
            )
            if serials and write:
                connection.execute(
                    update(certificates).where(*older).values(superseded_at=at)
                )
        return serials

    def newest_certificate_issued_at(self, device_id: str) -> datetime | None:
        """When the newest certificate of *device_id* was issued, or ``None``.

        The renewal rate limit reads it, so the limit holds across broker
        nodes and restarts.

        Raises:
            StoreError: The database failed.
        """
        _check_text(device_id, "device_id", DEVICE_ID_LENGTH)
        with self._transaction(write=False) as connection:
            newest: datetime | None = connection.execute(
                select(func.max(certificates.c.issued_at)).where(
                    certificates.c.device_id == device_id
                )
            ).scalar_one()
        return newest

    def revoke_device(
        self, device_id: str, *, at: datetime, reason: str
    ) -> list[Revocation]:
        """Revoke a device and every certificate of it not revoked yet.

        Idempotent: revoking a revoked device keeps the first ``revoked_at`` and
        reason and returns ``[]``.

        Args:
            device_id: The device to revoke.
            at: Time of revocation (aware).
            reason: Why, for operators; at most 200 characters.

        Returns:
            One :class:`Revocation` per certificate revoked by this call, oldest
            certificate first; each is also appended to the revocation feed.

        Raises:
            UnknownDevice: *device_id* was never enrolled.
            StoreError: The database failed.
            ValueError: *reason* is too long, or *at* is naive.
        """
        _check_text(device_id, "device_id", DEVICE_ID_LENGTH)
        _check_aware(at, "at")
        if len(reason) > REASON_LENGTH:
            raise ValueError(f"reason is longer than {REASON_LENGTH} characters")
        with self._transaction(write=True) as connection:
            if connection.dialect.name == "postgresql":
                # See "The revocation feed" at the top of this module.
                connection.execute(
                    text("LOCK TABLE revocation_events IN EXCLUSIVE MODE")
                )
            device_revoked_at = connection.execute(
                select(devices.c.revoked_at)
                .where(devices.c.device_id == device_id)
                .with_for_update()
            ).one_or_none()
            if device_revoked_at is None:
                raise UnknownDevice(f"no device {device_id!r}")
            if device_revoked_at.revoked_at is None:
                connection.execute(
                    update(devices)
                    .where(devices.c.device_id == device_id)
                    .values(revoked_at=at, revoked_reason=reason)
                )
            # Swept even when the device was already revoked: record_enrollment
            # refuses revoked devices, so this normally finds nothing, but if a
            # certificate ever got in it is revoked here rather than left live.
            live = (
                certificates.c.device_id == device_id,
                certificates.c.revoked_at.is_(None),
            )
            serials = list(
                connection.execute(
                    select(certificates.c.serial_hex)
                    .where(*live)
                    .order_by(certificates.c.issued_at, certificates.c.serial_hex)
                ).scalars()
            )
            if not serials:
                return []
            connection.execute(update(certificates).where(*live).values(revoked_at=at))
            connection.execute(
                insert(revocation_events),
                [
                    {"device_id": device_id, "serial_hex": s, "revoked_at": at}
                    for s in serials
                ],
            )
        return [Revocation(device_id=device_id, serial_hex=s) for s in serials]

    def revocations_after(
        self, cursor: int, *, limit: int = 1000
    ) -> tuple[list[Revocation], int]:
        """Read the revocation feed after *cursor*.

        Args:
            cursor: The last event id already handled (``0`` for the beginning).
            limit: At most this many events are returned; call again with the new
                cursor to read on.

        Returns:
            The events with an id greater than *cursor*, oldest first, and the
            cursor to pass next time (*cursor* itself when there are none).

        Raises:
            StoreError: The database failed.
            ValueError: *cursor* is negative or *limit* is not positive.
        """
        rows, new_cursor = self._read_feed(
            revocation_events,
            (revocation_events.c.device_id, revocation_events.c.serial_hex),
            cursor,
            limit,
        )
        return [
            Revocation(device_id=r.device_id, serial_hex=r.serial_hex) for r in rows
        ], new_cursor

    def _read_feed(
        self,
        table: Table,
        columns: tuple[ColumnElement[Any], ...],
        cursor: int,
        limit: int,
    ) -> tuple[Sequence[Row[Any]], int]:
        """Rows of an append-only feed with ``id > cursor``, oldest first, and the next cursor.

        Raises:
            StoreError: The database failed.
            ValueError: *cursor* is negative or *limit* is not positive.
        """
        if cursor < 0:
            raise ValueError("cursor must not be negative")
        if limit <= 0:
            raise ValueError("limit must be positive")
        with self._transaction(write=False) as connection:
            rows = connection.execute(
                select(table.c.id, *columns)
                .where(table.c.id > cursor)
                .order_by(table.c.id)
                .limit(limit)
            ).all()
        return rows, (rows[-1].id if rows else cursor)

    def revocation_cursor(self) -> int:
        """Return the id of the newest revocation event, or ``0`` if there is none.

        A starting broker polls from here: it checks every new handshake against
        the store itself, and has no live connections yet, so older events do not
        concern it.

        Raises:
            StoreError: The database failed.
        """
        with self._transaction(write=False) as connection:
            newest = connection.execute(
                select(func.coalesce(func.max(revocation_events.c.id), 0))
            ).scalar_one()
        return int(newest)

    def list_devices(
        self, *, now: datetime, stale_after: timedelta
    ) -> list[DeviceRecord]:
        """List every enrolled device with its presence, ordered by device id.

        Args:
            now: The current time (aware), to judge presence freshness.
            stale_after: A presence row whose ``last_seen`` is older than this is
                shown but not counted as online (its broker node may have died
                without clearing it).

        Returns:
            One record per device, with its labels. ``online`` needs a presence
            row with ``now - last_seen <= stale_after`` and a device that is not
            revoked.

        Raises:
            StoreError: The database failed.
            ValueError: *now* is naive.
        """
        _check_aware(now, "now")
        p = device_presence.c
        with self._transaction(write=False) as connection:
            rows = connection.execute(
                select(
                    devices.c.device_id,
                    devices.c.enrolled_at,
                    devices.c.revoked_at,
                    p.node_id,
                    p.connected_since,
                    p.last_seen,
                    p.agent_version,
                    p.peer,
                )
                .select_from(
                    devices.outerjoin(
                        device_presence, p.device_id == devices.c.device_id
                    )
                )
                .order_by(devices.c.device_id)
            ).all()
            labels = labels_by_device(connection)
        records = []
        for row in rows:
            presence = None
            if row.node_id is not None:
                presence = PresenceRow(
                    device_id=row.device_id,
                    node_id=row.node_id,
                    connected_since=row.connected_since,
                    last_seen=row.last_seen,
                    agent_version=row.agent_version,
                    peer=row.peer,
                )
            online = (
                presence is not None
                and row.revoked_at is None
                and now - presence.last_seen <= stale_after
            )
            records.append(
                DeviceRecord(
                    device_id=row.device_id,
                    enrolled_at=row.enrolled_at,
                    revoked_at=row.revoked_at,
                    online=online,
                    presence=presence,
                    labels=labels.get(row.device_id, {}),
                )
            )
        return records

    def replace_presence(self, node_id: str, rows: Sequence[PresenceRow]) -> None:
        """Write the presence of devices connected to broker node *node_id*.

        Each row is upserted by device id, so a device that moved to this node
        takes its row over. A row is only overwritten by a connection at least as
        new as the stored one: a node that has not yet noticed that its device
        reconnected elsewhere cannot overwrite the newer node's row. Devices
        missing from *rows* are left alone (see :meth:`remove_presence`).

        ``agent_version`` and ``peer`` come from the device and are informational;
        they are cut to their column size instead of failing the whole batch.

        Args:
            node_id: This broker node.
            rows: The devices to record; each must carry *node_id*.

        Raises:
            StoreError: The database failed.
            ValueError: A row names another node, or a datetime is naive.
        """
        _check_text(node_id, "node_id", NODE_ID_LENGTH)
        values = []
        for row in rows:
            if row.node_id != node_id:
                raise ValueError(
                    f"presence row of {row.device_id!r} names node {row.node_id!r}"
                )
            _check_text(row.device_id, "device_id", DEVICE_ID_LENGTH)
            _check_aware(row.connected_since, "connected_since")
            _check_aware(row.last_seen, "last_seen")
            values.append(
                {
                    "device_id": row.device_id,
                    "node_id": node_id,
                    "connected_since": row.connected_since,
                    "last_seen": row.last_seen,
                    "agent_version": row.agent_version[:AGENT_VERSION_LENGTH],
                    "peer": row.peer[:PEER_LENGTH],
                }
            )
        if not values:
            return
        with self._transaction(write=True) as connection:
            _upsert(
                connection,
                device_presence,
                values,
                key="device_id",
                update_columns=(
                    "node_id",
                    "connected_since",
                    "last_seen",
                    "agent_version",
                    "peer",
                ),
                keep_newer="connected_since",
            )

    def remove_presence(self, node_id: str, device_ids: Sequence[str]) -> None:
        """Delete the presence rows of *device_ids*, where *node_id* still owns them.

        Example: device D reconnects to node B before node A notices its old
        connection died. When A finally removes D, B's row must survive, so the
        delete matches the node as well as the device.

        Args:
            node_id: The broker node whose devices disconnected.
            device_ids: The disconnected devices.

        Raises:
            StoreError: The database failed.
        """
        if not device_ids:
            return
        ids = list(device_ids)
        with self._transaction(write=True) as connection:
            for start in range(0, len(ids), _DELETE_CHUNK):
                connection.execute(
                    delete(device_presence).where(
                        device_presence.c.node_id == node_id,
                        device_presence.c.device_id.in_(
                            ids[start : start + _DELETE_CHUNK]
                        ),
                    )
                )

    def clear_presence(self, node_id: str) -> None:
        """Delete every presence row of broker node *node_id*.

        Called when the node starts (rows left by a crash are stale) and when it
        stops cleanly.

        Raises:
            StoreError: The database failed.
        """
        with self._transaction(write=True) as connection:
            connection.execute(
                delete(device_presence).where(device_presence.c.node_id == node_id)
            )

    # Users and login sessions

    def add_user(
        self,
        *,
        username: str,
        role: str,
        password_hash: str,
        totp_secret_sealed: str,
        at: datetime,
        can_enroll: bool = False,
        groups: Collection[str] = (),
        organisation: str | None = None,
    ) -> None:
        """Add a user; no TOTP step is accepted yet and no session exists.

        Args:
            username: The login name, 1 to 64 characters.
            role: One of :data:`USER_ROLES`.
            password_hash: The password hash made by the auth layer.
            totp_secret_sealed: The TOTP secret, sealed by the auth layer.
            at: Creation time (aware); also the password change time.
            can_enroll: The enroll permission (see :class:`UserRecord`).
            groups: The user's first groups, written in the same transaction
                (and fed to the policy subject change feed when not empty).
            organisation: A customer's organisation (required for a
                customer, refused for every other role).

        Raises:
            UserExists: *username* is taken (also when that user is disabled).
            StoreError: The database failed.
            ValueError: A bad role, an empty or over-long field, a naive *at*,
                *can_enroll* for an auditor, or a malformed group name or more
                than :data:`MAX_USER_GROUPS` groups.
        """
        _check_text(username, "username", USERNAME_LENGTH)
        _check_role(role)
        _check_can_enroll(role, can_enroll)
        _check_organisation(role, organisation)
        _check_text(password_hash, "password_hash", PASSWORD_HASH_LENGTH)
        _check_text(totp_secret_sealed, "totp_secret_sealed", SEALED_SECRET_LENGTH)
        _check_aware(at, "at")
        first_groups = check_group_names(groups, "groups")
        if len(first_groups) > MAX_USER_GROUPS:
            raise ValueError(
                f"{len(first_groups)} groups; a user is in at most {MAX_USER_GROUPS}"
            )
        with self._transaction(write=True) as connection:
            # No SELECT first: the primary key decides, so two concurrent adds of
            # one name on PostgreSQL also end in exactly one UserExists. All other
            # constraints are checked above, so a violation here is the key.
            try:
                connection.execute(
                    insert(users).values(
                        username=username,
                        role=role,
                        password_hash=password_hash,
                        totp_secret_sealed=totp_secret_sealed,
                        totp_last_step=None,
                        created_at=at,
                        disabled_at=None,
                        password_changed_at=at,
                        can_enroll=can_enroll,
                        permissions_changed_at=None,
                        organisation=organisation,
                    )
                )
            except IntegrityError as exc:
                raise UserExists(f"user {username!r} exists already") from exc
            add_new_user_groups(connection, username, first_groups, at=at)

    def get_user(self, username: str) -> UserRecord | None:
        """Find a user by name.

        Returns:
            The user, disabled or not, or ``None`` if there is no such user.

        Raises:
            StoreError: The database failed.
        """
        with self._transaction(write=False) as connection:
            row = connection.execute(
                select(*_USER_COLUMNS).where(users.c.username == username)
            ).one_or_none()
            if row is None:
                return None
            groups = groups_by_user(connection, username)
        return _user_record(row, groups.get(username, frozenset()))

    def list_users(self) -> list[UserRecord]:
        """List every user, disabled ones included, ordered by username.

        Raises:
            StoreError: The database failed.
        """
        with self._transaction(write=False) as connection:
            rows = connection.execute(
                select(*_USER_COLUMNS).order_by(users.c.username)
            ).all()
            groups = groups_by_user(connection)
        return [
            _user_record(row, groups.get(row.username, frozenset())) for row in rows
        ]

    def set_user_organisation(
        self, username: str, organisation: str, *, at: datetime
    ) -> None:
        """Move a customer to another organisation.

        The change reaches running brokers through the policy subject feed
        (kind ``user_groups``), as a group change does, so what the customer
        sees follows at once.

        Raises:
            UnknownUser: No such user.
            ValueError: The user is not a customer, or a malformed organisation.
            StoreError: The database failed.
        """
        _check_aware(at, "at")
        with self._transaction(write=True) as connection:
            note_user_change(connection, username, at)  # the feed lock first
            row = connection.execute(
                select(users.c.role).where(users.c.username == username)
            ).one_or_none()
            if row is None:
                raise UnknownUser(f"no user {username!r}")
            _check_organisation(row.role, organisation)
            connection.execute(
                update(users)
                .where(users.c.username == username)
                .values(organisation=organisation, permissions_changed_at=at)
            )

    def set_user_can_enroll(
        self, username: str, allowed: bool, *, at: datetime
    ) -> bool:
        """Grant or withdraw a user's enroll permission.

        Takes effect at once: the enrollment route reads the flag on every
        request. ``permissions_changed_at`` becomes *at* when the flag changes;
        setting the value it already has writes nothing.

        Args:
            username: The user.
            allowed: The new value.
            at: Time of the change (aware).

        Returns:
            The previous value.

        Raises:
            UnknownUser: There is no such user.
            StoreError: The database failed.
            ValueError: *allowed* is true and the user is an auditor (checked on
                the locked row, so it holds against a concurrent change), or
                *at* is naive.
        """
        if not isinstance(allowed, bool):
            raise ValueError(f"allowed must be a bool, got {allowed!r}")
        _check_aware(at, "at")
        with self._transaction(write=True) as connection:
            row = _lock_user_row(connection, username, users.c.role, users.c.can_enroll)
            _check_can_enroll(row.role, allowed)
            previous = bool(row.can_enroll)
            if previous != allowed:
                connection.execute(
                    update(users)
                    .where(users.c.username == username)
                    .values(can_enroll=allowed, permissions_changed_at=at)
                )
        return previous

    def disable_user(self, username: str, *, at: datetime, reason: str) -> list[str]:
        """Disable a user and revoke all its live login sessions, in one transaction.

        Idempotent: disabling a disabled user keeps the first ``disabled_at``.
        A disabled user is refused new sessions (:meth:`create_login_session`)
        and TOTP steps (:meth:`accept_totp_step`).

        Args:
            username: The user to disable.
            at: Time of disabling (aware).
            reason: Why, for operators; recorded on each revoked session; at most
                200 characters.

        Returns:
            The token hashes of the sessions revoked by this call, oldest first;
            each is also appended to the session revocation feed.

        Raises:
            UnknownUser: There is no such user.
            StoreError: The database failed.
            ValueError: *reason* is too long, or *at* is naive.
        """
        _check_aware(at, "at")
        _check_reason(reason)
        with self._transaction(write=True) as connection:
            _lock_session_feed(connection)
            disabled_at = _lock_user(connection, username, users.c.disabled_at)
            if disabled_at is None:
                connection.execute(
                    update(users)
                    .where(users.c.username == username)
                    .values(disabled_at=at)
                )
            return _revoke_sessions(
                connection, login_sessions.c.username == username, at=at, reason=reason
            )

    def reset_totp(
        self, username: str, *, totp_secret_sealed: str, at: datetime
    ) -> list[str]:
        """Give a user a new TOTP secret, and revoke all its live login sessions.

        The accepted step is cleared, since steps of the old secret say nothing
        about the new one.

        Args:
            username: The user.
            totp_secret_sealed: The new secret, sealed by the auth layer.
            at: Time of the reset (aware).

        Returns:
            The token hashes of the sessions revoked by this call, oldest first;
            each is also appended to the session revocation feed.

        Raises:
            UnknownUser: There is no such user.
            StoreError: The database failed.
            ValueError: An empty or over-long secret, or a naive *at*.
        """
        _check_text(totp_secret_sealed, "totp_secret_sealed", SEALED_SECRET_LENGTH)
        _check_aware(at, "at")
        with self._transaction(write=True) as connection:
            _lock_session_feed(connection)
            _lock_user(connection, username, users.c.username)
            connection.execute(
                update(users)
                .where(users.c.username == username)
                .values(totp_secret_sealed=totp_secret_sealed, totp_last_step=None)
            )
            return _revoke_sessions(
                connection,
                login_sessions.c.username == username,
                at=at,
                reason=_TOTP_RESET_REASON,
            )

    def accept_totp_step(
        self, username: str, step: int, *, totp_secret_sealed: str
    ) -> bool:
        """Record TOTP time step *step* as used, if it is newer than the last one.

        The compare-and-set is a single UPDATE, so of several logins racing with
        the same code exactly one gets ``True``, on SQLite and PostgreSQL alike.
        A code of the last accepted step or an older one is refused: no reuse.

        Args:
            username: The user whose code was verified.
            step: The time step of the verified code (Unix time // 30).
            totp_secret_sealed: The sealed secret the code was verified with. A
                :meth:`reset_totp` since then changed it, and the step of an old
                secret's code is not recorded against the new one.

        Returns:
            ``True`` if the step was accepted; ``False`` if it is not newer than
            the last accepted step, the secret has changed, or the user is
            disabled or does not exist.

        Raises:
            StoreError: The database failed.
            ValueError: *step* is not an integer from 0 to 2**63 - 1.
        """
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"step must be an int, got {step!r}")
        if not 0 <= step < 2**63:
            raise ValueError(f"step must be from 0 to 2**63 - 1, got {step}")
        with self._transaction(write=True) as connection:
            result = connection.execute(
                update(users)
                .where(
                    users.c.username == username,
                    users.c.disabled_at.is_(None),
                    users.c.totp_secret_sealed == totp_secret_sealed,
                    or_(
                        users.c.totp_last_step.is_(None),
                        users.c.totp_last_step < step,
                    ),
                )
                .values(totp_last_step=step)
            )
            return result.rowcount == 1

    def create_login_session(
        self,
        *,
        token_hash: str,
        username: str,
        at: datetime,
        source: str,
        totp_secret_sealed: str,
    ) -> None:
        """Record a new login session of *username*.

        The user is checked in the same transaction, so a session can never be
        created for a user that :meth:`disable_user` has just disabled, nor from
        a code of a TOTP secret that :meth:`reset_totp` has just replaced (the
        reset revokes the sessions it finds; this one would have come after).

        Args:
            token_hash: SHA-256 of the bearer token, 64 hex digits (stored
                lowercase).
            username: The user who logged in.
            at: Login time (aware); also the first ``last_used_at``.
            source: The client address; informational, cut to 100 characters.
            totp_secret_sealed: The sealed secret the login's code was verified
                with.

        Raises:
            UnknownUser: There is no such user.
            UserDisabled: The user is disabled.
            TotpSecretChanged: The user's TOTP secret is no longer
                *totp_secret_sealed*.
            StoreError: The token hash is already recorded, or the database failed.
            ValueError: A malformed token hash, or a naive *at*.
        """
        digest = _canonical_token_hash(token_hash)
        _check_aware(at, "at")
        with self._transaction(write=True) as connection:
            row = _lock_user_row(
                connection, username, users.c.disabled_at, users.c.totp_secret_sealed
            )
            if row.disabled_at is not None:
                raise UserDisabled(f"user {username!r} is disabled")
            if row.totp_secret_sealed != totp_secret_sealed:
                raise TotpSecretChanged(f"user {username!r} has a new TOTP secret")
            connection.execute(
                insert(login_sessions).values(
                    token_hash=digest,
                    username=username,
                    created_at=at,
                    last_used_at=at,
                    revoked_at=None,
                    revoked_reason=None,
                    source=source[:SOURCE_LENGTH],
                )
            )

    def get_login_session(self, token_hash: str) -> LoginSessionRecord | None:
        """Find a login session, live or revoked, by its token hash.

        Idle and absolute expiry are the caller's to judge from ``created_at`` and
        ``last_used_at``; the store only records revocation.

        Returns:
            The session, or ``None`` if this hash was never recorded.

        Raises:
            StoreError: The database failed.
            ValueError: *token_hash* is not 64 hex digits.
        """
        digest = _canonical_token_hash(token_hash)
        s = login_sessions.c
        with self._transaction(write=False) as connection:
            row = connection.execute(
                select(
                    s.token_hash,
                    s.username,
                    s.created_at,
                    s.last_used_at,
                    s.revoked_at,
                    s.source,
                ).where(s.token_hash == digest)
            ).one_or_none()
        if row is None:
            return None
        return LoginSessionRecord(
            token_hash=row.token_hash,
            username=row.username,
            created_at=row.created_at,
            last_used_at=row.last_used_at,
            revoked_at=row.revoked_at,
            source=row.source,
        )

    def touch_login_session(self, token_hash: str, *, at: datetime) -> None:
        """Move a live session's ``last_used_at`` forward to *at*.

        A revoked or unknown session is left alone, and so is one already used
        at or after *at* (concurrent requests cannot move it back).

        Raises:
            StoreError: The database failed.
            ValueError: A malformed token hash, or a naive *at*.
        """
        digest = _canonical_token_hash(token_hash)
        _check_aware(at, "at")
        s = login_sessions.c
        with self._transaction(write=True) as connection:
            connection.execute(
                update(login_sessions)
                .where(
                    s.token_hash == digest,
                    s.revoked_at.is_(None),
                    s.last_used_at < at,
                )
                .values(last_used_at=at)
            )

    def revoke_login_session(
        self, token_hash: str, *, at: datetime, reason: str
    ) -> bool:
        """Revoke one login session (logout), and append it to the revocation feed.

        Args:
            token_hash: The session's token hash.
            at: Time of revocation (aware).
            reason: Why, for operators; at most 200 characters.

        Returns:
            ``True`` if the session was live; ``False`` if it was revoked already
            or never recorded (nothing is written then).

        Raises:
            StoreError: The database failed.
            ValueError: A malformed token hash, a too long *reason*, or a naive *at*.
        """
        digest = _canonical_token_hash(token_hash)
        _check_aware(at, "at")
        _check_reason(reason)
        with self._transaction(write=True) as connection:
            _lock_session_feed(connection)
            revoked = _revoke_sessions(
                connection, login_sessions.c.token_hash == digest, at=at, reason=reason
            )
        return bool(revoked)

    def revoke_user_sessions(
        self, username: str, *, at: datetime, reason: str
    ) -> list[str]:
        """Revoke every live login session of *username*; the user stays enabled.

        Args:
            username: The user.
            at: Time of revocation (aware).
            reason: Why, for operators; at most 200 characters.

        Returns:
            The token hashes revoked by this call, oldest session first; each is
            also appended to the session revocation feed.

        Raises:
            UnknownUser: There is no such user.
            StoreError: The database failed.
            ValueError: *reason* is too long, or *at* is naive.
        """
        _check_aware(at, "at")
        _check_reason(reason)
        with self._transaction(write=True) as connection:
            _lock_session_feed(connection)
            _lock_user(connection, username, users.c.username)
            return _revoke_sessions(
                connection, login_sessions.c.username == username, at=at, reason=reason
            )

    def session_revocations_after(
        self, cursor: int, *, limit: int = 1000
    ) -> tuple[list[SessionRevocation], int]:
        """Read the login session revocation feed after *cursor*.

        Every revocation path (logout, :meth:`revoke_user_sessions`,
        :meth:`disable_user`, :meth:`reset_totp`) appends to it, in any process;
        each broker polls it to close the WebSockets of revoked sessions.

        Args:
            cursor: The last event id already handled (``0`` for the beginning).
            limit: At most this many events are returned; call again with the new
                cursor to read on.

        Returns:
            The events with an id greater than *cursor*, oldest first, and the
            cursor to pass next time (*cursor* itself when there are none).

        Raises:
            StoreError: The database failed.
            ValueError: *cursor* is negative or *limit* is not positive.
        """
        r = login_session_revocations.c
        rows, new_cursor = self._read_feed(
            login_session_revocations, (r.token_hash, r.username), cursor, limit
        )
        events = [
            SessionRevocation(token_hash=row.token_hash, username=row.username)
            for row in rows
        ]
        return events, new_cursor

    def session_revocation_cursor(self) -> int:
        """Return the id of the newest session revocation event, or ``0``.

        A starting broker polls from here: it has no live WebSockets yet, and
        checks every request's session against the store itself.

        Raises:
            StoreError: The database failed.
        """
        with self._transaction(write=False) as connection:
            newest = connection.execute(
                select(func.coalesce(func.max(login_session_revocations.c.id), 0))
            ).scalar_one()
        return int(newest)

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Connection]:
        """Run one transaction, committed on success and rolled back on error.

        Args:
            write: The transaction will write; on SQLite it then takes the write
                lock at BEGIN (see Rule 2).

        Yields:
            The connection, inside the transaction.

        Raises:
            StoreError: Any database error, chained to the original. SQLAlchemy
                wraps driver errors, including those of the "connect" hook.
        """
        engine = self._writer if write else self._engine
        try:
            with engine.begin() as connection:
                yield connection
        except SQLAlchemyError as exc:
            # Show the driver's own message ("database is locked", "unable to open
            # database file"), not the SQL statement with its parameters.
            raise StoreError(str(getattr(exc, "orig", None) or exc)) from exc


def _sqlite_on_connect(
    dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry
) -> None:
    """Prepare a new SQLite connection for concurrent use by several processes.

    Args:
        dbapi_connection: The new ``sqlite3`` connection.
        record: The pool entry (unused).
    """
    connection = cast(sqlite3.Connection, dbapi_connection)
    # sqlite3's legacy transaction control sends no BEGIN before SELECT or DDL, which
    # breaks read-then-write transactions and transactional migrations. Switch it off;
    # _sqlite_on_begin sends BEGIN itself (SQLAlchemy's documented recipe).
    connection.isolation_level = None
    cursor = connection.cursor()
    try:
        # busy_timeout first: switching to WAL needs a lock another process may hold.
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS:d}")
        # WAL lets readers (relay device list, handshake lookups) run while the
        # broker or the CLI writes. It is a property of the file and persists.
        cursor.execute("PRAGMA journal_mode = WAL")
        # SQLite ignores foreign keys unless asked, PostgreSQL always enforces them.
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _sqlite_on_begin(connection: Connection) -> None:
    """Start a SQLite transaction, taking the write lock at once for writers.

    Args:
        connection: The connection whose transaction begins.
    """
    if connection.get_execution_options().get(_WRITER_OPTION, False):
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        connection.exec_driver_sql("BEGIN")


def _upsert(
    connection: Connection,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    *,
    key: str,
    update_columns: Sequence[str],
    keep_newer: str | None = None,
) -> None:
    """Insert *rows*, or update the existing row with the same *key*.

    The only dialect-specific statement of the store: ``INSERT ... ON CONFLICT``
    is spelled the same on SQLite (3.24+) and PostgreSQL (9.5+), but SQLAlchemy
    builds it from each dialect's own ``insert``.

    Args:
        connection: Connection inside a write transaction.
        table: The table.
        rows: Column values, one mapping per row.
        key: The primary-key column the conflict is detected on.
        update_columns: Columns overwritten on conflict; empty means the existing
            row is kept as is (``DO NOTHING``).
        keep_newer: If given, the existing row is only updated when the new value
            of this column is greater than or equal to the stored one.

    Raises:
        StoreError: The database is neither SQLite nor PostgreSQL.
    """
    name = connection.dialect.name
    # Both dialects spell upserts the same way (ON CONFLICT), from different
    # modules; pick the module, then build one statement. PostgreSQL's is
    # imported only when used: it costs every `relay` command 60 ms otherwise.
    dialect_insert: Any = None
    if name == "sqlite":
        dialect_insert = sqlite.insert
    elif name == "postgresql":
        from sqlalchemy.dialects import postgresql

        dialect_insert = postgresql.insert
    if dialect_insert is None:
        raise StoreError(f"unsupported database {name!r}: use SQLite or PostgreSQL")
    statement = dialect_insert(table)
    if not update_columns:
        connection.execute(statement.on_conflict_do_nothing(index_elements=[key]), rows)
        return
    excluded = statement.excluded
    connection.execute(
        statement.on_conflict_do_update(
            index_elements=[key],
            set_={column: excluded[column] for column in update_columns},
            where=None
            if keep_newer is None
            else table.c[keep_newer] <= excluded[keep_newer],
        ),
        rows,
    )


def _sqlite_file(url: str) -> Path | None:
    """Return the database file of a SQLite *url*, or ``None``.

    Args:
        url: SQLAlchemy database URL.

    Returns:
        The file path, or ``None`` for other databases and in-memory SQLite.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _check_aware(value: datetime, name: str) -> None:
    """Refuse a naive datetime, whose instant would be a guess.

    Raises:
        ValueError: *value* has no UTC offset.
    """
    if value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got {value!r}")


def _check_text(value: str, name: str, max_length: int) -> None:
    """Refuse an empty or over-long identifier.

    SQLite does not enforce ``VARCHAR(n)`` and PostgreSQL does, so the length is
    checked here to behave the same on both.

    Raises:
        ValueError: *value* is empty or longer than *max_length*.
    """
    if not value or len(value) > max_length:
        raise ValueError(f"{name} must be 1 to {max_length} characters, got {value!r}")


def _canonical_serial(serial_hex: str) -> str:
    """Return a certificate serial as lowercase hex without leading zeros.

    Example: ``"00AB12"`` and ``"ab12"`` are the same serial, and both are stored
    and looked up as ``"ab12"``, so formatting differences between callers cannot
    hide a revoked certificate.

    Raises:
        ValueError: *serial_hex* is not 1 to 64 hex digits.
    """
    if len(serial_hex) > SERIAL_HEX_LENGTH or not _HEX.fullmatch(serial_hex):
        raise ValueError(f"serial_hex must be 1 to {SERIAL_HEX_LENGTH} hex digits")
    return format(int(serial_hex, 16), "x")


def _canonical_fingerprint(fingerprint_sha256: str) -> str:
    """Return a SHA-256 fingerprint as 64 lowercase hex digits.

    Raises:
        ValueError: *fingerprint_sha256* is not 64 hex digits.
    """
    if len(fingerprint_sha256) != 64 or not _HEX.fullmatch(fingerprint_sha256):
        raise ValueError("fingerprint_sha256 must be 64 hex digits")
    return fingerprint_sha256.lower()


def _lock_session_feed(connection: Connection) -> None:
    """Serialise writers of the session revocation feed on PostgreSQL.

    Called first in every transaction that may append to
    ``login_session_revocations``, for the same reason as the lock on
    ``revocation_events`` (see "The revocation feeds" at the top of this module).
    Taking it before any row lock also gives every revoking transaction the same
    lock order, so they cannot deadlock. SQLite needs nothing: it has one writer.

    Args:
        connection: Connection inside a write transaction.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(
            text("LOCK TABLE login_session_revocations IN EXCLUSIVE MODE")
        )


def _lock_user(
    connection: Connection, username: str, column: ColumnElement[Any]
) -> Any:
    """Read one column of a user's row, locking the row on PostgreSQL.

    Returns:
        The column's value.

    Raises:
        UnknownUser: There is no such user.
    """
    return _lock_user_row(connection, username, column)[0]


def _lock_user_row(
    connection: Connection, username: str, *columns: ColumnElement[Any]
) -> Row[Any]:
    """Read columns of a user's row, locking the row on PostgreSQL.

    Args:
        connection: Connection inside a write transaction.
        username: The user.
        columns: Columns of ``users`` to read.

    Raises:
        UnknownUser: There is no such user.
    """
    row = connection.execute(
        select(*columns).where(users.c.username == username).with_for_update()
    ).one_or_none()
    if row is None:
        raise UnknownUser(f"no user {username!r}")
    return row


def _revoke_sessions(
    connection: Connection,
    condition: ColumnElement[bool],
    *,
    at: datetime,
    reason: str,
) -> list[str]:
    """Revoke the live login sessions matching *condition* and feed them out.

    Args:
        connection: Connection inside a write transaction that has called
            :func:`_lock_session_feed`.
        condition: A WHERE clause on ``login_sessions``.
        at: Time of revocation.
        reason: Recorded on each revoked session.

    Returns:
        The revoked token hashes, oldest session first.
    """
    s = login_sessions.c
    live = (condition, s.revoked_at.is_(None))
    rows = connection.execute(
        select(s.token_hash, s.username)
        .where(*live)
        .order_by(s.created_at, s.token_hash)
        .with_for_update()
    ).all()
    if not rows:
        return []
    connection.execute(
        update(login_sessions).where(*live).values(revoked_at=at, revoked_reason=reason)
    )
    connection.execute(
        insert(login_session_revocations),
        [
            {"token_hash": row.token_hash, "username": row.username, "revoked_at": at}
            for row in rows
        ],
    )
    return [row.token_hash for row in rows]


def _user_record(
    row: Row[*tuple[Any, ...]], groups: frozenset[str] = frozenset()
) -> UserRecord:
    """Build a UserRecord from a row selected with ``_USER_COLUMNS`` and its groups."""
    return UserRecord(
        username=row.username,
        role=row.role,
        password_hash=row.password_hash,
        totp_secret_sealed=row.totp_secret_sealed,
        totp_last_step=row.totp_last_step,
        created_at=row.created_at,
        disabled_at=row.disabled_at,
        can_enroll=bool(row.can_enroll),
        groups=groups,
        organisation=row.organisation,
    )


def _check_role(role: str) -> None:
    """Refuse a role that is not one of USER_ROLES.

    Raises:
        ValueError: *role* is unknown.
    """
    if role not in USER_ROLES:
        raise ValueError(f"role must be one of {sorted(USER_ROLES)}, got {role!r}")


def _check_organisation(role: str, organisation: str | None) -> None:
    """A customer belongs to one organisation; no other role has one.

    Raises:
        ValueError: A customer without an organisation, another role with
            one, or an organisation a device label could not hold.
    """
    if role == "customer" and organisation is None:
        raise ValueError("a customer needs an organisation (--organisation)")
    if role != "customer" and organisation is not None:
        raise ValueError("only customers belong to an organisation")
    if organisation is not None and not LABEL_VALUE.fullmatch(organisation):
        raise ValueError(
            f"organisation must match {LABEL_VALUE.pattern} "
            "(it is matched against the devices' customer label)"
        )


def _check_can_enroll(role: str, can_enroll: bool) -> None:
    """Refuse the enroll permission for a role that never enrolls.

    Raises:
        ValueError: *can_enroll* is true and *role* is auditor or customer.
    """
    if can_enroll and role in _NEVER_ENROLLS:
        raise ValueError(f"{role}s never enroll devices; can_enroll stays false")


def _check_reason(reason: str) -> None:
    """Refuse a reason longer than its column.

    Raises:
        ValueError: *reason* is longer than REASON_LENGTH.
    """
    if len(reason) > REASON_LENGTH:
        raise ValueError(f"reason is longer than {REASON_LENGTH} characters")


def _canonical_token_hash(token_hash: str) -> str:
    """Return a token hash (SHA-256) as 64 lowercase hex digits.

    Raises:
        ValueError: *token_hash* is not 64 hex digits.
    """
    if len(token_hash) != TOKEN_HASH_LENGTH or not _HEX.fullmatch(token_hash):
        raise ValueError(f"token_hash must be {TOKEN_HASH_LENGTH} hex digits")
    return token_hash.lower()
