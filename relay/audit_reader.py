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
  the audit public key, and against the last line of the checkpoint sink: a
  tail cut off after a checkpoint the sink saw is reported as ``truncated``.
- :func:`export_bundle` writes an evidence bundle: the records from the first
  one at or after *since* through the first checkpoint after the last one
  before *until* (so the excerpt ends sealed), the checkpoints from the sink
  that fall in it, the files of every session the excerpt names (recordings,
  receipts, device certificate), the audit public key, and ``manifest.json``
  with the SHA-256 of each file.
- :func:`verify_bundle` checks a bundle on its own, on any machine: every
  file's hash, the excerpt as a chain segment sealed by a checkpoint that the
  bundle's key signed, every ``session.recording`` record against the file it
  names, and every receipt's signature against the device certificate kept
  with it. The key's fingerprint is printed so that it can be compared with one
  obtained out of band: a bundle proves only that its key signed it.

Bundle layout::

    manifest.json        format, range, seqs, broker version, file hashes
    records.jsonl        the excerpt of the chain, byte for byte
    checkpoints.jsonl    the sink's lines for checkpoints in the excerpt
    audit-key.pem        the audit public key
    sessions/ID/...      shell-N.cast, forwards.json, grant-receipt.json,
                         end-receipt.json, device.crt
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from relay import __version__
from relay.audit import VerifyReport, parse_record, verify_lines
from relay.audit_log import (
    AUDIT_FILE,
    audit_files,
    iter_lines,
    load_public_key,
)
from relay.proto import receipts

__all__ = [
    "BUNDLE_FORMAT",
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
        except ValueError:
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
    """What :func:`verify_directory` found."""

    report: VerifyReport
    files: tuple[Path, ...]
    sink_seq: int | None
    key_fingerprint: str


def _last_sink_seq(sink: Path) -> int | None:
    if not sink.is_file():
        return None
    last: int | None = None
    with sink.open("rb") as handle:
        for line in handle:
            try:
                last = parse_record(line).seq
            except ValueError:
                continue
    return last


def verify_directory(
    directory: Path,
    *,
    public_key: Ed25519PublicKey | None = None,
    sink: Path | None = None,
) -> DirectoryReport:
    """Verify the chain in an audit directory against its key and sink.

    Raises:
        OSError: A file cannot be read.
        ValueError: The public key file is not an Ed25519 key.
    """
    key = public_key or load_public_key(directory / "audit-key.pem")
    sink_path = sink or directory / "checkpoints.jsonl"
    files = audit_files(directory)
    sink_seq = _last_sink_seq(sink_path)
    report = verify_lines(
        iter_lines(files),
        key,
        expect_checkpoint_seq=sink_seq,
        segment=bool(files) and _first_seq(files[0]) != 1,
    )
    return DirectoryReport(report, tuple(files), sink_seq, key_fingerprint(key))


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
    sink: Path | None = None,
) -> BundleSummary:
    """Write the evidence bundle of [since, until) into *out* (a new directory).

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
    shutil.copyfile(audit_dir / "audit-key.pem", out / "audit-key.pem")
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
    (out / "manifest.json").write_text(
        json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="ascii"
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

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_bundle(path: Path) -> BundleReport:
    """Check an evidence bundle offline; see the module docstring."""
    result = BundleReport()
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="ascii"))
    except (OSError, ValueError) as exc:
        result.problems.append(f"manifest.json: {exc}")
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
        if p.is_file() and p.name != "manifest.json"
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
        records = [json.loads(line) for line in handle]
    result.first_seq = records[0]["seq"] if records else None
    sessions = {
        r["session_id"]
        for r in records
        if isinstance(r.get("session_id"), str) and r["event"].startswith("session.")
    }
    result.sessions = len(sessions)
    for record in records:
        if record.get("event") != "session.recording":
            continue
        sid, name = record.get("session_id"), record.get("name")
        if not (
            isinstance(sid, str)
            and _SESSION_ID.fullmatch(sid)
            and isinstance(name, str)
            and RECORDING_NAME.fullmatch(name)
        ):
            result.problems.append(f"seq {record['seq']}: a malformed recording record")
            continue
        file = path / "sessions" / sid / name
        if not file.is_file():
            result.problems.append(f"sessions/{sid}/{name}: missing")
        elif sha256_file(file) != record.get("sha256"):
            result.problems.append(
                f"sessions/{sid}/{name}: SHA-256 differs from the audit record "
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
    for sid in sorted(sessions):
        result.receipts_checked += _check_receipts(path / "sessions" / sid, sid, result)
    return result


def _check_receipts(directory: Path, session_id: str, result: BundleReport) -> int:
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
        except (KeyError, TypeError, ValueError, receipts.ReceiptError) as exc:
            result.problems.append(f"{where}: does not verify ({exc})")
            continue
        checked += 1
    return checked


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, hex (read in 1 MiB pieces)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
