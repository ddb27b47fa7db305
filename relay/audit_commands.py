"""``relay audit ...`` and the command line's own audit records.

Theory of operation
===================
:mod:`relay.cli` stays a parser and a dispatcher; what the ``audit`` commands
do lives here, on top of :mod:`relay.audit_reader` (reading, verifying,
exporting) and :mod:`relay.audit_log` (appending).

- ``relay audit verify [PATH]`` takes an evidence bundle (a directory with
  ``manifest.json``), an audit directory, or one chain file, and says in plain
  words what it found. Exit 0: everything verified; 1: a problem was found
  (the first bad record is named); 2: the input could not be read. An audit
  directory must start at record 1 and hold, at its seq, the checkpoint line
  the sink saw last; ``--partial`` accepts a directory whose oldest files were
  archived on purpose (the rest is checked as a part of the chain).
- ``relay audit show --session ID`` prints what the store, the log and the
  recordings directory hold of one session; it reads files only, so it works
  without a running broker. The timeline is read, not verified.
- ``relay audit export`` first appends ``audit.exported`` and closes the log
  (which seals everything so far with a checkpoint), then writes the bundle
  (its manifest signed with the data dir's audit key), then verifies what it
  wrote.

:func:`cli_audit` gives the CLI's state-changing commands (``user add``,
``device revoke``, ``ca sign`` ...) a logger whose ``audit=True`` events are
appended to ``$RELAY_DATA_DIR/audit`` like the broker's. Every such record
carries ``by``, the operating-system user who ran the command: on the broker
host that is the only identity there is. The log is opened before the command
changes anything, so a log that cannot be opened or continued (a directory
that cannot be created, a damaged last line, an unreadable key) refuses the
command with nothing changed. A write that fails later (the disk fills between
the open and the append) cannot undo the change: the command then says that
the change was made but not recorded, and exits 1.

Everything printed from a record, a store row or a receipt goes through
:func:`_text`: the engineer typed the reason, the device chose its labels, so
control characters are escaped before they reach a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from relay.audit import CHECKPOINT_EVENT, Problem, VerifyReport, verify_lines
from relay.audit_log import (
    AuditLog,
    AuditLogCorrupt,
    audit_files,
    load_or_create_audit_key,
    load_public_key,
)
from relay.audit_reader import (
    export_bundle,
    key_fingerprint,
    read_receipts,
    session_timeline,
    sha256_file,
    verify_bundle,
    verify_directory,
)
from relay.cli import CLIError, _describe, _open_store
from relay.config import BrokerConfig
from relay.log import get_logger
from relay.pki_files import DataDir

__all__ = [
    "CliAudit",
    "cli_audit",
    "cmd_audit_export",
    "cmd_audit_show",
    "cmd_audit_verify",
    "parse_time",
]

#: Fields a timeline line leaves out: the session is the one shown, and these
#: are the same on every record of it.
_TIMELINE_SKIP: Final = frozenset(
    {"seq", "prev", "ts", "event", "session_id", "broker_version", "device_fingerprint"}
)
_COMPARE_KEY: Final = (
    "compare it with the fingerprint you obtained out of band: a log or bundle "
    "proves only that this key signed it"
)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a bare container)
        return f"uid {os.getuid()}"


def _text(value: object) -> str:
    """*value* as one line a terminal shows as is: control and format characters
    (ANSI escapes, line breaks, U+202E) escaped."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(
        char if char.isprintable() else f"\\u{ord(char):04x}" for char in text
    )


def _field(value: object) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_field(item) for item in value) + "]"
    if isinstance(value, str):
        if value and value.isprintable() and " " not in value:
            return value
        return json.dumps(value)  # quoted, every control character escaped
    return json.dumps(value)


def _print_json(value: object) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


# The CLI's own audit records ------------------------------------------------------


class CliAudit:
    """The audit sink of one CLI command: the data dir's log, plus ``by``.

    Attributes:
        logger: A logger whose ``audit=True`` events are appended here.
        failed: How many records could not be written.
    """

    def __init__(self, log: AuditLog, by: str) -> None:
        self._log = log
        self.by = by
        self.failed = 0
        self.logger: Any = get_logger("cli", audit=self)

    def append(self, event: str, fields: Mapping[str, object]) -> int | None:
        seq = self._log.append(event, {**fields, "by": self.by})
        if seq is None:
            self.failed += 1
        return seq

    def lost(self) -> int:
        """How many records could not be written so far."""
        return self.failed

    def require_written(self, what: str) -> None:
        """Refuse to go on (exit 1) if a record so far was not written."""
        if self.failed or not self._log.healthy:
            raise CLIError(
                f"cannot write the audit log in {self._log.directory} "
                f"({self._log.last_error or 'write failed'}); {what}"
            )


def _open_log(config: BrokerConfig) -> AuditLog:
    data_dir = DataDir(config.data_dir)
    where = data_dir.audit_dir
    nothing = "nothing was changed"
    try:
        key = load_or_create_audit_key(data_dir.audit_key, data_dir.audit_public_key)
        log = AuditLog(where, signer=key, config=config.audit, mirror=None)
    except AuditLogCorrupt as exc:
        raise CLIError(
            f"the audit log cannot be continued: {exc}; {nothing} "
            f"(`relay audit verify {where}` names the problem)"
        ) from None
    except (OSError, ValueError) as exc:
        text = _describe(exc) if isinstance(exc, OSError) else str(exc)
        raise CLIError(
            f"cannot open the audit log in {where}: {text}; {nothing}"
        ) from None
    if not log.healthy:  # the repair of a torn last line could not be written
        error = log.last_error
        log.close()
        raise CLIError(f"cannot write the audit log in {where} ({error}); {nothing}")
    return log


@contextlib.contextmanager
def cli_audit(config: BrokerConfig) -> Iterator[CliAudit]:
    """The audit log of one state-changing command; see the module docstring.

    Opened (and checked) before the ``with`` block, closed after it: closing
    writes a checkpoint, so the command's records are sealed when it exits.

    Raises:
        CLIError: The log cannot be opened (nothing changed yet), or, after
            the block, a record could not be written (the change was made).
    """
    log = _open_log(config)
    audit = CliAudit(log, _os_user())
    # The command itself is the first record: an admin action is on record
    # even if it is refused, and a log that takes no record (a full disk)
    # stops the command before it changes anything.
    audit.append("cli.command", {"command": " ".join(sys.argv[1:3])[:64]})
    if audit.failed:
        error = log.last_error or "write failed"
        log.close()
        raise CLIError(
            f"cannot write the audit log in {log.directory} ({error}); "
            "nothing was changed"
        )
    try:
        yield audit
    finally:
        log.close()
    failed = audit.lost()
    if failed or not log.healthy:
        lost = f"{failed} record(s) lost" if failed else "not sealed"
        raise CLIError(
            f"the change was made, but the audit log in {log.directory} could not "
            f"be written ({log.last_error or 'write failed'}; {lost}); fix the "
            "disk and check it with `relay audit verify`"
        )


# relay audit verify -----------------------------------------------------------------


@dataclass(slots=True)
class _Verified:
    """What one ``relay audit verify`` found, in a form for people and for JSON."""

    kind: str
    path: Path
    key_fingerprint: str
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    last_checkpoint_seq: int | None = None
    last_checkpoint_ts: str | None = None
    unsealed: int = 0
    sink_seq: int | None = None
    problem: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bundle: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None and not self.problems

    def take(self, report: VerifyReport) -> None:
        self.records = report.records
        self.last_seq = report.last_seq if report.records else None
        self.first_seq = (
            report.last_seq - report.records + 1 if report.records else None
        )
        self.last_checkpoint_seq = report.last_checkpoint_seq
        self.unsealed = report.unsealed

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "kind": self.kind,
            "path": str(self.path),
            "records": self.records,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "last_checkpoint_seq": self.last_checkpoint_seq,
            "last_checkpoint_ts": self.last_checkpoint_ts,
            "unsealed": self.unsealed,
            "sink_seq": self.sink_seq,
            "key_fingerprint": self.key_fingerprint,
            "problem": self.problem,
            "problems": self.problems,
            "notes": self.notes,
            "bundle": self.bundle,
        }


def explain(problem: Problem, *, last_seq: int, sink_seq: int | None) -> str:
    """The first problem of a log in plain words: where, and what it means."""
    seq = problem.seq
    if problem.reason == "malformed":
        after = f" (after record {last_seq})" if last_seq else ""
        return (
            f"line {problem.line}{after} is not a well-formed audit record "
            f"({problem.detail}): it was changed, damaged or inserted"
        )
    if problem.reason == "seq_gap":
        expected = last_seq + 1
        if seq is not None and seq > expected:
            missing = (
                f"record {expected} is missing"
                if seq == expected + 1
                else f"records {expected} to {seq - 1} are missing"
            )
            return (
                f"record {seq} follows record {last_seq}: {missing} (deleted), "
                "or this record's seq was changed"
            )
        return (
            f"record {seq} follows record {last_seq}: a record was inserted, "
            "repeated or reordered, or its seq was changed"
        )
    if problem.reason == "bad_prev":
        return (
            f"record {seq} does not follow record {last_seq}: a record before it "
            "was changed, removed or reordered"
        )
    if problem.reason == "checkpoint_mismatch":
        return (
            f"checkpoint record {seq} does not seal the record before it "
            f"({problem.detail}): records were changed, removed or inserted"
        )
    if problem.reason == "bad_checkpoint_signature":
        return (
            f"the signature of checkpoint record {seq} does not verify with the "
            "audit key: it was forged or rewritten, or signed with another key"
        )
    # "truncated", the last reason
    if seq is not None:
        # verify_directory: the record at the sink's seq is another line.
        return (
            f"record {seq} of the log is not the checkpoint the checkpoint sink "
            f"holds for seq {seq}: the log was cut back before it and written "
            "again (records were replaced)"
        )
    sealed = f" at seq {sink_seq}" if sink_seq is not None else ""
    ends = f"ends at record {last_seq}" if last_seq else "holds no records"
    return (
        f"the log {ends}, but the checkpoint sink saw a checkpoint{sealed}: "
        "records after it were cut off"
    )


def _locate(files: Iterable[Path], line: int) -> tuple[Path, int] | None:
    """The file and the line in it of the *line*-th line of *files* together."""
    seen = 0
    for path in files:
        with path.open("rb") as handle:
            count = sum(1 for _ in handle)
        if line <= seen + count:
            return path, line - seen
        seen += count
    return None


def _problem_json(
    problem: Problem, message: str, where: tuple[Path, int] | None
) -> dict[str, Any]:
    return {
        "reason": problem.reason,
        "line": problem.line,
        "seq": problem.seq,
        "detail": problem.detail,
        "message": message,
        "file": None if where is None else str(where[0]),
        "file_line": None if where is None else where[1],
    }


def _checkpoint_ts(lines: Iterable[bytes], seq: int | None) -> str | None:
    """The ts of the checkpoint record *seq* among *lines* (a sink), if there."""
    if seq is None:
        return None
    marker = f'"seq":{seq},'.encode()
    for line in lines:
        if marker in line and CHECKPOINT_EVENT.encode() in line:
            with contextlib.suppress(ValueError, AttributeError):
                return str(json.loads(line)["ts"])
    return None


def _sink_ts(sink: Path, seq: int | None) -> str | None:
    if seq is None or not sink.is_file():
        return None
    with sink.open("rb") as handle:
        return _checkpoint_ts(handle, seq)


def _key(path: Path) -> Ed25519PublicKey:
    try:
        return load_public_key(path)
    except OSError as exc:
        raise CLIError(f"cannot read the public key: {_describe(exc)}", 2) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CLIError(f"{path}: not an audit public key ({exc})", 2) from None


def _verify_directory(
    path: Path, key_file: Path | None, sink: Path | None, *, partial: bool = False
) -> _Verified:
    key = _key(key_file or path / "audit-key.pem")
    sink_path = sink or path / "checkpoints.jsonl"
    if sink is not None and not sink.is_file():
        raise CLIError(f"--sink {sink}: no such file", 2)
    found = verify_directory(
        path, public_key=key, sink=sink_path, allow_missing_head=partial
    )
    result = _Verified("directory", path, found.key_fingerprint)
    result.take(found.report)
    result.sink_seq = found.sink_seq
    result.last_checkpoint_ts = _sink_ts(sink_path, found.report.last_checkpoint_seq)
    problem = found.report.problem
    head = found.missing_head + 1
    if not found.files:
        result.notes.append(f"no audit files (audit-NNNNNNNNNNNN.jsonl) in {path}")
    elif found.missing_head and partial:
        result.notes.append(
            f"--partial: checked from record {head} on; records 1 to {head - 1} "
            "are in the archived files, not verified here"
        )
        if (
            problem is None
            and found.sink_seq is not None
            and found.sink_seq < head
            and not found.sink_matched
        ):
            result.notes.append(
                f"the sink's last checkpoint (seq {found.sink_seq}) is in the "
                "archived files: it could not be compared with the log"
            )
    if not sink_path.is_file():
        result.notes.append(
            f"no checkpoint sink at {sink_path}: a cut-off tail cannot be detected"
        )
    if problem is not None:
        head_problem = (
            found.missing_head > 0 and problem.line == 1 and problem.reason == "seq_gap"
        )
        if head_problem and not partial:
            message = (
                f"the log starts at record {head}: {problem.detail} (or pass "
                "--partial if they were archived on purpose)"
            )
        elif head_problem:
            message = problem.detail
        else:
            message = explain(
                problem, last_seq=found.report.last_seq, sink_seq=found.sink_seq
            )
        where = (
            None
            if problem.reason == "truncated" and problem.seq is None
            else _locate(found.files, problem.line)
        )
        result.problem = _problem_json(problem, message, where)
    return result


def _verify_file(path: Path, key_file: Path | None, sink: Path | None) -> _Verified:
    key_path = key_file or path.parent / "audit-key.pem"
    if key_file is None and not key_path.is_file():
        raise CLIError(
            f"no audit-key.pem beside {path}: give the audit public key with "
            "--public-key FILE",
            2,
        )
    key = _key(key_path)
    sink_seq: int | None = None
    if sink is not None:
        try:
            with sink.open("rb") as handle:
                sink_seq = _last_seq(handle)
        except OSError as exc:
            raise CLIError(f"cannot read the sink: {_describe(exc)}", 2) from None
    checkpoints: dict[int, str] = {}

    def lines(handle: Iterable[bytes]) -> Iterator[bytes]:
        for line in handle:
            if CHECKPOINT_EVENT.encode() in line:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    record = json.loads(line)
                    checkpoints[int(record["seq"])] = str(record["ts"])
            yield line

    try:
        with path.open("rb") as handle:
            first = handle.readline()
            segment = _first_seq_of(first) not in (None, 1)
            handle.seek(0)
            report = verify_lines(
                lines(handle), key, expect_checkpoint_seq=sink_seq, segment=segment
            )
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {_describe(exc)}", 2) from None
    result = _Verified("file", path, key_fingerprint(key))
    result.take(report)
    result.sink_seq = sink_seq
    if report.last_checkpoint_seq is not None:
        result.last_checkpoint_ts = checkpoints.get(report.last_checkpoint_seq)
    if segment:
        result.notes.append(
            "the file does not start at record 1: checked as a part of a chain "
            "(its first record is taken as given)"
        )
    if sink is None:
        result.notes.append("no --sink given: a cut-off tail cannot be detected")
    if report.problem is not None:
        problem = report.problem
        message = explain(problem, last_seq=report.last_seq, sink_seq=sink_seq)
        where = None if problem.reason == "truncated" else (path, problem.line)
        result.problem = _problem_json(problem, message, where)
    return result


def _first_seq_of(line: bytes) -> int | None:
    try:
        seq = json.loads(line).get("seq")
    except (ValueError, AttributeError):
        return None
    return seq if isinstance(seq, int) else None


def _last_seq(lines: Iterable[bytes]) -> int | None:
    last: int | None = None
    for line in lines:
        seq = _first_seq_of(line)
        if seq is not None:
            last = seq
    return last


def _verify_bundle(path: Path, key_file: Path | None) -> _Verified:
    found = verify_bundle(path)
    result = _Verified("bundle", path, found.key_fingerprint)
    if found.chain is not None:
        result.take(found.chain)
        if found.chain.problem is not None:
            problem = found.chain.problem
            sink_seq = None
            with (
                contextlib.suppress(OSError),
                (path / "checkpoints.jsonl").open("rb") as handle,
            ):
                sink_seq = _last_seq(handle)
            message = explain(problem, last_seq=found.chain.last_seq, sink_seq=sink_seq)
            where = (
                None
                if problem.reason == "truncated"
                else (
                    path / "records.jsonl",
                    problem.line,
                )
            )
            result.problem = _problem_json(problem, message, where)
    with (
        contextlib.suppress(OSError),
        (path / "checkpoints.jsonl").open("rb") as handle,
    ):
        result.last_checkpoint_ts = _checkpoint_ts(handle, result.last_checkpoint_seq)
    # The chain's own problem is explained above; the rest are the bundle's.
    result.problems = [
        p for p in found.problems if not p.startswith("records.jsonl line")
    ]
    if key_file is not None and found.key_fingerprint:
        expected = key_fingerprint(_key(key_file))
        if expected != found.key_fingerprint:
            result.problems.append(
                f"the bundle is signed with the audit key {found.key_fingerprint}, "
                f"not with the key given by --public-key ({expected})"
            )
    manifest: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads((path / "manifest.json").read_text(encoding="ascii"))
        if isinstance(loaded, dict):
            manifest = loaded
    result.bundle = {
        "from": manifest.get("from"),
        "to": manifest.get("to"),
        "created_at": manifest.get("created_at"),
        "broker_version": manifest.get("broker_version"),
        "sessions": found.sessions,
        "recordings_checked": found.recordings_checked,
        "receipts_checked": found.receipts_checked,
    }
    result.notes.extend(found.notes)
    if found.records == 0 and found.chain is not None and found.chain.ok:
        result.notes.append("the bundle holds no records")
    return result


def cmd_audit_verify(args: argparse.Namespace, data_dir: Path) -> int:
    """``relay audit verify``; exit 0 verified, 1 a problem, 2 cannot read."""
    path: Path = args.path if args.path is not None else DataDir(data_dir).audit_dir
    # --partial: the oldest files of an audit directory were archived on purpose.
    partial = bool(getattr(args, "partial", False))
    if not path.exists():
        raise CLIError(f"cannot read {path}: no such file or directory", 2)
    try:
        if path.is_dir() and (path / "manifest.json").exists():
            if args.sink is not None:
                raise CLIError(
                    "--sink is for an audit directory or file, not a bundle", 2
                )
            result = _verify_bundle(path, args.public_key)
        elif path.is_dir():
            result = _verify_directory(
                path, args.public_key, args.sink, partial=partial
            )
        else:
            result = _verify_file(path, args.public_key, args.sink)
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {_describe(exc)}", 2) from None
    if args.json:
        _print_json(result.to_json())
    else:
        _print_verified(result)
    return 0 if result.ok else 1


def _print_verified(result: _Verified) -> None:
    out = sys.stdout
    what = {"bundle": "evidence bundle", "directory": "audit log", "file": "audit file"}
    print(f"{what[result.kind]} {result.path}", file=out)
    if result.bundle is not None and result.bundle.get("from"):
        print(
            f"  range              {result.bundle['from']} to {result.bundle['to']}",
            file=out,
        )
    span = (
        f" (seq {result.first_seq} to {result.last_seq})"
        if result.first_seq is not None
        else ""
    )
    before = "" if result.problem is None else ", before the problem below"
    print(f"  records verified   {result.records}{span}{before}", file=out)
    if result.last_checkpoint_seq is None:
        print("  last checkpoint    none", file=out)
    else:
        when = f" at {result.last_checkpoint_ts}" if result.last_checkpoint_ts else ""
        print(f"  last checkpoint    seq {result.last_checkpoint_seq}{when}", file=out)
    if result.unsealed and result.problem is None:
        print(
            f"  not yet sealed     {result.unsealed} record(s) after the last "
            "checkpoint: chained, but no signature covers them yet",
            file=out,
        )
    if result.bundle is not None:
        bundle = result.bundle
        print(
            f"  sessions           {bundle['sessions']} ({bundle['recordings_checked']} "
            f"recording(s) and {bundle['receipts_checked']} receipt(s) verified)",
            file=out,
        )
    if result.key_fingerprint:
        print(f"  audit key          sha256 {result.key_fingerprint}", file=out)
        print(f"                     {_COMPARE_KEY}", file=out)
    for note in result.notes:
        print(f"  note: {note}", file=out)
    if result.problem is not None:
        problem = result.problem
        where = ""
        if problem["file"] is not None:
            where = f" ({problem['file']} line {problem['file_line']})"
        print(f"TAMPERED OR DAMAGED{where}: {problem['message']}", file=out)
    for text in result.problems:
        print(f"PROBLEM: {_text(text)}", file=out)
    if result.ok:
        part = ""
        if result.kind == "directory" and result.first_seq not in (None, 1):
            part = f" from record {result.first_seq} on (--partial)"
        print(f"OK: the log verifies{part}", file=out)


# relay audit show ---------------------------------------------------------------------


def cmd_audit_show(args: argparse.Namespace, config: BrokerConfig) -> int:
    """``relay audit show --session ID``: row, timeline, receipts, recordings."""
    session_id: str = args.session
    data_dir = DataDir(config.data_dir)
    if not data_dir.root.is_dir():
        raise CLIError(
            f"unknown session {session_id!r}: no data dir at {data_dir.root}"
        )
    with _open_store(config) as store:
        row = store.get_remote_session(session_id)
    if row is None:
        raise CLIError(f"unknown session {_text(session_id)!r}")
    timeline = session_timeline(data_dir.audit_dir, session_id, start_seq=row.start_seq)
    try:
        receipts = read_receipts(data_dir.recordings, session_id)
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot read the receipts of {session_id}: {exc}") from None
    recordings: list[dict[str, Any]] = []
    for entry in row.recordings:
        name = str(entry.get("name", ""))
        file = data_dir.recordings / session_id / name
        if not name or "/" in name or not file.is_file():
            state = "missing"
        elif sha256_file(file) != entry.get("sha256"):
            state = "changed"
        else:
            state = "matches"
        recordings.append({**entry, "path": str(file), "file": state})
    notes: list[str] = []
    events = [record.get("event") for record in timeline]
    if "session.requested" not in events:
        notes.append(
            "no session.requested record: the broker stopped between storing the "
            "session and logging its request, or the record is not in the log"
        )
    ends = events.count("session.end")
    if row.ended_at is not None and ends == 0:
        notes.append("the row is ended, but the log has no session.end record")
    if ends > 1:
        notes.append(f"{ends} session.end records (there should be one)")
    if args.json:
        _print_json(
            {
                "session": row.to_json(),
                "timeline": timeline,
                "receipts": receipts,
                "recordings": recordings,
                "notes": notes,
            }
        )
        return 0
    _print_session(row.to_json(), timeline, receipts, recordings, notes)
    return 0


def _print_session(
    row: dict[str, Any],
    timeline: list[dict[str, Any]],
    receipts: dict[str, dict[str, Any] | None],
    recordings: list[dict[str, Any]],
    notes: list[str],
) -> None:
    out = sys.stdout

    def line(label: str, value: object) -> None:
        print(f"  {label:<18} {_text(value)}", file=out)

    print(f"session {_text(row['session_id'])}", file=out)
    line("engineer", row["engineer"])
    line("device", row["device_id"])
    line("reason", row["reason"])
    line("source", row["source"])
    line("device cert", f"sha256 {row['device_fingerprint']}")
    line("channels asked", ", ".join(row["channels"]))
    line("requested", row["requested_at"])
    if row["granted_at"] is None:
        line("granted", "no")
    else:
        granted = ", ".join(row["granted_channels"] or [])
        line(
            "granted",
            f"{row['granted_at']} by {row['decided_by'] or '-'} "
            f"({granted}; at most {row['max_seconds']} s)",
        )
    if row["ended_at"] is None:
        line("ended", "not yet (or the broker has not recorded its end)")
    else:
        line("ended", f"{row['ended_at']} ({row['end_reason']})")
    if row["duration_s"] is not None:
        line("duration", f"{row['duration_s']} s")
    line(
        "bytes",
        f"{row['bytes_to_device']} to the device, {row['bytes_from_device']} from it",
    )
    print(
        "timeline (read from the audit log, not verified: `relay audit verify` "
        "checks the chain)",
        file=out,
    )
    if not timeline:
        print("  (no records)", file=out)
    for record in timeline:
        fields = " ".join(
            f"{name}={_field(value)}"
            for name, value in sorted(record.items())
            if name not in _TIMELINE_SKIP
        )
        print(
            f"  {record.get('seq')!s:>6}  {_text(record.get('ts'))}  "
            f"{_text(record.get('event'))}  {_text(fields)}",
            file=out,
        )
    print("receipts (signed by the device; a bundle's verify checks them)", file=out)
    if not any(receipts.values()):
        print("  (none)", file=out)
    for kind, stored in receipts.items():
        document: object = stored  # JSON from a file: any shape
        if not isinstance(document, dict):
            continue
        stated = document.get("fields")
        receipt: dict[str, Any] = stated if isinstance(stated, dict) else {}
        if kind == "grant":
            detail = (
                f"decided_by={_field(receipt.get('decided_by'))} "
                f"channels={_field(receipt.get('channels'))} "
                f"max_seconds={receipt.get('max_seconds')}"
            )
        else:
            detail = (
                f"reason={_field(receipt.get('reason'))} "
                f"bytes_to_device={receipt.get('bytes_to_device')} "
                f"bytes_from_device={receipt.get('bytes_from_device')} "
                f"streams_opened={receipt.get('streams_opened')}"
            )
        print(f"  {kind:<6} {_text(detail)}", file=out)
    print("recordings", file=out)
    if not recordings:
        print("  (none)", file=out)
    for entry in recordings:
        print(
            f"  {_text(entry.get('name')):<16} {_text(entry.get('kind')):<9} "
            f"{entry.get('size_bytes')} bytes  sha256 {_text(entry.get('sha256'))}  "
            f"file {entry['file']}",
            file=out,
        )
    for note in notes:
        print(f"note: {note}", file=out)


# relay audit export -------------------------------------------------------------------


def parse_time(text: str) -> datetime:
    """argparse type of ``--from``/``--to``: ISO 8601, UTC unless it says otherwise.

    A date alone is midnight UTC; a date and time without an offset is UTC.
    """
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), time(), tzinfo=UTC)
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 date or time (2026-06-01 or "
            "2026-06-01T12:00:00Z)"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def cmd_audit_export(args: argparse.Namespace, config: BrokerConfig) -> int:
    """``relay audit export``: record the export, seal, write and check the bundle."""
    since: datetime = args.since
    until: datetime = args.until
    out: Path = args.out
    if since >= until:
        raise CLIError("--from must be before --to", 2)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; give a new or empty directory", 2)
    if out.is_dir() and any(out.iterdir()):
        raise CLIError(
            f"--out {out} is not empty; give a new or empty directory (a bundle "
            "never mixes with other files)",
            2,
        )
    data_dir = DataDir(config.data_dir)
    if not audit_files(data_dir.audit_dir):
        raise CLIError(f"no audit log in {data_dir.audit_dir}: nothing to export")
    low = since.isoformat().replace("+00:00", "Z")
    high = until.isoformat().replace("+00:00", "Z")
    with cli_audit(config) as audit:
        audit.logger.info(
            "audit.exported",
            **{"from": low, "to": high, "out": str(out.resolve())},
            audit=True,
        )
        audit.require_written("nothing was exported")
    try:
        signer = load_or_create_audit_key(data_dir.audit_key, data_dir.audit_public_key)
    except (OSError, ValueError) as exc:
        text = _describe(exc) if isinstance(exc, OSError) else str(exc)
        raise CLIError(
            f"cannot read the audit key to sign the bundle: {text}"
        ) from None
    summary = export_bundle(
        audit_dir=data_dir.audit_dir,
        recordings_dir=data_dir.recordings,
        since=since,
        until=until,
        out=out,
        signer=signer,
        sink=config.audit.checkpoint_sink,
    )
    check = verify_bundle(out)
    if args.json:
        _print_json(
            {
                "out": str(out),
                "from": low,
                "to": high,
                "records": summary.records,
                "first_seq": summary.first_seq,
                "last_seq": summary.last_seq,
                "sessions": list(summary.sessions),
                "key_fingerprint": check.key_fingerprint,
                "verified": check.ok,
                "problems": check.problems,
            }
        )
    else:
        span = (
            f" (seq {summary.first_seq} to {summary.last_seq})"
            if summary.first_seq is not None
            else ""
        )
        print(f"wrote evidence bundle {out}")
        print(f"  range              {low} to {high}")
        print(f"  records            {summary.records}{span}, ending in a checkpoint")
        print(f"  sessions           {len(summary.sessions)} (recordings and receipts)")
        print(
            f"  audit key          sha256 {check.key_fingerprint} (signs the "
            "manifest, manifest.sig)"
        )
        print(f"verify it anywhere: relay audit verify {out}")
        for text in check.problems:
            print(f"PROBLEM: {_text(text)}")
    if not check.ok:
        raise CLIError(f"the bundle written to {out} does not verify; see above")
    return 0
