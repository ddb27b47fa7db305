"""The audit log on disk: the chained records of ``relay.audit``, in files.

Theory of operation
===================
:class:`AuditLog` is the file shell around :class:`relay.audit.AuditChain`. The
broker and every CLI command that changes something hold one on the same
directory; each :meth:`AuditLog.append` takes an exclusive ``flock`` on
``.lock``, makes sure its chain is at the end of the newest file (another
process may have written since: then it re-reads the last line and resumes),
appends one line with ``os.write`` and releases the lock. So records of several
processes interleave into one chain, in the order they were written.

Layout of ``$RELAY_DATA_DIR/audit/``::

    audit-000000000001.jsonl   the chain; a file starts at the seq in its name
    audit-000000481516.jsonl   the next file, begun when the last one passed
                               ``AuditConfig.max_file_bytes``
    checkpoints.jsonl          a copy of every checkpoint line: the separate
                               sink (``AuditConfig.checkpoint_sink`` puts it
                               elsewhere, e.g. another volume)
    audit-key.pem              the public half of the audit key, for verifiers

The signing key is ``$RELAY_DATA_DIR/secrets/audit-signing.key`` (0600, made on
first use), away from the log it vouches for.

Checkpoints: every ``checkpoint_every_records`` records a process has written,
at :meth:`AuditLog.tick` (the broker calls it every second) once
``checkpoint_every_s`` passed with records unsealed, and at :meth:`close`. A
checkpoint is fsync'ed with its file and copied to the sink, then fsync'ed
there. A record is in the kernel when :meth:`append` returns (a killed process
loses nothing); a power loss can cost the records after the last checkpoint,
and the sink shows that a sealed tail went missing.

Failure (fail closed, BRIEF Invariant 7): a write that raises (disk full,
read-only, I/O error) or is short is cut back off the file, the log becomes
*unhealthy*, and every :meth:`append` after it goes to a bounded in-memory
backlog instead (``backlog_max_records``; beyond that records are counted as
lost). The broker sees :attr:`healthy` turn false, refuses new sessions and
ends the live ones with ``audit_failure``; it calls :meth:`recover` every
``retry_s``. Recovery resynchronises with the file (cutting a torn last line),
writes the backlog in order with the original timestamps, then
``audit.resumed`` (how long, how many records waited, how many were lost) and a
checkpoint. Only then is the log healthy again. A checkpoint that reached the
file but not the sink is copied again first, and nothing else is written until
that works: a sink that stays broken does not grow the log at every retry, and
``audit.resumed`` is written once per failure (again only if more records
waited or were lost since).

Rule 1: :meth:`append` never raises for an I/O problem; it reports it through
:attr:`healthy`. A last line that is not a record, found when resuming, is not
an I/O problem: :class:`AuditLogCorrupt` stops the writer, because appending to
a chain that cannot be continued would hide the damage.
Rule 2: a line is written whole or cut back off; the next writer cuts a torn
line left by a crash and says so with ``audit.tail_repaired`` (on open or when
it resumes behind another writer).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Final, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from relay.audit import AuditChain, checkpoint_due, parse_record, record_hash
from relay.config import AuditConfig

__all__ = [
    "AUDIT_FILE",
    "AuditLog",
    "AuditLogCorrupt",
    "QueuedMirror",
    "audit_files",
    "iter_lines",
    "load_or_create_audit_key",
    "load_public_key",
    "public_key_pem",
]

#: Names of the chain's files: the seq of their first record, 12 digits.
AUDIT_FILE: Final = re.compile(r"audit-(\d{12})\.jsonl")
_TAIL_READ: Final = 64 * 1024
_STAMP_BYTES: Final = 64


class AuditLogCorrupt(Exception):
    """The newest file ends in a line that is not a record: the chain cannot be
    continued. ``relay audit verify`` names the problem."""


@dataclass(frozen=True, slots=True)
class _Pending:
    event: str
    fields: Mapping[str, object]
    ts: datetime


def audit_files(directory: Path) -> list[Path]:
    """The chain's files in *directory*, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if AUDIT_FILE.fullmatch(p.name)]
    return sorted(found, key=lambda p: p.name)


def iter_lines(files: list[Path]) -> Iterator[bytes]:
    """Every line of *files* in order, each with its newline (the last may lack it)."""
    for path in files:
        with path.open("rb") as handle:
            yield from handle


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    """The audit public key as PEM (SubjectPublicKeyInfo)."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read an audit public key written by :func:`public_key_pem`.

    Raises:
        ValueError: The file does not hold an Ed25519 public key.
    """
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def load_or_create_audit_key(key_path: Path, public_path: Path) -> Ed25519PrivateKey:
    """The audit signing key at *key_path* (made on first use, 0600), with its
    public half written to *public_path* for verifiers.

    Raises:
        ValueError: The file does not hold an Ed25519 private key.
    """
    if not key_path.exists():
        key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Another process may create it first; then theirs is used.
        with contextlib.suppress(FileExistsError):
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(pem)
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{key_path}: not an Ed25519 private key")
    pem_public = public_key_pem(key.public_key())
    if not public_path.exists() or public_path.read_bytes() != pem_public:
        public_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = public_path.with_name(public_path.name + ".tmp")
        tmp.write_bytes(pem_public)
        os.replace(tmp, public_path)
    return key


class TextSink(Protocol):
    """What :class:`AuditLog` copies lines to: a text stream's write and flush."""

    def write(self, text: str, /) -> object: ...

    def flush(self) -> object: ...


class QueuedMirror:
    """A text stream for :class:`AuditLog`'s *mirror* that copies lines to
    *stream* from a thread of its own.

    The audit log writes its mirror while it holds the log's lock; a reader
    that stalls (a log shipper behind a full pipe) must not hold up the log,
    the broker or a CLI command. At most *max_lines* lines wait; beyond that
    lines are dropped and counted in :attr:`dropped` (the log itself keeps
    every record; the mirror is a copy).
    """

    def __init__(
        self,
        stream: IO[str],
        *,
        max_lines: int = 10_000,
        on_drop: Callable[[], None] = lambda: None,
    ) -> None:
        self._stream = stream
        self._on_drop = on_drop
        self._lines: queue.Queue[str | None] = queue.Queue(max_lines)
        self.dropped = 0
        self._thread = threading.Thread(
            target=self._copy, name="audit-mirror", daemon=True
        )
        self._thread.start()

    def write(self, text: str) -> int:
        try:
            self._lines.put_nowait(text)
        except queue.Full:
            self.dropped += 1
            self._on_drop()
        return len(text)

    def flush(self) -> None:
        """Nothing to do here: the thread flushes after each line."""

    def close(self, timeout: float = 2.0) -> None:
        """Copy what waits (for up to *timeout* seconds), then stop the thread."""
        with contextlib.suppress(queue.Full):
            self._lines.put(None, timeout=timeout)
        self._thread.join(timeout)

    def _copy(self) -> None:
        while (text := self._lines.get()) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._stream.write(text)
                self._stream.flush()


class AuditLog:
    """Appends audit records to the chain in *directory*; see the module docstring.

    Args:
        directory: The audit directory (created 0700).
        signer: The audit key.
        config: Checkpoint cadence, file size, backlog, the sink's path.
        wall_clock: The records' timestamps.
        monotonic: Seconds, for the checkpoint cadence.
        mirror: A text stream that gets a copy of every line written (the SIEM
            shipper's stdout), or None.
        on_write_failure: Called once per failed write (a metric).
        on_health: Called with the new state when :attr:`healthy` changes.

    Raises:
        AuditLogCorrupt: The newest file's last line is not a record.
        OSError: The directory cannot be created or locked.
    """

    def __init__(
        self,
        directory: Path,
        *,
        signer: Ed25519PrivateKey,
        config: AuditConfig,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
        mirror: TextSink | None = None,
        on_write_failure: Callable[[], None] = lambda: None,
        on_health: Callable[[bool], None] = lambda _healthy: None,
    ) -> None:
        self.directory = directory
        self.sink_path = (
            config.checkpoint_sink
            if config.checkpoint_sink is not None
            else directory / "checkpoints.jsonl"
        )
        self._signer = signer
        self._config = config
        self._now = wall_clock
        self._monotonic = monotonic
        self._mirror = mirror
        self._on_write_failure = on_write_failure
        self._on_health = on_health
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._chain = AuditChain()
        self._file: Path | None = None
        self._fd: int | None = None
        self._thread_lock = threading.RLock()
        self._size = -1  # unknown: resynchronise before the next write
        self._unsealed = 0
        self._sealed_at = monotonic()
        self._healthy = True
        self._failed_at: float | None = None
        self._backlog: deque[_Pending] = deque()
        self._delayed = 0  # records queued since the last audit.resumed
        self._lost = 0
        self._resumed = False  # audit.resumed written since the failure
        self._unsynced: bytes | None = None  # a checkpoint not yet in the sink
        self._closed = False
        self._stamp = b""
        self._repaired_bytes = 0  # cut off a torn last line, not yet logged
        self.last_error: str | None = None
        #: Records that were still waiting when :meth:`close` gave up.
        self.lost_at_close = 0
        try:
            with self._locked():
                self._resync()
                # A crash tore the last line; the record it held is lost, and
                # the log says so.
                if (
                    self._repaired_bytes
                    and self._prepare()
                    and self._unsealed >= self._config.checkpoint_every_records
                ):
                    self._checkpoint()
        except BaseException:
            self._release()
            raise

    # State ---------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """Whether records are being written (false: fail closed)."""
        return self._healthy

    @property
    def seq(self) -> int:
        """The seq of the last record this process knows of."""
        return self._chain.seq

    # Writing ---------------------------------------------------------------------

    def append(self, event: str, fields: Mapping[str, object]) -> int | None:
        """Write one record; returns its seq, or None if it went to the backlog.

        Raises:
            ValueError: *event* or a field is not allowed in a record (a bug in
                the caller, not an I/O problem); nothing was written.
        """
        pending = _Pending(event, dict(fields), self._now())
        with self._thread_lock:
            if self._closed or not self._healthy:
                self._queue(pending)
                return None
            seq: int | None = None
            try:
                with self._locked():
                    seq = self._write_pending(pending)
                    if (
                        seq is not None
                        and self._unsealed >= self._config.checkpoint_every_records
                    ):
                        self._checkpoint()
            except (OSError, AuditLogCorrupt) as exc:
                # flock itself failed, or another writer left a last line that
                # is not a record: fail closed, as for a failed write.
                self._fail_on(exc)
            if seq is None:
                self._queue(pending)
            return seq

    def tick(self) -> None:
        """Write a checkpoint if one is due by time (the broker calls this often)."""
        if self._closed or not self._healthy:
            return
        due = checkpoint_due(
            records_since_checkpoint=self._unsealed,
            seconds_since_checkpoint=self._monotonic() - self._sealed_at,
            every_records=self._config.checkpoint_every_records,
            every_seconds=self._config.checkpoint_every_s,
        )
        if due:
            with self._thread_lock:
                try:
                    with self._locked():
                        self._checkpoint()
                except (OSError, AuditLogCorrupt) as exc:
                    self._fail_on(exc)

    def recover(self) -> bool:
        """Try to write the backlog after a failure; returns :attr:`healthy`."""
        with self._thread_lock:
            try:
                return self._recover()
            except (OSError, AuditLogCorrupt) as exc:
                self._note_error(exc)
                return False

    def _recover(self) -> bool:
        if self._healthy or self._closed:
            return self._healthy
        now = self._monotonic()
        failed_for = now - self._failed_at if self._failed_at is not None else 0.0
        with self._locked():
            self._size = -1
            try:
                self._resync()
            except OSError as exc:
                self._note_error(exc)
                return False
            unsynced = self._unsynced
            if (
                unsynced is not None
                and self._chain.head == record_hash(unsynced)
                and not self._seal(unsynced)
            ):
                # The sink is still broken: write nothing more.
                return False
            while self._backlog:
                if self._write_pending(self._backlog[0]) is None:
                    return False
                self._backlog.popleft()
            if not self._resumed or self._delayed or self._lost:
                resumed = _Pending(
                    "audit.resumed",
                    {
                        "failed_for_ms": round(failed_for * 1000),
                        "records_delayed": self._delayed,
                        "records_lost": self._lost,
                        "error": self.last_error,
                    },
                    self._now(),
                )
                if self._write_pending(resumed) is None:
                    return False
                self._resumed = True
                self._delayed = self._lost = 0
            if not self._checkpoint():
                return False
        self._failed_at = None
        self._set_health(True)
        return True

    def close(self) -> None:
        """Seal what this process wrote and release the files; idempotent.

        A log that is failing gets one more try to write what waits; what
        still cannot be written is lost, and :attr:`lost_at_close` says how
        many records that was.
        """
        with self._thread_lock:
            if self._closed:
                return
            if not self._healthy:
                self.recover()
            try:
                if self._healthy and self._unsealed:
                    with self._locked():
                        self._checkpoint()
            except (OSError, AuditLogCorrupt) as exc:
                self._note_error(exc)
            if not self._healthy:
                self.lost_at_close = len(self._backlog) + self._lost
            self._closed = True
            self._release()

    # Internals ---------------------------------------------------------------------

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        os.close(self._lock_fd)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # flock excludes other processes only: threads of this one share the
        # lock file's open description, so they take the thread lock first
        # (a worker thread may log an audit event while the trio thread does).
        with self._thread_lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _queue(self, pending: _Pending) -> None:
        if len(self._backlog) < self._config.backlog_max_records:
            self._backlog.append(pending)
            self._delayed += 1
        else:
            self._lost += 1

    def _prepare(self) -> bool:
        """Put the chain at the end of the newest file with room, and log a torn
        line the resync cut; False (and unhealthy) on failure."""
        try:
            self._ensure_current()
        except OSError as exc:
            self._fail(exc)
            return False
        if not self._repaired_bytes:
            return True
        repair = _Pending(
            "audit.tail_repaired", {"bytes_cut": self._repaired_bytes}, self._now()
        )
        self._repaired_bytes = 0
        line = self._chain.append(repair.event, repair.fields, repair.ts)
        if not self._write_line(line):
            self._queue(repair)
            return False
        self._wrote(line)
        try:
            self._ensure_current()  # the repair record may have filled the file
        except OSError as exc:
            self._fail(exc)
            return False
        return True

    def _write_pending(self, pending: _Pending) -> int | None:
        """Append *pending* at the end of the chain; None (and unhealthy) on failure."""
        if not self._prepare():
            return None
        line = self._chain.append(pending.event, pending.fields, pending.ts)
        if not self._write_line(line):
            return None
        self._wrote(line)
        return self._chain.seq

    def _wrote(self, line: bytes) -> None:
        if self._unsealed == 0:
            # The time limit counts from the oldest record not yet sealed.
            self._sealed_at = self._monotonic()
        self._unsealed += 1
        self._copy_to_mirror(line)

    def _checkpoint(self) -> bool:
        if self._chain.seq == 0:
            return True
        if not self._prepare():
            return False
        line = self._chain.checkpoint(self._now(), self._signer)
        if not self._write_line(line):
            return False
        self._copy_to_mirror(line)
        self._unsynced = line
        return self._seal(line)

    def _seal(self, line: bytes) -> bool:
        """Sync the file, whose last line is the checkpoint *line*, and copy that
        line to the sink."""
        assert self._fd is not None  # noqa: S101 - the checkpoint was written to it
        try:
            os.fsync(self._fd)
            _append_synced(self.sink_path, line)
        except OSError as exc:
            self._fail(exc)
            return False
        self._unsynced = None
        self._unsealed = 0
        return True

    def _write_line(self, line: bytes) -> bool:
        assert self._fd is not None  # noqa: S101 - _ensure_current opened it
        try:
            self._announce()
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, "short write")
        except OSError as exc:
            # Cut whatever part of the line reached the file; if even that
            # fails, the next writer's resync cuts the torn line.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            self._fail(exc)
            return False
        self._size += len(line)
        return True

    def _ensure_current(self) -> None:
        """Resume from the file if another process wrote, and rotate if full."""
        if self._fd is None or self._size < 0 or self._read_stamp() != self._stamp:
            self._resync()
        if self._file is None or self._size >= self._config.max_file_bytes:
            self._open_new(self._chain.seq + 1)

    def _read_stamp(self) -> bytes:
        return os.pread(self._lock_fd, _STAMP_BYTES, 0)

    def _announce(self) -> None:
        """Put the seq and file of the line about to be written into ``.lock``.

        Every writer compares the stamp with the last one it wrote or read
        before it appends: any other writer's record, even one whose process
        died before the write, or a new file, changes it, and the chain is
        resumed from the file. Written before the line, so a crash between the
        two costs a resync, never a second record with the same seq. A random
        nonce makes every stamp new: a writer that re-announces a seq (after
        the dead writer's, or after its own failed write) must not look
        unchanged to one that read the earlier stamp.
        """
        assert self._file is not None  # noqa: S101 - _ensure_current opened one
        nonce = os.urandom(6).hex()
        stamp = f"{self._chain.seq:020d} {self._file.name} {nonce}\n".encode()
        if os.pwrite(self._lock_fd, stamp.ljust(_STAMP_BYTES, b" "), 0) != _STAMP_BYTES:
            raise OSError(errno.ENOSPC, "short write to .lock")
        self._stamp = stamp.ljust(_STAMP_BYTES, b" ")

    def _resync(self) -> None:
        """Continue the chain from the newest file's last complete line."""
        files = audit_files(self.directory)
        chain = AuditChain()
        last_is_checkpoint = True
        # A file holds no record only if its first write failed; the chain then
        # continues from the file before it.
        for path in reversed(files):
            last = _last_line(path)
            if last is None:
                continue
            try:
                record = parse_record(last)
            except ValueError as exc:
                raise AuditLogCorrupt(
                    f"{path}: the last line is not an audit record ({exc})"
                ) from None
            chain = AuditChain.resume(last)
            last_is_checkpoint = record.is_checkpoint
            break
        sealed = _sink_seq(self.sink_path)
        if sealed is not None and sealed > chain.seq:
            # A checkpoint reached the sink only after its line was fsync'ed
            # in the log: the log has lost a sealed tail. Appending now would
            # write new records over the gap and hide it.
            raise AuditLogCorrupt(
                f"the audit log ends at seq {chain.seq}, but the checkpoint sink "
                f"{self.sink_path} holds a checkpoint at seq {sealed}: the log's "
                "tail was cut (relay audit verify names it)"
            )
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._file = None
        self._chain = chain
        if files:
            self._open(files[-1])
        self._stamp = self._read_stamp()
        if not last_is_checkpoint:
            # Records of another process, or of one that crashed, are unsealed:
            # seal them at the next tick.
            self._unsealed = max(self._unsealed, 1)
            self._sealed_at = min(
                self._sealed_at, self._monotonic() - self._config.checkpoint_every_s
            )

    def _open(self, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        size = os.fstat(fd).st_size
        cut = _torn_tail(path, size)
        if cut:
            os.ftruncate(fd, size - cut)
            size -= cut
            self._repaired_bytes += cut
        self._fd, self._file, self._size = fd, path, size

    def _open_new(self, first_seq: int) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._open(self.directory / f"audit-{first_seq:012d}.jsonl")

    def _fail(self, exc: OSError) -> None:
        self._note_error(exc)
        self._on_write_failure()
        self._size = -1
        if self._healthy:
            self._failed_at = self._monotonic()
            self._resumed = False
            self._set_health(False)

    def _fail_on(self, exc: OSError | AuditLogCorrupt) -> None:
        if isinstance(exc, OSError):
            self._fail(exc)
        else:
            self._fail(OSError(errno.EIO, str(exc)))
            self.last_error = "corrupt"

    def _note_error(self, exc: OSError | AuditLogCorrupt) -> None:
        if not isinstance(exc, OSError):
            self.last_error = "corrupt"
            return
        self.last_error = (
            errno.errorcode.get(exc.errno, "EIO") if exc.errno else type(exc).__name__
        )

    def _set_health(self, healthy: bool) -> None:
        self._healthy = healthy
        self._on_health(healthy)

    def _copy_to_mirror(self, line: bytes) -> None:
        if self._mirror is None:
            return
        # A copy for a log shipper; a closed stdout must not stop the audit log.
        with contextlib.suppress(OSError, ValueError):
            self._mirror.write(line.decode("ascii"))
            self._mirror.flush()


def _append_synced(path: Path, line: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        if os.write(fd, line) != len(line):
            raise OSError(errno.ENOSPC, "short write")
        os.fsync(fd)
    finally:
        os.close(fd)


def _sink_seq(path: Path) -> int | None:
    """The seq of the checkpoint sink's last checkpoint, or None (no sink yet)."""
    try:
        last = _last_line(path)
    except OSError:
        # No sink yet, or one that cannot be read: the next checkpoint's
        # copy to it fails closed, if it cannot be written either.
        return None
    if last is None:
        return None
    try:
        return parse_record(last).seq
    except ValueError:
        return None


def _last_line(path: Path) -> bytes | None:
    """The last complete line of *path* (without a torn tail), or None."""
    size = path.stat().st_size
    end = size - _torn_tail(path, size)
    if end <= 0:
        return None
    with path.open("rb") as handle:
        start = max(0, end - _TAIL_READ)
        while True:
            handle.seek(start)
            chunk = handle.read(end - start)
            # chunk ends with the last line's newline; find the one before it.
            cut = chunk.rfind(b"\n", 0, len(chunk) - 1)
            if cut >= 0 or start == 0:
                return chunk[cut + 1 :]
            start = max(0, start - _TAIL_READ)


def _torn_tail(path: Path, size: int) -> int:
    """How many bytes at the end of *path* follow its last newline (a torn write)."""
    if size == 0:
        return 0
    with path.open("rb") as handle:
        position = size
        while position > 0:
            start = max(0, position - _TAIL_READ)
            handle.seek(start)
            chunk = handle.read(position - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                return size - (start + cut + 1)
            position = start
    return size
