"""Remote-session rows (the auditors' index and crash recovery's worklist), on
SQLite and PostgreSQL alike."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from relay.store import RemoteSessionRecord, Store, StoreError
from relay.store._schema import SESSION_REASON_LENGTH

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
#: More than a 32-bit column holds: an hour of bulk transfer gets there.
FIVE_GIB = 5 * 1024**3


def requested(session_id: str = "s-1", **changes: object) -> RemoteSessionRecord:
    record = RemoteSessionRecord(
        session_id=session_id,
        node_id="node-a",
        device_id="dev-1",
        engineer="alice",
        reason="TICKET-42",
        channels=("shell", "tcp:22"),
        source="203.0.113.7",
        device_fingerprint="ab" * 32,
        requested_at=T0,
        start_seq=7,
    )
    return replace(record, **changes)  # type: ignore[arg-type]


def test_a_session_row_through_request_grant_and_end(store: Store) -> None:
    """The row carries what each step wrote, times as aware UTC, byte counts
    beyond 32 bits, and the recordings' digests."""
    store.record_session_request(requested())
    store.record_session_grant(
        "s-1",
        at=T0 + timedelta(seconds=5),
        decided_by="onsite",
        channels=["shell"],
        max_seconds=1800,
    )
    digest = {"kind": "shell", "sha256": "cd" * 32}
    assert store.record_session_end(
        "s-1",
        at=T0 + timedelta(minutes=30),
        reason="engineer",
        bytes_to_device=FIVE_GIB,
        bytes_from_device=FIVE_GIB + 1,
        recordings=[digest],
    )
    row = store.get_remote_session("s-1")
    assert row is not None
    assert row.requested_at == T0
    assert row.requested_at.tzinfo is not None
    assert (row.granted_at, row.decided_by) == (T0 + timedelta(seconds=5), "onsite")
    assert (row.granted_channels, row.max_seconds) == (("shell",), 1800)
    assert (row.ended_at, row.end_reason) == (T0 + timedelta(minutes=30), "engineer")
    assert (row.bytes_to_device, row.bytes_from_device) == (FIVE_GIB, FIVE_GIB + 1)
    assert row.recordings == (digest,)
    assert row.to_json()["duration_s"] == 30 * 60 - 5


def test_a_session_ends_once(store: Store) -> None:
    """A second end (a late receipt, recovery racing a live end) changes nothing."""
    store.record_session_request(requested())
    for reason, expected in [("onsite", True), ("broker_crash", False)]:
        ended = store.record_session_end(
            "s-1", at=T0, reason=reason, bytes_to_device=1, bytes_from_device=2
        )
        assert ended is expected
    row = store.get_remote_session("s-1")
    assert row is not None
    assert row.end_reason == "onsite"


def test_a_repeated_session_id_is_refused(store: Store) -> None:
    store.record_session_request(requested())
    with pytest.raises(StoreError):
        store.record_session_request(requested())


def test_open_sessions_are_per_node(store: Store) -> None:
    """Crash recovery on a node finds its own unended sessions, oldest first."""
    store.record_session_request(requested("s-2", requested_at=T0 + timedelta(1)))
    store.record_session_request(requested("s-1"))
    store.record_session_request(requested("s-3", node_id="node-b"))
    store.record_session_request(requested("s-4"))
    store.record_session_end(
        "s-4", at=T0, reason="engineer", bytes_to_device=0, bytes_from_device=0
    )
    assert [r.session_id for r in store.open_remote_sessions("node-a")] == [
        "s-1",
        "s-2",
    ]
    assert [r.session_id for r in store.open_remote_sessions("node-b")] == ["s-3"]


def test_open_sessions_elsewhere_are_those_of_the_other_nodes(store: Store) -> None:
    """What the nodes of a fleet may end for a node that left it."""
    store.record_session_request(requested("s-1"))
    store.record_session_request(requested("s-2", node_id="node-b"))
    store.record_session_request(requested("s-3", node_id="node-c"))
    store.record_session_request(requested("s-4", node_id="node-c"))
    store.record_session_end(
        "s-4", at=T0, reason="engineer", bytes_to_device=0, bytes_from_device=0
    )
    elsewhere = store.open_remote_sessions_elsewhere(["node-a", "node-b"])
    assert [r.session_id for r in elsewhere] == ["s-3"]
    assert [r.session_id for r in store.open_remote_sessions_elsewhere([])] == [
        "s-1",
        "s-2",
        "s-3",
    ]


def test_listing_filters_newest_first(store: Store) -> None:
    for n in range(6):
        store.record_session_request(
            requested(
                f"s-{n}",
                requested_at=T0 + timedelta(hours=n),
                device_id=f"dev-{n % 2}",
                engineer="bob" if n == 5 else "alice",
            )
        )
    store.record_session_end(
        "s-2", at=T0, reason="time_cap", bytes_to_device=0, bytes_from_device=0
    )

    def ids(**filters: object) -> list[str]:
        return [r.session_id for r in store.list_remote_sessions(**filters)]  # type: ignore[arg-type]

    assert ids() == ["s-5", "s-4", "s-3", "s-2", "s-1", "s-0"]
    assert ids(device_id="dev-1") == ["s-5", "s-3", "s-1"]
    assert ids(engineer="bob") == ["s-5"]
    assert ids(since=T0 + timedelta(hours=2), until=T0 + timedelta(hours=4)) == [
        "s-3",
        "s-2",
    ]
    assert ids(end_reason="time_cap") == ["s-2"]
    assert ids(limit=2) == ["s-5", "s-4"]
    assert ids(limit=0) == ["s-5"]  # at least one


def test_an_overlong_reason_is_cut_to_the_column(store: Store) -> None:
    """The same on both engines: PostgreSQL would refuse a longer value outright."""
    store.record_session_request(requested(reason="é" * (SESSION_REASON_LENGTH + 50)))
    row = store.get_remote_session("s-1")
    assert row is not None
    assert row.reason == "é" * SESSION_REASON_LENGTH
