"""The monitoring feed's rows: records instruments delivered, and data requests.

Theory of operation
===================
A record is stored once per ``(device_id, record_id)``: the agent gives every
record an idempotency key when the instrument hands it over and sends it again
until the broker acknowledges it, so the database's unique constraint is what
makes delivery exactly-once from at-least-once. :meth:`Feed.add_feed_record`
says whether the row is new, and the broker acknowledges only after the
transaction committed ("acknowledged means stored").

A record that answers a data request (``request_id``) marks the request
answered in the same transaction; a record naming a request this device was
not asked, or asked for another kind, is refused (:class:`UnknownDataRequest`)
and nothing is written, so request-only data cannot be stored unasked.

A data request is ``pending`` until the device answers (``answered``), refuses
(``refused``), or ``request_timeout_s`` passes (``lapsed``, by
:meth:`Feed.lapse_data_requests`). A late answer to a lapsed request is still
taken (the data was asked for). Retention deletes records and requests older
than ``retention_days`` (:meth:`Feed.purge_feed`).

The methods live in :class:`Feed`, a mixin of :class:`relay.store.Store`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import Connection, Row, delete, insert, select, update
from sqlalchemy.dialects import sqlite

from relay.proto import feed

from ._records import (
    DataRequestRow,
    FeedRow,
    NewFeedRecord,
    StoreError,
    UnknownDataRequest,
)
from ._schema import REQUEST_REASON_LENGTH, data_requests, feed_records

#: The most rows one listing returns.
MAX_FEED_LIST: Final = 10_000


class Feed:
    """The store's monitoring-feed methods (mixed into :class:`Store`)."""

    def _transaction(self, *, write: bool) -> AbstractContextManager[Connection]:
        raise NotImplementedError  # pragma: no cover - Store provides it

    def add_feed_record(
        self,
        device_id: str,
        record: feed.Record,
        *,
        record_id: str,
        request_id: str | None,
        received_at: datetime,
    ) -> bool:
        """Store one record; ``False`` if this device's *record_id* is stored already.

        Raises:
            UnknownDataRequest: *request_id* is not a pending or lapsed request
                of this device for this kind of record; nothing is stored.
            StoreError: The database failed.
        """
        kind = feed.kind_of(record)
        values = _row_values(device_id, record, record_id, request_id, received_at)
        with self._transaction(write=True) as connection:
            statement = _insert_ignoring_duplicates(connection, values)
            # RETURNING, not rowcount: psycopg reports no row count for a
            # conflict that did nothing.
            if connection.execute(statement).first() is None:
                return False
            if request_id is not None:
                answered = connection.execute(
                    update(data_requests)
                    .where(
                        data_requests.c.request_id == request_id,
                        data_requests.c.device_id == device_id,
                        data_requests.c.kind == kind,
                        data_requests.c.status.in_(("pending", "lapsed")),
                    )
                    .values(
                        status="answered", finished_at=received_at, record_id=record_id
                    )
                )
                if answered.rowcount != 1:
                    # Raised inside the transaction: the insert is rolled back.
                    raise UnknownDataRequest(
                        f"no open {kind} request {request_id} for {device_id}"
                    )
        return True

    def add_feed_records(self, records: Sequence[NewFeedRecord]) -> list[bool]:
        """Store pushed records (no request ids) in one transaction.

        One commit for many records: the broker's feed writer takes what
        arrived from every channel while the last commit ran, so the cost of
        a commit (an fsync on SQLite) is shared instead of paid per record.

        Returns:
            For each record in order, ``True`` if stored now, ``False`` if its
            device's key was stored already.

        Answers to data requests are not taken here: :meth:`add_feed_record`
        checks each one's request.

        Raises:
            StoreError: The database failed; nothing is stored.
        """
        stored: list[bool] = []
        with self._transaction(write=True) as connection:
            for item in records:
                values = _row_values(
                    item.device_id, item.record, item.record_id, None, item.received_at
                )
                statement = _insert_ignoring_duplicates(connection, values)
                stored.append(connection.execute(statement).first() is not None)
        return stored

    def list_feed_records(
        self,
        device_id: str,
        *,
        kinds: Sequence[str],
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 1000,
    ) -> list[FeedRow]:
        """The newest *limit* records of *kinds* in ``[since, until)`` by device time,
        returned oldest first.

        Raises:
            StoreError: The database failed.
        """
        limit = max(0, min(limit, MAX_FEED_LIST))
        query = select(feed_records).where(
            feed_records.c.device_id == device_id, feed_records.c.kind.in_(kinds)
        )
        if since is not None:
            query = query.where(feed_records.c.device_time >= since)
        if until is not None:
            query = query.where(feed_records.c.device_time < until)
        query = query.order_by(
            feed_records.c.device_time.desc(), feed_records.c.id.desc()
        ).limit(limit)
        with self._transaction(write=False) as connection:
            rows = connection.execute(query).all()
        return [_feed_row(row) for row in reversed(rows)]

    def latest_feed_record(self, device_id: str, kind: str) -> FeedRow | None:
        """The record of *kind* from this device that arrived last, or ``None``."""
        with self._transaction(write=False) as connection:
            row = connection.execute(
                select(feed_records)
                .where(
                    feed_records.c.device_id == device_id,
                    feed_records.c.kind == kind,
                )
                .order_by(feed_records.c.id.desc())
                .limit(1)
            ).one_or_none()
        return None if row is None else _feed_row(row)

    def create_data_request(
        self,
        *,
        request_id: str,
        device_id: str,
        kind: str,
        requested_by: str,
        reason: str,
        at: datetime,
    ) -> DataRequestRow:
        """Record a new pending request.

        Raises:
            ValueError: *kind* is not a request-only kind.
            StoreError: The id exists, or the database failed.
        """
        if kind not in feed.REQUESTED_KINDS:
            raise ValueError(f"kind must be one of {feed.REQUESTED_KINDS}")
        row = DataRequestRow(
            request_id=request_id,
            device_id=device_id,
            kind=kind,
            requested_by=requested_by,
            reason=reason[:REQUEST_REASON_LENGTH],
            requested_at=at,
            status="pending",
        )
        with self._transaction(write=True) as connection:
            connection.execute(
                insert(data_requests).values(
                    request_id=row.request_id,
                    device_id=row.device_id,
                    kind=row.kind,
                    requested_by=row.requested_by,
                    reason=row.reason,
                    requested_at=row.requested_at,
                    status=row.status,
                )
            )
        return row

    def pending_data_request(self, device_id: str, kind: str) -> DataRequestRow | None:
        """The newest pending request of *kind* for the device, if any."""
        with self._transaction(write=False) as connection:
            row = connection.execute(
                select(data_requests)
                .where(
                    data_requests.c.device_id == device_id,
                    data_requests.c.kind == kind,
                    data_requests.c.status == "pending",
                )
                .order_by(data_requests.c.requested_at.desc())
                .limit(1)
            ).one_or_none()
        return None if row is None else _request_row(row)

    def refuse_data_request(
        self, request_id: str, device_id: str, *, refusal: str, at: datetime
    ) -> bool:
        """Mark a pending (or lapsed) request of this device refused by it."""
        with self._transaction(write=True) as connection:
            result = connection.execute(
                update(data_requests)
                .where(
                    data_requests.c.request_id == request_id,
                    data_requests.c.device_id == device_id,
                    data_requests.c.status.in_(("pending", "lapsed")),
                )
                .values(status="refused", finished_at=at, refusal=refusal[:32])
            )
        return result.rowcount == 1

    def lapse_data_requests(
        self, *, requested_before: datetime, at: datetime
    ) -> list[DataRequestRow]:
        """Mark requests still pending that were made before *requested_before* lapsed."""
        with self._transaction(write=True) as connection:
            rows = connection.execute(
                select(data_requests).where(
                    data_requests.c.status == "pending",
                    data_requests.c.requested_at < requested_before,
                )
            ).all()
            if rows:
                connection.execute(
                    update(data_requests)
                    .where(
                        data_requests.c.request_id.in_([r.request_id for r in rows]),
                        data_requests.c.status == "pending",
                    )
                    .values(status="lapsed", finished_at=at)
                )
        return [_request_row(row) for row in rows]

    def get_data_request(self, request_id: str) -> DataRequestRow | None:
        """One request by id, or ``None``."""
        with self._transaction(write=False) as connection:
            row = connection.execute(
                select(data_requests).where(data_requests.c.request_id == request_id)
            ).one_or_none()
        return None if row is None else _request_row(row)

    def list_data_requests(
        self, device_id: str, *, limit: int = 20
    ) -> list[DataRequestRow]:
        """The device's requests, newest first."""
        with self._transaction(write=False) as connection:
            rows = connection.execute(
                select(data_requests)
                .where(data_requests.c.device_id == device_id)
                .order_by(data_requests.c.requested_at.desc())
                .limit(max(0, min(limit, MAX_FEED_LIST)))
            ).all()
        return [_request_row(row) for row in rows]

    def purge_feed(self, *, before: datetime) -> int:
        """Delete records received and requests made before *before*; how many records."""
        with self._transaction(write=True) as connection:
            result = connection.execute(
                delete(feed_records).where(feed_records.c.received_at < before)
            )
            connection.execute(
                delete(data_requests).where(data_requests.c.requested_at < before)
            )
        return int(result.rowcount)


def _row_values(
    device_id: str,
    record: feed.Record,
    record_id: str,
    request_id: str | None,
    received_at: datetime,
) -> dict[str, Any]:
    alarm = record if isinstance(record, feed.Alarm) else None
    return {
        "device_id": device_id,
        "record_id": record_id,
        "kind": feed.kind_of(record),
        "received_at": received_at,
        "device_time": record.device_time.astimezone(UTC),
        "severity": None if alarm is None else alarm.severity,
        "code": None if alarm is None else alarm.code,
        "request_id": request_id,
        "body": json.dumps(
            feed.to_json(record), separators=(",", ":"), ensure_ascii=False
        ),
    }


def _insert_ignoring_duplicates(connection: Connection, values: dict[str, Any]) -> Any:
    # INSERT ... ON CONFLICT DO NOTHING on the idempotency key, spelled from each
    # dialect's own module (as Store._upsert does): a duplicate is not an error
    # and does not abort a PostgreSQL transaction.
    name = connection.dialect.name
    if name == "sqlite":
        statement: Any = sqlite.insert(feed_records)
    elif name == "postgresql":
        from sqlalchemy.dialects import postgresql

        statement = postgresql.insert(feed_records)
    else:
        raise StoreError(f"unsupported database {name!r}: use SQLite or PostgreSQL")
    return (
        statement.values(**values)
        .on_conflict_do_nothing(index_elements=["device_id", "record_id"])
        .returning(feed_records.c.id)
    )


def _feed_row(row: Row[Any]) -> FeedRow:
    return FeedRow(
        record_id=row.record_id,
        device_id=row.device_id,
        kind=row.kind,
        received_at=row.received_at,
        device_time=row.device_time,
        body=json.loads(row.body),
        request_id=row.request_id,
        severity=row.severity,
        code=row.code,
    )


def _request_row(row: Row[Any]) -> DataRequestRow:
    return DataRequestRow(
        request_id=row.request_id,
        device_id=row.device_id,
        kind=row.kind,
        requested_by=row.requested_by,
        reason=row.reason,
        requested_at=row.requested_at,
        status=row.status,
        finished_at=row.finished_at,
        refusal=row.refusal,
        record_id=row.record_id,
    )
