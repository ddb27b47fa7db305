"""What stays of a remote session: its row in the store, recordings, receipts.

Theory of operation
===================
The audit log is the evidence of a session; :class:`SessionArchive` keeps the
rest beside it and makes it findable. For each session the
:class:`~relay._trio.session_broker.SessionBroker` calls, in order:

1. :meth:`~SessionArchive.requested` before the ``session.requested`` record is
   written: the row in ``remote_sessions`` (who, which device, why, from
   where, the device certificate's fingerprint, the audit seq to start reading
   the timeline from). A store that cannot take it refuses the session.
2. :meth:`~SessionArchive.granted` after a verified grant: the row's grant
   columns, and into ``recordings/ID/`` the device's signed grant receipt and
   the device certificate it verifies with (so that an auditor can check the
   signature offline); :meth:`~SessionArchive.recording` opens the session's
   :class:`~relay.recordings.SessionRecording` in the same directory.
3. :meth:`~SessionArchive.end_receipt` when the device's signed end receipt
   verified.
4. :meth:`~SessionArchive.ended` once the session is over and its end receipt
   came or timed out: the recording is closed, each file's SHA-256 goes into
   the chain as ``session.recording``, and the row gets the end.

:meth:`~SessionArchive.recover` runs once at start: every row of this node
without an end belongs to a session the last process did not finish (it was
killed or crashed); each gets ``session.end`` with ``broker_crash`` in the log
and in the row, so that every session has exactly one start and one end.

Files are written in worker threads; errors are logged and counted as audit
failures by the caller (a receipt or recording that cannot be kept ends the
session with ``audit_failure``).

Known gap: a process killed between the row's insert and the
``session.requested`` record leaves a row whose recovery writes an end with no
start before it. The window is one store round trip wide; ``relay audit
show`` marks such a session.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Final

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relay import __version__
from relay.audit_reader import session_timeline, sha256_file
from relay.config import AuditConfig
from relay.proto import receipts
from relay.proto.session import EndReason
from relay.recordings import RecordingError, RecordingSummary, SessionRecording
from relay.store import RemoteSessionRecord, Store, StoreError

__all__ = [
    "DEVICE_CERT_FILE",
    "END_RECEIPT_FILE",
    "GRANT_RECEIPT_FILE",
    "SessionArchive",
    "receipt_document",
]

GRANT_RECEIPT_FILE: Final = "grant-receipt.json"
END_RECEIPT_FILE: Final = "end-receipt.json"
DEVICE_CERT_FILE: Final = "device.crt"
BROKER_CRASH: Final = EndReason.BROKER_CRASH.value
#: Row ends kept while the audit log cannot be written; beyond it the oldest
#: is left to the next start's recovery (which takes the end from the log).
MAX_DEFERRED_ENDS: Final = 10_000


def receipt_document(kind: str, signed: receipts.SignedReceipt) -> dict[str, Any]:
    """A receipt as stored: the wire form that the signature covers, and what it says."""
    receipt, signature = signed.to_wire()
    decoded = receipts.decode(signed.payload)
    fields = {
        name: list(value) if isinstance(value, tuple) else value
        for name, value in (
            (n, getattr(decoded, n)) for n in decoded.__dataclass_fields__
        )
    }
    return {"kind": kind, "receipt": receipt, "signature": signature, "fields": fields}


class SessionArchive:
    """Rows, recordings and receipts of this node's sessions; see the module docstring.

    Args:
        store: Where the rows go.
        recordings_dir: ``$RELAY_DATA_DIR/recordings``.
        config: Recording switches and caps.
        node_id: This broker node (rows are recovered per node).
        log: The audit logger.
        audit_dir: The audit log's directory: recovery reads it to find the
            ends that were written before a crash.
        wall_clock: Aware UTC now.
    """

    def __init__(
        self,
        *,
        store: Store,
        recordings_dir: Path,
        config: AuditConfig,
        node_id: str,
        log: Any,
        audit_dir: Path | None = None,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.recordings_dir = recordings_dir
        self._audit_dir = audit_dir
        # Row ends that wait for the audit log to be written again (oldest
        # first, at most MAX_DEFERRED_ENDS).
        self._deferred: list[partial[bool]] = []
        self._store = store
        self._config = config
        self._node_id = node_id
        self._log = log
        self._now = wall_clock

    @property
    def node_id(self) -> str:
        return self._node_id

    async def row(self, session_id: str) -> RemoteSessionRecord | None:
        """The store's row of any node's session, or None.

        Raises:
            StoreError: The store cannot be read.
        """
        return await trio.to_thread.run_sync(self._store.get_remote_session, session_id)

    async def requested(
        self,
        *,
        session_id: str,
        device_id: str,
        engineer: str,
        reason: str,
        channels: Sequence[str],
        source: str,
        device_fingerprint: str,
        start_seq: int,
    ) -> datetime:
        """Insert the session's row; returns the time it was recorded with.

        Raises:
            StoreError: The store did not take it.
        """
        at = self._now()
        record = RemoteSessionRecord(
            session_id=session_id,
            node_id=self._node_id,
            device_id=device_id,
            engineer=engineer,
            reason=reason,
            channels=tuple(channels),
            source=source,
            device_fingerprint=device_fingerprint,
            requested_at=at,
            start_seq=start_seq,
        )
        await trio.to_thread.run_sync(self._store.record_session_request, record)
        return at

    def recording(self, session_id: str, started_at: datetime) -> SessionRecording:
        """The recording of a session granted at *started_at*."""
        return SessionRecording(
            self.recordings_dir,
            session_id=session_id,
            started_at=started_at,
            record_input=self._config.record_input,
            max_bytes=self._config.recording_max_bytes,
        )

    async def granted(
        self,
        session_id: str,
        *,
        at: datetime,
        grant: receipts.GrantReceipt,
        signed: receipts.SignedReceipt,
        certificate: x509.Certificate,
    ) -> bool:
        """Keep the grant receipt and the device certificate; update the row.

        Returns whether everything was kept (False: the caller fails closed).
        """
        document = receipt_document("grant", signed)
        pem = certificate.public_bytes(serialization.Encoding.PEM)

        def keep() -> None:
            self._write_files(
                session_id,
                {GRANT_RECEIPT_FILE: _json_bytes(document), DEVICE_CERT_FILE: pem},
            )
            self._store.record_session_grant(
                session_id,
                at=at,
                decided_by=grant.decided_by,
                channels=grant.channels,
                max_seconds=grant.max_seconds,
            )

        return await self._keep(session_id, "grant", keep)

    async def end_receipt(
        self, session_id: str, signed: receipts.SignedReceipt
    ) -> bool:
        """Keep the device's verified end receipt."""
        document = receipt_document("end", signed)
        return await self._keep(
            session_id,
            "end_receipt",
            partial(
                self._write_files, session_id, {END_RECEIPT_FILE: _json_bytes(document)}
            ),
        )

    async def _keep(self, session_id: str, step: str, work: Callable[[], None]) -> bool:
        """Run *work* in a worker thread; a failure is an audit event and False."""
        try:
            await trio.to_thread.run_sync(work)
        except (OSError, StoreError) as exc:
            self._log.error(
                "session.archive_failed",
                session_id=session_id,
                step=step,
                detail=str(exc)[:200],
                audit=True,
            )
            return False
        return True

    async def ended(
        self,
        session_id: str,
        *,
        reason: str,
        bytes_to_device: int,
        bytes_from_device: int,
        recording: SessionRecording | None,
        t: float,
        audit_ok: Callable[[], bool] = lambda: True,
    ) -> None:
        """Close the recording, chain its files' hashes, and end the row.

        While the audit log fails (*audit_ok* false), the row's end waits
        (:meth:`flush_deferred`): the session's ``session.end`` is in the
        log's backlog, not yet in the log, and a row ended now would hide a
        lost end from the next start's recovery.
        """
        files: list[dict[str, Any]] = []
        if recording is not None:
            summary: RecordingSummary | None = None
            try:
                summary = await trio.to_thread.run_sync(recording.close, t)
            except RecordingError as exc:
                self._log.error(
                    "session.recording_failed",
                    session_id=session_id,
                    detail=str(exc)[:200],
                    audit=True,
                )
            if summary is not None:
                for file in summary.files:
                    files.append(
                        {
                            "name": file.name,
                            "kind": file.kind,
                            "size_bytes": file.size_bytes,
                            "sha256": file.sha256,
                        }
                    )
                    self._log.info(
                        "session.recording",
                        session_id=session_id,
                        name=file.name,
                        kind=file.kind,
                        size_bytes=file.size_bytes,
                        sha256=file.sha256,
                        truncated=summary.truncated,
                        audit=True,
                    )
        end_row = partial(
            self._store.record_session_end,
            session_id,
            at=self._now(),
            reason=reason,
            bytes_to_device=bytes_to_device,
            bytes_from_device=bytes_from_device,
            recordings=files,
        )
        if not audit_ok():
            self._defer(end_row)
            return
        try:
            await trio.to_thread.run_sync(end_row)
        except StoreError as exc:
            # The end is in the audit log: the node's next start writes it
            # into the row from there (recover).
            self._log.error(
                "session.archive_failed",
                session_id=session_id,
                step="end",
                detail=str(exc)[:200],
                audit=True,
            )

    def _defer(self, end_row: partial[bool]) -> None:
        if len(self._deferred) >= MAX_DEFERRED_ENDS:
            self._deferred.pop(0)  # the next start's recovery reads it from the log
        self._deferred.append(end_row)

    async def flush_deferred(self) -> None:
        """End the rows that waited for the audit log (it is written again);
        stops at the first the store does not take."""
        while self._deferred:
            end_row = self._deferred[0]
            try:
                await trio.to_thread.run_sync(end_row)
            except StoreError:
                return  # the next start's recovery finds the row open
            self._deferred.pop(0)

    async def recover(self) -> int:
        """End the sessions a crash left open; returns how many.

        A row without an end may belong to a session whose ``session.end``
        is in the log all the same (the store failed, or the process died,
        after the record was written): the log is read from the row's
        ``start_seq`` first, and such a row gets the logged end, not a second
        one.
        """
        rows = await trio.to_thread.run_sync(
            self._store.open_remote_sessions, self._node_id
        )
        crashed = 0
        for row in rows:
            reason = await trio.to_thread.run_sync(self._logged_end, row)
            recordings: list[dict[str, Any]] = []
            if reason is None:
                crashed += 1
                reason = BROKER_CRASH
                self._log_crash_end(row)
                recordings = await trio.to_thread.run_sync(
                    self._recover_recording_files, row.session_id
                )
            await trio.to_thread.run_sync(
                partial(
                    self._store.record_session_end,
                    row.session_id,
                    at=self._now(),
                    reason=reason,
                    bytes_to_device=row.bytes_to_device,
                    bytes_from_device=row.bytes_from_device,
                    recordings=recordings,
                )
            )
        return crashed

    def open_rows_elsewhere(self, nodes: Collection[str]) -> list[RemoteSessionRecord]:
        """Open rows of the nodes not in *nodes* (blocking: a worker thread)."""
        return self._store.open_remote_sessions_elsewhere(nodes)

    async def close_orphans(self, gone_nodes: Collection[str]) -> int:
        """End the sessions that nodes in *gone_nodes* (no longer in the
        fleet) left open, as ``broker_crash``; returns how many this node
        ended (of several nodes doing it, each row is ended by one).

        The dead node's own log cannot be read from here: a session whose
        ``session.end`` it wrote just before it died gets ``broker_crash`` in
        the store all the same (its own log keeps the true reason).
        """
        if not gone_nodes:
            return 0
        rows = await trio.to_thread.run_sync(
            self._store.open_remote_sessions_elsewhere,
            [self._node_id],
        )
        closed = 0
        for row in rows:
            if row.node_id not in gone_nodes:
                continue
            ended = await trio.to_thread.run_sync(
                partial(
                    self._store.record_session_end,
                    row.session_id,
                    at=self._now(),
                    reason=BROKER_CRASH,
                    bytes_to_device=row.bytes_to_device,
                    bytes_from_device=row.bytes_from_device,
                )
            )
            if ended:
                closed += 1
                self._log_crash_end(row, node=row.node_id)
        return closed

    def _log_crash_end(self, row: RemoteSessionRecord, node: str | None = None) -> None:
        """The ``session.end`` a crash left unwritten (bytes unknown: None);
        *node* names the dead node when another node writes it."""
        extra = {} if node is None else {"node": node, "closed_by": self._node_id}
        self._log.warning(
            "session.end",
            **extra,
            session_id=row.session_id,
            device_id=row.device_id,
            engineer=row.engineer,
            reason=BROKER_CRASH,
            granted=row.granted_at is not None,
            decided_by=row.decided_by,
            requested_at=row.requested_at.isoformat(),
            granted_at=None if row.granted_at is None else row.granted_at.isoformat(),
            duration_ms=None,
            bytes_to_device=None,
            bytes_from_device=None,
            device_fingerprint=row.device_fingerprint,
            source=row.source,
            broker_version=__version__,
            audit=True,
        )

    def _logged_end(self, row: RemoteSessionRecord) -> str | None:
        """The reason of *row*'s ``session.end`` if the log has one."""
        if self._audit_dir is None:
            return None
        for record in session_timeline(
            self._audit_dir, row.session_id, start_seq=row.start_seq
        ):
            if record.get("event") == "session.end":
                return str(record.get("reason"))
        return None

    def _recover_recording_files(self, session_id: str) -> list[dict[str, Any]]:
        """Hash what a crashed session's recording left, and chain the hashes."""
        directory = self.recordings_dir / session_id
        if not directory.is_dir():
            return []
        found: list[dict[str, Any]] = []
        for path in sorted(directory.glob("shell-*.cast")):
            digest = sha256_file(path)
            entry = {
                "name": path.name,
                "kind": "shell",
                "size_bytes": path.stat().st_size,
                "sha256": digest,
            }
            found.append(entry)
            self._log.info(
                "session.recording",
                session_id=session_id,
                truncated=True,
                audit=True,
                **entry,
            )
        return found

    def _write_files(self, session_id: str, files: dict[str, bytes]) -> None:
        directory = self.recordings_dir / session_id
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name, data in files.items():
            fd = os.open(
                directory / name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                0o600,
            )
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())


def _json_bytes(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, indent=2).encode("ascii") + b"\n"
