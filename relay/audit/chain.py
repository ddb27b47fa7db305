"""Audit records and the hash chain that links them (pure, no I/O).

Theory of operation
===================
The audit log is a sequence of records, one per line. Each record carries its
sequence number and the SHA-256 of the line before it, so changing, deleting,
inserting or reordering any record breaks the chain at a place a verifier can
name (``relay.audit.verify``). Every N records or T seconds the broker appends a
*checkpoint*: a record whose fields name the head it covers (the seq and hash
of the record just before it) and an Ed25519 signature over that head. Someone
who can edit the file can rebuild a hash chain, but cannot sign a checkpoint;
and a head copied to a separate sink shows when the tail was cut off.

:class:`AuditChain` is the writer's state: the last seq and hash. It turns
``(event, fields, ts)`` into the bytes of the next line and never touches a
file, a clock or a key store; the shell passes the time and the signer in,
writes the bytes, and decides when a checkpoint is due with
:func:`checkpoint_due`.

Record format
-------------
One line of canonical JSON, terminated by ``\\n``: one object, keys sorted, no
whitespace (``,`` and ``:`` separators), ASCII only. Every character outside
printable ASCII is a ``\\uXXXX`` escape (as :func:`json.dumps` writes them, plus
DEL, which it leaves raw), so CR, LF, ANSI escapes, NUL and U+202E can never
appear raw in the file. Example::

    {"event":"session.start","prev":"<64 hex>","seq":7,"session_id":"ab12",
    "ts":"2026-06-01T12:00:00.000Z"}

- ``seq``: 1 for the first record of a chain, then +1 per record.
- ``prev``: lowercase hex SHA-256 of the previous line's bytes without its
  newline; :data:`GENESIS_HASH` (64 zeros) for the first record.
- ``ts``: UTC, ``YYYY-MM-DDTHH:MM:SS.mmmZ``, from the caller's clock.
- ``event``: two to four dotted lowercase parts (``session.start``).
- The event's own fields: at most :data:`MAX_FIELDS`, names of the form
  ``[a-z][a-z0-9_]{0,31}`` other than the four above; values are strings,
  integers in ±(2**53-1), booleans, null, or lists of up to
  :data:`MAX_LIST_ITEMS` of those. A string longer than
  :data:`MAX_STRING_CHARS` is cut and ends in ``…[cut N]`` (N characters
  removed), so it stays within the cap.

A record's hash is the SHA-256 of its line without the newline.

Checkpoint format
-----------------
A chained record with event :data:`CHECKPOINT_EVENT` (``audit.checkpoint``) and
exactly three fields: ``head_seq`` and ``head``, the seq and hash of the record
before it (so ``head_seq == seq - 1`` and ``head == prev``), and ``sig``, the
unpadded base64url Ed25519 signature over::

    b"relay audit checkpoint v1\\0" + b'{"head":"<64 hex>","seq":<head_seq>}'

Rule 1: one record has one byte form. :func:`parse_record` re-encodes what it
parsed and refuses the line unless the bytes are identical.
Rule 2: the writer never produces a line :func:`parse_record` refuses; values
that would not fit are refused (:class:`ValueError` naming the field) or, for
long strings, cut.
Rule 3: nothing here decides policy; the caller passes every time and limit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, TypeAlias

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "CHECKPOINT_DOMAIN",
    "CHECKPOINT_EVENT",
    "GENESIS_HASH",
    "MAX_FIELDS",
    "MAX_LINE_BYTES",
    "MAX_LIST_ITEMS",
    "MAX_STRING_CHARS",
    "AuditChain",
    "FieldValue",
    "Record",
    "Signer",
    "checkpoint_due",
    "checkpoint_message",
    "parse_record",
    "record_hash",
]

#: ``prev`` of the first record of a chain.
GENESIS_HASH: Final = "0" * 64
#: The event name only :meth:`AuditChain.checkpoint` writes.
CHECKPOINT_EVENT: Final = "audit.checkpoint"
#: Domain separation: the audit key signs nothing that starts otherwise.
CHECKPOINT_DOMAIN: Final = b"relay audit checkpoint v1\0"

MAX_STRING_CHARS: Final = 1024
MAX_FIELDS: Final = 32
MAX_LIST_ITEMS: Final = 16
#: Larger than any line the writer can produce: 32 fields of 16 strings of 1024
#: characters, each written as a 12-byte surrogate-pair escape, is 6 MiB; the
#: fixed fields and punctuation add well under 1 MiB. Checked before parsing.
MAX_LINE_BYTES: Final = 8 * 1024 * 1024

_MAX_INT: Final = 2**53 - 1  # integers every JSON reader keeps exact
_FIXED: Final = frozenset({"seq", "prev", "ts", "event"})
_CHECKPOINT_FIELDS: Final = frozenset({"head_seq", "head", "sig"})

# Forms, matched with fullmatch.
_FIELD_NAME: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
_EVENT: Final = re.compile(r"[a-z][a-z0-9_]{0,31}(?:\.[a-z][a-z0-9_]{0,31}){1,3}")
_HASH: Final = re.compile(r"[0-9a-f]{64}")
_TS: Final = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
# 64 bytes as unpadded base64url: 86 characters, and the last one carries only 2
# data bits (its low 4 bits are zero), so one signature has one spelling.
_SIG: Final = re.compile(r"[A-Za-z0-9_-]{85}[AQgw]")

Scalar: TypeAlias = str | int | bool | None
#: What a field may hold once encoded (lists come back as lists).
FieldValue: TypeAlias = Scalar | list[Scalar]
#: Signs the checkpoint message; returns the 64-byte Ed25519 signature.
Signer: TypeAlias = Ed25519PrivateKey | Callable[[bytes], bytes]


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """One parsed, well-formed audit record (not yet checked against its chain).

    Attributes:
        seq, prev, ts, event: The fixed fields (see the module docstring).
        fields: The event's own fields, by name.
        hash: Lowercase hex SHA-256 of the line without its newline.
    """

    seq: int
    prev: str
    ts: str
    event: str
    fields: Mapping[str, FieldValue]
    hash: str

    @property
    def is_checkpoint(self) -> bool:
        """Whether this is an ``audit.checkpoint`` record."""
        return self.event == CHECKPOINT_EVENT


def _canonical(obj: object) -> bytes:
    # ensure_ascii escapes everything below 0x20 and above 0x7e except DEL, which
    # is ASCII but not printable; DEL can only occur inside a string, so the
    # byte-level replacement is exact.
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return text.encode("ascii").replace(b"\x7f", b"\\u007f")


def record_hash(line: bytes) -> str:
    """The hex SHA-256 of *line*, without a trailing newline if it has one."""
    return hashlib.sha256(line.removesuffix(b"\n")).hexdigest()


def checkpoint_message(head_seq: int, head: str) -> bytes:
    """The bytes a checkpoint signs for the head (*head_seq*, *head*)."""
    return CHECKPOINT_DOMAIN + _canonical({"head": head, "seq": head_seq})


def _cut(value: str) -> str:
    if len(value) <= MAX_STRING_CHARS:
        return value
    # The marker quotes the removed count, which is below len(value), so a marker
    # sized for len(value) leaves the result within the cap.
    kept = MAX_STRING_CHARS - len(f"…[cut {len(value)}]")
    return f"{value[:kept]}…[cut {len(value) - kept}]"


def _scalar(name: str, value: object, *, writing: bool) -> Scalar:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if -_MAX_INT <= value <= _MAX_INT:
            return value
        raise ValueError(f"field {name!r}: integer out of range ±(2**53-1)")
    if isinstance(value, str):
        if writing:
            return _cut(value)
        if len(value) <= MAX_STRING_CHARS:
            return value
        raise ValueError(f"field {name!r}: string over {MAX_STRING_CHARS} characters")
    raise ValueError(f"field {name!r}: {type(value).__name__} is not allowed")


def _value(name: str, value: object, *, writing: bool) -> FieldValue:
    if isinstance(value, list | tuple):
        if len(value) > MAX_LIST_ITEMS:
            raise ValueError(f"field {name!r}: more than {MAX_LIST_ITEMS} items")
        return [_scalar(name, item, writing=writing) for item in value]
    return _scalar(name, value, writing=writing)


def _event_fields(
    event: object, fields: Mapping[str, object], *, writing: bool
) -> dict[str, FieldValue]:
    if not isinstance(event, str) or not _EVENT.fullmatch(event):
        raise ValueError(f"field 'event': {event!r:.80} is not a dotted event name")
    if len(fields) > MAX_FIELDS:
        raise ValueError(f"fields: more than {MAX_FIELDS}")
    checked: dict[str, FieldValue] = {}
    for name, value in fields.items():
        if name in _FIXED or not _FIELD_NAME.fullmatch(name):
            raise ValueError(f"field {name!r:.80}: not an allowed field name")
        checked[name] = _value(name, value, writing=writing)
    if event == CHECKPOINT_EVENT:
        _check_checkpoint_fields(checked)
    return checked


def _check_checkpoint_fields(fields: Mapping[str, FieldValue]) -> None:
    if fields.keys() != _CHECKPOINT_FIELDS:
        raise ValueError(
            f"fields: a checkpoint has exactly {sorted(_CHECKPOINT_FIELDS)}"
        )
    head_seq, head, sig = fields["head_seq"], fields["head"], fields["sig"]
    if not isinstance(head_seq, int) or isinstance(head_seq, bool) or head_seq < 0:
        raise ValueError("field 'head_seq': not a sequence number")
    if not isinstance(head, str) or not _HASH.fullmatch(head):
        raise ValueError("field 'head': not a lowercase hex SHA-256")
    if not isinstance(sig, str) or not _SIG.fullmatch(sig):
        raise ValueError("field 'sig': not a base64url Ed25519 signature")


def _format_ts(ts: datetime) -> str:
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise ValueError("field 'ts': a naive datetime has no known UTC time")
    utc = ts.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def _encode(
    seq: int, prev: str, ts: str, event: str, fields: Mapping[str, FieldValue]
) -> bytes:
    return _canonical({**fields, "seq": seq, "prev": prev, "ts": ts, "event": event})


def parse_record(line: bytes) -> Record:
    """Parse one audit line (with or without its newline) and check its form.

    Only the record itself is checked: its encoding is canonical, the fixed
    fields and the event's fields have valid forms, and a checkpoint's fields
    are well formed. Not checked: its place in the chain (seq, prev) and a
    checkpoint's signature; that is :func:`relay.audit.verify_lines`' job.

    Raises:
        ValueError: The line is not one canonical, well-formed record; the
            message names the field where it can.
    """
    body = line.removesuffix(b"\n")
    if len(body) > MAX_LINE_BYTES:
        raise ValueError(f"line: over {MAX_LINE_BYTES} bytes")
    try:
        obj = json.loads(
            body.decode("ascii"), parse_float=_refuse, parse_constant=_refuse
        )
    except (ValueError, RecursionError):  # also UnicodeDecodeError, JSONDecodeError
        raise ValueError("line: not ASCII JSON") from None
    if not isinstance(obj, dict):
        raise ValueError("line: not a JSON object")
    missing = _FIXED - obj.keys()
    if missing:
        raise ValueError(f"field {min(missing)!r}: missing")
    seq, prev, ts = obj.pop("seq"), obj.pop("prev"), obj.pop("ts")
    event = obj.pop("event")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq <= _MAX_INT:
        raise ValueError("field 'seq': not a sequence number")
    if not isinstance(prev, str) or not _HASH.fullmatch(prev):
        raise ValueError("field 'prev': not a lowercase hex SHA-256")
    if not isinstance(ts, str) or not _TS.fullmatch(ts):
        raise ValueError("field 'ts': not YYYY-MM-DDTHH:MM:SS.mmmZ")
    try:
        datetime.fromisoformat(ts)
    except ValueError:
        raise ValueError("field 'ts': not a valid date and time") from None
    fields = _event_fields(event, obj, writing=False)
    if _encode(seq, prev, ts, event, fields) != body:
        raise ValueError("line: not in canonical form")
    return Record(
        seq=seq, prev=prev, ts=ts, event=event, fields=fields, hash=record_hash(body)
    )


def _refuse(text: str) -> object:
    raise ValueError(f"{text!r:.20} is not allowed")


def checkpoint_due(
    *,
    records_since_checkpoint: int,
    seconds_since_checkpoint: float,
    every_records: int,
    every_seconds: float,
) -> bool:
    """Whether the writer should append a checkpoint now.

    A checkpoint is due when at least one record is unsealed and either
    *every_records* records or *every_seconds* seconds have passed since the
    last one; with nothing to seal, none is due.
    """
    if records_since_checkpoint <= 0:
        return False
    return (
        records_since_checkpoint >= every_records
        or seconds_since_checkpoint >= every_seconds
    )


class AuditChain:
    """The writer's end of one audit chain: the last seq and hash.

    Each :meth:`append` or :meth:`checkpoint` returns the next line's bytes
    (newline included) and advances the chain, as if the line was written. If
    the write then fails or is torn, the chain is ahead of the file: cut the
    file back to its last complete line and rebuild the chain with
    :meth:`resume`. After a resume the shell should append a checkpoint at once,
    because it cannot know how many records the last one covers.
    """

    __slots__ = ("_hash", "_seq")

    def __init__(self) -> None:
        """Start a new, empty chain: the first record gets seq 1."""
        self._seq = 0
        self._hash = GENESIS_HASH

    @classmethod
    def resume(cls, last_line: bytes) -> AuditChain:
        """Continue the chain whose last line is *last_line*.

        Only the line's form is checked (:func:`parse_record`), not the chain
        before it; verify the log to check that.

        Raises:
            ValueError: *last_line* is not a well-formed record.
        """
        record = parse_record(last_line)
        chain = cls()
        chain._seq = record.seq
        chain._hash = record.hash
        return chain

    @property
    def seq(self) -> int:
        """The seq of the last record; 0 for an empty chain."""
        return self._seq

    @property
    def head(self) -> str:
        """The hash of the last record; :data:`GENESIS_HASH` for an empty chain."""
        return self._hash

    def append(self, event: str, fields: Mapping[str, object], ts: datetime) -> bytes:
        """Encode the next record and advance the chain.

        Args:
            event: A dotted event name such as ``"session.start"``; not
                ``"audit.checkpoint"`` (use :meth:`checkpoint`).
            fields: The event's fields; see the module docstring for what they
                may hold. Strings over :data:`MAX_STRING_CHARS` are cut.
            ts: When it happened; an aware datetime, written as UTC milliseconds.

        Returns:
            The line to write, ending in ``b"\\n"``.

        Raises:
            ValueError: A field is not allowed; the message names it. The
                chain has not moved.
        """
        if event == CHECKPOINT_EVENT:
            raise ValueError("field 'event': checkpoints come from checkpoint()")
        return self._advance(event, _event_fields(event, fields, writing=True), ts)

    def checkpoint(self, ts: datetime, signer: Signer) -> bytes:
        """Sign the current head and encode the checkpoint record that carries it.

        Args:
            ts: When the checkpoint is written.
            signer: The audit key, or a callable that signs bytes with it and
                returns the 64-byte Ed25519 signature (an HSM, a key service).

        Returns:
            The checkpoint line to write, ending in ``b"\\n"``.

        Raises:
            ValueError: The chain is empty (there is no head to cover), or the
                signer returned something that is not 64 bytes.
        """
        if self._seq == 0:
            raise ValueError("field 'head_seq': an empty chain has no head to sign")
        message = checkpoint_message(self._seq, self._hash)
        if isinstance(signer, Ed25519PrivateKey):
            signature = signer.sign(message)
        else:
            signature = signer(message)
        if len(signature) != 64:
            raise ValueError("field 'sig': the signer did not return 64 bytes")
        sig = base64.urlsafe_b64encode(signature).rstrip(b"=").decode("ascii")
        fields: dict[str, FieldValue] = {
            "head_seq": self._seq,
            "head": self._hash,
            "sig": sig,
        }
        return self._advance(CHECKPOINT_EVENT, fields, ts)

    def _advance(
        self, event: str, fields: Mapping[str, FieldValue], ts: datetime
    ) -> bytes:
        body = _encode(self._seq + 1, self._hash, _format_ts(ts), event, fields)
        self._seq += 1
        self._hash = record_hash(body)
        return body + b"\n"
