"""The auditors' routes of the engineer API: remote sessions, their timelines and
their recordings.

Theory of operation
===================
Thin, read-only handlers over three things the broker already keeps: the rows
of ``remote_sessions`` in the store (:meth:`relay.store.Store.list_remote_sessions`),
the audit log's chain files (:func:`relay.audit_reader.session_timeline`) and the
session directories under ``$RELAY_DATA_DIR/recordings/`` (recordings and
receipts). The roles of each route are in :data:`relay.api_contract.ROUTE_ROLES`
(auditor and admin); :func:`relay._trio.engineer_api.audit_routes` guards them
like every other route.

- ``GET /api/v1/audit/sessions``: ``{"sessions": [...]}``, newest first,
  filtered by ``device_id``, ``engineer``, ``since``/``until`` (ISO 8601 with a
  timezone; requested in [since, until)), ``end_reason`` and ``limit``
  (1..:data:`~relay.api_contract.AUDIT_LIST_MAX`, default
  :data:`~relay.api_contract.AUDIT_LIST_DEFAULT`). A value of
  the wrong form, or a parameter given twice, is 400 naming the parameter.
- ``GET /api/v1/audit/sessions/{session_id}``: the row, its ``timeline`` (the
  chain's records that name the session, read from the row's ``start_seq``) and
  its ``receipts`` (``grant``, ``end``: the stored documents or null). 404 for
  an id of the wrong form or without a row. Audited as ``audit.session_viewed``.
- ``GET /api/v1/audit/sessions/{session_id}/recordings/{name}``: the file's
  bytes. *name* must have the form of a recording (:data:`RECORDING_NAME`) and
  be one of the row's ``recordings``, else 404; ``?download=1`` adds
  ``Content-Disposition: attachment``. Audited as ``audit.recording_read``.

Rule 1: a file path is built only from a session id that passed
:func:`relay.proto.session.is_session_id` (32 lowercase hex characters) and a
name that matched :data:`RECORDING_NAME` and is listed in the row, so no
request reaches outside the session's directory; a name that is a symlink or
not a regular file answers 404 as well.
Rule 2: every store call and file read runs in a worker thread. A
:class:`~relay.store.StoreError` propagates to the listener's handler, which
answers 503 with ``Retry-After``; a session whose audit files cannot be read
answers 500 and logs ``audit.read_failed``.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Final

import trio
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from relay._trio.login_service import Principal
from relay._trio.query_params import BadParameter, single, time_param
from relay.api_contract import AUDIT_END_REASONS, AUDIT_LIST_DEFAULT, AUDIT_LIST_MAX
from relay.audit_reader import RECORDING_NAME, read_receipts, session_timeline
from relay.proto.session import DEVICE_ID_FORM, USERNAME_FORM, is_session_id
from relay.store import RemoteSessionRecord, Store

__all__ = [
    "CAST_MEDIA_TYPE",
    "RECORDING_NAME",
    "AuditRoutes",
]

#: asciicast v2 has no registered type; this is what asciinema's server answers.
CAST_MEDIA_TYPE: Final = "application/x-asciicast"
_LIMIT_FORM: Final = re.compile(r"[0-9]{1,4}")
_FILTERS: Final = ("device_id", "engineer", "since", "until", "end_reason", "limit")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Filters:
    device_id: str | None = None
    engineer: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    end_reason: str | None = None
    limit: int = AUDIT_LIST_DEFAULT


def _filters(params: QueryParams) -> _Filters:
    """The listing's filters from the query string.

    Raises:
        BadParameter: A value has the wrong form, or a filter is given twice.
    """
    text = {name: single(params, name) for name in _FILTERS}
    device_id, engineer = text["device_id"], text["engineer"]
    if device_id is not None and not DEVICE_ID_FORM.fullmatch(device_id):
        raise BadParameter("device_id", "not a device id")
    if engineer is not None and not USERNAME_FORM.fullmatch(engineer):
        raise BadParameter("engineer", "not a user name")
    since, until = (
        time_param("since", text["since"]),
        time_param("until", text["until"]),
    )
    if since is not None and until is not None and since >= until:
        raise BadParameter("until", "must be later than since")
    end_reason = text["end_reason"]
    if end_reason is not None and end_reason not in AUDIT_END_REASONS:
        raise BadParameter(
            "end_reason", "one of " + ", ".join(sorted(AUDIT_END_REASONS))
        )
    limit = AUDIT_LIST_DEFAULT
    if text["limit"] is not None:
        limit_text = text["limit"]
        if not _LIMIT_FORM.fullmatch(limit_text) or not (
            1 <= int(limit_text) <= AUDIT_LIST_MAX
        ):
            raise BadParameter("limit", f"an integer from 1 to {AUDIT_LIST_MAX}")
        limit = int(limit_text)
    return _Filters(
        device_id=device_id,
        engineer=engineer,
        since=since,
        until=until,
        end_reason=end_reason,
        limit=limit,
    )


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _regular_file_stat(path: Path) -> os.stat_result | None:
    """The stat of *path* if it is a regular file and not a symlink, else None."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return None
    return found if stat.S_ISREG(found.st_mode) else None


class AuditRoutes:
    """The auditors' handlers; see the module docstring.

    Args:
        store: The remote-session rows.
        audit_dir: ``$RELAY_DATA_DIR/audit``, the chain's files.
        recordings_dir: ``$RELAY_DATA_DIR/recordings``, one directory per session.
        log: The listener's logger; its ``audit=True`` events go to the audit log.
    """

    def __init__(
        self, *, store: Store, audit_dir: Path, recordings_dir: Path, log: Any
    ) -> None:
        self._store = store
        self._audit_dir = audit_dir
        self._recordings_dir = recordings_dir
        self._log = log

    async def list_sessions(self, request: Request, _principal: Principal) -> Response:
        """``GET /api/v1/audit/sessions``."""
        try:
            filters = _filters(request.query_params)
        except BadParameter as bad:
            return _error(400, bad.message)
        rows = await trio.to_thread.run_sync(
            partial(
                self._store.list_remote_sessions,
                device_id=filters.device_id,
                engineer=filters.engineer,
                since=filters.since,
                until=filters.until,
                end_reason=filters.end_reason,
                limit=filters.limit,
            )
        )
        return JSONResponse({"sessions": [row.to_json() for row in rows]})

    async def _row(self, request: Request) -> RemoteSessionRecord | None:
        session_id = request.path_params.get("session_id")
        if not is_session_id(session_id):
            return None
        return await trio.to_thread.run_sync(
            self._store.get_remote_session, str(session_id)
        )

    def _read_evidence(
        self, row: RemoteSessionRecord
    ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any] | None]]:
        timeline = session_timeline(
            self._audit_dir, row.session_id, start_seq=row.start_seq
        )
        return timeline, read_receipts(self._recordings_dir, row.session_id)

    async def session(self, request: Request, principal: Principal) -> Response:
        """``GET /api/v1/audit/sessions/{session_id}``."""
        row = await self._row(request)
        if row is None:
            return _error(404, "unknown session")
        try:
            timeline, receipts = await trio.to_thread.run_sync(self._read_evidence, row)
        except (OSError, ValueError) as exc:
            # A receipt that is not JSON, or a file that cannot be read: the
            # session's evidence is damaged, which the operator must see.
            self._log.error(
                "audit.read_failed",
                session_id=row.session_id,
                detail=str(exc)[:200],
                audit=True,
            )
            return _error(500, "the audit files of this session cannot be read")
        self._log.info(
            "audit.session_viewed",
            username=principal.username,
            role=principal.role,
            session_id=row.session_id,
            audit=True,
        )
        return JSONResponse(
            {**row.to_json(), "timeline": timeline, "receipts": receipts}
        )

    async def recording(self, request: Request, principal: Principal) -> Response:
        """``GET /api/v1/audit/sessions/{session_id}/recordings/{name}``."""
        try:
            download = single(request.query_params, "download")
        except BadParameter as bad:
            return _error(400, bad.message)
        if download not in (None, "0", "1"):
            return _error(400, "bad download: 0 or 1")
        name = request.path_params.get("name")
        if not isinstance(name, str) or not RECORDING_NAME.fullmatch(name):
            return _error(404, "unknown recording")
        row = await self._row(request)
        if row is None:
            return _error(404, "unknown session")
        if name not in {entry.get("name") for entry in row.recordings}:
            return _error(404, "unknown recording")
        path = self._recordings_dir / row.session_id / name
        try:
            found = await trio.to_thread.run_sync(_regular_file_stat, path)
        except OSError as exc:
            self._log.error(
                "audit.read_failed",
                session_id=row.session_id,
                name=name,
                detail=str(exc)[:200],
                audit=True,
            )
            return _error(500, "the recording cannot be read")
        if found is None:
            return _error(404, "unknown recording")
        self._log.info(
            "audit.recording_read",
            username=principal.username,
            role=principal.role,
            session_id=row.session_id,
            name=name,
            audit=True,
        )
        # FileResponse reads the file in worker threads (anyio, on trio here)
        # and uses the stat above, so it does not look the path up again for it.
        return FileResponse(
            path,
            media_type=CAST_MEDIA_TYPE
            if name.endswith(".cast")
            else "application/json",
            filename=name if download == "1" else None,
            stat_result=found,
        )
