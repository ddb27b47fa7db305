"""The agent's store-and-forward queue of monitoring records (SQLite, on disk).

Theory of operation
===================
Every record the instrument hands over (an alarm, a day's statistics, the
answer to a data request) is put here first, in one SQLite transaction, and
leaves only when the broker acknowledged it for good (``stored``,
``duplicate`` or ``rejected``). So a record survives a lost connection, a
broker that cannot store, and a restart of the agent; the agent sends it again
until it is acknowledged (at least once), and the broker drops the copies by
the record's idempotency key (so: once, in effect).

The key is given here, at intake, from the record's content: the first 32 hex
digits of SHA-256 over its kind, the request it answers and its canonical
JSON (:func:`content_key`). So a copy sent after a lost ack carries the key of
the first one, and so does the same record taken again from the instrument's
file after a crash between the queue's commit and the file's deletion: the
broker drops it as a duplicate instead of storing it twice. Two records with
the same content (the same alarm code, text, state and device time to the
microsecond) are one record. A record already queued under its key is not
queued again. The one exception is the summary alarm
below: when more alarms are folded into it, its content changes, and it gets a
new key, so that a broker that already stored the old summary stores the new
one too instead of dropping it as a duplicate.

The queue is bounded (``feed_queue_max_records``). When a record arrives and
the queue is full, room is made, in this order:

1. the oldest day of statistics goes (the incoming one counts: it is the
   oldest when none is queued, and then it is the one dropped);
2. then the oldest answer to a data request (the user can ask again; the
   broker gave up waiting for it long before the queue filled);
3. then the two oldest alarms become one summary alarm
   (:data:`QUEUE_FULL_CODE`, severity ``warning``), which says how many alarms
   were dropped, which codes, and from when to when; later alarms are folded
   into the same summary. An alarm is never dropped without this trace.

Every record dropped or folded is counted (:attr:`AgentQueue.dropped`, which
the agent reports in ``feed_status``); the count is kept in the file, so it
goes on across restarts. Records the caller says are in flight (sent, not yet
acknowledged) are never dropped or folded: the broker may already have stored
them. When only such records remain, the queue holds one more than its bound
until an ack makes room.

Rules: one connection, used under a lock (the agent calls from worker
threads); every change is one transaction; WAL journal, ``synchronous=FULL``
(a record the instrument's file was deleted for is on disk). No clock is read
here.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

from relay.proto import feed

__all__ = [
    "QUEUE_FULL_CODE",
    "AgentQueue",
    "Intake",
    "QueuedRecord",
    "canonical_body",
]

#: The code of the summary alarm that stands for alarms dropped from a full queue.
QUEUE_FULL_CODE: Final = "RC-QUEUE-FULL"
#: Codes a summary names, at most (the alarm's text is bounded).
_SUMMARY_CODES: Final = 12
#: Distinct codes a summary keeps (so a summary stays small, whatever codes
#: the instrument invents); more are counted only.
_SUMMARY_CODES_KEPT: Final = 64

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    record_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    request_id TEXT NOT NULL DEFAULT '',
    -- For a summary alarm: what it stands for, as JSON (count, codes, first,
    -- last, worst); NULL for every other record.
    summary TEXT
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class QueuedRecord:
    """One record in the queue, as it is sent."""

    seq: int
    record_id: str
    kind: str
    body: str
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class Intake:
    """What :meth:`AgentQueue.enqueue` did.

    Attributes:
        record: The record as queued, or None when it was itself dropped (a
            day's statistics arriving at a queue full of alarms).
        dropped_kinds: The kind of every record dropped to make room (for
            the log); alarms folded into the summary count as ``alarm``.
    """

    record: QueuedRecord | None
    dropped_kinds: tuple[str, ...] = ()


def canonical_body(record: feed.Record) -> str:
    """The JSON text the queue stores and sends for *record*: compact, UTF-8."""
    return json.dumps(feed.to_json(record), ensure_ascii=False, separators=(",", ":"))


def new_record_id() -> str:
    """A fresh idempotency key: 32 lowercase hex (for the summary alarm)."""
    return secrets.token_hex(16)


def content_key(kind: str, body: str, request_id: str = "") -> str:
    """The idempotency key of a record: 32 lowercase hex from its content."""
    digest = hashlib.sha256(f"{kind}\0{request_id}\0{body}".encode())
    return digest.hexdigest()[:32]


class AgentQueue:
    """The on-disk queue; see the module docstring.

    Args:
        path: The SQLite file (created with its directory if missing).
        max_records: The bound; at least 1.

    Resource handling:
        Holds one SQLite connection until :meth:`close`.
    """

    def __init__(self, path: Path, *, max_records: int) -> None:
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records!r}")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self.max_records = max_records
        self._lock = threading.Lock()
        # isolation_level=None: we open every transaction ourselves (BEGIN
        # IMMEDIATE), so nothing is committed behind our back.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the connection; the queue's content stays in the file."""
        with self._lock:
            self._db.close()

    # Reading -----------------------------------------------------------------------

    def depth(self) -> int:
        """How many records wait."""
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM records").fetchone()
        return int(count)

    @property
    def dropped(self) -> int:
        """Records dropped or folded into a summary since the file was created."""
        with self._lock:
            return self._counter("dropped")

    def next_records(
        self, limit: int, *, exclude: Collection[str] = ()
    ) -> list[QueuedRecord]:
        """The next *limit* records to send, skipping the ids in *exclude*.

        Answers to data requests come first (a person is waiting for them),
        then everything else in the order it arrived.
        """
        if limit <= 0:
            return []
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, record_id, kind, body, request_id FROM records "
                "ORDER BY request_id = '', seq LIMIT ?",
                (limit + len(exclude),),
            ).fetchall()
        records = [QueuedRecord(*row) for row in rows if row[1] not in exclude]
        return records[:limit]

    def get(self, record_id: str) -> QueuedRecord | None:
        """The queued record with *record_id*, or None when it left the queue."""
        with self._lock:
            row = self._db.execute(
                "SELECT seq, record_id, kind, body, request_id FROM records "
                "WHERE record_id = ?",
                (record_id,),
            ).fetchone()
        return None if row is None else QueuedRecord(*row)

    def all_records(self) -> list[QueuedRecord]:
        """Every queued record in arrival order (tests, diagnostics)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, record_id, kind, body, request_id FROM records ORDER BY seq"
            ).fetchall()
        return [QueuedRecord(*row) for row in rows]

    # Changing ----------------------------------------------------------------------

    def enqueue(
        self,
        kind: str,
        body: str,
        *,
        request_id: str = "",
        in_flight: Collection[str] = (),
    ) -> Intake:
        """Queue one record (already checked), making room if the queue is full.

        Args:
            kind: The record's kind.
            body: Its canonical JSON text (:func:`canonical_body`).
            request_id: The data request it answers, or ``""``.
            in_flight: Record ids sent and not yet acknowledged: never dropped.
        """
        record_id = content_key(kind, body, request_id)
        with self._lock, self._transaction():
            queued = self._db.execute(
                "SELECT seq FROM records WHERE record_id = ?", (record_id,)
            ).fetchone()
            if queued is not None:  # taken again after a crash: queued once
                return Intake(
                    record=QueuedRecord(queued[0], record_id, kind, body, request_id),
                    dropped_kinds=(),
                )
            dropped: list[str] = []
            while self._count() >= self.max_records:
                made = self._make_room(kind, in_flight)
                if made is None:
                    break  # only records in flight: one over the bound, briefly
                if made == "incoming":
                    self._add_counter("dropped", 1)
                    return Intake(record=None, dropped_kinds=(*dropped, kind))
                dropped.extend(made)
            cursor = self._db.execute(
                "INSERT INTO records (record_id, kind, body, request_id) "
                "VALUES (?, ?, ?, ?)",
                (record_id, kind, body, request_id),
            )
            seq = cursor.lastrowid
            assert seq is not None  # noqa: S101 - an INSERT always sets lastrowid
            return Intake(
                record=QueuedRecord(seq, record_id, kind, body, request_id),
                dropped_kinds=tuple(dropped),
            )

    def remove(self, record_id: str) -> bool:
        """Forget a record the broker acknowledged for good; whether it was here."""
        with self._lock, self._transaction():
            cursor = self._db.execute(
                "DELETE FROM records WHERE record_id = ?", (record_id,)
            )
            return cursor.rowcount > 0

    # Internals ---------------------------------------------------------------------

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def _count(self) -> int:
        (count,) = self._db.execute("SELECT COUNT(*) FROM records").fetchone()
        return int(count)

    def _counter(self, name: str) -> int:
        row = self._db.execute(
            "SELECT value FROM counters WHERE name = ?", (name,)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def _add_counter(self, name: str, amount: int) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, amount),
        )

    def _oldest(
        self, where: str, in_flight: Collection[str], limit: int
    ) -> list[tuple[int, str, str, str | None]]:
        rows = self._db.execute(
            f"SELECT seq, record_id, body, summary FROM records WHERE {where} "  # noqa: S608 - where is one of our constants
            "ORDER BY seq LIMIT ?",
            (limit + len(in_flight),),
        ).fetchall()
        return [row for row in rows if row[1] not in in_flight][:limit]

    def _make_room(
        self, kind: str, in_flight: Collection[str]
    ) -> list[str] | str | None:
        """Free one slot (see the module docstring); "incoming" to drop the new one."""
        stats = self._oldest("kind = 'daily_stats'", in_flight, 1)
        if stats:
            self._delete(stats[0][0])
            self._add_counter("dropped", 1)
            return ["daily_stats"]
        if kind == "daily_stats":
            return "incoming"
        answers = self._oldest("request_id != ''", in_flight, 1)
        if answers:
            self._delete(answers[0][0])
            self._add_counter("dropped", 1)
            return ["answer"]
        alarms = self._oldest("kind = 'alarm'", in_flight, 2)
        if len(alarms) < 2:
            return None
        return self._fold(alarms[0], alarms[1])

    def _delete(self, seq: int) -> None:
        self._db.execute("DELETE FROM records WHERE seq = ?", (seq,))

    def _fold(
        self,
        first: tuple[int, str, str, str | None],
        second: tuple[int, str, str, str | None],
    ) -> list[str]:
        """Make *first* (or the summary it is) the summary of both; drop *second*."""
        summary = _Summary.of(first)
        summary.add(_Summary.of(second))
        # A summary folded into a summary: its alarms were counted when they
        # were folded first; only plain alarms are new drops.
        newly_dropped = (0 if first[3] is not None else 1) + (
            1 if second[3] is None else 0
        )
        self._delete(second[0])
        self._db.execute(
            "UPDATE records SET record_id = ?, kind = 'alarm', body = ?, "
            "request_id = '', summary = ? WHERE seq = ?",
            (new_record_id(), summary.body(), summary.to_text(), first[0]),
        )
        self._add_counter("dropped", newly_dropped)
        return ["alarm"] * newly_dropped


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on an exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")


@dataclass(slots=True)
class _Summary:
    """What a summary alarm stands for."""

    count: int
    codes: list[str]
    first: str
    last: str
    worst: str
    other_codes: int = 0

    @classmethod
    def of(cls, row: tuple[int, str, str, str | None]) -> _Summary:
        """The summary a queued alarm row is, or the one-alarm summary of it."""
        if row[3] is not None:
            data = json.loads(row[3])
            return cls(
                count=int(data["count"]),
                codes=list(data["codes"]),
                first=str(data["first"]),
                last=str(data["last"]),
                worst=str(data["worst"]),
                other_codes=int(data.get("other_codes", 0)),
            )
        alarm = json.loads(row[2])
        return cls(
            count=1,
            codes=[str(alarm["code"])],
            first=str(alarm["device_time"]),
            last=str(alarm["device_time"]),
            worst=str(alarm["severity"]),
        )

    def add(self, other: _Summary) -> None:
        self.count += other.count
        self.other_codes += other.other_codes
        for code in other.codes:
            if code in self.codes:
                continue
            if len(self.codes) < _SUMMARY_CODES_KEPT:
                self.codes.append(code)
            else:
                self.other_codes += 1
        # Device times as the instrument wrote them; compared as times, so an
        # offset change on the instrument does not confuse first and last.
        if _moment(other.first) < _moment(self.first):
            self.first = other.first
        if _moment(other.last) > _moment(self.last):
            self.last = other.last
        if feed.SEVERITIES.index(other.worst) > feed.SEVERITIES.index(self.worst):
            self.worst = other.worst

    def to_text(self) -> str:
        return json.dumps(
            {
                "count": self.count,
                "codes": self.codes,
                "first": self.first,
                "last": self.last,
                "worst": self.worst,
                "other_codes": self.other_codes,
            }
        )

    def body(self) -> str:
        shown = ", ".join(self.codes[:_SUMMARY_CODES])
        more = max(0, len(self.codes) - _SUMMARY_CODES) + self.other_codes
        if more > 0:
            shown += f" and {more} more"
        # The codes come last: if long codes make the text too long, the cut
        # takes some of them, never the count or the time range.
        text = (
            f"The agent's queue was full: {self.count} alarms were dropped, "
            f"from {self.first} to {self.last}, worst severity {self.worst} "
            f"(codes {shown})."
        )
        alarm = feed.Alarm(
            code=QUEUE_FULL_CODE,
            severity="warning",
            text=text[: feed.MAX_TEXT_CHARS],
            device_time=_moment(self.last),
        )
        return canonical_body(alarm)


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text)
