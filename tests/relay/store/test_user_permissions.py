"""The enroll permission of users (``users.can_enroll``) on real SQLite files:
migration 0003 and ``Store.set_user_can_enroll``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, create_engine, inspect, text

from relay.store import MIGRATIONS_DIR, Store, UnknownUser
from relay.store._store import SCHEMA_HEAD
from tests.relay.store.conftest import foreign_keys_on, make_room

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
NAIVE = datetime(2025, 3, 1, 12, 0)  # naive on purpose


def add(
    store: Store, username: str = "alice", role: str = "engineer", **extra: Any
) -> None:
    store.add_user(
        username=username,
        role=role,
        password_hash=f"$argon2id$hash-of-{username}",
        totp_secret_sealed=f"sealed-{username}",
        at=T0,
        **extra,
    )


def can_enroll(store: Store, username: str = "alice") -> bool:
    record = store.get_user(username)
    assert record is not None
    return record.can_enroll


def _alembic(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def _sql(url: str, statement: str, **params: Any) -> list[Any]:
    """Run one statement on its own engine; return the rows (if any)."""
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            result = connection.execute(text(statement), params)
            return list(result) if result.returns_rows else []
    finally:
        engine.dispose()


def test_upgrade_from_0002_keeps_users_and_grants_nothing(db_url: str) -> None:
    """A 0002 database with a user and a live session upgrades in place: the user
    keeps everything, can_enroll is false, and the flag can then be set."""
    url = make_room(db_url)
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            # Foreign keys on, as the Store's connections have them: a table
            # copy-and-swap of users would fail on the session row below.
            foreign_keys_on(connection)
            command.upgrade(_alembic(connection), "0002")
            connection.execute(
                text(
                    "INSERT INTO users (username, role, password_hash, "
                    "totp_secret_sealed, totp_last_step, created_at, disabled_at, "
                    "password_changed_at) VALUES ('alice', 'engineer', 'h', 's', 7, "
                    "'2025-03-01 12:00:00', NULL, '2025-03-01 12:00:00')"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO login_sessions (token_hash, username, created_at, "
                    "last_used_at, revoked_at, revoked_reason, source) VALUES "
                    "(:digest, 'alice', '2025-03-01 12:00:00', "
                    "'2025-03-01 12:00:00', NULL, NULL, '192.0.2.1')"
                ),
                {"digest": "a" * 64},
            )
        columns = {c["name"] for c in inspect(engine).get_columns("users")}
        assert "can_enroll" not in columns
    finally:
        engine.dispose()
    upgraded = Store.open(url)
    try:
        record = upgraded.get_user("alice")
        assert record is not None
        assert (record.role, record.totp_last_step, record.created_at) == (
            "engineer",
            7,
            T0,
        )
        assert record.can_enroll is False
        assert upgraded.get_login_session("a" * 64) is not None
        assert upgraded.set_user_can_enroll("alice", True, at=T0) is False
        assert can_enroll(upgraded)
    finally:
        upgraded.close()
    [(version,)] = _sql(url, "SELECT version_num FROM alembic_version")
    assert version == SCHEMA_HEAD


def test_downgrade_to_0002_drops_the_columns_and_keeps_the_rows(
    store: Store, db_url: str
) -> None:
    """0003's downgrade removes can_enroll and permissions_changed_at only."""
    add(store, can_enroll=True)
    url = db_url
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            command.downgrade(_alembic(connection), "0002")
        columns = {c["name"] for c in inspect(engine).get_columns("users")}
    finally:
        engine.dispose()
    assert "can_enroll" not in columns
    assert "permissions_changed_at" not in columns
    assert _sql(url, "SELECT username, role FROM users") == [("alice", "engineer")]


def test_new_users_may_not_enroll_unless_added_so(store: Store) -> None:
    """add_user defaults to no enroll permission; can_enroll=True grants it."""
    add(store, "alice")
    add(store, "bob", can_enroll=True)
    assert (can_enroll(store, "alice"), can_enroll(store, "bob")) == (False, True)
    assert [(u.username, u.can_enroll) for u in store.list_users()] == [
        ("alice", False),
        ("bob", True),
    ]


def test_set_can_enroll_grants_withdraws_and_returns_the_previous_value(
    store: Store, db_url: str
) -> None:
    """The flag follows each call at once; only a change moves
    permissions_changed_at."""
    add(store)
    url = db_url

    def changed_at() -> Any:
        [(value,)] = _sql(url, "SELECT permissions_changed_at FROM users")
        return value

    assert changed_at() is None
    assert store.set_user_can_enroll("alice", True, at=T0) is False
    assert can_enroll(store)
    first = changed_at()
    assert first is not None
    later = T0 + timedelta(hours=1)
    assert store.set_user_can_enroll("alice", True, at=later) is True
    assert changed_at() == first  # same value: nothing written
    assert store.set_user_can_enroll("alice", False, at=later) is True
    assert not can_enroll(store)
    assert changed_at() != first


def test_set_can_enroll_of_unknown_user_raises(store: Store) -> None:
    """A missing user is UnknownUser, as for the other user methods."""
    with pytest.raises(UnknownUser):
        store.set_user_can_enroll("ghost", True, at=T0)


def test_auditors_never_get_the_enroll_permission(store: Store) -> None:
    """Granting it to an auditor is refused (add or set); withdrawing is a no-op."""
    with pytest.raises(ValueError, match="auditors never enroll"):
        add(store, "carol", role="auditor", can_enroll=True)
    assert store.get_user("carol") is None
    add(store, "carol", role="auditor")
    with pytest.raises(ValueError, match="auditors never enroll"):
        store.set_user_can_enroll("carol", True, at=T0)
    assert not can_enroll(store, "carol")
    assert store.set_user_can_enroll("carol", False, at=T0) is False


def test_disabled_users_and_admins_keep_a_settable_flag(store: Store) -> None:
    """The flag is stored for admins and disabled users too (the route decides
    what it means for them)."""
    add(store, "root", role="admin")
    add(store, "dave")
    store.disable_user("dave", at=T0, reason="left")
    assert store.set_user_can_enroll("root", True, at=T0) is False
    assert store.set_user_can_enroll("dave", True, at=T0) is False
    assert can_enroll(store, "root")
    assert can_enroll(store, "dave")


@pytest.mark.parametrize("allowed", [1, "yes", None])
def test_set_can_enroll_needs_a_bool_and_an_aware_time(
    store: Store, allowed: Any
) -> None:
    """A non-bool value or a naive time is ValueError before any SQL runs."""
    add(store)
    with pytest.raises(ValueError, match="bool"):
        store.set_user_can_enroll("alice", allowed, at=T0)
    with pytest.raises(ValueError, match="timezone-aware"):
        store.set_user_can_enroll("alice", True, at=NAIVE)
    assert not can_enroll(store)
