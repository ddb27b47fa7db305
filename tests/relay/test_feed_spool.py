"""The spool directory where the instrument hands records over (relay.feed_spool)."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from relay.feed_spool import MAX_FILES_PER_TAKE, FeedSpool, SnapshotUnavailable
from relay.proto import feed
from relay.simulated_instrument import (
    configuration_snapshot,
    write_record,
    write_snapshot,
)

T0 = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)
ALARM = feed.Alarm(code="E101", severity="alarm", text="low", device_time=T0)


@pytest.fixture
def spool(tmp_path: Path) -> FeedSpool:
    spool = FeedSpool(tmp_path / "feed", max_record_bytes=2048)
    spool.create()
    return spool


def write(spool: FeedSpool, name: str, text: str, mtime_s: int | None = None) -> Path:
    path = spool.outbox / name
    path.write_text(text, encoding="utf-8")
    if mtime_s is not None:
        os.utime(path, (mtime_s, mtime_s))
    return path


def test_good_records_are_accepted_in_order_then_deleted(spool: FeedSpool) -> None:
    """Outbox files go to accept() oldest first; each is deleted only after accept()."""
    body = json.dumps(feed.to_json(ALARM))
    write(spool, "b.alarm.json", body, mtime_s=1000)
    write(spool, "a.alarm.json", body.replace("E101", "E102"), mtime_s=2000)
    seen: list[tuple[str, bool]] = []

    def accept(record: feed.Record) -> None:
        assert isinstance(record, feed.Alarm)
        # The file is still there while the record is being queued.
        name = "b.alarm.json" if record.code == "E101" else "a.alarm.json"
        seen.append((record.code, (spool.outbox / name).exists()))

    taken = spool.take_outbox(accept)
    assert taken.accepted == 2
    assert not taken.refused
    assert seen == [("E101", True), ("E102", True)]
    assert not list(spool.outbox.glob("*.json"))


def test_a_failing_accept_keeps_the_file(spool: FeedSpool) -> None:
    """If the queue cannot commit, the file stays for the next scan."""
    write_record(spool.root, ALARM, "x")

    def accept(_record: feed.Record) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        spool.take_outbox(accept)
    assert (spool.outbox / "x.alarm.json").exists()


def test_half_written_files_are_not_read(spool: FeedSpool) -> None:
    """Files not ending in .json, dot files and tmp/ are the instrument's, not ours."""
    write(spool, "x.alarm.json.part", "{")
    write(spool, ".x.alarm.json", "{")
    (spool.outbox / "tmp" / "y.alarm.json").write_text("{")
    taken = spool.take_outbox(lambda _r: None)
    assert taken.accepted == 0
    assert not taken.refused
    assert not list(spool.rejected.iterdir())


def test_a_malformed_file_goes_to_rejected_with_a_reason(spool: FeedSpool) -> None:
    """A bad record is moved to rejected/ with a .reason file, never silently lost."""
    write(spool, "bad.alarm.json", '{"code": "E1"')
    write(spool, "field.alarm.json", json.dumps({"code": "E1"}))
    accepted: list[feed.Record] = []
    taken = spool.take_outbox(accepted.append)
    assert not accepted
    assert {(r.name, r.reason) for r in taken.refused} == {
        ("bad.alarm.json", "malformed"),
        ("field.alarm.json", "bad_field"),
    }
    assert (spool.rejected / "bad.alarm.json").read_text() == '{"code": "E1"'
    assert (
        (spool.rejected / "bad.alarm.json.reason").read_text().startswith("malformed: ")
    )
    assert "lacks" in (spool.rejected / "field.alarm.json.reason").read_text()
    assert not list(spool.outbox.glob("*.json"))


def test_an_unsolicited_configuration_push_is_refused(spool: FeedSpool) -> None:
    """Request-only data dropped in the outbox is never sent: rejected as unsolicited."""
    write_record(spool.root, configuration_snapshot(T0), "push")
    accepted: list[feed.Record] = []
    taken = spool.take_outbox(accepted.append)
    assert not accepted
    assert [(r.name, r.reason) for r in taken.refused] == [
        ("push.configuration.json", "unsolicited")
    ]
    reason = (spool.rejected / "push.configuration.json.reason").read_text()
    assert reason.startswith("unsolicited: ")


def test_unknown_kinds_and_oversized_files_are_rejected(spool: FeedSpool) -> None:
    """A name without a known kind, or a file over the limit, is refused with its reason."""
    write(spool, "noise.json", "{}")
    write(spool, "big.alarm.json", " " * 3000)
    taken = spool.take_outbox(lambda _r: None)
    assert {(r.name, r.reason) for r in taken.refused} == {
        ("noise.json", "unknown_kind"),
        ("big.alarm.json", "too_large"),
    }


def test_a_second_reject_of_the_same_name_does_not_overwrite(spool: FeedSpool) -> None:
    """Two bad files of one name keep both copies and both reasons."""
    write(spool, "x.alarm.json", "1")
    spool.take_outbox(lambda _r: None)
    write(spool, "x.alarm.json", "2")
    spool.take_outbox(lambda _r: None)
    assert (spool.rejected / "x.alarm.json").read_text() == "1"
    assert (spool.rejected / "x.alarm.2.json").read_text() == "2"
    assert (spool.rejected / "x.alarm.2.json.reason").exists()


def test_one_take_is_bounded(spool: FeedSpool) -> None:
    """A full outbox is taken in passes; the first says more wait."""
    body = json.dumps(feed.to_json(ALARM))
    for n in range(MAX_FILES_PER_TAKE + 3):
        write(spool, f"{n:04d}.alarm.json", body)
    first = spool.take_outbox(lambda _r: None)
    assert first.accepted == MAX_FILES_PER_TAKE
    assert first.more
    second = spool.take_outbox(lambda _r: None)
    assert second.accepted == 3
    assert not second.more


def test_links_are_not_followed(spool: FeedSpool, tmp_path: Path) -> None:
    """A symlink in the outbox cannot make the agent send another file."""
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps(feed.to_json(ALARM)))
    (spool.outbox / "link.alarm.json").symlink_to(secret)
    accepted: list[feed.Record] = []
    taken = spool.take_outbox(accepted.append)
    assert not accepted
    assert [r.reason for r in taken.refused] == ["unreadable"]


def test_snapshots_are_read_checked(spool: FeedSpool) -> None:
    """A snapshot is returned parsed; missing is no_data, invalid is bad_snapshot."""
    with pytest.raises(SnapshotUnavailable) as missing:
        spool.read_snapshot("configuration")
    assert missing.value.reason == "no_data"
    write_snapshot(spool.root, configuration_snapshot(T0))
    assert spool.read_snapshot("configuration") == configuration_snapshot(T0)
    spool.snapshot_path("consumables").write_text('{"device_time": "yesterday"}')
    with pytest.raises(SnapshotUnavailable) as bad:
        spool.read_snapshot("consumables")
    assert bad.value.reason == "bad_snapshot"
    with pytest.raises(ValueError, match="no snapshot"):
        spool.snapshot_path("alarm")


def test_the_instruments_group_may_write_whatever_the_umask(tmp_path: Path) -> None:
    """The outbox and the snapshots are 0770 even under the systemd unit's
    umask 0077 (the instrument's software writes them as a group member);
    rejected/ is 0750 (it reads the reasons)."""
    old = os.umask(0o077)
    try:
        spool = FeedSpool(tmp_path / "feed", max_record_bytes=2048)
        spool.create()
    finally:
        os.umask(old)
    modes = {
        path.relative_to(spool.root).as_posix(): stat.S_IMODE(path.stat().st_mode)
        for path in (
            spool.outbox,
            spool.outbox / "tmp",
            spool.snapshots,
            spool.rejected,
        )
    }
    assert modes == {
        "outbox": 0o770,
        "outbox/tmp": 0o770,
        "snapshots": 0o770,
        "rejected": 0o750,
    }
