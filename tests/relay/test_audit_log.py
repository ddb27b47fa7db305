"""The audit log on disk: appends, checkpoints, rotation, several writers, torn
tails, failing disks and tampering (relay/audit_log.py).

Every test that writes a log ends by verifying the files it left with the
verifier a reviewer would use (``verify_lines`` over every file, with the
seq of the sink's last checkpoint as the expected seal).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relay.audit import (
    CHECKPOINT_EVENT,
    AuditChain,
    Problem,
    Record,
    VerifyReport,
    parse_record,
    verify_lines,
)
from relay.audit_log import (
    AuditLog,
    AuditLogCorrupt,
    QueuedMirror,
    audit_files,
    iter_lines,
    load_or_create_audit_key,
    load_public_key,
    public_key_pem,
)
from relay.config import AuditConfig
from tests.small_disk import small_disk

KEY: Final = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY: Final = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
PUBLIC: Final = KEY.public_key()
START: Final = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


# Helpers ---------------------------------------------------------------------


@dataclass
class Clocks:
    """A wall clock that moves one second per reading and a monotonic clock
    that moves only when the test says so."""

    wall: datetime = START
    mono: float = 0.0  # 0.0 on purpose: a start of zero is a valid reading

    def now(self) -> datetime:
        self.wall += timedelta(seconds=1)
        return self.wall

    def monotonic(self) -> float:
        return self.mono


@dataclass
class Harness:
    """One AuditLog with its clocks, mirror and callbacks recorded."""

    directory: Path
    config: AuditConfig
    clocks: Clocks = field(default_factory=Clocks)
    mirror: io.StringIO = field(default_factory=io.StringIO)
    health: list[bool] = field(default_factory=list)
    failures: int = 0

    def open(self) -> AuditLog:
        def count_failure() -> None:
            self.failures += 1

        return AuditLog(
            self.directory,
            signer=KEY,
            config=self.config,
            wall_clock=self.clocks.now,
            monotonic=self.clocks.monotonic,
            mirror=self.mirror,
            on_write_failure=count_failure,
            on_health=self.health.append,
        )


def healthy(log: AuditLog) -> bool:
    """log.healthy, read afresh (mypy keeps an earlier ``assert not`` narrowing)."""
    return log.healthy


def log_lines(directory: Path) -> list[bytes]:
    return list(iter_lines(audit_files(directory)))


def log_records(directory: Path) -> list[Record]:
    return [parse_record(line) for line in log_lines(directory)]


def sink_lines(sink: Path) -> list[bytes]:
    return sink.read_bytes().splitlines(keepends=True) if sink.exists() else []


def sink_seq(sink: Path) -> int | None:
    lines = sink_lines(sink)
    return parse_record(lines[-1]).seq if lines else None


def verify_dir(directory: Path, sink: Path) -> VerifyReport:
    """Verify every file of the chain against the sink's last checkpoint."""
    report = verify_lines(
        iter_lines(audit_files(directory)),
        PUBLIC,
        expect_checkpoint_seq=sink_seq(sink),
    )
    assert report.ok, report.problem
    return report


def assert_sink_matches_log(directory: Path, sink: Path) -> None:
    """The sink holds exactly the log's checkpoint lines, byte for byte, in order."""
    checkpoints = [
        line
        for line in log_lines(directory)
        if parse_record(line).event == CHECKPOINT_EVENT
    ]
    assert sink_lines(sink) == checkpoints


def events(directory: Path) -> list[str]:
    return [record.event for record in log_records(directory)]


def problem(directory: Path, sink: Path) -> Problem:
    report = verify_lines(
        iter_lines(audit_files(directory)),
        PUBLIC,
        expect_checkpoint_seq=sink_seq(sink),
    )
    assert report.problem is not None
    return report.problem


@pytest.fixture
def audit_dir(tmp_path: Path) -> Path:
    return tmp_path / "audit"


# 1. Appends, seq numbers, checkpoints, the sink and the mirror -----------------


def test_appends_number_records_and_checkpoint_every_n(audit_dir: Path) -> None:
    h = Harness(audit_dir, AuditConfig(checkpoint_every_records=3))
    log = h.open()
    seqs = [log.append("session.start", {"n": i}) for i in range(7)]
    # A checkpoint follows every third record and takes the next seq.
    assert seqs == [1, 2, 3, 5, 6, 7, 9]
    assert log.seq == 9
    assert log.healthy
    assert log.sink_path == audit_dir / "checkpoints.jsonl"
    assert [r.seq for r in log_records(audit_dir)] == list(range(1, 10))
    assert events(audit_dir) == [
        *["session.start"] * 3,
        CHECKPOINT_EVENT,
        *["session.start"] * 3,
        CHECKPOINT_EVENT,
        "session.start",
    ]
    fields = [r.fields for r in log_records(audit_dir) if not r.is_checkpoint]
    assert fields == [{"n": i} for i in range(7)]

    log.close()
    records = log_records(audit_dir)
    assert records[-1].event == CHECKPOINT_EVENT
    assert records[-1].seq == 10
    assert records[-1].fields["head_seq"] == 9
    log.close()  # idempotent: no second checkpoint
    assert len(log_records(audit_dir)) == 10

    assert_sink_matches_log(audit_dir, log.sink_path)
    assert [parse_record(line).seq for line in sink_lines(log.sink_path)] == [4, 8, 10]
    assert h.mirror.getvalue().encode() == b"".join(log_lines(audit_dir))
    assert h.health == []
    assert h.failures == 0
    report = verify_dir(audit_dir, log.sink_path)
    assert report.records == 10
    assert report.last_checkpoint_seq == 10
    assert report.unsealed == 0


def test_records_carry_the_wall_clock_and_caller_fields(audit_dir: Path) -> None:
    h = Harness(audit_dir, AuditConfig())
    log = h.open()
    log.append("user.login", {"user": "ana", "ok": True, "roles": ["a", "b"]})
    log.close()
    first = log_records(audit_dir)[0]
    assert first.ts == "2026-06-01T12:00:01.000Z"
    assert first.fields == {"user": "ana", "ok": True, "roles": ["a", "b"]}
    verify_dir(audit_dir, log.sink_path)


def test_tick_checkpoints_once_the_interval_passed(audit_dir: Path) -> None:
    h = Harness(audit_dir, AuditConfig(checkpoint_every_s=60.0))
    log = h.open()
    log.tick()  # nothing written yet: nothing to seal
    assert audit_files(audit_dir) == []

    log.append("session.start", {})
    h.clocks.mono = 59.9
    log.tick()
    assert events(audit_dir) == ["session.start"]
    h.clocks.mono = 60.0
    log.tick()
    assert events(audit_dir) == ["session.start", CHECKPOINT_EVENT]
    h.clocks.mono = 500.0
    log.tick()  # sealed, nothing new: no checkpoint of a checkpoint
    assert len(log_records(audit_dir)) == 2

    # The interval counts from the last checkpoint.
    log.append("session.end", {})
    h.clocks.mono = 559.0
    log.tick()
    assert len(log_records(audit_dir)) == 3
    h.clocks.mono = 560.0
    log.tick()
    assert events(audit_dir)[-1] == CHECKPOINT_EVENT
    assert_sink_matches_log(audit_dir, log.sink_path)
    log.close()  # nothing unsealed: no checkpoint
    assert len(log_records(audit_dir)) == 4
    report = verify_dir(audit_dir, log.sink_path)
    assert report.last_checkpoint_seq == 4


def test_close_without_records_writes_nothing(audit_dir: Path) -> None:
    log = Harness(audit_dir, AuditConfig()).open()
    log.close()
    assert audit_files(audit_dir) == []
    assert not log.sink_path.exists()
    assert stat.S_IMODE(audit_dir.stat().st_mode) == 0o700


def test_a_new_writer_continues_the_chain(audit_dir: Path) -> None:
    h = Harness(audit_dir, AuditConfig())
    first = h.open()
    first.append("a.b", {"n": 1})
    first.close()  # seq 2 is its checkpoint
    second = h.open()
    assert second.seq == 2
    assert second.append("a.b", {"n": 2}) == 3
    second.close()
    assert [r.seq for r in log_records(audit_dir)] == [1, 2, 3, 4]
    assert len(audit_files(audit_dir)) == 1
    assert_sink_matches_log(audit_dir, first.sink_path)
    verify_dir(audit_dir, first.sink_path)


def test_unsealed_records_of_another_writer_are_sealed_at_the_next_tick(
    audit_dir: Path,
) -> None:
    h = Harness(audit_dir, AuditConfig())
    crashed = h.open()
    crashed.append("a.b", {})
    # The process dies without close(): its record stays unsealed.
    resumed = h.open()
    resumed.tick()
    assert events(audit_dir) == ["a.b", CHECKPOINT_EVENT]
    resumed.close()
    crashed.close()  # its record was sealed by the other writer
    verify_dir(audit_dir, h.open().sink_path)


def test_a_bad_field_raises_and_writes_nothing(audit_dir: Path) -> None:
    h = Harness(audit_dir, AuditConfig())
    log = h.open()
    log.append("a.b", {"n": 1})
    with pytest.raises(ValueError, match="field 'x'"):
        log.append("a.b", {"x": 1.5})
    with pytest.raises(ValueError, match="event"):
        log.append("Not An Event", {})
    assert log.healthy
    assert log.seq == 1
    assert log.append("a.b", {"n": 2}) == 2
    log.close()
    assert h.failures == 0
    verify_dir(audit_dir, log.sink_path)


def test_the_sink_can_live_elsewhere(tmp_path: Path, audit_dir: Path) -> None:
    sink = tmp_path / "other-volume" / "sink.jsonl"
    sink.parent.mkdir()
    h = Harness(
        audit_dir, AuditConfig(checkpoint_every_records=2, checkpoint_sink=sink)
    )
    log = h.open()
    assert log.sink_path == sink
    for i in range(5):
        log.append("a.b", {"n": i})
    log.close()
    assert not (audit_dir / "checkpoints.jsonl").exists()
    assert_sink_matches_log(audit_dir, sink)
    assert len(sink_lines(sink)) == 3
    verify_dir(audit_dir, sink)


def test_a_closed_mirror_does_not_stop_the_log(audit_dir: Path) -> None:
    h = Harness(audit_dir, AuditConfig())
    log = h.open()
    h.mirror.close()
    assert log.append("a.b", {}) == 1
    assert log.healthy
    log.close()
    verify_dir(audit_dir, log.sink_path)


# 2. Rotation ------------------------------------------------------------------


def test_rotation_starts_files_named_by_their_first_seq(audit_dir: Path) -> None:
    config = AuditConfig(max_file_bytes=4096, checkpoint_every_records=25)
    h = Harness(audit_dir, config)
    log = h.open()
    for i in range(120):
        log.append("session.output", {"n": i, "text": "x" * 100})
    log.close()

    files = audit_files(audit_dir)
    assert len(files) >= 4
    for path in files:
        lines = path.read_bytes().splitlines(keepends=True)
        assert lines, path
        assert path.name == f"audit-{parse_record(lines[0]).seq:012d}.jsonl"
        # A file is closed after the first line that takes it to the limit.
        assert path.stat().st_size - len(lines[-1]) < config.max_file_bytes
    for path in files[:-1]:
        assert path.stat().st_size >= config.max_file_bytes

    report = verify_dir(audit_dir, log.sink_path)
    assert report.records == 120 + 5  # 4 by count, 1 at close
    assert_sink_matches_log(audit_dir, log.sink_path)

    # A new writer continues in the newest file, or starts the next one.
    again = h.open()
    seq = again.append("a.b", {})
    again.close()
    assert seq == report.last_seq + 1
    newest = audit_files(audit_dir)[-1]
    assert int(newest.name[6:18]) <= seq
    verify_dir(audit_dir, log.sink_path)


# 3. Several writers ---------------------------------------------------------------


def test_two_writers_in_one_process_share_one_chain(audit_dir: Path) -> None:
    config = AuditConfig(checkpoint_every_records=4, max_file_bytes=4096)
    h = Harness(audit_dir, config)
    a, b = h.open(), h.open()
    seqs: list[int] = []
    for i in range(60):
        for name, log in (("a", a), ("b", b)):
            if i % 3 == 0 and name == "b":
                continue  # uneven, so that checkpoints fall at odd places
            seq = log.append("writer.step", {"who": name, "i": i})
            assert seq is not None
            seqs.append(seq)
    a.close()
    b.close()

    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    records = log_records(audit_dir)
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    for name, expected in (
        ("a", list(range(60))),
        ("b", [i for i in range(60) if i % 3]),
    ):
        assert [
            r.fields["i"] for r in records if r.fields.get("who") == name
        ] == expected
    assert len([r for r in records if not r.is_checkpoint]) == 60 + 40
    assert_sink_matches_log(audit_dir, h.open().sink_path)
    verify_dir(audit_dir, audit_dir / "checkpoints.jsonl")


class _Killed(BaseException):
    """Stands for SIGKILL between two system calls."""


def test_a_writer_killed_between_stamp_and_line_causes_no_duplicate_seq(
    audit_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = Harness(audit_dir, AuditConfig())
    a = h.open()
    a.append("a.b", {"who": "a"})
    victim = h.open()

    def killed(fd: int, data: bytes) -> int:
        raise _Killed

    # The victim announces seq 2 in .lock and dies before writing its line.
    with monkeypatch.context() as patch:
        patch.setattr(os, "write", killed)
        with pytest.raises(_Killed):
            victim.append("a.b", {"who": "victim"})

    late = h.open()  # reads the dead writer's stamp
    assert a.append("a.b", {"who": "a"}) == 2
    assert late.append("a.b", {"who": "late"}) == 3
    assert a.append("a.b", {"who": "a"}) == 4
    for log in (a, late):
        log.close()
    assert [r.seq for r in log_records(audit_dir)] == [1, 2, 3, 4, 5, 6]
    verify_dir(audit_dir, audit_dir / "checkpoints.jsonl")


def test_a_writer_killed_mid_line_is_cut_by_the_next_writer(
    audit_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = Harness(audit_dir, AuditConfig())
    a = h.open()
    a.append("a.b", {"who": "a"})
    victim = h.open()
    real_write = os.write

    def torn(fd: int, data: bytes) -> int:
        real_write(fd, data[:10])
        raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", torn)
        with pytest.raises(_Killed):
            victim.append("a.b", {"who": "victim"})
    assert not log_lines(audit_dir)[-1].endswith(b"\n")

    assert a.append("a.b", {"who": "a"}) is not None
    a.close()
    records = log_records(audit_dir)
    assert "victim" not in [r.fields.get("who") for r in records]
    # The cut is in the log: the record the dead writer was writing is lost.
    repaired = [r for r in records if r.event == "audit.tail_repaired"]
    assert [r.fields["bytes_cut"] for r in repaired] == [10]
    verify_dir(audit_dir, a.sink_path)


_CHILD: Final = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from relay.audit_log import AuditLog, load_or_create_audit_key
    from relay.config import AuditConfig

    directory, secrets, name, go = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    key = load_or_create_audit_key(secrets / "audit.key", directory / "audit-key.pem")
    log = AuditLog(directory, signer=key, config=AuditConfig(checkpoint_every_records=50))
    deadline = time.monotonic() + 10
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.001)
    for i in range(200):
        if log.append("writer.step", {"who": name, "i": i}) is None:
            sys.exit(f"{name}: append {i} failed: {log.last_error}")
    log.close()
    """
)


def test_two_processes_append_to_one_chain(tmp_path: Path, audit_dir: Path) -> None:
    secrets = tmp_path / "secrets"
    key = load_or_create_audit_key(secrets / "audit.key", audit_dir / "audit-key.pem")
    go = tmp_path / "go"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(audit_dir), str(secrets), name, str(go)],
            stderr=subprocess.PIPE,
        )
        for name in ("p1", "p2")
    ]
    time.sleep(0.6)  # both import and open the log, then start together
    go.touch()
    for child in children:
        _, err = child.communicate(timeout=30)
        assert child.returncode == 0, err.decode()

    report = verify_lines(
        iter_lines(audit_files(audit_dir)),
        key.public_key(),
        expect_checkpoint_seq=sink_seq(audit_dir / "checkpoints.jsonl"),
    )
    assert report.ok, report.problem
    assert report.unsealed == 0
    records = log_records(audit_dir)
    steps = [r for r in records if not r.is_checkpoint]
    assert len(steps) == 400
    for name in ("p1", "p2"):
        assert [r.fields["i"] for r in steps if r.fields["who"] == name] == list(
            range(200)
        )
    # 4 by count each, plus at most one each at close.
    assert 8 <= len(records) - 400 <= 10
    assert_sink_matches_log(audit_dir, audit_dir / "checkpoints.jsonl")


# 4. Torn tails and corrupt last lines ---------------------------------------------


def test_a_torn_tail_is_cut_on_open_and_logged(audit_dir: Path) -> None:
    h = Harness(audit_dir, AuditConfig())
    log = h.open()
    for i in range(3):
        log.append("a.b", {"n": i})
    log.close()  # seq 4 is the checkpoint
    newest = audit_files(audit_dir)[-1]
    garbage = b'{"event":"a.b","prev":"0123'
    with newest.open("ab") as handle:
        handle.write(garbage)

    again = h.open()
    assert newest.read_bytes().endswith(b"\n")
    records = log_records(audit_dir)
    assert records[-1].event == "audit.tail_repaired"
    assert records[-1].seq == 5
    assert records[-1].fields == {"bytes_cut": len(garbage)}
    again.close()
    verify_dir(audit_dir, again.sink_path)


def test_a_file_that_is_all_torn_line_is_emptied_and_continued(audit_dir: Path) -> None:
    h = Harness(audit_dir, AuditConfig())
    log = h.open()
    log.append("a.b", {})
    log.close()
    # A writer rotated to seq 3's file and died mid-line.
    torn = audit_dir / "audit-000000000003.jsonl"
    torn.write_bytes(b'{"event":"a.b"')

    again = h.open()
    again.close()
    assert torn.read_bytes().startswith(
        b'{"bytes_cut":14,"event":"audit.tail_repaired"'
    )
    assert [(r.seq, r.event) for r in log_records(audit_dir)] == [
        (1, "a.b"),
        (2, CHECKPOINT_EVENT),
        (3, "audit.tail_repaired"),
        (4, CHECKPOINT_EVENT),
    ]
    verify_dir(audit_dir, again.sink_path)


@pytest.mark.parametrize(
    "last_line",
    [b"not json at all\n", b"\n", b'{"seq":3}\n', b'{"event": "a.b"}\n'],
    ids=["text", "empty", "partial-record", "non-canonical"],
)
def test_a_last_line_that_is_not_a_record_stops_the_writer(
    audit_dir: Path, last_line: bytes
) -> None:
    h = Harness(audit_dir, AuditConfig())
    log = h.open()
    log.append("a.b", {})
    log.close()
    newest = audit_files(audit_dir)[-1]
    with newest.open("ab") as handle:
        handle.write(last_line)
    before = newest.read_bytes()

    with pytest.raises(AuditLogCorrupt, match=newest.name):
        h.open()
    assert newest.read_bytes() == before  # nothing cut, nothing added


def test_a_corrupt_last_line_found_by_a_running_writer_stops_it(
    audit_dir: Path,
) -> None:
    h = Harness(audit_dir, AuditConfig())
    a, b = h.open(), h.open()
    a.append("a.b", {})
    with audit_files(audit_dir)[-1].open("ab") as handle:
        handle.write(b"junk\n")
    # b has not seen a's record: its stamp differs, it resumes and finds junk.
    # It does not append after it: it fails closed, as for a failed write.
    assert b.append("a.b", {}) is None
    assert not b.healthy
    assert b.last_error == "corrupt"
    assert b.recover() is False


def test_a_log_whose_sealed_tail_was_cut_is_not_continued(audit_dir: Path) -> None:
    """The sink holds a checkpoint beyond the log's end: the writer refuses to
    start, instead of writing new records over the gap."""
    h = Harness(audit_dir, AuditConfig())
    log = h.open()
    for i in range(10):
        log.append("a.b", {"i": i})
    log.close()  # a checkpoint at seq 11, copied to the sink
    [path] = audit_files(audit_dir)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:5]))
    with pytest.raises(AuditLogCorrupt, match="holds a checkpoint at seq 11"):
        h.open()


def test_open_failures_do_not_leak_file_descriptors(audit_dir: Path) -> None:
    h = Harness(audit_dir, AuditConfig())
    log = h.open()
    log.append("a.b", {})
    log.close()
    with audit_files(audit_dir)[-1].open("ab") as handle:
        handle.write(b"junk\n")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(AuditLogCorrupt):
            h.open()
    assert len(os.listdir("/proc/self/fd")) == before


# 5. A real full disk ---------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs."""
    with small_disk(tmp_path / "disk", "64k") as mountpoint:
        yield mountpoint


def fill_until_failure(log: AuditLog, limit: int = 5000) -> int:
    """Append until a record goes to the backlog; how many were written."""
    for i in range(limit):
        if log.append("session.output", {"i": i, "text": "y" * 120}) is None:
            return i
    raise AssertionError(f"the disk did not fill in {limit} records")


def assert_whole_lines(directory: Path) -> None:
    for path in audit_files(directory):
        data = path.read_bytes()
        assert not data or data.endswith(b"\n"), f"{path.name} ends in a torn line"
    for line in log_lines(directory):
        parse_record(line)


def test_a_full_disk_fails_closed_and_recovers(tiny_disk: Path) -> None:
    directory = tiny_disk / "audit"
    filler = tiny_disk / "filler"
    filler.write_bytes(b"\0" * 40 * 1024)
    h = Harness(directory, AuditConfig(checkpoint_every_records=10_000))
    log = h.open()

    written = fill_until_failure(log)
    assert written > 10
    assert not log.healthy
    assert h.health == [False]
    assert h.failures == 1
    assert log.last_error == "ENOSPC"
    assert_whole_lines(directory)
    assert log_records(directory)[-1].seq == written

    # While unhealthy, records wait in memory with their own timestamps.
    h.clocks.mono = 5.0
    waiting_from = h.clocks.wall
    for i in range(3):
        assert log.append("session.waiting", {"i": i}) is None
    assert h.failures == 1  # no write was tried
    log.tick()  # no checkpoint while unhealthy
    assert log_records(directory)[-1].seq == written

    # Still full: recovery fails, nothing half-written.
    h.clocks.mono = 6.0
    assert log.recover() is False
    assert h.failures == 2
    assert h.health == [False]
    assert_whole_lines(directory)
    assert log_records(directory)[-1].seq == written

    filler.unlink()
    h.clocks.mono = 7.5
    assert log.recover() is True
    assert healthy(log)
    assert h.health == [False, True]
    assert log.last_error == "ENOSPC"  # the last failure, kept for the operator

    tail = log_records(directory)[written:]
    assert [r.event for r in tail] == [
        "session.output",  # the one that hit the full disk
        *["session.waiting"] * 3,
        "audit.resumed",
        CHECKPOINT_EVENT,
    ]
    assert tail[0].fields["i"] == written
    assert [r.fields["i"] for r in tail[1:4]] == [0, 1, 2]
    # Original timestamps: one second apart, ending at the append of the last
    # waiting record, all before the resumed record's.
    stamps = [datetime.fromisoformat(r.ts) for r in tail[:4]]
    assert stamps[1:] == [waiting_from + timedelta(seconds=k) for k in (1, 2, 3)]
    assert stamps == sorted(stamps)
    assert stamps[-1] < datetime.fromisoformat(tail[4].ts)
    assert tail[4].fields == {
        "failed_for_ms": 7500,
        "records_delayed": 4,
        "records_lost": 0,
        "error": "ENOSPC",
    }
    assert tail[5].fields["head_seq"] == tail[4].seq

    assert log.append("session.after", {}) == tail[5].seq + 1
    log.close()
    assert h.health == [False, True]
    assert_sink_matches_log(directory, log.sink_path)
    report = verify_dir(directory, log.sink_path)
    assert report.unsealed == 0
    assert h.mirror.getvalue().encode() == b"".join(log_lines(directory))


def test_a_full_backlog_counts_lost_records(tiny_disk: Path) -> None:
    directory = tiny_disk / "audit"
    (tiny_disk / "filler").write_bytes(b"\0" * 40 * 1024)
    h = Harness(
        directory, AuditConfig(checkpoint_every_records=10_000, backlog_max_records=3)
    )
    log = h.open()
    written = fill_until_failure(log)
    for i in range(6):
        assert log.append("session.waiting", {"i": i}) is None

    # More room without deleting anything.
    subprocess.run(["mount", "-o", "remount,size=1m", str(tiny_disk)], check=True)
    assert log.recover() is True
    tail = log_records(directory)[written:]
    # The failed record and the first two waiting ones fit; four were lost.
    assert [r.event for r in tail] == [
        "session.output",
        "session.waiting",
        "session.waiting",
        "audit.resumed",
        CHECKPOINT_EVENT,
    ]
    assert [r.fields["i"] for r in tail[1:3]] == [0, 1]
    assert tail[3].fields["records_delayed"] == 3
    assert tail[3].fields["records_lost"] == 4

    # A later failure starts counting from zero.
    log.close()
    verify_dir(directory, log.sink_path)


def test_a_disk_that_stays_full_fails_each_retry_without_writing(
    tiny_disk: Path,
) -> None:
    directory = tiny_disk / "audit"
    (tiny_disk / "filler").write_bytes(b"\0" * 40 * 1024)
    h = Harness(directory, AuditConfig(checkpoint_every_records=10_000))
    log = h.open()
    written = fill_until_failure(log)
    for _ in range(5):
        assert log.recover() is False
        assert_whole_lines(directory)
    assert h.health == [False]
    assert h.failures == 6
    assert len(log_records(directory)) == written
    log.close()  # unhealthy: cannot seal, must not raise
    report = verify_lines(iter_lines(audit_files(directory)), PUBLIC)
    assert report.ok, report.problem


# 6. A sink that cannot be written ------------------------------------------------


def test_a_sink_that_cannot_be_written_makes_the_log_unhealthy(
    tmp_path: Path, audit_dir: Path
) -> None:
    sink = tmp_path / "sink.jsonl"
    sink.mkdir()  # a directory where the file should be
    h = Harness(
        audit_dir, AuditConfig(checkpoint_every_records=3, checkpoint_sink=sink)
    )
    log = h.open()
    assert log.append("a.b", {}) == 1
    assert log.append("a.b", {}) == 2
    # The third record is written; its checkpoint cannot reach the sink.
    assert log.append("a.b", {}) == 3
    assert not log.healthy
    assert h.health == [False]
    assert h.failures == 1
    assert log.last_error == "EISDIR"
    assert log.append("a.b", {"waiting": True}) is None

    # Retrying while the sink is still broken must not grow the log: the
    # checkpoint already in the file is what has to reach the sink first.
    before = log_lines(audit_dir)
    assert parse_record(before[-1]).event == CHECKPOINT_EVENT
    for _ in range(5):
        assert log.recover() is False
    assert log_lines(audit_dir) == before
    assert h.health == [False]
    assert h.failures == 6

    sink.rmdir()
    assert log.recover() is True
    assert h.health == [False, True]
    resumed = [r for r in log_records(audit_dir) if r.event == "audit.resumed"]
    assert len(resumed) == 1
    assert resumed[0].fields["records_delayed"] == 1
    assert resumed[0].fields["error"] == "EISDIR"
    waiting = [r for r in log_records(audit_dir) if r.fields.get("waiting")]
    assert len(waiting) == 1
    log.close()
    # The stuck checkpoint reached the sink after all, then the new one.
    assert_sink_matches_log(audit_dir, sink)
    assert [r.event for r in log_records(audit_dir)[3:]] == [
        CHECKPOINT_EVENT,
        "a.b",
        "audit.resumed",
        CHECKPOINT_EVENT,
    ]
    assert h.mirror.getvalue().encode() == b"".join(log_lines(audit_dir))
    verify_dir(audit_dir, sink)


def test_a_sink_under_proc_makes_the_log_unhealthy(audit_dir: Path) -> None:
    sink = Path("/proc/self/relay-audit-sink.jsonl")
    h = Harness(
        audit_dir, AuditConfig(checkpoint_every_records=1, checkpoint_sink=sink)
    )
    log = h.open()
    assert log.append("a.b", {}) == 1
    assert not log.healthy
    assert h.health == [False]
    assert log.last_error in {"ENOENT", "EACCES", "EROFS", "EPERM"}
    assert log.recover() is False
    log.close()
    report = verify_lines(iter_lines(audit_files(audit_dir)), PUBLIC)
    assert report.ok, report.problem


# 7. Tampering with what the writer wrote ----------------------------------------


@pytest.fixture
def written_log(audit_dir: Path) -> tuple[Path, Path]:
    """Twelve records, checkpoints at seq 6, 12 and 15 (close): one file."""
    h = Harness(audit_dir, AuditConfig(checkpoint_every_records=5))
    log = h.open()
    for i in range(12):
        log.append("session.input", {"n": i, "text": f"ls -l /var/log/{i}"})
    log.close()
    (path,) = audit_files(audit_dir)
    verify_dir(audit_dir, log.sink_path)
    return path, log.sink_path


def rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def test_tamper_a_flipped_byte_is_found(written_log: tuple[Path, Path]) -> None:
    path, sink = written_log
    lines = path.read_bytes().splitlines(keepends=True)
    assert b"/var/log/2" in lines[2]
    lines[2] = lines[2].replace(b"/var/log/2", b"/var/log/3")
    rewrite(path, lines)
    found = problem(path.parent, sink)
    assert (found.reason, found.line, found.seq) == ("bad_prev", 4, 4)


def test_tamper_a_flipped_signature_byte_is_found(
    written_log: tuple[Path, Path],
) -> None:
    path, sink = written_log
    lines = path.read_bytes().splitlines(keepends=True)
    checkpoint = json.loads(lines[5])
    sig = checkpoint["sig"]
    checkpoint["sig"] = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    lines[5] = (
        json.dumps(checkpoint, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    )
    rewrite(path, lines)
    found = problem(path.parent, sink)
    assert (found.reason, found.seq) == ("bad_checkpoint_signature", 6)


def test_tamper_a_deleted_line_is_found(written_log: tuple[Path, Path]) -> None:
    path, sink = written_log
    lines = path.read_bytes().splitlines(keepends=True)
    del lines[2]
    rewrite(path, lines)
    found = problem(path.parent, sink)
    assert (found.reason, found.line, found.seq) == ("seq_gap", 3, 4)


def test_tamper_swapped_lines_are_found(written_log: tuple[Path, Path]) -> None:
    path, sink = written_log
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2], lines[3] = lines[3], lines[2]
    rewrite(path, lines)
    found = problem(path.parent, sink)
    assert (found.reason, found.line, found.seq) == ("seq_gap", 3, 4)


def test_tamper_a_cut_tail_is_found_with_the_sink(
    written_log: tuple[Path, Path],
) -> None:
    path, sink = written_log
    assert sink_seq(sink) == 15
    lines = path.read_bytes().splitlines(keepends=True)
    rewrite(path, lines[:12])  # up to and including the checkpoint at seq 12
    found = problem(path.parent, sink)
    assert (found.reason, found.line, found.seq) == ("truncated", 13, None)
    assert "15" in found.detail
    # Without the sink the cut log looks whole: that is what the sink is for.
    report = verify_lines(iter_lines(audit_files(path.parent)), PUBLIC)
    assert report.ok
    assert report.last_checkpoint_seq == 12


def test_tamper_a_rebuilt_chain_cannot_be_signed(
    written_log: tuple[Path, Path],
) -> None:
    path, sink = written_log
    records = [parse_record(line) for line in path.read_bytes().splitlines()]
    chain = AuditChain()
    forged: list[bytes] = []
    for record in records:
        ts = datetime.fromisoformat(record.ts)
        if record.is_checkpoint:
            forged.append(chain.checkpoint(ts, OTHER_KEY))
        else:
            fields = dict(record.fields)
            if record.seq == 3:
                fields["text"] = "nothing to see"
            forged.append(chain.append(record.event, fields, ts))
    rewrite(path, forged)
    found = problem(path.parent, sink)
    assert (found.reason, found.seq) == ("bad_checkpoint_signature", 6)


# 8. The audit key ------------------------------------------------------------------


def test_the_audit_key_is_made_once_and_kept_private(tmp_path: Path) -> None:
    key_path = tmp_path / "secrets" / "audit-signing.key"
    public_path = tmp_path / "audit" / "audit-key.pem"
    key = load_or_create_audit_key(key_path, public_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_path.parent.stat().st_mode) == 0o700
    assert public_path.read_bytes() == public_key_pem(key.public_key())

    again = load_or_create_audit_key(key_path, public_path)
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    assert again.public_key().public_bytes(*raw) == key.public_key().public_bytes(*raw)
    loaded = load_public_key(public_path)
    assert loaded.public_bytes(*raw) == key.public_key().public_bytes(*raw)

    # A stale public file is rewritten from the key.
    public_path.write_bytes(public_key_pem(OTHER_KEY.public_key()))
    load_or_create_audit_key(key_path, public_path)
    assert public_path.read_bytes() == public_key_pem(key.public_key())

    # A log signed with the key verifies with the published half.
    directory = tmp_path / "audit"
    log = AuditLog(directory, signer=key, config=AuditConfig())
    log.append("a.b", {})
    log.close()
    report = verify_lines(iter_lines(audit_files(directory)), loaded)
    assert report.ok
    assert report.last_checkpoint_seq == 2


def test_keys_of_another_kind_are_refused(tmp_path: Path) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    key_path = tmp_path / "ec.key"
    key_path.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ValueError, match="not an Ed25519 private key"):
        load_or_create_audit_key(key_path, tmp_path / "pub.pem")
    public_path = tmp_path / "ec.pem"
    public_path.write_bytes(
        other.public_key().public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )
    with pytest.raises(ValueError, match="not an Ed25519 public key"):
        load_public_key(public_path)


def test_a_stalled_mirror_never_holds_up_the_log(audit_dir: Path) -> None:
    """A log shipper that stops reading (a full pipe) costs mirror lines, which
    are counted, never a record or the writer's time."""
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    drops: list[None] = []
    mirror = QueuedMirror(stream, max_lines=5, on_drop=lambda: drops.append(None))
    log = AuditLog(
        audit_dir,
        signer=KEY,
        config=AuditConfig(),
        mirror=mirror,
    )
    started = time.monotonic()
    # Far more than a pipe holds (64 KiB), with nobody reading it.
    for i in range(2000):
        assert log.append("a.b", {"i": i, "text": "x" * 200}) is not None
    assert time.monotonic() - started < 5
    assert mirror.dropped > 0
    assert len(drops) == mirror.dropped  # the broker counts them in a metric
    log.close()
    os.close(read_end)  # the copying thread's write now fails; it ends
    mirror.close(timeout=2)
    with contextlib.suppress(OSError):
        stream.close()
    assert verify_lines(iter_lines(audit_files(audit_dir)), PUBLIC).ok
