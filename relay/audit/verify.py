"""Walking an audit log and naming its first bad record (pure, no I/O).

Theory of operation
===================
:func:`verify_lines` reads the log line by line, exactly as the writer chained
it (``relay.audit.chain``), and stops at the first line that breaks a rule.
For each line, cheapest first:

1. ``malformed``: not one canonical, well-formed record (see
   :func:`~relay.audit.chain.parse_record`), an empty line, or a line without
   its newline that is not the last one.
2. ``seq_gap``: seq is not the previous seq + 1 (1 for the first record). A
   deleted record, or one inserted with a fresh seq, shows up here.
3. ``bad_prev``: prev is not the hash of the previous line (64 zeros for the
   first). A changed byte in an earlier record, or a reordered or inserted
   record with a plausible seq, shows up here, on the record *after* the
   changed one, because a changed record can still parse. Example: flip a byte
   inside a string of record 3 and record 4 is reported; flip its seq and
   record 3 itself is reported (``seq_gap``).
4. For a checkpoint, ``checkpoint_mismatch``: its head is not the record before
   it; then ``bad_checkpoint_signature``: the signature does not verify with the
   audit public key (another key, or a forged checkpoint).

After the last line, if the caller knows (from a separate sink or an evidence
bundle) that a checkpoint with seq *expect_checkpoint_seq* was written, and the
log has no valid checkpoint at or beyond that seq, the report is ``truncated``:
the tail that checkpoint sealed is gone.

Rule 1: the first problem ends the walk; nothing after it is trusted or counted.
Rule 2: records after the last valid checkpoint verify as a chain but are
reported as ``unsealed``: anyone who can write the file could have rebuilt them.

Not checked: that timestamps increase (clocks step; the chain orders records),
which events a session must have, or anything about the key beyond the
signature (rotation and where the public key comes from are the caller's).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias, get_args

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from relay.audit.chain import GENESIS_HASH, Record, checkpoint_message, parse_record

__all__ = [
    "PROBLEM_REASONS",
    "Problem",
    "ProblemReason",
    "VerifyReport",
    "verify_lines",
]

ProblemReason: TypeAlias = Literal[
    "malformed",
    "seq_gap",
    "bad_prev",
    "bad_checkpoint_signature",
    "checkpoint_mismatch",
    "truncated",
]
#: The same reasons as a set, for checks and metrics labels.
PROBLEM_REASONS: Final[frozenset[ProblemReason]] = frozenset(get_args(ProblemReason))


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """The first thing wrong with a log.

    Attributes:
        reason: One of :data:`PROBLEM_REASONS`.
        line: 1-based line number across all the lines given; for
            ``truncated``, one past the last line.
        seq: The seq the bad line claims, if it parsed that far; ``None`` for a
            malformed line and for ``truncated``.
        detail: A short human-readable explanation.
    """

    reason: ProblemReason
    line: int
    seq: int | None
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyReport:
    """What :func:`verify_lines` found.

    Attributes:
        records: How many records verified before the first problem (all of
            them if there is none), checkpoints included.
        last_seq: The seq of the last verified record; 0 if none.
        last_checkpoint_seq: The seq of the last verified checkpoint record;
            ``None`` if none.
        unsealed: How many verified records come after that checkpoint (all of
            them if there is none): they are chained, but no signature covers
            them yet.
        problem: The first problem, or ``None``.
    """

    records: int
    last_seq: int
    last_checkpoint_seq: int | None
    unsealed: int
    problem: Problem | None

    @property
    def ok(self) -> bool:
        """Whether the whole log verified."""
        return self.problem is None


def verify_lines(
    lines: Iterable[bytes],
    public_key: Ed25519PublicKey,
    *,
    expect_checkpoint_seq: int | None = None,
    segment: bool = False,
) -> VerifyReport:
    """Verify an audit log and report its first bad record.

    Args:
        lines: The log's lines, each with its ``b"\\n"``, as iterating a file
            opened in binary mode yields them. For a log kept in several files,
            chain the files' lines in order; the first line must be the chain's
            first record.
        public_key: The audit key that signs checkpoints.
        expect_checkpoint_seq: The seq of a checkpoint record known, from
            outside the log, to have been written. The log must hold a valid
            checkpoint at or beyond it, or the report says ``truncated``.
        segment: The lines are a contiguous part of a chain (an evidence
            bundle's excerpt), not the whole of it: the first record's seq and
            prev are taken as given, and everything after is checked as usual.
            A checkpoint still seals every record before it in the segment:
            each one's hash is bound into the next one's prev, up to the
            signed head.

    Returns:
        The report; ``report.ok`` is true only if every line verified.
        A log with no lines verifies, with zero records.
    """
    seq, head = 0, GENESIS_HASH
    records = 0
    last_checkpoint: int | None = None
    number = 0

    def report(problem: Problem | None) -> VerifyReport:
        unsealed = records if last_checkpoint is None else seq - last_checkpoint
        return VerifyReport(
            records=records,
            last_seq=seq,
            last_checkpoint_seq=last_checkpoint,
            unsealed=unsealed,
            problem=problem,
        )

    # Each line is checked once its successor is known, so that only the very
    # last line may lack its newline (a file that ends without one). The lines
    # are streamed: a log of any length is walked in constant memory.
    iterator = iter(lines)
    current = next(iterator, None)
    while current is not None:
        following = next(iterator, None)
        number += 1
        if following is not None and not current.endswith(b"\n"):
            return report(
                Problem(
                    reason="malformed", line=number, seq=None, detail="line: no newline"
                )
            )
        try:
            record = parse_record(current)
        except ValueError as error:
            return report(
                Problem(reason="malformed", line=number, seq=None, detail=str(error))
            )
        if segment and records == 0:
            seq, head = record.seq - 1, record.prev
        found = _check_link(record, seq, head, public_key)
        if found is not None:
            reason, detail = found
            return report(
                Problem(reason=reason, line=number, seq=record.seq, detail=detail)
            )
        if record.is_checkpoint:
            last_checkpoint = record.seq
        seq, head = record.seq, record.hash
        records += 1
        current = following
    if expect_checkpoint_seq is not None and (
        last_checkpoint is None or last_checkpoint < expect_checkpoint_seq
    ):
        detail = f"no valid checkpoint at or after seq {expect_checkpoint_seq}"
        return report(
            Problem(reason="truncated", line=number + 1, seq=None, detail=detail)
        )
    return report(None)


def _check_link(
    record: Record, seq: int, head: str, public_key: Ed25519PublicKey
) -> tuple[ProblemReason, str] | None:
    # Steps 2 to 4 of the theory of operation, for one parsed record that
    # follows the record (seq, head).
    if record.seq != seq + 1:
        return "seq_gap", f"seq {record.seq} after seq {seq}"
    if record.prev != head:
        return "bad_prev", "prev is not the hash of the line before"
    if not record.is_checkpoint:
        return None
    head_seq, covered = record.fields["head_seq"], record.fields["head"]
    if head_seq != seq or covered != head:
        return "checkpoint_mismatch", f"covers seq {head_seq}, not seq {seq} before it"
    if not _signature_ok(public_key, seq, head, record.fields["sig"]):
        return (
            "bad_checkpoint_signature",
            "signature does not verify with the audit key",
        )
    return None


def _signature_ok(
    public_key: Ed25519PublicKey, head_seq: int, head: str, sig: object
) -> bool:
    # parse_record has checked the form: 86 base64url characters, 64 bytes.
    signature = base64.urlsafe_b64decode(str(sig) + "==")
    try:
        public_key.verify(signature, checkpoint_message(head_seq, head))
    except InvalidSignature:
        return False
    return True
