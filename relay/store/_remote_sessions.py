"""Remote-session rows: the audit log's index for auditors and crash recovery.

A row is inserted when a session is requested, updated at the grant and at the
end, and never deleted here (retention is the operator's). The broker writes
them through :class:`RemoteSessions`, a mixin of :class:`relay.store.Store`.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, Final

from sqlalchemy import Connection, insert, select, update

from ._records import RemoteSessionRecord, StoreError
from ._schema import (
    CHANNELS_LENGTH,
    SESSION_REASON_LENGTH,
    SOURCE_LENGTH,
    remote_sessions,
)

#: The most rows one listing returns.
MAX_LIST: Final = 1000


class RemoteSessions:
    """The store's remote-session methods (mixed into :class:`Store`)."""

    def _transaction(self, *, write: bool) -> AbstractContextManager[Connection]:
        raise NotImplementedError  # pragma: no cover - Store provides it

    def record_session_request(self, record: RemoteSessionRecord) -> None:
        """Insert the row of a session just requested.

        Raises:
            StoreError: The id exists already, or the database failed.
        """
        with self._transaction(write=True) as connection:
            connection.execute(
                insert(remote_sessions).values(
                    session_id=record.session_id,
                    node_id=record.node_id,
                    device_id=record.device_id,
                    engineer=record.engineer,
                    reason=record.reason[:SESSION_REASON_LENGTH],
                    channels=_channels(record.channels),
                    source=record.source[:SOURCE_LENGTH],
                    device_fingerprint=record.device_fingerprint,
                    requested_at=record.requested_at,
                    start_seq=record.start_seq,
                )
            )

    def record_session_grant(
        self,
        session_id: str,
        *,
        at: datetime,
        decided_by: str,
        channels: Sequence[str],
        max_seconds: int,
    ) -> None:
        """Note the device's grant of a session."""
        with self._transaction(write=True) as connection:
            connection.execute(
                update(remote_sessions)
                .where(remote_sessions.c.session_id == session_id)
                .values(
                    granted_at=at,
                    decided_by=decided_by,
                    granted_channels=_channels(channels),
                    max_seconds=max_seconds,
                )
            )

    def record_session_end(
        self,
        session_id: str,
        *,
        at: datetime,
        reason: str,
        bytes_to_device: int,
        bytes_from_device: int,
        recordings: Sequence[dict[str, Any]] = (),
    ) -> bool:
        """Note a session's end, once; returns whether this call ended it."""
        s = remote_sessions.c
        with self._transaction(write=True) as connection:
            result = connection.execute(
                update(remote_sessions)
                .where(s.session_id == session_id, s.ended_at.is_(None))
                .values(
                    ended_at=at,
                    end_reason=reason,
                    bytes_to_device=bytes_to_device,
                    bytes_from_device=bytes_from_device,
                    recordings=json.dumps(list(recordings)) if recordings else None,
                )
            )
            return result.rowcount == 1

    def open_remote_sessions(self, node_id: str) -> list[RemoteSessionRecord]:
        """The sessions of *node_id* that have no end (a crash left them)."""
        s = remote_sessions.c
        with self._transaction(write=False) as connection:
            rows = connection.execute(
                select(remote_sessions)
                .where(s.node_id == node_id, s.ended_at.is_(None))
                .order_by(s.requested_at)
            ).all()
        return [_record(row._mapping) for row in rows]

    def open_remote_sessions_elsewhere(
        self, nodes: Collection[str]
    ) -> list[RemoteSessionRecord]:
        """The unended sessions of every node not in *nodes*, oldest first."""
        s = remote_sessions.c
        with self._transaction(write=False) as connection:
            rows = connection.execute(
                select(remote_sessions)
                .where(s.node_id.not_in(list(nodes)), s.ended_at.is_(None))
                .order_by(s.requested_at)
            ).all()
        return [_record(row._mapping) for row in rows]

    def get_remote_session(self, session_id: str) -> RemoteSessionRecord | None:
        """One session by id, or None."""
        with self._transaction(write=False) as connection:
            row = connection.execute(
                select(remote_sessions).where(
                    remote_sessions.c.session_id == session_id
                )
            ).one_or_none()
        return None if row is None else _record(row._mapping)

    def list_remote_sessions(
        self,
        *,
        device_id: str | None = None,
        engineer: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        end_reason: str | None = None,
        limit: int = 100,
    ) -> list[RemoteSessionRecord]:
        """Sessions requested in [since, until), newest first, filtered."""
        s = remote_sessions.c
        query = select(remote_sessions)
        if device_id is not None:
            query = query.where(s.device_id == device_id)
        if engineer is not None:
            query = query.where(s.engineer == engineer)
        if since is not None:
            query = query.where(s.requested_at >= since)
        if until is not None:
            query = query.where(s.requested_at < until)
        if end_reason is not None:
            query = query.where(s.end_reason == end_reason)
        query = query.order_by(s.requested_at.desc()).limit(
            max(1, min(limit, MAX_LIST))
        )
        with self._transaction(write=False) as connection:
            rows = connection.execute(query).all()
        return [_record(row._mapping) for row in rows]


def _channels(channels: Sequence[str]) -> str:
    text = json.dumps(list(channels))
    if len(text) > CHANNELS_LENGTH:
        raise StoreError("too many channels to record")
    return text


def _record(row: Any) -> RemoteSessionRecord:
    granted = row["granted_channels"]
    return RemoteSessionRecord(
        session_id=row["session_id"],
        node_id=row["node_id"],
        device_id=row["device_id"],
        engineer=row["engineer"],
        reason=row["reason"],
        channels=tuple(json.loads(row["channels"])),
        source=row["source"],
        device_fingerprint=row["device_fingerprint"],
        requested_at=row["requested_at"],
        start_seq=row["start_seq"],
        granted_at=row["granted_at"],
        decided_by=row["decided_by"],
        granted_channels=None if granted is None else tuple(json.loads(granted)),
        max_seconds=row["max_seconds"],
        ended_at=row["ended_at"],
        end_reason=row["end_reason"],
        bytes_to_device=row["bytes_to_device"],
        bytes_from_device=row["bytes_from_device"],
        recordings=tuple(json.loads(row["recordings"] or "[]")),
    )


__all__ = ["MAX_LIST", "RemoteSessionRecord", "RemoteSessions"]
