"""Users, login sessions, TOTP steps and the session revocation feed on real SQLite files."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, inspect, text

from relay.store import (
    MIGRATIONS_DIR,
    USER_ROLES,
    LoginSessionRecord,
    SessionRevocation,
    Store,
    StoreError,
    TotpSecretChanged,
    UnknownUser,
    UserDisabled,
    UserExists,
    UserRecord,
)
from relay.store._store import SCHEMA_HEAD
from tests.relay.store.conftest import sqlite_url

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
NAIVE = datetime(2025, 3, 1, 12, 0)  # naive on purpose
SOURCE = "192.0.2.20:41000"
# Stand-ins for what the auth layer hands the store; the store treats them as opaque.
ARGON_HASH = "$argon2id$v=19$abc"
SEALED = "sealed:xyz"
SEALED_NEW = "sealed:new"
#: The sealed secret add() gives alice.
SEALED_ALICE = "sealed-alice"


@pytest.fixture
def bare_store(tmp_path: Path) -> Iterator[Store]:
    """A store on an empty, unmigrated file: any SQL it ran would fail with StoreError."""
    opened = Store(sqlite_url(tmp_path / "bare.sqlite3"))
    try:
        yield opened
    finally:
        opened.close()


def token_hash(name: str) -> str:
    """A distinct, well-formed token hash for each name."""
    return hashlib.sha256(name.encode()).hexdigest()


def add(store: Store, username: str = "alice", role: str = "engineer") -> None:
    """Add *username* with placeholder credentials at T0."""
    store.add_user(
        username=username,
        role=role,
        password_hash=f"$argon2id$hash-of-{username}",
        totp_secret_sealed=f"sealed-{username}",
        at=T0,
        organisation="acme" if role == "customer" else None,
    )


def login(store: Store, name: str, username: str = "alice") -> str:
    """Create a session for *username* at T0 and return its token hash."""
    digest = token_hash(name)
    store.create_login_session(
        token_hash=digest,
        username=username,
        at=T0,
        source=SOURCE,
        totp_secret_sealed=f"sealed-{username}",
    )
    return digest


def session(store: Store, digest: str) -> LoginSessionRecord:
    """Return the recorded session *digest*, which must exist."""
    record = store.get_login_session(digest)
    assert record is not None
    return record


def user(store: Store, username: str = "alice") -> UserRecord:
    """Return the recorded user *username*, which must exist."""
    record = store.get_user(username)
    assert record is not None
    return record


# Migration


def test_upgrade_from_0001_keeps_devices(tmp_path: Path) -> None:
    """A database at revision 0001 that already has devices upgrades and keeps them."""
    path = tmp_path / "old.sqlite3"
    url = sqlite_url(path)
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            config = Config()
            config.set_main_option(
                "script_location", str(MIGRATIONS_DIR).replace("%", "%%")
            )
            config.attributes["connection"] = connection
            command.upgrade(config, "0001")
        assert "users" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()
    old = Store(url)
    try:
        old.record_enrollment(
            device_id="dev-1",
            serial_hex="a1",
            fingerprint_sha256=token_hash("a1"),
            not_before=T0,
            not_after=T0 + timedelta(days=365),
            issued_at=T0,
        )
    finally:
        old.close()
    upgraded = Store.open(url)
    try:
        record = upgraded.lookup_certificate("a1")
        add(upgraded)
        assert user(upgraded).role == "engineer"
    finally:
        upgraded.close()
    assert record is not None
    assert record.device_id == "dev-1"
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            version = connection.execute(
                text("SELECT version_num FROM alembic_version")
            ).scalar_one()
    finally:
        engine.dispose()
    assert version == SCHEMA_HEAD


def test_open_creates_user_tables(store: Store, db_url: str) -> None:
    """A new database gets users, login_sessions and login_session_revocations."""
    engine = create_engine(db_url)
    try:
        names = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert names >= {"users", "login_sessions", "login_session_revocations"}


# Users


def test_add_and_get_user_round_trip(store: Store) -> None:
    """An added user is read back with its fields, no TOTP step and aware UTC times."""
    plus_two = timezone(timedelta(hours=2))
    store.add_user(
        username="alice",
        role="admin",
        password_hash=ARGON_HASH,
        totp_secret_sealed=SEALED,
        at=datetime(2025, 3, 1, 14, 0, tzinfo=plus_two),
    )
    record = user(store)
    assert record == UserRecord(
        username="alice",
        role="admin",
        password_hash=ARGON_HASH,
        totp_secret_sealed=SEALED,
        totp_last_step=None,
        created_at=T0,
        disabled_at=None,
    )
    assert record.created_at.tzinfo is UTC


def test_get_unknown_user_returns_none(store: Store) -> None:
    """A name that was never added is not found."""
    assert store.get_user("ghost") is None


def test_add_existing_user_raises_user_exists(store: Store) -> None:
    """Adding a taken name raises UserExists and leaves the first user unchanged."""
    add(store, "alice", "engineer")
    with pytest.raises(UserExists):
        add(store, "alice", "admin")
    assert user(store).role == "engineer"


def test_list_users_is_ordered_by_username(store: Store) -> None:
    """list_users returns every user, disabled ones too, ordered by name."""
    for name, role in [("carol", "auditor"), ("alice", "engineer"), ("bob", "admin")]:
        add(store, name, role)
    store.disable_user("bob", at=T0, reason="left")
    listed = store.list_users()
    assert [(u.username, u.role) for u in listed] == [
        ("alice", "engineer"),
        ("bob", "admin"),
        ("carol", "auditor"),
    ]
    assert listed[1].disabled_at == T0


def test_list_users_of_empty_store_is_empty(store: Store) -> None:
    """With no users, list_users returns an empty list."""
    assert store.list_users() == []


def test_every_role_is_accepted(store: Store) -> None:
    """Each of engineer, auditor, admin and customer can be given to a user."""
    for role in sorted(USER_ROLES):
        add(store, f"user-{role}", role)
    assert {u.role for u in store.list_users()} == {
        "engineer",
        "auditor",
        "admin",
        "customer",
    }


@pytest.mark.parametrize("role", ["", "Admin", "root", "engineer "])
def test_bad_role_is_refused_before_sql(bare_store: Store, role: str) -> None:
    """A role outside engineer, auditor, admin is ValueError before any SQL runs."""
    with pytest.raises(ValueError, match="role"):
        add(bare_store, "alice", role)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("username", ""),
        ("username", "u" * 65),
        ("password_hash", ""),
        ("password_hash", "p" * 201),
        ("totp_secret_sealed", ""),
        ("totp_secret_sealed", "s" * 201),
    ],
)
def test_bad_user_field_is_refused_before_sql(
    bare_store: Store, field: str, value: str
) -> None:
    """An empty or over-long username, hash or sealed secret is ValueError before SQL."""
    fields = {
        "username": "alice",
        "password_hash": "hash",
        "totp_secret_sealed": "sealed",
    }
    fields[field] = value
    with pytest.raises(ValueError, match=field):
        bare_store.add_user(
            username=fields["username"],
            role="engineer",
            password_hash=fields["password_hash"],
            totp_secret_sealed=fields["totp_secret_sealed"],
            at=T0,
        )


def test_naive_datetimes_are_refused_before_sql(bare_store: Store) -> None:
    """Every method taking a time refuses a naive one with ValueError before SQL."""
    digest = token_hash("t")
    calls: list[Callable[[], object]] = [
        lambda: bare_store.add_user(
            username="alice",
            role="engineer",
            password_hash=ARGON_HASH,
            totp_secret_sealed=SEALED,
            at=NAIVE,
        ),
        lambda: bare_store.disable_user("alice", at=NAIVE, reason="r"),
        lambda: bare_store.reset_totp("alice", totp_secret_sealed=SEALED_NEW, at=NAIVE),
        lambda: bare_store.create_login_session(
            token_hash=digest,
            username="alice",
            at=NAIVE,
            source=SOURCE,
            totp_secret_sealed=SEALED,
        ),
        lambda: bare_store.touch_login_session(digest, at=NAIVE),
        lambda: bare_store.revoke_login_session(digest, at=NAIVE, reason="r"),
        lambda: bare_store.revoke_user_sessions("alice", at=NAIVE, reason="r"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="timezone-aware"):
            call()


def test_unmigrated_database_raises_store_error(bare_store: Store) -> None:
    """With valid input, the bare store does run SQL: the checks above came first."""
    with pytest.raises(StoreError, match="no such table"):
        add(bare_store)


# Disabling


def test_disable_user_revokes_sessions_and_feeds_them(store: Store) -> None:
    """Disabling revokes the user's live sessions, returns and feeds their hashes."""
    add(store, "alice")
    add(store, "bob")
    first = login(store, "a1")
    second = login(store, "a2")
    other = login(store, "b1", "bob")
    store.revoke_login_session(first, at=T0, reason="logout")
    cursor = store.session_revocation_cursor()
    at = T0 + timedelta(minutes=5)
    revoked = store.disable_user("alice", at=at, reason="left the company")
    assert revoked == [second]
    assert user(store).disabled_at == at
    assert session(store, second).revoked_at == at
    assert session(store, first).revoked_at == T0
    assert session(store, other).revoked_at is None
    assert store.session_revocations_after(cursor) == (
        [SessionRevocation(second, "alice")],
        store.session_revocation_cursor(),
    )


def test_disable_user_is_idempotent(store: Store) -> None:
    """A second disable keeps the first disabled_at and revokes nothing."""
    add(store)
    login(store, "a1")
    store.disable_user("alice", at=T0, reason="first")
    assert store.disable_user("alice", at=T0 + timedelta(hours=1), reason="x") == []
    assert user(store).disabled_at == T0
    assert len(store.session_revocations_after(0)[0]) == 1


def test_disable_unknown_user_raises(store: Store) -> None:
    """Disabling a user that does not exist raises UnknownUser."""
    with pytest.raises(UnknownUser):
        store.disable_user("ghost", at=T0, reason="typo")


def test_disable_reason_longer_than_column_is_refused(bare_store: Store) -> None:
    """A reason over 200 characters is ValueError before SQL."""
    with pytest.raises(ValueError, match="reason"):
        bare_store.disable_user("alice", at=T0, reason="x" * 201)


def test_disabled_user_gets_no_session(store: Store) -> None:
    """A disabled user cannot get a new login session: UserDisabled, nothing stored."""
    add(store)
    store.disable_user("alice", at=T0, reason="left")
    with pytest.raises(UserDisabled):
        login(store, "a1")
    assert store.get_login_session(token_hash("a1")) is None


# TOTP


def test_reset_totp_replaces_secret_clears_step_and_revokes(store: Store) -> None:
    """reset_totp stores the new secret, clears the step and revokes live sessions."""
    add(store)
    assert store.accept_totp_step("alice", 1000, totp_secret_sealed=SEALED_ALICE)
    digest = login(store, "a1")
    at = T0 + timedelta(hours=1)
    assert store.reset_totp("alice", totp_secret_sealed=SEALED_NEW, at=at) == [digest]
    record = user(store)
    assert record.totp_secret_sealed == SEALED_NEW
    assert record.totp_last_step is None
    assert session(store, digest).revoked_at == at
    assert store.session_revocations_after(0)[0] == [SessionRevocation(digest, "alice")]
    assert store.accept_totp_step("alice", 5, totp_secret_sealed=SEALED_NEW)


def test_code_of_the_old_secret_counts_for_nothing_after_a_reset(
    store: Store,
) -> None:
    """A login checked against the old secret, finishing after reset-totp, fails.

    Both halves of a login name the secret its code was verified with: the step
    is not recorded against the new secret, and no session is created.
    """
    add(store)
    store.reset_totp("alice", totp_secret_sealed=SEALED_NEW, at=T0)
    assert not store.accept_totp_step("alice", 1000, totp_secret_sealed=SEALED_ALICE)
    assert user(store).totp_last_step is None
    with pytest.raises(TotpSecretChanged):
        store.create_login_session(
            token_hash=token_hash("late"),
            username="alice",
            at=T0,
            source=SOURCE,
            totp_secret_sealed=SEALED_ALICE,
        )
    assert store.get_login_session(token_hash("late")) is None


def test_reset_totp_of_unknown_user_raises(store: Store) -> None:
    """Resetting the TOTP secret of a user that does not exist raises UnknownUser."""
    with pytest.raises(UnknownUser):
        store.reset_totp("ghost", totp_secret_sealed=SEALED_NEW, at=T0)


def test_accept_totp_step_refuses_equal_and_older_steps(store: Store) -> None:
    """A step is accepted once; the same step or an older one afterwards is refused."""
    add(store)
    assert store.accept_totp_step("alice", 100, totp_secret_sealed=SEALED_ALICE)
    assert not store.accept_totp_step("alice", 100, totp_secret_sealed=SEALED_ALICE)
    assert not store.accept_totp_step("alice", 99, totp_secret_sealed=SEALED_ALICE)
    assert user(store).totp_last_step == 100
    assert store.accept_totp_step("alice", 101, totp_secret_sealed=SEALED_ALICE)
    assert user(store).totp_last_step == 101


def test_accept_totp_step_refuses_disabled_and_unknown_users(store: Store) -> None:
    """A disabled user's step, or an unknown user's, is refused and nothing changes."""
    add(store)
    store.disable_user("alice", at=T0, reason="left")
    assert not store.accept_totp_step("alice", 100, totp_secret_sealed=SEALED_ALICE)
    assert user(store).totp_last_step is None
    assert not store.accept_totp_step("ghost", 100, totp_secret_sealed=SEALED)


def test_accept_totp_step_large_step_round_trips(store: Store) -> None:
    """The largest BIGINT step is stored without loss."""
    add(store)
    assert store.accept_totp_step("alice", 2**63 - 1, totp_secret_sealed=SEALED_ALICE)
    assert user(store).totp_last_step == 2**63 - 1


@pytest.mark.parametrize("step", [-1, 2**63, True])
def test_bad_totp_step_is_refused_before_sql(bare_store: Store, step: int) -> None:
    """A negative step, one beyond BIGINT, or a bool is ValueError before SQL."""
    with pytest.raises(ValueError, match="step"):
        bare_store.accept_totp_step("alice", step, totp_secret_sealed=SEALED_ALICE)


def test_racing_logins_with_one_code_have_one_winner(db_url: str) -> None:
    """20 threads on two Stores accepting the same step at once: exactly one wins."""
    stores = [Store.open(db_url), Store.open(db_url)]
    workers = 20
    barrier = threading.Barrier(workers)
    add(stores[0])

    def attempt(worker: int) -> bool:
        barrier.wait()
        return stores[worker % 2].accept_totp_step(
            "alice", 55_000_000, totp_secret_sealed=SEALED_ALICE
        )

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(attempt, range(workers)))
        last_step = user(stores[1]).totp_last_step
    finally:
        for opened in stores:
            opened.close()
    assert results.count(True) == 1
    assert last_step == 55_000_000


# Login sessions


def test_login_session_round_trip(store: Store) -> None:
    """A created session is found by its hash, live, with last_used_at = created_at."""
    add(store)
    digest = login(store, "a1")
    assert store.get_login_session(digest) == LoginSessionRecord(
        token_hash=digest,
        username="alice",
        created_at=T0,
        last_used_at=T0,
        revoked_at=None,
        source=SOURCE,
    )


def test_token_hash_is_lowercased(store: Store) -> None:
    """An upper-case token hash is stored and found as the same lowercase hash."""
    add(store)
    digest = token_hash("a1")
    store.create_login_session(
        token_hash=digest.upper(),
        username="alice",
        at=T0,
        source=SOURCE,
        totp_secret_sealed=SEALED_ALICE,
    )
    assert session(store, digest.upper()).token_hash == digest


def test_get_unknown_login_session_returns_none(store: Store) -> None:
    """A hash that was never recorded is not found."""
    assert store.get_login_session(token_hash("nope")) is None


def test_session_for_unknown_user_raises(store: Store) -> None:
    """A session for a user that does not exist raises UnknownUser."""
    with pytest.raises(UnknownUser):
        login(store, "a1", "ghost")


def test_duplicate_token_hash_raises_store_error(store: Store) -> None:
    """Recording the same token hash twice violates the key: StoreError."""
    add(store)
    login(store, "a1")
    with pytest.raises(StoreError):
        login(store, "a1")


def test_long_source_is_truncated(store: Store) -> None:
    """An over-long client address is cut to 100 characters, not a failed login."""
    add(store)
    digest = token_hash("a1")
    store.create_login_session(
        token_hash=digest,
        username="alice",
        at=T0,
        source="s" * 500,
        totp_secret_sealed=SEALED_ALICE,
    )
    assert session(store, digest).source == "s" * 100


@pytest.mark.parametrize("bad", ["", "xyz", "a" * 63, "a" * 65, "g" * 64])
def test_malformed_token_hash_is_refused_before_sql(
    bare_store: Store, bad: str
) -> None:
    """Anything but 64 hex digits is ValueError before SQL."""
    with pytest.raises(ValueError, match="token_hash"):
        bare_store.get_login_session(bad)


def test_touch_moves_last_used_forward_only(store: Store) -> None:
    """Touch sets last_used_at to a later time; an earlier time leaves it alone."""
    add(store)
    digest = login(store, "a1")
    later = T0 + timedelta(minutes=3)
    store.touch_login_session(digest, at=later)
    assert session(store, digest).last_used_at == later
    store.touch_login_session(digest, at=T0 + timedelta(minutes=1))
    assert session(store, digest).last_used_at == later


def test_touch_leaves_revoked_session_alone(store: Store) -> None:
    """Touching a revoked session does not change its last_used_at."""
    add(store)
    digest = login(store, "a1")
    store.revoke_login_session(digest, at=T0, reason="logout")
    store.touch_login_session(digest, at=T0 + timedelta(minutes=1))
    assert session(store, digest).last_used_at == T0


def test_touch_of_unknown_session_is_a_no_op(store: Store) -> None:
    """Touching a hash that was never recorded succeeds and records nothing."""
    store.touch_login_session(token_hash("nope"), at=T0)
    assert store.get_login_session(token_hash("nope")) is None


def test_revoke_login_session_once(store: Store) -> None:
    """Revoking a live session returns True and feeds it; again returns False."""
    add(store)
    digest = login(store, "a1")
    assert store.revoke_login_session(digest, at=T0, reason="logout")
    assert not store.revoke_login_session(
        digest, at=T0 + timedelta(minutes=1), reason="again"
    )
    assert session(store, digest).revoked_at == T0
    assert store.session_revocations_after(0) == (
        [SessionRevocation(digest, "alice")],
        1,
    )


def test_revoke_unknown_login_session_returns_false(store: Store) -> None:
    """Revoking a hash that was never recorded returns False and feeds nothing."""
    assert not store.revoke_login_session(token_hash("nope"), at=T0, reason="r")
    assert store.session_revocation_cursor() == 0


def test_revoke_user_sessions_keeps_user_enabled(store: Store) -> None:
    """revoke_user_sessions revokes only that user's live sessions, oldest first."""
    add(store, "alice")
    add(store, "bob")
    first = login(store, "a1")
    digest = token_hash("a2")
    store.create_login_session(
        token_hash=digest,
        username="alice",
        at=T0 + timedelta(minutes=1),
        source=SOURCE,
        totp_secret_sealed=SEALED_ALICE,
    )
    other = login(store, "b1", "bob")
    revoked = store.revoke_user_sessions("alice", at=T0, reason="logout everywhere")
    assert revoked == [first, digest]
    assert store.revoke_user_sessions("alice", at=T0, reason="again") == []
    assert session(store, other).revoked_at is None
    assert user(store).disabled_at is None
    login(store, "a3")


def test_revoke_sessions_of_unknown_user_raises(store: Store) -> None:
    """Revoking the sessions of a user that does not exist raises UnknownUser."""
    with pytest.raises(UnknownUser):
        store.revoke_user_sessions("ghost", at=T0, reason="r")


# The session revocation feed


def test_session_revocation_feed_pages_and_crosses_stores(db_url: str) -> None:
    """Revocations by one Store (the CLI) are read in pages by another (the broker)."""
    broker = Store.open(db_url)
    cli = Store.open(db_url)
    try:
        assert broker.session_revocation_cursor() == 0
        assert broker.session_revocations_after(0) == ([], 0)
        add(cli, "alice")
        add(cli, "bob")
        a1, a2, b1 = login(cli, "a1"), login(cli, "a2"), login(cli, "b1", "bob")
        cli.revoke_login_session(b1, at=T0, reason="logout")
        cli.disable_user("alice", at=T0, reason="left")
        first, cursor = broker.session_revocations_after(0, limit=2)
        rest, cursor = broker.session_revocations_after(cursor, limit=10)
        assert broker.session_revocations_after(cursor) == ([], cursor)
    finally:
        cli.close()
        broker.close()
    # alice's sessions share a login time, so they are ordered by token hash.
    older, newer = sorted([a1, a2])
    assert first == [SessionRevocation(b1, "bob"), SessionRevocation(older, "alice")]
    assert rest == [SessionRevocation(newer, "alice")]
    assert cursor == 3


@pytest.mark.parametrize(("cursor", "limit"), [(-1, 10), (0, 0)])
def test_bad_feed_arguments_are_refused(
    bare_store: Store, cursor: int, limit: int
) -> None:
    """A negative cursor or a non-positive limit is ValueError before SQL."""
    with pytest.raises(ValueError, match=r"cursor|limit"):
        bare_store.session_revocations_after(cursor, limit=limit)
