"""The monitoring feed's spool directory: where the instrument hands records over.

Theory of operation
===================
The instrument's own software and the agent share one directory
(``AgentConfig.feed_dir``, by default ``feed/`` in the agent directory;
docs/instrument-integration.md is the instrument maker's guide)::

    feed/
      outbox/          the instrument writes pushed records here
        tmp/           ... or its half-written files here (never read)
      rejected/        records the agent refused, each with a .reason file
      snapshots/
        configuration.json   the instrument's current state, replaced whole;
        consumables.json     read only to answer a data request

Outbox. One record per file, named ``<anything>.<kind>.json`` with kind
``alarm`` or ``daily_stats``. The instrument writes under another name (one
not ending in ``.json``, or inside ``outbox/tmp/``) and renames when done, so
the agent never reads half a file. :meth:`FeedSpool.take_outbox` reads the
files oldest first (modification time, then name), checks each with
:func:`relay.proto.feed.parse_record`, and hands a good one to the caller's
``accept``; the file is deleted only after ``accept`` returned (the queue has
committed it). A file that fails the check is moved to ``rejected/`` with a
``<name>.reason`` text next to it; a ``configuration`` or ``consumables`` file
is refused the same way, with reason ``unsolicited``: request-only data is
never pushed, whatever the instrument does. Nothing is dropped silently.

A crash between the queue's commit and the file's deletion takes the file
again at the next start; the record's key comes from its content
(:func:`relay.agent_queue.content_key`), so it is queued once, and if it was
delivered meanwhile the broker drops it as a duplicate.

Snapshots. :meth:`FeedSpool.read_snapshot` reads one snapshot when a data
request was accepted, and returns it checked; nothing else reads them.

Rules: synchronous file I/O (the agent calls it from a worker thread); no
clock; links are not followed (``O_NOFOLLOW``), so the spool cannot be used to
make the agent send another file.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from relay.proto import feed

__all__ = ["FeedSpool", "Refused", "SnapshotUnavailable", "Taken"]

#: Files taken from the outbox per call; the caller calls again for the rest.
MAX_FILES_PER_TAKE: Final = 256
#: Suffix of the text written next to a refused file.
REASON_SUFFIX: Final = ".reason"


class SnapshotUnavailable(Exception):
    """A snapshot the agent cannot give out.

    Attributes:
        reason: ``no_data`` (the file is missing or unreadable) or
            ``bad_snapshot`` (it fails the record check).
        detail: For logs and the refusal's detail.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail[:200]


@dataclass(frozen=True, slots=True)
class Refused:
    """An outbox file moved to ``rejected/``."""

    name: str
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Taken:
    """What one :meth:`FeedSpool.take_outbox` call did."""

    accepted: int
    refused: tuple[Refused, ...]
    more: bool


class FeedSpool:
    """The spool directory at *root*; see the module docstring.

    Args:
        root: The spool directory (created with its subdirectories).
        max_record_bytes: Largest record taken (``feed_max_record_bytes``).
    """

    def __init__(self, root: Path, *, max_record_bytes: int) -> None:
        self.root = root
        self.max_record_bytes = max_record_bytes

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def rejected(self) -> Path:
        return self.root / "rejected"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    def create(self) -> None:
        """Make the directories: the instrument's software (in the agent's
        group) may write the outbox and the snapshots (0770) and read what
        was rejected (0750). Set with chmod, so a umask (the systemd unit's
        0077) does not take the group's rights away; a directory someone else
        made (an installer) is left as it is."""
        modes = {
            self.outbox: 0o770,
            self.outbox / "tmp": 0o770,
            self.snapshots: 0o770,
            self.rejected: 0o750,
        }
        for path, mode in modes.items():
            path.mkdir(parents=True, exist_ok=True, mode=mode)
            with contextlib.suppress(PermissionError):
                if path.stat().st_uid == os.getuid():
                    path.chmod(mode | (path.stat().st_mode & 0o2000))

    def snapshot_path(self, kind: str) -> Path:
        """Where the instrument keeps the snapshot of *kind*."""
        if kind not in feed.REQUESTED_KINDS:
            raise ValueError(f"no snapshot of kind {kind!r}")
        return self.snapshots / f"{kind}.json"

    def take_outbox(self, accept: Callable[[feed.Record], None]) -> Taken:
        """Hand each complete outbox file to *accept*, oldest first.

        *accept* queues the record and returns once it is committed; the file
        is deleted after that. If *accept* raises, the file stays for the next
        call and the exception propagates.

        Returns:
            How many were accepted, the files refused, and whether more files
            wait than one call takes (:data:`MAX_FILES_PER_TAKE`).
        """
        candidates = self._outbox_files()
        accepted = 0
        refused: list[Refused] = []
        for path in candidates[:MAX_FILES_PER_TAKE]:
            kind = _kind_from_name(path.name)
            try:
                if kind in feed.REQUESTED_KINDS:
                    raise feed.RecordRejected(
                        "unsolicited",
                        f"{kind} is sent only when a user asks; keep it in "
                        f"snapshots/{kind}.json",
                    )
                if kind not in feed.PUSHED_KINDS:
                    raise feed.RecordRejected(
                        "unknown_kind",
                        "name the file <anything>.alarm.json or "
                        "<anything>.daily_stats.json",
                    )
                record = feed.parse_record(
                    kind, self._read(path), max_bytes=self.max_record_bytes
                )
            except feed.RecordRejected as exc:
                refused.append(self._reject(path, exc.reason, exc.detail))
                continue
            except FileNotFoundError:
                continue  # taken away by the instrument after we listed it
            except OSError as exc:
                refused.append(self._reject(path, "unreadable", str(exc)))
                continue
            accept(record)
            path.unlink(missing_ok=True)
            accepted += 1
        return Taken(
            accepted=accepted,
            refused=tuple(refused),
            more=len(candidates) > MAX_FILES_PER_TAKE,
        )

    def read_snapshot(self, kind: str) -> feed.Record:
        """The checked snapshot of *kind* (``configuration`` or ``consumables``).

        Raises:
            SnapshotUnavailable: Missing or unreadable (``no_data``), or not a
                valid record of that kind (``bad_snapshot``).
        """
        path = self.snapshot_path(kind)
        try:
            body = self._read(path)
        except feed.RecordRejected as exc:
            raise SnapshotUnavailable("bad_snapshot", exc.detail) from None
        except OSError as exc:
            raise SnapshotUnavailable(
                "no_data", f"{path.name}: {exc.strerror or exc}"
            ) from None
        try:
            return feed.parse_record(kind, body, max_bytes=self.max_record_bytes)
        except feed.RecordRejected as exc:
            raise SnapshotUnavailable(
                "bad_snapshot", f"{exc.reason}: {exc.detail}"
            ) from None

    # Internals ---------------------------------------------------------------------

    def _outbox_files(self) -> list[Path]:
        entries: list[tuple[int, str, Path]] = []
        try:
            scan = os.scandir(self.outbox)
        except FileNotFoundError:
            return []
        with scan:
            for entry in scan:
                # Half-written files end otherwise (or sit in tmp/, a directory).
                if not entry.name.endswith(".json") or entry.name.startswith("."):
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(info.st_mode):
                    continue
                entries.append((info.st_mtime_ns, entry.name, Path(entry.path)))
        entries.sort()
        return [path for _, _, path in entries]

    def _read(self, path: Path) -> bytes:
        """At most one byte more than the limit; a longer file is too large."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise feed.RecordRejected("malformed", "not a regular file")
            chunks: list[bytes] = []
            left = self.max_record_bytes + 1
            while left > 0:
                chunk = os.read(fd, left)
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        if len(data) > self.max_record_bytes:
            raise feed.RecordRejected(
                "too_large", f"over {self.max_record_bytes} bytes"
            )
        return data

    def _reject(self, path: Path, reason: str, detail: str) -> Refused:
        """Move *path* to rejected/ with a reason file; never overwrite one."""
        self.rejected.mkdir(parents=True, exist_ok=True, mode=0o750)
        target = self.rejected / path.name
        number = 1
        while target.exists() or _reason_path(target).exists():
            number += 1
            target = self.rejected / f"{path.stem}.{number}{path.suffix}"
        _reason_path(target).write_text(f"{reason}: {detail}\n", encoding="utf-8")
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, target)
        return Refused(name=path.name, reason=reason, detail=detail)


def _kind_from_name(name: str) -> str:
    """``2026-11-27T10-00.alarm.json`` -> ``alarm``; ``""`` when there is none."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 3 else ""


def _reason_path(target: Path) -> Path:
    return target.with_name(target.name + REASON_SUFFIX)
