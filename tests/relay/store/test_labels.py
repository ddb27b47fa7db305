"""Device labels, user groups and their change feed on real SQLite files:
migration 0006 and the ``Labels`` methods of the store."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, create_engine, inspect, text

from relay.store import (
    MAX_DEVICE_LABELS,
    MAX_USER_GROUPS,
    MIGRATIONS_DIR,
    PolicySubjectChange,
    PolicySubjectKind,
    Store,
    UnknownDevice,
    UnknownUser,
)
from relay.store._store import SCHEMA_HEAD
from tests.relay.store.conftest import foreign_keys_on, make_room

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
NAIVE = datetime(2025, 3, 1, 12, 0)  # naive on purpose
NEW_TABLES = {"device_labels", "user_groups", "policy_subject_changes"}
DEVICE = PolicySubjectKind.DEVICE_LABELS
USER = PolicySubjectKind.USER_GROUPS


@pytest.fixture
def url(db_url: str) -> str:
    return db_url


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    """A migrated store with device dev-1 and engineer alice, closed after the test."""
    opened = Store.open(url)
    try:
        enroll(opened, "dev-1", "0a")
        add_user(opened, "alice")
        yield opened
    finally:
        opened.close()


def enroll(store: Store, device_id: str, serial_hex: str) -> None:
    store.record_enrollment(
        device_id=device_id,
        serial_hex=serial_hex,
        fingerprint_sha256=hashlib.sha256(serial_hex.encode()).hexdigest(),
        not_before=T0,
        not_after=T0 + timedelta(days=365),
        issued_at=T0,
    )


def add_user(store: Store, username: str, **extra: Any) -> None:
    store.add_user(
        username=username,
        role="engineer",
        password_hash=f"$argon2id$hash-of-{username}",
        totp_secret_sealed=f"sealed-{username}",
        at=T0,
        **extra,
    )


def relabel(
    store: Store,
    device_id: str = "dev-1",
    *,
    remove: tuple[str, ...] = (),
    **labels: str,
) -> tuple[dict[str, str], dict[str, str]]:
    return store.set_device_labels(device_id, set=labels, remove=remove, at=T0)


def regroup(
    store: Store,
    username: str = "alice",
    *,
    add: tuple[str, ...] = (),
    remove: tuple[str, ...] = (),
) -> tuple[frozenset[str], frozenset[str]]:
    return store.set_user_groups(username, add=add, remove=remove, at=T0)


def _alembic(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def _sql(url: str, statement: str) -> list[Any]:
    """Run one statement (foreign keys on, as in the store); return its rows."""
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            foreign_keys_on(connection)
            result = connection.execute(text(statement))
            return list(result) if result.returns_rows else []
    finally:
        engine.dispose()


# Device labels


def test_labels_round_trip_set_overwrite_and_remove(store: Store) -> None:
    """set_device_labels returns (previous, new), device_labels and list_devices
    read the same; removing a key the device lacks is no error."""
    assert store.device_labels("dev-1") == {}
    assert relabel(store, customer="acme", site="lyon") == (
        {},
        {"customer": "acme", "site": "lyon"},
    )
    previous, new = relabel(
        store, remove=("customer", "rack"), site="paris 2", model="xr-200/b"
    )
    assert previous == {"customer": "acme", "site": "lyon"}
    assert new == {"model": "xr-200/b", "site": "paris 2"}
    assert store.device_labels("dev-1") == new
    [record] = store.list_devices(now=T0, stale_after=timedelta(seconds=30))
    assert record.labels == new


def test_list_devices_gives_each_device_its_own_labels(store: Store) -> None:
    """Labels of several devices land on the right rows; unlabelled devices get {}."""
    enroll(store, "dev-2", "0b")
    enroll(store, "dev-3", "0c")
    relabel(store, "dev-1", site="lyon")
    relabel(store, "dev-3", site="oslo", region="eu")
    records = store.list_devices(now=T0, stale_after=timedelta(seconds=30))
    assert {r.device_id: r.labels for r in records} == {
        "dev-1": {"site": "lyon"},
        "dev-2": {},
        "dev-3": {"region": "eu", "site": "oslo"},
    }


def test_labels_of_unknown_device(store: Store) -> None:
    """Reading an unknown device's labels gives {}; setting them is UnknownDevice."""
    assert store.device_labels("ghost") == {}
    assert not store.device_enrolled("ghost")
    assert store.device_enrolled("dev-1")
    with pytest.raises(UnknownDevice, match="ghost"):
        relabel(store, "ghost", site="lyon")


@pytest.mark.parametrize(
    ("labels", "remove", "message"),
    [
        ({"Site": "lyon"}, (), "invalid label key 'Site'"),
        ({"1site": "lyon"}, (), "invalid label key '1site'"),
        ({"k" * 64: "v"}, (), "invalid label key 'kkkk"),
        ({"site": ""}, (), "invalid value '' of label 'site'"),
        ({"site": " lyon"}, (), "of label 'site'"),
        ({"site": "a,b"}, (), "of label 'site'"),
        ({"site": "v" * 129}, (), "of label 'site'"),
        ({}, ("Bad Key",), "invalid label key 'Bad Key'"),
        ({"site": "lyon"}, ("site",), "label 'site' is both set and removed"),
    ],
)
def test_malformed_labels_are_refused_and_nothing_changes(
    store: Store, labels: dict[str, str], remove: tuple[str, ...], message: str
) -> None:
    """policies.model's syntax decides; the message names the key."""
    relabel(store, site="lyon")
    cursor = store.policy_subject_cursor()
    with pytest.raises(ValueError, match=message):
        store.set_device_labels("dev-1", set=labels, remove=remove, at=T0)
    assert store.device_labels("dev-1") == {"site": "lyon"}
    assert store.policy_subject_cursor() == cursor


def test_at_most_max_device_labels(store: Store) -> None:
    """A device may reach MAX_DEVICE_LABELS labels, not one more; replacing a
    label at the limit is fine."""
    full = {f"k{i}": "v" for i in range(MAX_DEVICE_LABELS)}
    store.set_device_labels("dev-1", set=full, remove=(), at=T0)
    with pytest.raises(ValueError, match=f"at most {MAX_DEVICE_LABELS}"):
        relabel(store, extra="v")
    assert relabel(store, k0="w")[1]["k0"] == "w"
    assert len(relabel(store, remove=("k1",), extra="v")[1]) == MAX_DEVICE_LABELS


def test_bad_arguments_are_refused_before_sql(store: Store) -> None:
    """A naive time, or a bare string where a collection of keys belongs, is a
    ValueError."""
    with pytest.raises(ValueError, match="timezone-aware"):
        store.set_device_labels("dev-1", set={"a": "b"}, remove=(), at=NAIVE)
    with pytest.raises(ValueError, match="not one string"):
        store.set_device_labels("dev-1", set={}, remove="site", at=T0)
    with pytest.raises(ValueError, match="timezone-aware"):
        store.set_user_groups("alice", add=("a",), remove=(), at=NAIVE)
    with pytest.raises(ValueError, match="not one string"):
        store.set_user_groups("alice", add="ops", remove=(), at=T0)


def test_revocation_works_on_a_labelled_device_and_keeps_its_labels(
    store: Store,
) -> None:
    """The foreign key of device_labels does not get in the way of revoke_device."""
    relabel(store, site="lyon")
    [revoked] = store.revoke_device("dev-1", at=T0, reason="stolen")
    assert revoked.serial_hex == "a"
    assert store.device_labels("dev-1") == {"site": "lyon"}
    [record] = store.list_devices(now=T0, stale_after=timedelta(seconds=30))
    assert (record.revoked_at, record.labels) == (T0, {"site": "lyon"})
    assert relabel(store, site="paris")[1] == {"site": "paris"}


def test_deleting_a_device_deletes_its_labels(store: Store, url: str) -> None:
    """ON DELETE CASCADE: should devices ever be deleted, labels go with them."""
    relabel(store, site="lyon")
    _sql(url, "DELETE FROM certificates WHERE device_id = 'dev-1'")
    _sql(url, "DELETE FROM devices WHERE device_id = 'dev-1'")
    assert _sql(url, "SELECT count(*) FROM device_labels") == [(0,)]


# User groups


def test_groups_round_trip(store: Store) -> None:
    """add_user(groups=...), set_user_groups, user_groups, get_user and
    list_users agree; adding a held group or removing a missing one is no error."""
    add_user(store, "bob", groups=("field-eu", "acme"))
    assert store.user_groups("bob") == {"acme", "field-eu"}
    assert regroup(store, "bob", add=("ops", "acme"), remove=("field-eu", "x")) == (
        frozenset({"acme", "field-eu"}),
        frozenset({"acme", "ops"}),
    )
    bob = store.get_user("bob")
    assert bob is not None
    assert bob.groups == {"acme", "ops"}
    assert {u.username: u.groups for u in store.list_users()} == {
        "alice": frozenset(),
        "bob": frozenset({"acme", "ops"}),
    }
    assert store.user_groups("ghost") == frozenset()


def test_groups_of_unknown_user_raise(store: Store) -> None:
    """set_user_groups on a user that does not exist is UnknownUser."""
    with pytest.raises(UnknownUser, match="ghost"):
        regroup(store, "ghost", add=("ops",))


@pytest.mark.parametrize(
    ("add", "remove", "message"),
    [
        (("Ops",), (), "invalid group name 'Ops'"),
        (("-ops",), (), "invalid group name '-ops'"),
        (("o" * 64,), (), "invalid group name"),
        ((), ("a b",), "invalid group name 'a b'"),
        (("ops",), ("ops",), "group 'ops' is both added and removed"),
    ],
)
def test_malformed_groups_are_refused_and_nothing_changes(
    store: Store, add: tuple[str, ...], remove: tuple[str, ...], message: str
) -> None:
    """GROUP_NAME decides; nothing is written on a refusal."""
    cursor = store.policy_subject_cursor()
    with pytest.raises(ValueError, match=message):
        regroup(store, add=add, remove=remove)
    assert store.user_groups("alice") == frozenset()
    assert store.policy_subject_cursor() == cursor


def test_add_user_checks_groups_before_adding(store: Store) -> None:
    """A malformed or excess initial group refuses the whole add_user."""
    with pytest.raises(ValueError, match="invalid group name 'Ops'"):
        add_user(store, "bob", groups=("Ops",))
    too_many = [f"g{i}" for i in range(MAX_USER_GROUPS + 1)]
    with pytest.raises(ValueError, match=f"at most {MAX_USER_GROUPS}"):
        add_user(store, "bob", groups=too_many)
    assert store.get_user("bob") is None


def test_at_most_max_user_groups(store: Store) -> None:
    """A user may be in MAX_USER_GROUPS groups, not one more."""
    full = tuple(f"g{i}" for i in range(MAX_USER_GROUPS))
    regroup(store, add=full)
    with pytest.raises(ValueError, match=f"at most {MAX_USER_GROUPS}"):
        regroup(store, add=("one-more",))
    assert len(regroup(store, add=("one-more",), remove=("g0",))[1]) == 32


# The change feed


def test_each_change_appends_one_row_and_no_ops_append_none(store: Store) -> None:
    """Every change moves the cursor by one, names kind and subject; reads and
    changes that change nothing do not move it."""
    assert store.policy_subject_cursor() == 0
    relabel(store, site="lyon")
    regroup(store, add=("ops",))
    add_user(store, "bob", groups=("ops",))
    add_user(store, "carol")  # no groups: no change of a policy subject
    relabel(store, remove=("site",))
    changes = store.policy_subject_changes_after(0)
    assert [(c.kind, c.subject) for c in changes] == [
        (DEVICE, "dev-1"),
        (USER, "alice"),
        (USER, "bob"),
        (DEVICE, "dev-1"),
    ]
    assert [c.id for c in changes] == sorted(c.id for c in changes)
    cursor = store.policy_subject_cursor()
    assert cursor == changes[-1].id
    relabel(store, remove=("site",))  # has none
    regroup(store, add=("ops",), remove=("x",))  # in ops already, not in x
    store.device_labels("dev-1")
    store.user_groups("alice")
    store.list_devices(now=T0, stale_after=timedelta(seconds=30))
    store.list_users()
    assert store.policy_subject_cursor() == cursor
    assert store.policy_subject_changes_after(cursor) == []


def test_changes_after_pages_by_cursor(store: Store) -> None:
    """changes_after honours cursor and limit, oldest first; a bad cursor or
    limit is a ValueError."""
    for n in range(5):
        relabel(store, n=str(n))
    first = store.policy_subject_changes_after(0, limit=2)
    assert len(first) == 2
    rest = store.policy_subject_changes_after(first[-1].id, limit=10)
    assert len(rest) == 3
    assert [c.id for c in first + rest] == sorted({c.id for c in first + rest})
    assert rest[-1] == PolicySubjectChange(
        kind=DEVICE, subject="dev-1", id=store.policy_subject_cursor()
    )
    with pytest.raises(ValueError, match="negative"):
        store.policy_subject_changes_after(-1)
    with pytest.raises(ValueError, match="positive"):
        store.policy_subject_changes_after(0, limit=0)


def test_another_store_on_the_file_sees_the_change(store: Store, url: str) -> None:
    """A change made through one Store (the CLI) reaches another (a broker)."""
    broker = Store.open(url)
    try:
        cursor = broker.policy_subject_cursor()
        relabel(store, site="lyon")
        [change] = broker.policy_subject_changes_after(cursor)
        assert (change.kind, change.subject) == (DEVICE, "dev-1")
        assert broker.device_labels("dev-1") == {"site": "lyon"}
    finally:
        broker.close()


# Migration 0006


def test_upgrade_from_0005_keeps_rows_and_adds_empty_tables(db_url: str) -> None:
    """A 0005 database with a device and a user upgrades: both keep their rows,
    have no labels or groups, and can get some."""
    url = make_room(db_url)
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            foreign_keys_on(connection)
            command.upgrade(_alembic(connection), "0005")
            connection.execute(
                text(
                    "INSERT INTO devices (device_id, enrolled_at) "
                    "VALUES ('dev-1', '2025-03-01 12:00:00')"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO users (username, role, password_hash, "
                    "totp_secret_sealed, created_at, password_changed_at) VALUES "
                    "('alice', 'engineer', 'h', 's', '2025-03-01 12:00:00', "
                    "'2025-03-01 12:00:00')"
                )
            )
        assert not NEW_TABLES & set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    upgraded = Store.open(url)
    try:
        [device] = upgraded.list_devices(now=T0, stale_after=timedelta(seconds=30))
        assert (device.device_id, device.enrolled_at, device.labels) == (
            "dev-1",
            T0,
            {},
        )
        alice = upgraded.get_user("alice")
        assert alice is not None
        assert alice.groups == frozenset()
        assert upgraded.policy_subject_cursor() == 0
        relabel(upgraded, site="lyon")
        regroup(upgraded, add=("ops",))
        assert upgraded.policy_subject_cursor() == 2
    finally:
        upgraded.close()
    assert _sql(url, "SELECT version_num FROM alembic_version") == [(SCHEMA_HEAD,)]


def test_downgrade_to_0005_drops_the_tables_and_keeps_the_rest(
    store: Store, url: str
) -> None:
    """0006's downgrade removes labels, groups and the feed only."""
    relabel(store, site="lyon")
    regroup(store, add=("ops",))
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            command.downgrade(_alembic(connection), "0005")
        names = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert not NEW_TABLES & names
    assert _sql(url, "SELECT device_id FROM devices") == [("dev-1",)]
    assert _sql(url, "SELECT username FROM users") == [("alice",)]
