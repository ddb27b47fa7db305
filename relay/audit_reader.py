"""Reading the audit log: timelines, verification, evidence bundles.

Theory of operation
===================
Everything here reads; nothing appends to the chain (the CLI records an
export in the log itself, through :class:`relay.audit_log.AuditLog`, before it
calls :func:`export_bundle`).

- :func:`read_records` walks the chain's files from a seq on, as parsed JSON
  objects, without verifying (the timeline of a session for a screen; use
  :func:`verify_directory` for evidence).
- :func:`verify_directory` verifies the whole chain of an audit directory with
  the audit public key, and against the last line of the checkpoint sink. The
  log must hold a valid checkpoint at or after that line's seq (else
  ``truncated``: a tail the sink saw was cut off), and the log's record at that
  seq must be that very line, byte for byte (else also ``truncated``, with the
  seq and line of the record that replaced it: the log was cut back and
  written again past the old seq). The first file must start at seq 1 (else
  ``seq_gap`` on line 1: the oldest files are gone) unless the caller says
  that they were archived on purpose (``allow_missing_head``); the rest is
  then checked as a segment, and a sink checkpoint older than the first file
  cannot be compared.
- :func:`export_bundle` writes an evidence bundle: the records from the first
  one at or after *since* through the first checkpoint after the last one
  before *until* (so the excerpt ends sealed), the checkpoints from the sink
  that fall in it, the files of every session the excerpt names (recordings,
  receipts, device certificate), the audit public key, ``manifest.json``
  with the range, the seqs and the SHA-256 of each file, and ``manifest.sig``:
  the audit key's Ed25519 signature over :data:`BUNDLE_SIG_CONTEXT` followed
  by the bytes of ``manifest.json`` (unpadded base64url, one line).
- :func:`verify_bundle` checks a bundle on its own, on any machine, and lists
  every problem it finds:

  1. no symlink anywhere in the bundle (nothing is followed out of it);
  2. ``manifest.sig`` verifies with the bundle's ``audit-key.pem``, so the
     manifest (range, seqs, hashes) is the exporter's: trimming records off
     either end, or swapping a file, needs the audit key;
  3. every file's hash matches the manifest, and no file is unlisted;
  4. the excerpt verifies as a chain segment sealed by a checkpoint that the
     key signed, and holds exactly the seqs the manifest names, with ``from``
     before ``to`` and the first record not older than ``from``;
  5. every ``session.recording`` record against the file it names, and no
     recording without such a record;
  6. every receipt's signature against the device certificate kept with it,
     that certificate's SHA-256 fingerprint against the ``device_fingerprint``
     of the session's ``session.requested`` and ``session.end`` records, the
     receipt's device against the records' ``device_id``, and a grant
     receipt's ``decided_by``, ``channels`` and ``max_seconds`` against the
     session's ``session.granted`` record, where those records are in the
     excerpt. Only session ids of the form ``[A-Za-z0-9_-]{1,64}`` become
     paths.

  The key's fingerprint is printed so that it can be compared with one
  obtained out of band: a bundle proves only that its key signed it.

Bundle layout::

    manifest.json        format, range, seqs, broker version, file hashes
    manifest.sig         the audit key's signature over manifest.json
    records.jsonl        the excerpt of the chain, byte for byte
    checkpoints.jsonl    the sink's lines for checkpoints in the excerpt
    audit-key.pem        the audit public key
    sessions/ID/...      shell-N.cast, forwards.json, grant-receipt.json,
                         end-receipt.json, device.crt
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

import auth
from relay import __version__
from relay.audit import (
    CHECKPOINT_EVENT,
    Problem,
    VerifyReport,
    parse_record,
    verify_lines,
)
from relay.audit_log import (
    AUDIT_FILE,
    audit_files,
    iter_lines,
    load_public_key,
    public_key_pem,
)
from relay.proto import receipts

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_SIG_CONTEXT",
    "RECORDING_NAME",
    "BundleReport",
    "BundleSummary",
    "DirectoryReport",
    "export_bundle",
    "key_fingerprint",
    "read_receipts",
    "read_records",
    "session_timeline",
    "sha256_file",
    "verify_bundle",
    "verify_directory",
]

BUNDLE_FORMAT: Final = "relay-audit-bundle/1"
#: What ``manifest.sig`` signs, followed by the bytes of ``manifest.json``.
BUNDLE_SIG_CONTEXT: Final = b"relay audit bundle v1\0"
#: The bundle's files that the manifest does not list: itself and its signature.
_UNLISTED: Final = frozenset({"manifest.json", "manifest.sig"})
RECORDING_NAME: Final = re.compile(r"shell-[0-9]{1,10}\.cast|forwards\.json")
_SESSION_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SESSION_FILES: Final = re.compile(
    r"shell-[0-9]{1,10}\.cast|forwards\.json|grant-receipt\.json|end-receipt\.json"
    r"|device\.crt"
)
#: After a session's end, how many more records its timeline reads for the
#: records that follow the end (end receipt, recording hashes).
TIMELINE_AFTER_END: Final = 10_000


def key_fingerprint(key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, hex: what an auditor compares out of band."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _first_seq(path: Path) -> int:
    match = AUDIT_FILE.fullmatch(path.name)
    assert match is not None  # noqa: S101 - audit_files lists only matching names
    return int(match.group(1))


def read_records(directory: Path, *, from_seq: int = 1) -> Iterator[dict[str, Any]]:
    """The records of the chain in *directory* from seq *from_seq* on, parsed
    but not verified; a line that is not JSON ends the walk."""
    files = audit_files(directory)
    start = 0
    for index, path in enumerate(files):
        if _first_seq(path) <= from_seq:
            start = index
    for line in iter_lines(files[start:]):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: deep nesting
            return
        seq = record.get("seq") if isinstance(record, dict) else None
        if isinstance(seq, int) and seq >= from_seq:
            yield record


def session_timeline(
    directory: Path, session_id: str, *, start_seq: int, max_records: int = 1000
) -> list[dict[str, Any]]:
    """The records naming *session_id*, from *start_seq* (the store's hint: the
    log's seq just before the session's first record) on."""
    found: list[dict[str, Any]] = []
    end_seq: int | None = None
    for record in read_records(directory, from_seq=start_seq + 1):
        seq = int(record.get("seq", 0))
        if end_seq is not None and seq > end_seq + TIMELINE_AFTER_END:
            break
        if record.get("session_id") != session_id:
            continue
        found.append(record)
        if record.get("event") == "session.end":
            end_seq = seq
        if len(found) >= max_records:
            break
    return found


def read_receipts(
    recordings_dir: Path, session_id: str
) -> dict[str, dict[str, Any] | None]:
    """The stored grant and end receipts of a session (None where absent)."""
    out: dict[str, dict[str, Any] | None] = {"grant": None, "end": None}
    if not _SESSION_ID.fullmatch(session_id):
        return out
    for kind in ("grant", "end"):
        path = recordings_dir / session_id / f"{kind}-receipt.json"
        if path.is_file():
            out[kind] = json.loads(path.read_text(encoding="ascii"))
    return out


# Verifying a live audit directory ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class DirectoryReport:
    """What :func:`verify_directory` found.

    Attributes:
        report: The chain's report; its problem is the first one found, also
            one about the sink or a missing head (see :func:`verify_directory`).
        files: The chain's files, oldest first.
        sink_seq: The seq of the sink's last checkpoint; None without one.
        key_fingerprint: See :func:`key_fingerprint`.
        missing_head: How many records come before the first file (its name's
            seq - 1): 0 for a log that starts at record 1.
        sink_matched: The sink's last line was found in the log, byte for byte.
            False also when it could not be looked for: no sink, a problem
            before it, or (with ``allow_missing_head``) a sink checkpoint in
            the files that are not here.
    """

    report: VerifyReport
    files: tuple[Path, ...]
    sink_seq: int | None
    key_fingerprint: str
    missing_head: int = 0
    sink_matched: bool = False


def _last_sink_line(sink: Path) -> tuple[int, bytes] | None:
    """The seq and the line (without its newline) of the sink's last record."""
    if not sink.is_file():
        return None
    last: tuple[int, bytes] | None = None
    with sink.open("rb") as handle:
        for line in handle:
            try:
                last = (parse_record(line).seq, line.removesuffix(b"\n"))
            except ValueError:
                continue
    return last


def _last_sink_seq(sink: Path) -> int | None:
    last = _last_sink_line(sink)
    return None if last is None else last[0]


def _seq_of(line: bytes) -> int | None:
    """The seq a line claims, parsed with json only (no checks of its form)."""
    with contextlib.suppress(ValueError, AttributeError, RecursionError):
        seq = json.loads(line).get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool):
            return seq
    return None


@dataclass(slots=True)
class _SinkWatch:
    """Picks, from the lines as they stream by, the line whose seq is *seq*
    and the last checkpoint before it."""

    seq: int
    line: bytes | None = None
    number: int = 0
    checkpoint_before: int | None = None

    def watch(self, lines: Iterable[bytes]) -> Iterator[bytes]:
        marker = b'"seq":%d' % self.seq
        checkpoint = CHECKPOINT_EVENT.encode()
        for number, line in enumerate(lines, 1):
            if self.line is None:
                # Cheap filters first: most lines are neither.
                if marker in line and _seq_of(line) == self.seq:
                    self.line, self.number = line, number
                elif checkpoint in line:
                    seen = _seq_of(line)
                    if seen is not None:
                        self.checkpoint_before = seen
            yield line


def _problem_report(
    problem: Problem,
    *,
    records: int = 0,
    last_seq: int = 0,
    last_checkpoint_seq: int | None = None,
) -> VerifyReport:
    unsealed = (
        records if last_checkpoint_seq is None else last_seq - last_checkpoint_seq
    )
    return VerifyReport(
        records=records,
        last_seq=last_seq,
        last_checkpoint_seq=last_checkpoint_seq,
        unsealed=unsealed,
        problem=problem,
    )


def verify_directory(
    directory: Path,
    *,
    public_key: Ed25519PublicKey | None = None,
    sink: Path | None = None,
    allow_missing_head: bool = False,
) -> DirectoryReport:
    """Verify the chain in an audit directory against its key and sink.

    The first problem found ends the check (see the module docstring):

    - the first file does not start at seq 1 and *allow_missing_head* is
      false: ``seq_gap`` on line 1, nothing walked (``missing_head`` says how
      many records are gone). With *allow_missing_head*, the files are checked
      as a segment, whose first record must have the seq its file is named
      for (else ``seq_gap`` on line 1);
    - a problem in the chain, as :func:`relay.audit.verify_lines` reports it;
    - the sink's last checkpoint: no valid checkpoint at or after its seq
      (``truncated``, seq None, line one past the last), or the log's record
      at its seq is not the sink's line byte for byte (``truncated`` with that
      seq and the line of the record in its place; the counts then stop
      before it).

    Raises:
        OSError: A file cannot be read.
        ValueError: The public key file is not an Ed25519 key.
    """
    key = public_key or load_public_key(directory / "audit-key.pem")
    fingerprint = key_fingerprint(key)
    sink_path = sink or directory / "checkpoints.jsonl"
    files = audit_files(directory)
    sink_last = _last_sink_line(sink_path)
    sink_seq = None if sink_last is None else sink_last[0]
    head = _first_seq(files[0]) if files else 1
    missing = head - 1

    def done(report: VerifyReport, *, matched: bool = False) -> DirectoryReport:
        return DirectoryReport(
            report, tuple(files), sink_seq, fingerprint, missing, matched
        )

    if missing and not allow_missing_head:
        return done(
            _problem_report(
                Problem(
                    reason="seq_gap",
                    line=1,
                    seq=head,
                    detail=f"the first {missing} records are missing: the oldest "
                    "files were removed or archived; verify them together",
                )
            )
        )
    if missing:
        with files[0].open("rb") as handle:
            first = _seq_of(handle.readline())
        if first is not None and first != head:
            return done(
                _problem_report(
                    Problem(
                        reason="seq_gap",
                        line=1,
                        seq=first,
                        detail=f"the first file is named for record {head} but "
                        f"starts with record {first}: its start was removed",
                    )
                )
            )
    watch = _SinkWatch(sink_seq) if sink_seq is not None else None
    lines = iter_lines(files)
    report = verify_lines(
        lines if watch is None else watch.watch(lines),
        key,
        expect_checkpoint_seq=sink_seq,
        segment=bool(missing),
    )
    if report.problem is not None or watch is None or sink_last is None:
        return done(report)
    if watch.line is None:
        # Only possible as a segment: the sink's checkpoint is in the files
        # that are not here (a log that lacks it otherwise is "truncated").
        return done(report)
    if watch.line.removesuffix(b"\n") == sink_last[1]:
        return done(report, matched=True)
    problem = Problem(
        reason="truncated",
        line=watch.number,
        seq=watch.seq,
        detail=f"the log's record {watch.seq} is not the checkpoint the sink "
        "holds: the log was cut back before it and written again",
    )
    return done(
        _problem_report(
            problem,
            records=watch.number - 1,
            last_seq=watch.seq - 1,
            last_checkpoint_seq=watch.checkpoint_before,
        )
    )


# Evidence bundles --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BundleSummary:
    """What :func:`export_bundle` wrote."""

    out: Path
    records: int
    first_seq: int | None
    last_seq: int | None
    sessions: tuple[str, ...]


def _ts_of(line: bytes) -> str:
    # Records are canonical JSON with "ts" as a fixed-width UTC string, so
    # comparing the strings compares the instants.
    return str(json.loads(line).get("ts", ""))


def _iso_ms(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{value.astimezone(UTC).microsecond // 1000:03d}Z"
    )


def export_bundle(
    *,
    audit_dir: Path,
    recordings_dir: Path,
    since: datetime,
    until: datetime,
    out: Path,
    signer: Ed25519PrivateKey,
    sink: Path | None = None,
) -> BundleSummary:
    """Write the evidence bundle of [since, until) into *out* (a new directory).

    *signer* is the audit key (the one that signed the log's checkpoints): its
    public half is the bundle's ``audit-key.pem``, and it signs the manifest.

    Raises:
        FileExistsError: *out* exists and is not an empty directory.
        OSError: A file cannot be read or written.
    """
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    low, high = _iso_ms(since), _iso_ms(until)
    selected: list[bytes] = []
    for line in iter_lines(audit_files(audit_dir)):
        if not line.endswith(b"\n"):
            break  # a torn tail: not a record
        ts = _ts_of(line)
        if not selected:
            if ts < low:
                continue
            if ts >= high:
                break  # nothing in the range
        selected.append(line)
        if ts >= high and parse_record(line).is_checkpoint:
            break  # past the range, the first checkpoint seals the excerpt
    # Records after the last checkpoint would be unsealed: left out (the CLI
    # writes a checkpoint before it exports, so these are only records written
    # meanwhile).
    while selected and not parse_record(selected[-1]).is_checkpoint:
        selected.pop()
    first = parse_record(selected[0]).seq if selected else None
    last = parse_record(selected[-1]).seq if selected else None
    (out / "records.jsonl").write_bytes(b"".join(selected))
    sink_lines: list[bytes] = []
    sink_path = sink or audit_dir / "checkpoints.jsonl"
    if sink_path.is_file() and first is not None and last is not None:
        with sink_path.open("rb") as handle:
            for line in handle:
                try:
                    seq = parse_record(line).seq
                except ValueError:
                    continue
                if first <= seq <= last:
                    sink_lines.append(line)
    (out / "checkpoints.jsonl").write_bytes(b"".join(sink_lines))
    (out / "audit-key.pem").write_bytes(public_key_pem(signer.public_key()))
    sessions: list[str] = []
    # A recording goes into the bundle only with the record that holds its
    # hash: a file nothing in the excerpt vouches for proves nothing.
    vouched: set[tuple[str, str]] = set()
    for line in selected:
        record = json.loads(line)
        session_id = record.get("session_id")
        if not (isinstance(session_id, str) and _SESSION_ID.fullmatch(session_id)):
            continue
        if session_id not in sessions:
            sessions.append(session_id)
        if record.get("event") == "session.recording":
            vouched.add((session_id, str(record.get("name"))))
    for session_id in sessions:
        source = recordings_dir / session_id
        if not source.is_dir():
            continue
        target = out / "sessions" / session_id
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path in sorted(source.iterdir()):
            if not (path.is_file() and _SESSION_FILES.fullmatch(path.name)):
                continue
            if RECORDING_NAME.fullmatch(path.name) and (
                (session_id, path.name) not in vouched
            ):
                continue  # the session's end (and its hashes) came later
            shutil.copyfile(path, target / path.name)
    manifest = {
        "format": BUNDLE_FORMAT,
        "created_at": _iso_ms(datetime.now(UTC)),
        "from": low,
        "to": high,
        "first_seq": first,
        "last_seq": last,
        "broker_version": __version__,
        "files": {
            str(path.relative_to(out)): sha256_file(path)
            for path in sorted(out.rglob("*"))
            if path.is_file()
        },
    }
    manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode(
        "ascii"
    )
    (out / "manifest.json").write_bytes(manifest_bytes)
    signature = signer.sign(BUNDLE_SIG_CONTEXT + manifest_bytes)
    (out / "manifest.sig").write_bytes(
        base64.urlsafe_b64encode(signature).rstrip(b"=") + b"\n"
    )
    return BundleSummary(out, len(selected), first, last, tuple(sessions))


@dataclass(slots=True)
class BundleReport:
    """What :func:`verify_bundle` found; ``ok`` only if *problems* is empty."""

    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    sessions: int = 0
    recordings_checked: int = 0
    receipts_checked: int = 0
    key_fingerprint: str = ""
    chain: VerifyReport | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _symlinks(path: Path) -> list[str]:
    """Every symlink under *path*, relative to it (none is followed)."""
    found: list[str] = []
    for root, dirs, files in os.walk(path, followlinks=False):
        for name in (*dirs, *files):
            entry = Path(root, name)
            if entry.is_symlink():
                found.append(str(entry.relative_to(path)))
    return sorted(found)


def _signature_ok(key: Ed25519PublicKey, text: bytes, manifest: bytes) -> bool:
    encoded = text.strip()
    if not re.fullmatch(rb"[A-Za-z0-9_-]{86}", encoded):
        return False
    try:
        signature = base64.urlsafe_b64decode(encoded + b"==")
        key.verify(signature, BUNDLE_SIG_CONTEXT + manifest)
    except (binascii.Error, ValueError, InvalidSignature):
        return False
    return True


def _instant(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _same(a: object, b: object) -> bool:
    """Equal and of the same JSON type (so that ``true`` is not ``1``)."""
    return type(a) is type(b) and a == b


def _check_range(
    manifest: dict[str, Any], records: list[dict[str, Any]], result: BundleReport
) -> None:
    first = records[0]["seq"] if records else None
    last = records[-1]["seq"] if records else None
    said = (manifest.get("first_seq"), manifest.get("last_seq"))
    if not (_same(said[0], first) and _same(said[1], last)):
        result.problems.append(
            f"manifest.json: names seq {said[0]} to {said[1]}, but records.jsonl "
            f"holds seq {first} to {last}"
        )
    low, high = _instant(manifest.get("from")), _instant(manifest.get("to"))
    if low is None or high is None:
        result.problems.append("manifest.json: from and to are not ISO 8601 instants")
        return
    if low >= high:
        result.problems.append("manifest.json: from is not before to")
    begins = _instant(records[0].get("ts")) if records else None
    if begins is not None and begins < low:
        result.problems.append(
            f"records.jsonl: its first record (seq {first}) is older than the "
            "manifest's from"
        )


def verify_bundle(path: Path) -> BundleReport:
    """Check an evidence bundle offline; see the module docstring.

    Raises:
        OSError: A file of the bundle cannot be read.
    """
    result = BundleReport()
    links = _symlinks(path)
    if links:
        # Nothing in a bundle is followed out of it: stop here.
        result.problems.extend(f"symlink in the bundle: {name}" for name in links)
        return result
    try:
        manifest_bytes = (path / "manifest.json").read_bytes()
        manifest = json.loads(manifest_bytes.decode("ascii"))
    except (OSError, ValueError) as exc:
        result.problems.append(f"manifest.json: {exc}")
        return result
    except RecursionError:
        result.problems.append("manifest.json: JSON nested too deeply")
        return result
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        result.problems.append(f"manifest.json: not a {BUNDLE_FORMAT} manifest")
        return result
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        result.problems.append("manifest.json: no file list")
        return result
    present = {
        str(p.relative_to(path))
        for p in path.rglob("*")
        if p.is_file() and str(p.relative_to(path)) not in _UNLISTED
    }
    for name in sorted(present - set(listed)):
        result.problems.append(f"{name}: not in the manifest")
    for name, digest in sorted(listed.items()):
        file = path / name
        if name not in present:
            result.problems.append(f"{name}: listed in the manifest but missing")
        elif sha256_file(file) != digest:
            result.problems.append(f"{name}: SHA-256 differs from the manifest")
    try:
        key = load_public_key(path / "audit-key.pem")
    except (OSError, ValueError) as exc:
        result.problems.append(f"audit-key.pem: {exc}")
        return result
    result.key_fingerprint = key_fingerprint(key)
    signature = path / "manifest.sig"
    if not signature.is_file():
        result.problems.append(
            "manifest.sig: missing (the manifest is not signed by the audit key)"
        )
    elif not _signature_ok(key, signature.read_bytes(), manifest_bytes):
        result.problems.append(
            "manifest.sig: the signature over manifest.json does not verify with "
            "audit-key.pem: the manifest was changed, or signed with another key"
        )
    if not (path / "records.jsonl").is_file():
        result.problems.append("records.jsonl: missing")
        return result
    sink_seq = _last_sink_seq(path / "checkpoints.jsonl")
    with (path / "records.jsonl").open("rb") as handle:
        chain = verify_lines(handle, key, expect_checkpoint_seq=sink_seq, segment=True)
    result.chain = chain
    result.records = chain.records
    result.last_seq = chain.last_seq
    if chain.problem is not None:
        p = chain.problem
        result.problems.append(
            f"records.jsonl line {p.line} (seq {p.seq}): {p.reason}: {p.detail}"
        )
        return result
    if chain.unsealed:
        result.problems.append(
            f"records.jsonl: the last {chain.unsealed} records are not sealed by "
            "a checkpoint"
        )
    with (path / "records.jsonl").open("rb") as handle:
        records: list[dict[str, Any]] = [json.loads(line) for line in handle]
    result.first_seq = records[0]["seq"] if records else None
    _check_range(manifest, records, result)
    by_session: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        named = record.get("session_id")
        if not (isinstance(named, str) and str(record["event"]).startswith("session.")):
            continue
        if not _SESSION_ID.fullmatch(named):
            result.notes.append(
                f"seq {record['seq']}: its session id is not of the form "
                "[A-Za-z0-9_-]{1,64}; no files were looked for"
            )
            continue
        by_session.setdefault(named, []).append(record)
    result.sessions = len(by_session)
    for record in records:
        if record.get("event") != "session.recording":
            continue
        rec_sid, rec_name = record.get("session_id"), record.get("name")
        if not (
            isinstance(rec_sid, str)
            and _SESSION_ID.fullmatch(rec_sid)
            and isinstance(rec_name, str)
            and RECORDING_NAME.fullmatch(rec_name)
        ):
            result.problems.append(f"seq {record['seq']}: a malformed recording record")
            continue
        file = path / "sessions" / rec_sid / rec_name
        if not file.is_file():
            result.problems.append(f"sessions/{rec_sid}/{rec_name}: missing")
        elif sha256_file(file) != record.get("sha256"):
            result.problems.append(
                f"sessions/{rec_sid}/{rec_name}: SHA-256 differs from the audit record "
                f"seq {record['seq']}"
            )
        else:
            result.recordings_checked += 1
    vouched = {
        (r.get("session_id"), r.get("name"))
        for r in records
        if r.get("event") == "session.recording"
    }
    for file in sorted((path / "sessions").glob("*/*")):
        sid, name = file.parent.name, file.name
        if RECORDING_NAME.fullmatch(name) and (sid, name) not in vouched:
            result.problems.append(
                f"sessions/{sid}/{name}: no session.recording record in the "
                "bundle vouches for it"
            )
    for session_id, session_records in sorted(by_session.items()):
        result.receipts_checked += _check_receipts(
            path / "sessions" / session_id, session_id, session_records, result
        )
    return result


def _check_certificate(
    certificate: x509.Certificate,
    session_id: str,
    records: Sequence[dict[str, Any]],
    result: BundleReport,
) -> None:
    """Tie the device certificate to the session's records."""
    fingerprint = auth.certificate_fingerprint(certificate)
    naming = [
        r
        for r in records
        if r.get("event") in ("session.requested", "session.end")
        and "device_fingerprint" in r
    ]
    for record in naming:
        if record["device_fingerprint"] != fingerprint:
            result.problems.append(
                f"sessions/{session_id}/device.crt: its fingerprint {fingerprint} "
                f"is not the device_fingerprint of the {record['event']} record "
                f"seq {record['seq']}"
            )
    if not naming:
        result.notes.append(
            f"sessions/{session_id}: no session.requested or session.end record "
            "in the bundle names the device certificate: its receipts are "
            "checked against the certificate kept with them only"
        )


def _check_against_records(
    decoded: receipts.GrantReceipt | receipts.EndReceipt,
    records: Sequence[dict[str, Any]],
) -> list[str]:
    """How a verified receipt differs from the session's records."""
    differences: list[str] = []
    for record in records:
        device = record.get("device_id")
        if device is not None and device != decoded.device_id:
            differences.append(
                f"device_id {decoded.device_id!r} is not the {record['event']} "
                f"record seq {record['seq']}'s {device!r}"
            )
    if not isinstance(decoded, receipts.GrantReceipt):
        return differences
    stated: dict[str, object] = {
        "decided_by": decoded.decided_by,
        "channels": list(decoded.channels),
        "max_seconds": decoded.max_seconds,
    }
    for record in records:
        if record.get("event") != "session.granted":
            continue
        for name, value in stated.items():
            if not _same(record.get(name), value):
                differences.append(
                    f"{name} {value!r} is not the session.granted record seq "
                    f"{record['seq']}'s {record.get(name)!r}"
                )
    return differences


def _check_receipts(
    directory: Path,
    session_id: str,
    records: Sequence[dict[str, Any]],
    result: BundleReport,
) -> int:
    checked = 0
    certificate: x509.Certificate | None = None
    if (directory / "device.crt").is_file():
        try:
            certificate = x509.load_pem_x509_certificate(
                (directory / "device.crt").read_bytes()
            )
        except ValueError as exc:
            result.problems.append(
                f"sessions/{session_id}/device.crt: not a certificate ({exc})"
            )
            return 0
        _check_certificate(certificate, session_id, records, result)
    for kind in ("grant", "end"):
        file = directory / f"{kind}-receipt.json"
        if not file.is_file():
            continue
        where = f"sessions/{session_id}/{file.name}"
        if certificate is None:
            result.problems.append(f"{where}: no device.crt to verify it with")
            continue
        try:
            document = json.loads(file.read_text(encoding="ascii"))
            signed = receipts.SignedReceipt.from_wire(
                document["receipt"], document["signature"]
            )
            decoded = receipts.decode(signed.payload)
            if decoded.session_id != session_id:
                raise ValueError("the receipt is for another session")
            if isinstance(decoded, receipts.GrantReceipt):
                receipts.verify_grant(
                    certificate,
                    signed,
                    session_id=session_id,
                    device_id=decoded.device_id,
                    nonce=decoded.nonce,
                    engineer=decoded.engineer,
                    offered_channels=decoded.channels,
                    offered_max_seconds=decoded.max_seconds,
                )
            else:
                receipts.verify_end(
                    certificate,
                    signed,
                    session_id=session_id,
                    device_id=decoded.device_id,
                    nonce=decoded.nonce,
                )
        except RecursionError:
            result.problems.append(f"{where}: does not verify (JSON nested too deeply)")
            continue
        except (KeyError, TypeError, ValueError, receipts.ReceiptError) as exc:
            result.problems.append(f"{where}: does not verify ({exc})")
            continue
        differences = _check_against_records(decoded, records)
        result.problems.extend(
            f"{where}: {text} (the receipt does not match the chain)"
            for text in differences
        )
        if not differences:
            checked += 1
    return checked


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, hex (read in 1 MiB pieces)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
