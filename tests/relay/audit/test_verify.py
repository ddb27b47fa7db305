"""Verifying an audit log: the first bad record and why (relay/audit/verify.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Final

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, strategies as st

from relay.audit import (
    PROBLEM_REASONS,
    AuditChain,
    Problem,
    VerifyReport,
    parse_record,
    verify_lines,
)

NOW: Final = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
KEY: Final = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY: Final = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
PUBLIC: Final = KEY.public_key()

_EVENTS: Final = st.lists(
    st.tuples(
        st.sampled_from(["session.start", "session.end", "user.login", "cp"]),
        st.text(max_size=40),
    ),
    min_size=1,
    max_size=15,
)


def build_log(
    steps: list[tuple[str, str]], *, key: Ed25519PrivateKey = KEY
) -> list[bytes]:
    """Write one record per step ("cp" is a checkpoint) with a second between them."""
    chain = AuditChain()
    lines = []
    for i, (event, text) in enumerate(steps):
        ts = NOW + timedelta(seconds=i)
        if event == "cp" and chain.seq:
            lines.append(chain.checkpoint(ts, key))
        else:
            lines.append(
                chain.append("a.b" if event == "cp" else event, {"text": text}, ts)
            )
    return lines


# Six records: three events, a checkpoint (seq 4), two more events.
SIX: Final = build_log(
    [("a.b", "1"), ("a.b", "2"), ("a.b", "3"), ("cp", ""), ("a.b", "5"), ("a.b", "6")]
)


def problem_of(lines: list[bytes], **kwargs: Any) -> Problem:
    report = verify_lines(lines, PUBLIC, **kwargs)
    assert report.problem is not None
    assert report.problem.reason in PROBLEM_REASONS
    return report.problem


@given(_EVENTS)
def test_round_trip_verifies(steps: list[tuple[str, str]]) -> None:
    """A log written by AuditChain verifies, and the report counts it right."""
    lines = build_log(steps)
    report = verify_lines(lines, PUBLIC)
    assert report.ok
    assert report.records == report.last_seq == len(lines)
    checkpoints = [
        parse_record(line).seq for line in lines if parse_record(line).is_checkpoint
    ]
    assert report.last_checkpoint_seq == (checkpoints[-1] if checkpoints else None)
    assert report.unsealed == len(lines) - (checkpoints[-1] if checkpoints else 0)


def test_empty_log_verifies() -> None:
    """No lines is a valid, empty log."""
    assert verify_lines([], PUBLIC) == VerifyReport(
        records=0, last_seq=0, last_checkpoint_seq=None, unsealed=0, problem=None
    )


def test_report_for_six_records() -> None:
    """Two records after the checkpoint at seq 4 are unsealed."""
    report = verify_lines(SIX, PUBLIC)
    assert (report.records, report.last_checkpoint_seq, report.unsealed) == (6, 4, 2)


def test_lines_stream_from_a_generator() -> None:
    """Any iterable works, including one read lazily (several files chained)."""
    report = verify_lines((line for line in SIX), PUBLIC)
    assert report.ok


@given(st.data())
def test_byte_flip_is_found_at_the_right_record(data: st.DataObject) -> None:
    """Changing any byte of any record is reported at that record or the next one.

    The changed record itself is reported when it no longer parses or its seq
    or prev no longer fit; otherwise (a changed string, say) the next record is,
    because its prev no longer matches. A change to the last record leaves no
    next record, so a byte flip there is only found if the record breaks.
    """
    index = data.draw(st.integers(0, len(SIX) - 2), label="record")
    line = SIX[index]
    position = data.draw(st.integers(0, len(line) - 2), label="byte")
    flip = data.draw(st.integers(1, 255), label="xor")
    lines = list(SIX)
    lines[index] = (
        line[:position] + bytes([line[position] ^ flip]) + line[position + 1 :]
    )
    problem = problem_of(lines)
    assert problem.line in (index + 1, index + 2)
    if problem.line == index + 2:
        assert problem.reason in ("bad_prev", "checkpoint_mismatch")
    report = verify_lines(lines, PUBLIC)
    assert report.records == problem.line - 1


def test_flipped_string_is_reported_on_the_next_record() -> None:
    """A changed value that still parses breaks the next record's prev."""
    lines = list(SIX)
    lines[1] = lines[1].replace(b'"text":"2"', b'"text":"X"')
    problem = problem_of(lines)
    assert (problem.reason, problem.line, problem.seq) == ("bad_prev", 3, 3)


def test_deleted_record_is_a_seq_gap() -> None:
    """Removing a record is reported where the seq jumps."""
    problem = problem_of(SIX[:2] + SIX[3:])
    assert (problem.reason, problem.line, problem.seq) == ("seq_gap", 3, 4)


def test_deleted_first_record_is_a_seq_gap() -> None:
    """A log must start at seq 1."""
    problem = problem_of(SIX[1:])
    assert (problem.reason, problem.line, problem.seq) == ("seq_gap", 1, 2)


def test_reordered_records_are_found() -> None:
    """Swapping two records is reported at the first one out of place."""
    lines = [SIX[0], SIX[2], SIX[1], *SIX[3:]]
    problem = problem_of(lines)
    assert (problem.reason, problem.line) == ("seq_gap", 2)


def test_duplicated_record_is_found() -> None:
    """A record written twice breaks the seq."""
    problem = problem_of([*SIX[:3], SIX[2], *SIX[3:]])
    assert (problem.reason, problem.line, problem.seq) == ("seq_gap", 4, 3)


def test_inserted_record_with_a_plausible_seq_is_bad_prev() -> None:
    """A record forged from another chain but with the right seq breaks prev."""
    other = AuditChain()
    for _ in range(2):
        forged = other.append("a.b", {"text": "forged"}, NOW)
    problem = problem_of([*SIX[:1], forged, *SIX[2:]])
    assert (problem.reason, problem.line, problem.seq) == ("bad_prev", 2, 2)


def test_rebuilt_chain_fails_at_the_checkpoint() -> None:
    """Rewriting a record and re-chaining everything after it needs the audit key."""
    chain = AuditChain()
    forged = [chain.append("a.b", {"text": t}, NOW) for t in ("1", "X", "3")]
    forged.append(chain.checkpoint(NOW, OTHER_KEY))
    forged += [chain.append("a.b", {"text": t}, NOW) for t in ("5", "6")]
    problem = problem_of(forged)
    assert (problem.reason, problem.line, problem.seq) == (
        "bad_checkpoint_signature",
        4,
        4,
    )
    assert verify_lines(forged, PUBLIC).records == 3


def test_checkpoint_with_a_changed_head_is_a_mismatch() -> None:
    """A checkpoint whose head is not the record before it is refused."""
    record = parse_record(SIX[3])
    head = str(record.fields["head"])
    for old, new in (
        (f'"head":"{head}"', f'"head":"{"0" * 64}"'),
        ('"head_seq":3', '"head_seq":2'),
    ):
        body = SIX[3].replace(old.encode(), new.encode())
        # Only the head changed: seq and prev still link the checkpoint.
        assert parse_record(body).prev == record.prev
        problem = problem_of([*SIX[:3], body])
        assert (problem.reason, problem.line, problem.seq) == (
            "checkpoint_mismatch",
            4,
            4,
        )


def test_missing_newline_is_malformed_except_on_the_last_line() -> None:
    """Only the last line may lack its newline (a file ending without one)."""
    assert verify_lines([*SIX[:-1], SIX[-1][:-1]], PUBLIC).ok
    problem = problem_of([SIX[0][:-1], *SIX[1:]])
    assert (problem.reason, problem.line, problem.seq) == ("malformed", 1, None)


def test_blank_line_is_malformed() -> None:
    """An empty line is not a record."""
    problem = problem_of([*SIX[:2], b"\n", *SIX[2:]])
    assert (problem.reason, problem.line) == ("malformed", 3)


def test_truncated_tail_after_a_checkpoint() -> None:
    """Cutting records after the last checkpoint leaves a log that still chains.

    Without outside knowledge it verifies with fewer unsealed records; with the
    last checkpoint's seq from a separate sink, a cut through that checkpoint
    is reported as truncated.
    """
    cut_after_checkpoint = SIX[:4]
    report = verify_lines(cut_after_checkpoint, PUBLIC, expect_checkpoint_seq=4)
    assert report.ok
    assert (report.records, report.unsealed) == (4, 0)

    cut_through_checkpoint = SIX[:3]
    assert verify_lines(cut_through_checkpoint, PUBLIC).ok
    report = verify_lines(cut_through_checkpoint, PUBLIC, expect_checkpoint_seq=4)
    assert report.problem == Problem(
        reason="truncated",
        line=4,
        seq=None,
        detail="no valid checkpoint at or after seq 4",
    )
    assert (report.records, report.last_checkpoint_seq, report.unsealed) == (3, None, 3)


def test_a_later_checkpoint_satisfies_an_earlier_expectation() -> None:
    """A valid checkpoint beyond the expected one is enough."""
    chain = AuditChain.resume(SIX[-1])
    lines = [*SIX, chain.checkpoint(NOW, KEY)]
    report = verify_lines(lines, PUBLIC, expect_checkpoint_seq=4)
    assert report.ok
    assert (report.last_checkpoint_seq, report.unsealed) == (7, 0)
    problem = problem_of(lines, expect_checkpoint_seq=8)
    assert (problem.reason, problem.line) == ("truncated", 8)


def test_report_stops_at_the_first_problem() -> None:
    """Counts describe only what verified before the problem."""
    report = verify_lines([*SIX[:5], b"garbage\n", SIX[5]], PUBLIC)
    assert report.problem is not None
    assert (report.problem.reason, report.problem.line) == ("malformed", 6)
    assert (
        report.records,
        report.last_seq,
        report.last_checkpoint_seq,
        report.unsealed,
    ) == (
        5,
        5,
        4,
        1,
    )


@pytest.mark.parametrize("reason", sorted(PROBLEM_REASONS))
def test_every_reason_is_reachable(reason: str) -> None:
    """Each reason in the fixed set is produced by some damaged log."""
    other_chain = AuditChain()
    other_chain.append("x.y", {}, NOW)
    cases = {
        "malformed": [b"{}\n"],
        "seq_gap": SIX[1:],
        "bad_prev": [SIX[0], other_chain.append("a.b", {}, NOW)],
        "bad_checkpoint_signature": [
            *SIX[:3],
            AuditChain.resume(SIX[2]).checkpoint(NOW, OTHER_KEY),
        ],
        "checkpoint_mismatch": [
            *SIX[:3],
            SIX[3].replace(b'"head_seq":3', b'"head_seq":2'),
        ],
        "truncated": SIX[:3],
    }
    assert problem_of(cases[reason], expect_checkpoint_seq=4).reason == reason


class TestSegment:
    """An excerpt of a chain (an evidence bundle) verifies from its first record."""

    def test_a_segment_from_the_middle_verifies(self) -> None:
        report = verify_lines(SIX[1:5], PUBLIC, segment=True)
        assert report.ok
        assert (report.records, report.last_seq, report.last_checkpoint_seq) == (
            4,
            5,
            4,
        )
        assert report.unsealed == 1

    def test_without_segment_the_same_excerpt_is_a_gap(self) -> None:
        assert problem_of(SIX[1:5]).reason == "seq_gap"

    def test_a_changed_record_inside_a_segment_is_found(self) -> None:
        lines = list(SIX[1:5])
        lines[1] = lines[1].replace(b'"text":"3"', b'"text":"X"')
        report = verify_lines(lines, PUBLIC, segment=True)
        assert report.problem is not None
        assert (report.problem.reason, report.problem.seq) == ("bad_prev", 4)

    def test_a_deleted_record_inside_a_segment_is_a_gap(self) -> None:
        lines = [SIX[0], SIX[2], SIX[3]]
        report = verify_lines(lines, PUBLIC, segment=True)
        assert report.problem is not None
        assert report.problem.reason == "seq_gap"
