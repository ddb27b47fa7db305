"""The relay store on real SQLite files: migrations, enrollment, revocation, presence."""

from __future__ import annotations

import hashlib
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from relay.store import (
    MIGRATIONS_DIR,
    CertificateRecord,
    DeviceRevoked,
    PresenceRow,
    Revocation,
    Store,
    StoreError,
    UnknownDevice,
)
from relay.store._schema import metadata
from relay.store._store import SCHEMA_HEAD
from tests.relay.store.conftest import sqlite_url

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
STALE_AFTER = timedelta(seconds=30)
TABLES = {"devices", "certificates", "revocation_events", "device_presence"}


def fingerprint(serial_hex: str) -> str:
    """A distinct, well-formed fingerprint for each serial."""
    return hashlib.sha256(serial_hex.encode()).hexdigest()


def enroll(
    store: Store, device_id: str, serial_hex: str, *, issued_at: datetime = T0
) -> None:
    """Record a one-year certificate *serial_hex* for *device_id*."""
    store.record_enrollment(
        device_id=device_id,
        serial_hex=serial_hex,
        fingerprint_sha256=fingerprint(serial_hex),
        not_before=issued_at,
        not_after=issued_at + timedelta(days=365),
        issued_at=issued_at,
    )


def presence(
    device_id: str,
    node_id: str = "node-a",
    *,
    connected_since: datetime = T0,
    last_seen: datetime = T0,
) -> PresenceRow:
    """A presence row with informational fields filled in."""
    return PresenceRow(
        device_id=device_id,
        node_id=node_id,
        connected_since=connected_since,
        last_seen=last_seen,
        agent_version="1.2.3",
        peer="192.0.2.10:50000",
    )


# Migrations


def test_open_creates_tables(store: Store, db_url: str) -> None:
    """Store.open migrates a new file: all four tables and Alembic's version table."""
    engine = create_engine(db_url)
    try:
        names = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert names >= {*TABLES, "alembic_version"}


def test_open_is_idempotent(db_url: str) -> None:
    """Opening a migrated database again migrates nothing and keeps the data."""
    first = Store.open(db_url)
    try:
        enroll(first, "dev-1", "0a")
    finally:
        first.close()
    second = Store.open(db_url)
    try:
        record = second.lookup_certificate("0a")
    finally:
        second.close()
    assert record is not None
    assert record.device_id == "dev-1"


def test_migrated_revision_is_head(store: Store, db_url: str) -> None:
    """After open, the database's Alembic revision is the newest migration."""
    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
    assert head is not None
    assert current == head
    # The shortcut that skips Alembic on an up-to-date database names the same head.
    assert head == SCHEMA_HEAD


def test_migrations_match_table_definitions(store: Store, db_url: str) -> None:
    """The schema the migrations build is exactly the one the queries are written for."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_database_from_a_newer_relay_is_refused(db_url: str) -> None:
    """A schema revision this relay does not know (a newer relay wrote it) is StoreError."""
    Store.open(db_url).close()
    engine = create_engine(db_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        engine.dispose()
    with pytest.raises(StoreError, match="9999"):
        Store.open(db_url)


def test_open_creates_private_directory(tmp_path: Path) -> None:
    """A SQLite file's missing directory is created readable by its owner only."""
    directory = tmp_path / "state"
    opened = Store.open(sqlite_url(directory / "relay.sqlite3"))
    opened.close()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_in_memory_sqlite_is_refused() -> None:
    """In-memory SQLite is refused: each pooled connection would see its own database."""
    with pytest.raises(ValueError, match="in-memory"):
        Store("sqlite://")


def test_unmigrated_database_raises_store_error(db_url: str) -> None:
    """A database failure (here: no tables) surfaces as StoreError, not SQLAlchemy's."""
    if db_url.startswith("sqlite:"):
        Path(db_url.removeprefix("sqlite:///")).parent.mkdir()
    bare = Store(db_url)
    try:
        with pytest.raises(StoreError, match=r"no such table|does not exist"):
            bare.lookup_certificate("a1")
    finally:
        bare.close()


# Enrollment and lookup


def test_enrollment_round_trip(store: Store) -> None:
    """A recorded certificate is found by serial, with its expiry as aware UTC."""
    plus_two = timezone(timedelta(hours=2))
    issued = datetime(2025, 3, 1, 14, 0, tzinfo=plus_two)
    store.record_enrollment(
        device_id="dev-1",
        serial_hex="7f3a",
        fingerprint_sha256=fingerprint("7f3a"),
        not_before=issued,
        not_after=issued + timedelta(days=365),
        issued_at=issued,
    )
    record = store.lookup_certificate("7f3a")
    assert record == CertificateRecord(
        serial_hex="7f3a",
        device_id="dev-1",
        fingerprint_sha256=fingerprint("7f3a"),
        not_after=T0 + timedelta(days=365),
        revoked=False,
        superseded=False,
        issued_at=issued,
    )
    assert record.not_after.tzinfo is UTC
    [device] = store.list_devices(now=T0, stale_after=STALE_AFTER)
    assert device.enrolled_at == T0
    assert device.enrolled_at.tzinfo is UTC


def test_lookup_of_unknown_serial_returns_none(store: Store) -> None:
    """A serial the store never saw is not found."""
    assert store.lookup_certificate("abcdef") is None


def test_serials_are_canonical(store: Store) -> None:
    """Case and leading zeros of a serial do not matter: 00AB12 is ab12."""
    enroll(store, "dev-1", "00AB12")
    record = store.lookup_certificate("ab12")
    assert record is not None
    assert record.serial_hex == "ab12"
    assert store.lookup_certificate("0000Ab12") == record


def test_long_serial_round_trips(store: Store) -> None:
    """A 159-bit serial, the largest RFC 5280 allows, is stored without loss."""
    serial = format(2**159 - 1, "x")
    enroll(store, "dev-1", serial)
    record = store.lookup_certificate(serial)
    assert record is not None
    assert record.serial_hex == serial


def test_second_certificate_keeps_enrollment_time(store: Store) -> None:
    """A renewal adds a certificate; the device keeps its first enrollment time."""
    enroll(store, "dev-1", "a1")
    enroll(store, "dev-1", "a2", issued_at=T0 + timedelta(days=300))
    [device] = store.list_devices(now=T0, stale_after=STALE_AFTER)
    assert device.enrolled_at == T0
    assert store.lookup_certificate("a2") is not None


def test_repeated_enrollment_is_a_no_op(store: Store) -> None:
    """Recording the same certificate twice (a retry) succeeds and changes nothing."""
    enroll(store, "dev-1", "a1")
    enroll(store, "dev-1", "a1")
    assert len(store.list_devices(now=T0, stale_after=STALE_AFTER)) == 1


def test_serial_reused_for_another_certificate_raises(store: Store) -> None:
    """A serial already recorded for another device is refused."""
    enroll(store, "dev-1", "a1")
    with pytest.raises(StoreError, match="already recorded"):
        store.record_enrollment(
            device_id="dev-2",
            serial_hex="a1",
            fingerprint_sha256=fingerprint("other"),
            not_before=T0,
            not_after=T0,
            issued_at=T0,
        )
    assert [
        d.device_id for d in store.list_devices(now=T0, stale_after=STALE_AFTER)
    ] == ["dev-1"]


def test_duplicate_fingerprint_raises_store_error(store: Store) -> None:
    """The same certificate recorded under two serials violates a constraint: StoreError."""
    enroll(store, "dev-1", "a1")
    with pytest.raises(StoreError):
        store.record_enrollment(
            device_id="dev-1",
            serial_hex="a2",
            fingerprint_sha256=fingerprint("a1"),
            not_before=T0,
            not_after=T0,
            issued_at=T0,
        )


def test_naive_datetime_is_refused(store: Store) -> None:
    """A naive timestamp is refused before it can be stored as the wrong instant."""
    with pytest.raises(ValueError, match="timezone-aware"):
        store.record_enrollment(
            device_id="dev-1",
            serial_hex="a1",
            fingerprint_sha256=fingerprint("a1"),
            not_before=T0,
            not_after=T0,
            issued_at=datetime(2025, 3, 1, 12, 0),  # naive on purpose
        )


@pytest.mark.parametrize("serial_hex", ["", "xyz", "-1", "0x1f", "a" * 65])
def test_malformed_serial_is_refused(store: Store, serial_hex: str) -> None:
    """Anything but 1 to 64 hex digits is not a serial."""
    with pytest.raises(ValueError, match="serial_hex"):
        store.lookup_certificate(serial_hex)


# Revocation


def test_revoke_device_revokes_its_certificates(store: Store) -> None:
    """Revocation marks every certificate revoked and reports one Revocation each."""
    enroll(store, "dev-1", "a1")
    enroll(store, "dev-1", "a2", issued_at=T0 + timedelta(days=1))
    enroll(store, "dev-2", "a3")
    revoked = store.revoke_device("dev-1", at=T0 + timedelta(days=2), reason="stolen")
    assert revoked == [Revocation("dev-1", "a1"), Revocation("dev-1", "a2")]
    for serial in ("a1", "a2"):
        record = store.lookup_certificate(serial)
        assert record is not None
        assert record.revoked
    other = store.lookup_certificate("a3")
    assert other is not None
    assert not other.revoked


def test_revoke_is_idempotent(store: Store) -> None:
    """A second revocation returns nothing and keeps the first revocation time."""
    enroll(store, "dev-1", "a1")
    first_at = T0 + timedelta(hours=1)
    assert store.revoke_device("dev-1", at=first_at, reason="stolen") != []
    assert (
        store.revoke_device("dev-1", at=first_at + timedelta(hours=1), reason="again")
        == []
    )
    [device] = store.list_devices(now=T0, stale_after=STALE_AFTER)
    assert device.revoked_at == first_at
    assert store.revocations_after(0) == ([Revocation("dev-1", "a1")], 1)


def test_revoke_unknown_device_raises(store: Store) -> None:
    """Revoking a device that was never enrolled raises UnknownDevice."""
    with pytest.raises(UnknownDevice):
        store.revoke_device("ghost", at=T0, reason="typo")


def test_revoked_device_cannot_enroll_again(store: Store) -> None:
    """A revoked device id is never reused: enrolling it again raises DeviceRevoked."""
    enroll(store, "dev-1", "a1")
    store.revoke_device("dev-1", at=T0, reason="decommissioned")
    with pytest.raises(DeviceRevoked):
        enroll(store, "dev-1", "a2")
    assert store.lookup_certificate("a2") is None


def test_revoke_reason_longer_than_column_is_refused(store: Store) -> None:
    """A reason over 200 characters is refused the same way on SQLite and PostgreSQL."""
    enroll(store, "dev-1", "a1")
    with pytest.raises(ValueError, match="reason"):
        store.revoke_device("dev-1", at=T0, reason="x" * 201)


def test_revocation_cursor_of_empty_feed_is_zero(store: Store) -> None:
    """With no revocations, the cursor is 0 and nothing follows it."""
    assert store.revocation_cursor() == 0
    assert store.revocations_after(0) == ([], 0)


def test_revocations_after_pages_through_the_feed(store: Store) -> None:
    """The feed returns events after a cursor, oldest first, in pages of at most limit."""
    for index in range(3):
        enroll(store, f"dev-{index}", f"a{index + 1}")
    start = store.revocation_cursor()
    store.revoke_device("dev-0", at=T0, reason="r")
    store.revoke_device("dev-1", at=T0, reason="r")
    first, cursor = store.revocations_after(start, limit=1)
    assert first == [Revocation("dev-0", "a1")]
    rest, cursor = store.revocations_after(cursor, limit=10)
    assert rest == [Revocation("dev-1", "a2")]
    assert cursor == store.revocation_cursor()
    assert store.revocations_after(cursor) == ([], cursor)
    store.revoke_device("dev-2", at=T0, reason="r")
    assert store.revocations_after(cursor)[0] == [Revocation("dev-2", "a3")]


# Presence


def test_list_devices_online_stale_offline_and_revoked(store: Store) -> None:
    """Online needs a fresh presence row and an unrevoked device; stale rows still show."""
    for device_id, serial in [
        ("fresh", "a1"),
        ("stale", "a2"),
        ("off", "a3"),
        ("gone", "a4"),
    ]:
        enroll(store, device_id, serial)
    now = T0 + timedelta(minutes=10)
    store.replace_presence(
        "node-a",
        [
            presence("fresh", last_seen=now - STALE_AFTER),
            presence("stale", last_seen=now - STALE_AFTER - timedelta(seconds=1)),
            presence("gone", last_seen=now),
        ],
    )
    store.revoke_device("gone", at=now, reason="stolen")
    listed = {
        d.device_id: d for d in store.list_devices(now=now, stale_after=STALE_AFTER)
    }
    assert list(listed) == ["fresh", "gone", "off", "stale"]
    assert listed["fresh"].online
    assert listed["fresh"].presence == presence("fresh", last_seen=now - STALE_AFTER)
    assert not listed["stale"].online
    assert listed["stale"].presence is not None
    assert not listed["off"].online
    assert listed["off"].presence is None
    assert not listed["gone"].online
    assert listed["gone"].revoked_at == now


def test_replace_presence_updates_and_moves_rows(store: Store) -> None:
    """A refresh updates last_seen; a newer connection on another node takes the row over."""
    enroll(store, "dev-1", "a1")
    store.replace_presence("node-a", [presence("dev-1", "node-a")])
    later = T0 + timedelta(seconds=20)
    store.replace_presence("node-a", [presence("dev-1", "node-a", last_seen=later)])
    [device] = store.list_devices(now=later, stale_after=STALE_AFTER)
    assert device.presence is not None
    assert device.presence.last_seen == later
    moved = presence("dev-1", "node-b", connected_since=later, last_seen=later)
    store.replace_presence("node-b", [moved])
    [device] = store.list_devices(now=later, stale_after=STALE_AFTER)
    assert device.presence == moved


def test_older_connection_does_not_overwrite_newer_presence(store: Store) -> None:
    """A node still reporting a superseded connection cannot overwrite the newer row."""
    enroll(store, "dev-1", "a1")
    newer = presence("dev-1", "node-b", connected_since=T0 + timedelta(minutes=1))
    store.replace_presence("node-b", [newer])
    store.replace_presence(
        "node-a", [presence("dev-1", "node-a", last_seen=T0 + timedelta(minutes=2))]
    )
    [device] = store.list_devices(now=T0, stale_after=STALE_AFTER)
    assert device.presence == newer


def test_replace_presence_truncates_informational_fields(store: Store) -> None:
    """An oversized agent version or peer from a device is cut, not a failed batch."""
    enroll(store, "dev-1", "a1")
    row = PresenceRow(
        device_id="dev-1",
        node_id="node-a",
        connected_since=T0,
        last_seen=T0,
        agent_version="v" * 500,
        peer="p" * 500,
    )
    store.replace_presence("node-a", [row])
    [device] = store.list_devices(now=T0, stale_after=STALE_AFTER)
    assert device.presence is not None
    assert device.presence.agent_version == "v" * 64
    assert device.presence.peer == "p" * 100


def test_replace_presence_refuses_rows_of_another_node(store: Store) -> None:
    """Each row must carry the node that writes it."""
    with pytest.raises(ValueError, match="node"):
        store.replace_presence("node-a", [presence("dev-1", "node-b")])


def test_remove_presence_spares_rows_owned_by_another_node(store: Store) -> None:
    """Removing a device on node A leaves its row alone once node B owns it."""
    for device_id, serial in [("dev-1", "a1"), ("dev-2", "a2")]:
        enroll(store, device_id, serial)
    store.replace_presence("node-a", [presence("dev-2", "node-a")])
    store.replace_presence("node-b", [presence("dev-1", "node-b")])
    store.remove_presence("node-a", ["dev-1", "dev-2"])
    listed = {
        d.device_id: d for d in store.list_devices(now=T0, stale_after=STALE_AFTER)
    }
    assert listed["dev-1"].online
    assert listed["dev-2"].presence is None


def test_clear_presence_removes_only_that_node(store: Store) -> None:
    """Clearing a node's presence leaves other nodes' rows in place."""
    for device_id, serial in [("dev-1", "a1"), ("dev-2", "a2")]:
        enroll(store, device_id, serial)
    store.replace_presence("node-a", [presence("dev-1", "node-a")])
    store.replace_presence("node-b", [presence("dev-2", "node-b")])
    store.clear_presence("node-a")
    online = [
        d.device_id
        for d in store.list_devices(now=T0, stale_after=STALE_AFTER)
        if d.online
    ]
    assert online == ["dev-2"]


def test_empty_presence_batches_are_no_ops(store: Store) -> None:
    """Empty replace and remove calls succeed without touching the database."""
    store.replace_presence("node-a", [])
    store.remove_presence("node-a", [])
    assert store.list_devices(now=T0, stale_after=STALE_AFTER) == []


# Several writers on one file


def test_two_stores_on_one_file_see_each_other(db_url: str) -> None:
    """The CLI's Store and the broker's Store on one file see each other's commits."""
    broker = Store.open(db_url)
    cli = Store.open(db_url)
    try:
        enroll(broker, "dev-1", "a1")
        broker.replace_presence("node-a", [presence("dev-1")])
        cursor = broker.revocation_cursor()
        [listed] = cli.list_devices(now=T0, stale_after=STALE_AFTER)
        assert listed.online
        cli.revoke_device("dev-1", at=T0, reason="via CLI")
        record = broker.lookup_certificate("a1")
        assert record is not None
        assert record.revoked
        assert broker.revocations_after(cursor)[0] == [Revocation("dev-1", "a1")]
    finally:
        cli.close()
        broker.close()


def test_concurrent_writers_do_not_hit_locked_database(db_url: str) -> None:
    """8 threads on two Stores enrolling and revoking at once never see 'database is locked'."""
    stores = [Store.open(db_url), Store.open(db_url)]
    workers, rounds = 8, 10
    barrier = threading.Barrier(workers)

    def work(worker: int) -> None:
        store = stores[worker % 2]
        barrier.wait()
        for round_ in range(rounds):
            device_id = f"dev-{worker}-{round_}"
            serial = format(0x1000 + worker * 0x100 + round_, "x")
            enroll(store, device_id, serial)
            assert store.lookup_certificate(serial) is not None
            assert store.revoke_device(device_id, at=T0, reason="test") == [
                Revocation(device_id, serial)
            ]

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(work, worker) for worker in range(workers)]:
                future.result()
        events, cursor = stores[0].revocations_after(0, limit=10_000)
    finally:
        for opened in stores:
            opened.close()
    assert len({event.serial_hex for event in events}) == workers * rounds
    assert cursor == workers * rounds


# Readiness


def test_ping_succeeds_on_open_store(store: Store) -> None:
    """A reachable database answers ping."""
    store.ping()


@pytest.mark.parametrize("where", ["missing-directory", "directory"])
def test_ping_raises_store_error_when_database_cannot_open(
    tmp_path: Path, where: str
) -> None:
    """Ping raises StoreError when the file's directory is gone or the path is a directory."""
    path = (
        tmp_path / "gone" / "relay.sqlite3"
        if where == "missing-directory"
        else tmp_path
    )
    broken = Store(sqlite_url(path))
    try:
        with pytest.raises(StoreError):
            broken.ping()
    finally:
        broken.close()


def test_open_raises_store_error_when_directory_cannot_be_created(
    tmp_path: Path,
) -> None:
    """Open reports a data directory it cannot create (here: a file is in the way)."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot create"):
        Store.open(sqlite_url(blocker / "data" / "relay.sqlite3"))
