"""verify_directory against its sink and its first file (relay/audit_reader.py).

Logs are written here with AuditChain directly (no AuditLog), so that a log
can be cut back and written again as only a tamperer would.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relay.audit import AuditChain
from relay.audit_log import public_key_pem
from relay.audit_reader import verify_directory

KEY: Final = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
NOW: Final = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def _grow(chain: AuditChain, records: int, name: str) -> list[bytes]:
    """*records* records, then a checkpoint."""
    lines = [
        chain.append("user.added", {"username": name}, NOW) for _ in range(records)
    ]
    return [*lines, chain.checkpoint(NOW, KEY)]


def _write(
    directory: Path, lines: list[bytes], sink: list[bytes], *, first: int = 1
) -> None:
    directory.mkdir(exist_ok=True)
    (directory / "audit-key.pem").write_bytes(public_key_pem(KEY.public_key()))
    (directory / f"audit-{first:012d}.jsonl").write_bytes(b"".join(lines))
    (directory / "checkpoints.jsonl").write_bytes(b"".join(sink))


def test_the_sinks_last_line_must_be_in_the_log(tmp_path: Path) -> None:
    """Cut back before the sink's checkpoint and written again past it: the
    log has a valid checkpoint beyond the sink's seq, but not the sink's line."""
    chain = AuditChain()
    lines = _grow(chain, 3, "alice")  # seq 1-3, checkpoint 4
    _write(tmp_path, lines, [lines[-1]])
    found = verify_directory(tmp_path)
    assert found.report.ok
    assert found.sink_matched
    assert found.sink_seq == 4

    rewritten = lines[:2]  # records 1 and 2 kept
    again = AuditChain.resume(rewritten[-1])
    rewritten += _grow(again, 3, "mallory")  # seq 3-5, checkpoint 6
    _write(tmp_path, rewritten, [lines[-1]])
    found = verify_directory(tmp_path)
    problem = found.report.problem
    assert problem is not None
    assert (problem.reason, problem.seq, problem.line) == ("truncated", 4, 4)
    assert "record 4 is not the checkpoint the sink holds" in problem.detail
    assert not found.sink_matched
    # The counts stop before the replaced record.
    assert (found.report.records, found.report.last_seq) == (3, 3)
    assert found.report.last_checkpoint_seq is None


def test_a_log_that_does_not_start_at_record_1(tmp_path: Path) -> None:
    chain = AuditChain()
    lines = _grow(chain, 3, "alice") + _grow(chain, 3, "bob")  # checkpoints 4, 8
    _write(tmp_path, lines[4:], [lines[-1]], first=5)
    found = verify_directory(tmp_path)
    problem = found.report.problem
    assert problem is not None
    assert (problem.reason, problem.line, problem.seq) == ("seq_gap", 1, 5)
    assert problem.detail.startswith("the first 4 records are missing")
    assert found.missing_head == 4

    partial = verify_directory(tmp_path, allow_missing_head=True)
    assert partial.report.ok, partial.report.problem
    assert (partial.report.records, partial.report.last_seq) == (4, 8)
    assert partial.sink_matched

    # Named for record 5, but its first record is gone too.
    (tmp_path / "audit-000000000005.jsonl").write_bytes(b"".join(lines[5:]))
    cut = verify_directory(tmp_path, allow_missing_head=True)
    assert cut.report.problem is not None
    assert (cut.report.problem.reason, cut.report.problem.seq) == ("seq_gap", 6)


def test_a_sink_checkpoint_in_the_archived_files_is_not_compared(
    tmp_path: Path,
) -> None:
    chain = AuditChain()
    lines = _grow(chain, 3, "alice") + _grow(chain, 3, "bob")
    _write(tmp_path, lines[4:], [lines[3]], first=5)
    found = verify_directory(tmp_path, allow_missing_head=True)
    assert found.report.ok
    assert not found.sink_matched
