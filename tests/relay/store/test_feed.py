"""The monitoring feed in the store (SQLite and PostgreSQL): records stored once,
data requests answered only by their own device's record of their kind,
retention, customers' organisations, and migration 0007."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect

from relay.proto import feed
from relay.store import NewFeedRecord, PolicySubjectKind, Store, UnknownDataRequest
from tests.relay.store.test_labels import (
    _alembic,
    _sql,
    add_user,
    enroll,
)

T0 = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
PARIS = timezone(timedelta(hours=1))


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    opened = Store.open(db_url)
    try:
        enroll(opened, "dev-1", "0a")
        enroll(opened, "dev-2", "0b")
        yield opened
    finally:
        opened.close()


def alarm(n: int, *, code: str = "E101", severity: str = "alarm") -> feed.Alarm:
    return feed.Alarm(
        code=code,
        severity=severity,
        text=f"alarm {n}",
        device_time=datetime(2026, 11, 2, 9, n, tzinfo=PARIS),
    )


def consumables() -> feed.Consumables:
    return feed.Consumables(
        device_time=datetime(2026, 11, 2, 9, 30, tzinfo=PARIS),
        items=(
            feed.Consumable(
                name="final_filter",
                part="Final filter 0.22 um",
                remaining_percent=41.0,
                installed_on=date(2026, 6, 1),
            ),
        ),
    )


def rid(n: int) -> str:
    return f"{n:032x}"


def test_a_record_is_stored_once_per_device_and_key(store: Store) -> None:
    assert store.add_feed_record(
        "dev-1", alarm(1), record_id=rid(1), request_id=None, received_at=T0
    )
    # The same key again (an ack that was lost): not stored twice.
    assert not store.add_feed_record(
        "dev-1", alarm(1), record_id=rid(1), request_id=None, received_at=T0
    )
    # Another device may use the same key: keys are the agent's, per device.
    assert store.add_feed_record(
        "dev-2", alarm(1), record_id=rid(1), request_id=None, received_at=T0
    )
    [row] = store.list_feed_records("dev-1", kinds=["alarm"])
    assert (row.record_id, row.severity, row.code) == (rid(1), "alarm", "E101")
    assert row.device_time == datetime(2026, 11, 2, 8, 1, tzinfo=UTC)
    # The body keeps the device's own offset, and parses back to the record.
    assert row.body["device_time"] == "2026-11-02T09:01:00+01:00"
    assert feed.parse_record("alarm", _json(row.body), max_bytes=16384) == alarm(1)


def test_listing_keeps_the_newest_within_the_limit_oldest_first(store: Store) -> None:
    for n in range(1, 6):
        store.add_feed_record(
            "dev-1", alarm(n), record_id=rid(n), request_id=None, received_at=T0
        )
    rows = store.list_feed_records("dev-1", kinds=["alarm"], limit=3)
    assert [r.body["text"] for r in rows] == ["alarm 3", "alarm 4", "alarm 5"]
    since = datetime(2026, 11, 2, 8, 2, tzinfo=UTC)
    until = datetime(2026, 11, 2, 8, 4, tzinfo=UTC)
    rows = store.list_feed_records("dev-1", kinds=["alarm"], since=since, until=until)
    assert [r.body["text"] for r in rows] == ["alarm 2", "alarm 3"]
    assert store.list_feed_records("dev-1", kinds=["daily_stats"]) == []


def test_a_request_is_answered_by_its_own_device_and_kind_only(store: Store) -> None:
    request = store.create_data_request(
        request_id=rid(7),
        device_id="dev-1",
        kind="consumables",
        requested_by="alice",
        reason="filter change planned",
        at=T0,
    )
    assert store.pending_data_request("dev-1", "consumables") == request
    # Another device answering it, or this device with another kind: refused,
    # and nothing is stored.
    with pytest.raises(UnknownDataRequest):
        store.add_feed_record(
            "dev-2", consumables(), record_id=rid(1), request_id=rid(7), received_at=T0
        )
    configuration = feed.Configuration(
        device_time=datetime(2026, 11, 2, 9, 0, tzinfo=PARIS), parameters=()
    )
    with pytest.raises(UnknownDataRequest):
        store.add_feed_record(
            "dev-1", configuration, record_id=rid(2), request_id=rid(7), received_at=T0
        )
    assert store.latest_feed_record("dev-2", "consumables") is None
    assert store.latest_feed_record("dev-1", "configuration") is None
    answered_at = T0 + timedelta(seconds=3)
    assert store.add_feed_record(
        "dev-1",
        consumables(),
        record_id=rid(3),
        request_id=rid(7),
        received_at=answered_at,
    )
    done = store.get_data_request(rid(7))
    assert done is not None
    assert (done.status, done.record_id, done.finished_at) == (
        "answered",
        rid(3),
        answered_at,
    )
    latest = store.latest_feed_record("dev-1", "consumables")
    assert latest is not None
    assert latest.request_id == rid(7)
    # A second answer to an answered request is no answer.
    with pytest.raises(UnknownDataRequest):
        store.add_feed_record(
            "dev-1", consumables(), record_id=rid(4), request_id=rid(7), received_at=T0
        )


def test_requests_lapse_refuse_and_a_late_answer_is_taken(store: Store) -> None:
    for n, kind in ((1, "configuration"), (2, "consumables")):
        store.create_data_request(
            request_id=rid(n),
            device_id="dev-1",
            kind=kind,
            requested_by="alice",
            reason="",
            at=T0,
        )
    assert not store.refuse_data_request(rid(1), "dev-2", refusal="x", at=T0)
    assert store.refuse_data_request(rid(1), "dev-1", refusal="too_soon", at=T0)
    lapsed = store.lapse_data_requests(
        requested_before=T0 + timedelta(seconds=1), at=T0 + timedelta(seconds=61)
    )
    assert [r.request_id for r in lapsed] == [rid(2)]
    assert [r.status for r in store.list_data_requests("dev-1")] in (
        ["refused", "lapsed"],
        ["lapsed", "refused"],
    )
    assert store.add_feed_record(
        "dev-1", consumables(), record_id=rid(9), request_id=rid(2), received_at=T0
    )
    got = store.get_data_request(rid(2))
    assert got is not None
    assert got.status == "answered"
    first = store.get_data_request(rid(1))
    assert first is not None
    assert (first.status, first.refusal) == (
        "refused",
        "too_soon",
    )
    with pytest.raises(ValueError, match="kind"):
        store.create_data_request(
            request_id=rid(3),
            device_id="dev-1",
            kind="alarm",
            requested_by="alice",
            reason="",
            at=T0,
        )


def test_retention_deletes_only_what_is_older(store: Store) -> None:
    store.add_feed_record(
        "dev-1", alarm(1), record_id=rid(1), request_id=None, received_at=T0
    )
    store.add_feed_record(
        "dev-1",
        alarm(2),
        record_id=rid(2),
        request_id=None,
        received_at=T0 + timedelta(days=2),
    )
    assert store.purge_feed(before=T0 + timedelta(days=1)) == 1
    assert [r.record_id for r in store.list_feed_records("dev-1", kinds=["alarm"])] == [
        rid(2)
    ]


def test_a_customer_has_an_organisation_and_nobody_else_does(store: Store) -> None:
    store.add_user(
        username="carol",
        role="customer",
        password_hash="h",  # noqa: S106 - a stand-in, nothing is hashed here
        totp_secret_sealed="s",  # noqa: S106 - a stand-in
        at=T0,
        organisation="acme",
    )
    carol = store.get_user("carol")
    assert carol is not None
    assert (carol.role, carol.organisation) == (
        "customer",
        "acme",
    )
    with pytest.raises(ValueError, match="needs an organisation"):
        store.add_user(
            username="dave",
            role="customer",
            password_hash="h",  # noqa: S106 - a stand-in, nothing is hashed here
            totp_secret_sealed="s",  # noqa: S106 - a stand-in
            at=T0,
        )
    with pytest.raises(ValueError, match="only customers"):
        add_user(store, "erin", organisation="acme")
    with pytest.raises(ValueError, match="organisation must match"):
        store.add_user(
            username="dave",
            role="customer",
            password_hash="h",  # noqa: S106 - a stand-in, nothing is hashed here
            totp_secret_sealed="s",  # noqa: S106 - a stand-in
            at=T0,
            organisation="Acme Inc.\n",
        )
    cursor = store.policy_subject_cursor()
    store.set_user_organisation("carol", "globex", at=T0)
    carol = store.get_user("carol")
    assert carol is not None
    assert carol.organisation == "globex"
    # Running brokers hear of it like a group change.
    [change] = store.policy_subject_changes_after(cursor)
    assert (change.kind, change.subject) == (PolicySubjectKind.USER_GROUPS, "carol")
    add_user(store, "alice")
    with pytest.raises(ValueError, match="only customers"):
        store.set_user_organisation("alice", "acme", at=T0)


def test_migration_0007_up_from_0006_and_down_again(db_url: str) -> None:
    """0006 → head adds the tables and a NULL organisation; head → 0006 removes
    them and keeps the users."""
    store = Store.open(db_url)
    try:
        add_user(store, "alice")
        store.add_feed_record(
            _enrolled(store),
            alarm(1),
            record_id=rid(1),
            request_id=None,
            received_at=T0,
        )
    finally:
        store.close()
    engine = create_engine(db_url)
    try:
        with engine.begin() as connection:
            command.downgrade(_alembic(connection), "0006")
        names = set(inspect(engine).get_table_names())
        columns = {c["name"] for c in inspect(engine).get_columns("users")}
    finally:
        engine.dispose()
    assert not {"feed_records", "data_requests"} & names
    assert "organisation" not in columns
    assert _sql(db_url, "SELECT username FROM users") == [("alice",)]
    upgraded = Store.open(db_url)
    try:
        alice = upgraded.get_user("alice")
        assert alice is not None
        assert alice.organisation is None
        assert upgraded.list_feed_records("dev-1", kinds=["alarm"]) == []
    finally:
        upgraded.close()


def _enrolled(store: Store) -> str:
    enroll(store, "dev-1", "0a")
    return "dev-1"


def _json(body: object) -> str:
    import json

    return json.dumps(body)


def test_a_customer_never_holds_the_enroll_permission(store: Store) -> None:
    with pytest.raises(ValueError, match="customers never enroll"):
        store.add_user(
            username="carol",
            role="customer",
            password_hash="h",  # noqa: S106 - a stand-in
            totp_secret_sealed="s",  # noqa: S106 - a stand-in
            at=T0,
            organisation="acme",
            can_enroll=True,
        )


def test_pushed_records_are_stored_in_one_transaction_each_once(store: Store) -> None:
    store.add_feed_record(
        "dev-1", alarm(1), record_id=rid(1), request_id=None, received_at=T0
    )
    batch = [
        NewFeedRecord(
            device_id="dev-1", record=alarm(n), record_id=rid(n), received_at=T0
        )
        for n in (1, 2, 3)
    ] + [
        NewFeedRecord(
            device_id="dev-2", record=alarm(1), record_id=rid(1), received_at=T0
        )
    ]
    assert store.add_feed_records(batch) == [False, True, True, True]
    assert len(store.list_feed_records("dev-1", kinds=["alarm"])) == 3
