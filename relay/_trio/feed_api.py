"""The monitoring routes of the engineer API: who sees which instrument, and
what it reported.

Theory of operation
===================
*Who sees what* (docs/monitoring.md, "Who sees what"). :class:`DeviceVisibility`
answers one question for every route here, for ``GET /api/v1/devices`` and for
the console's live feed on ``/api/v1/events``: may this user see this
instrument?

- ``admin`` and ``auditor``: every enrolled instrument.
- ``customer``: exactly the instruments labelled ``customer=<organisation>``
  with the user's own organisation (``relay user add --organisation``). A
  customer without an organisation (which the store refuses to create) sees
  nothing.
- ``engineer``: the instruments the access policy lets the engineer reach
  (:func:`policy_reaches`): at least one allow rule concerns the engineer and the
  instrument, no deny rule without time windows does, and the allow rules
  together leave at least one channel. Time windows are ignored: an instrument
  an engineer may reach on Monday mornings is listed on Sunday too, so that
  the engineer can read its alarms before the window opens. A deny rule with
  windows hides nothing for the same reason. The broker's own
  ``[sessions] allowed_channels`` is the same for every instrument and is not
  looked at.

Every question reads the user's row (role, organisation, groups) and the
instrument's labels afresh in a worker thread, so ``relay user set`` and
``relay device label`` take effect at the next request (at the next push on
the live feed).

Rule 1: an instrument the user may not see answers exactly what an unknown one
answers (404 ``{"error": "unknown device"}``), on every route and for every
method, before anything else about the request is looked at (its query, its
body), so that no answer tells whether an instrument id exists.
Rule 2: every list is bounded (``limit``, with a maximum, and
:data:`~relay.api_contract.EXPORT_MAX_RECORDS` for exports, which refuse a
range that holds more instead of cutting it short); a query parameter of the
wrong form, or given twice, is 400 naming the parameter.
Rule 3: CSV cells that the instrument wrote and that start with ``=``, ``+``,
``-`` or ``@`` get a leading ``'`` (a spreadsheet would otherwise run them as a
formula, OWASP "CSV injection"); numbers the broker formats itself from a
parsed float are left as they are (``-3.5`` stays a number). The csv module
quotes the rest (RFC 4180, CRLF line ends).
Rule 4: each export is an audit event (``feed.exported``: who, instrument,
data set, format, range, rows). Store failures propagate to the listener's
handler (503 with ``Retry-After``).

The routes, all under ``/api/v1/devices/{device_id}`` (roles in
:data:`relay.api_contract.ROUTE_ROLES`; the OpenAPI document in
:mod:`relay.openapi` describes the answers):

- ``GET .../alarms``: the newest ``limit`` alarms in ``[since, until)`` by the
  instrument's time, newest first.
- ``GET .../daily-stats``: the daily statistics in the range, oldest first.
- ``GET .../snapshots``: the last configuration and consumables records, and
  the newest data requests.
- ``POST .../data-requests`` ``{"kind", "reason"}``: asks the instrument now
  (:class:`relay._trio.feed_requests.DataRequester`), 202 with the request.
- ``GET .../data-requests/{request_id}``: one request, for polling; with the
  record that answered it once there is one.
- ``GET .../sessions``: who held remote sessions on it, when, why, how they
  ended (no addresses, fingerprints or byte counts: customers read this too).
- ``GET .../exports/{dataset}?format=csv|json``: alarms or daily statistics
  over a range, as a download.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from policies import Device, Effect, Engineer, Policy
from relay._trio.feed_requests import DataRequestUnavailable
from relay._trio.login_service import Principal
from relay._trio.query_params import BadParameter, single, time_param
from relay._trio.request_body import BadBody, read_json_body
from relay.api_contract import (
    EXPORT_DATASETS,
    EXPORT_FORMATS,
    EXPORT_MAX_RECORDS,
    FEED_ALARMS_DEFAULT,
    FEED_ALARMS_MAX,
    FEED_SESSIONS_DEFAULT,
    FEED_SESSIONS_MAX,
    FEED_STATS_DEFAULT,
    FEED_STATS_MAX,
    MAX_DATA_REQUEST_BODY_BYTES,
    MAX_DATA_REQUEST_REASON_CHARS,
)
from relay.proto.feed import REQUESTED_KINDS
from relay.proto.session import DEVICE_ID_FORM

if TYPE_CHECKING:
    from relay.store import (
        DataRequestRow,
        FeedRow,
        RemoteSessionRecord,
        UserRecord,
    )

__all__ = [
    "DataRequests",
    "DeviceVisibility",
    "FeedRoutes",
    "FeedStore",
    "PolicySource",
    "csv_cell",
    "policy_reaches",
]

#: Roles that see every enrolled instrument.
_SEE_ALL_ROLES: Final = frozenset({"admin", "auditor"})
#: The label that names an instrument's customer organisation.
CUSTOMER_LABEL: Final = "customer"
_LIMIT_FORM: Final = re.compile(r"[0-9]{1,5}")
_REQUEST_ID_FORM: Final = re.compile(r"[0-9a-f]{32}")
#: Characters that make a spreadsheet read a cell as a formula (Rule 3).
_FORMULA_START: Final = ("=", "+", "-", "@")
_UNKNOWN_DEVICE: Final = "unknown device"


# --- who sees what --------------------------------------------------------------


class PolicySource(Protocol):
    """Where the access policy in force is read (a ``PolicyGate`` has it)."""

    @property
    def policy(self) -> Policy: ...


class FeedStore(Protocol):
    """What these routes read from the store (:class:`relay.store.Store` has it)."""

    def get_user(self, username: str) -> UserRecord | None: ...

    def device_enrolled(self, device_id: str) -> bool: ...

    def device_labels(self, device_id: str) -> dict[str, str]: ...

    def list_feed_records(
        self,
        device_id: str,
        *,
        kinds: Sequence[str],
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 1000,
    ) -> list[FeedRow]: ...

    def latest_feed_record(self, device_id: str, kind: str) -> FeedRow | None: ...

    def list_data_requests(
        self, device_id: str, *, limit: int = 20
    ) -> list[DataRequestRow]: ...

    def get_data_request(self, request_id: str) -> DataRequestRow | None: ...

    def list_remote_sessions(
        self,
        *,
        device_id: str | None = None,
        engineer: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        end_reason: str | None = None,
        limit: int = 100,
    ) -> list[RemoteSessionRecord]: ...


class DataRequests(Protocol):
    """What the routes need of :class:`relay._trio.feed_requests.DataRequester`."""

    async def request(
        self,
        *,
        device_id: str,
        kind: str,
        username: str,
        role_text: str,
        reason: str,
        source: str,
    ) -> DataRequestRow: ...


def policy_reaches(policy: Policy, engineer: Engineer, device: Device) -> bool:
    """Whether *policy* lets *engineer* reach *device* at some time.

    The decision of :func:`policies.decide` without the time and without the
    request: the rules that concern the engineer and the device are those whose
    selectors match; a deny rule without time windows among them hides the
    device; otherwise an allow rule must be among them, and the allow rules'
    channels together must leave at least one. Not checked: time windows (of
    allow and deny rules alike), reasons, session counts and the broker's own
    channel ceiling, which are about one request, not about the device.
    """
    applied = [rule for rule in policy.rules if rule.mismatch(engineer, device) is None]
    if any(rule.effect is Effect.DENY and not rule.windows for rule in applied):
        return False
    allows = [rule for rule in applied if rule.effect is Effect.ALLOW]
    if not allows:
        return False
    channels = None
    for rule in allows:
        if rule.channels is not None:
            channels = rule.channels if channels is None else channels & rule.channels
    return channels is None or not channels.is_empty()


@dataclass(frozen=True, slots=True)
class _Viewer:
    """A user as visibility sees it, read from the store for one question."""

    username: str
    role: str
    organisation: str | None
    groups: frozenset[str]


class DeviceVisibility:
    """May this user see this instrument? (See the module docstring.)

    Args:
        store: The users' rows and the instruments' labels.
        policy: The access policy in force. Without one, engineers see no
            instrument (default deny); admins, auditors and customers are not
            affected.
    """

    def __init__(self, *, store: FeedStore, policy: PolicySource | None) -> None:
        self._store = store
        self._policy = policy

    def _viewer(self, principal: Principal) -> _Viewer | None:
        user = self._store.get_user(principal.username)
        if user is None or user.disabled_at is not None:
            return None
        # The row's role, not the session's: a role is never changed in place
        # today, but if it were, the row is what is true now.
        return _Viewer(
            username=user.username,
            role=user.role,
            organisation=user.organisation,
            groups=frozenset(user.groups),
        )

    def _sees(self, viewer: _Viewer, device_id: str, labels: dict[str, str]) -> bool:
        if viewer.role in _SEE_ALL_ROLES:
            return True
        if viewer.role == "customer":
            return (
                viewer.organisation is not None
                and labels.get(CUSTOMER_LABEL) == viewer.organisation
            )
        if viewer.role == "engineer" and self._policy is not None:
            return policy_reaches(
                self._policy.policy,
                Engineer(viewer.username, viewer.role, viewer.groups),
                Device(device_id, labels),
            )
        return False

    def sees_device(self, principal: Principal, device_id: str) -> bool:
        """Whether *principal* may see the enrolled instrument *device_id*
        (blocking: call it in a worker thread).

        Returns:
            False for an id of the wrong form, an instrument never enrolled,
            or one the user may not see (Rule 1: the caller cannot tell which).
        """
        if not DEVICE_ID_FORM.fullmatch(device_id):
            return False
        viewer = self._viewer(principal)
        if viewer is None or not self._store.device_enrolled(device_id):
            return False
        labels = {} if viewer.role in _SEE_ALL_ROLES else self._labels(device_id)
        return self._sees(viewer, device_id, labels)

    def _labels(self, device_id: str) -> dict[str, str]:
        return self._store.device_labels(device_id)

    def visible_devices(
        self, principal: Principal, devices: Sequence[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """The entries of a device list (``device_id``, ``labels``) that
        *principal* may see (blocking: call it in a worker thread)."""
        viewer = self._viewer(principal)
        if viewer is None:
            return []
        return [
            device
            for device in devices
            if self._sees(viewer, str(device["device_id"]), dict(device["labels"]))
        ]

    async def filter(
        self, principal: Principal, devices: Sequence[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """:meth:`visible_devices` in a worker thread."""
        return await trio.to_thread.run_sync(self.visible_devices, principal, devices)


# --- query parameters -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Range:
    since: datetime | None
    until: datetime | None
    limit: int


def _time(params: QueryParams, name: str) -> datetime | None:
    return time_param(name, single(params, name))


def _range(
    params: QueryParams,
    *,
    allowed: frozenset[str],
    default: int,
    maximum: int,
) -> _Range:
    """``since``, ``until`` and ``limit`` from the query string.

    Raises:
        BadParameter: A value has the wrong form, a parameter is given twice,
            or the query names a parameter the route does not take.
    """
    unknown = sorted(set(params.keys()) - allowed)
    if unknown:
        raise BadParameter(unknown[0][:40], "not a parameter of this route")
    since, until = _time(params, "since"), _time(params, "until")
    if since is not None and until is not None and since >= until:
        raise BadParameter("until", "must be later than since")
    limit = default
    text = single(params, "limit")
    if text is not None:
        if not _LIMIT_FORM.fullmatch(text) or not 1 <= int(text) <= maximum:
            raise BadParameter("limit", f"an integer from 1 to {maximum}")
        limit = int(text)
    return _Range(since=since, until=until, limit=limit)


# --- answers --------------------------------------------------------------------


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _record_json(row: FeedRow) -> dict[str, Any]:
    """A stored record as the API answers it: its canonical body, with where and
    when the broker got it."""
    return {
        **row.body,
        "record_id": row.record_id,
        "received_at": row.received_at.isoformat(),
        "request_id": row.request_id,
    }


def _request_json(row: DataRequestRow) -> dict[str, Any]:
    return {
        "request_id": row.request_id,
        "device_id": row.device_id,
        "kind": row.kind,
        "requested_by": row.requested_by,
        "reason": row.reason,
        "requested_at": row.requested_at.isoformat(),
        "status": row.status,
        "finished_at": _iso(row.finished_at),
        "refusal": row.refusal,
        "record_id": row.record_id,
    }


def _session_json(row: RemoteSessionRecord) -> dict[str, Any]:
    """A remote session as a device's history shows it: who, when, why, how it
    ended. Addresses, certificate fingerprints, byte counts and recordings stay
    with the auditors' routes."""
    full = row.to_json()
    keep = (
        "session_id",
        "engineer",
        "reason",
        "channels",
        "granted_channels",
        "requested_at",
        "granted_at",
        "decided_by",
        "ended_at",
        "end_reason",
        "duration_s",
    )
    return {key: full[key] for key in keep}


def csv_cell(value: object) -> str:
    """One CSV cell: text from the instrument with the formula defence (Rule 3).

    Examples: ``"=1+1"`` → ``"'=1+1"``; ``"-5 degC drift"`` → ``"'-5 degC
    drift"``; ``-3.5`` (a float) → ``"-3.5"``; ``None`` → ``""``.
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


#: CSV columns of each data set; one row per alarm, one per measurement.
_CSV_COLUMNS: Final = {
    "alarms": (
        "device_id",
        "record_id",
        "device_time",
        "received_at",
        "code",
        "severity",
        "state",
        "text",
    ),
    "daily-stats": (
        "device_id",
        "record_id",
        "day",
        "device_time",
        "received_at",
        "name",
        "value",
        "unit",
    ),
}


def _csv_rows(dataset: str, rows: Sequence[FeedRow]) -> list[list[str]]:
    out: list[list[str]] = []
    for row in rows:
        common = {
            "device_id": row.device_id,
            "record_id": row.record_id,
            "device_time": row.body.get("device_time"),
            "received_at": row.received_at.isoformat(),
        }
        if dataset == "alarms":
            cells = {**row.body, **common}
            out.append([csv_cell(cells.get(name)) for name in _CSV_COLUMNS[dataset]])
            continue
        for value in row.body.get("values", []):
            cells = {**common, "day": row.body.get("day"), **value}
            out.append([csv_cell(cells.get(name)) for name in _CSV_COLUMNS[dataset]])
    return out


def export_csv(dataset: str, rows: Sequence[FeedRow]) -> tuple[str, int]:
    """The CSV text of *rows* (a header, then one line per alarm or per
    measurement) and its number of data lines."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(_CSV_COLUMNS[dataset])
    lines = _csv_rows(dataset, rows)
    writer.writerows(lines)
    return buffer.getvalue(), len(lines)


def _is_reason(value: object) -> bool:
    if not isinstance(value, str) or len(value) > MAX_DATA_REQUEST_REASON_CHARS:
        return False
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value):
        return False  # shown on the touchscreen, in logs and consoles
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape
        return False
    return True


def _role_text(role: str, organisation: str | None) -> str:
    """How the instrument's screen names who asked: the role, and a customer's
    organisation."""
    if role == "customer" and organisation:
        return f"customer ({organisation})"
    return role


_Handler = Callable[[Request, Principal, str], Awaitable[Response]]


class FeedRoutes:
    """The monitoring handlers (see the module docstring).

    Args:
        store: Records, requests, remote sessions, users and labels.
        visibility: Who sees which instrument.
        data_requester: Sends data requests to instruments; None: ``POST
            .../data-requests`` answers 503 (a broker without the feed).
        log: The listener's logger; its ``audit=True`` events go to the audit log.
        wall_clock: The current time, aware (export file names).
    """

    def __init__(
        self,
        *,
        store: FeedStore,
        visibility: DeviceVisibility,
        data_requester: DataRequests | None,
        log: Any,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._visibility = visibility
        self._requester = data_requester
        self._log = log
        self._wall_clock = wall_clock

    def _visible(
        self, handler: _Handler
    ) -> Callable[[Request, Principal], Awaitable[Response]]:
        """*handler*, called only for an instrument the user may see (Rule 1)."""

        async def checked(request: Request, principal: Principal) -> Response:
            device_id = str(request.path_params.get("device_id", ""))
            seen = await trio.to_thread.run_sync(
                self._visibility.sees_device, principal, device_id
            )
            if not seen:
                return _error(404, _UNKNOWN_DEVICE)
            return await handler(request, principal, device_id)

        return checked

    @property
    def alarms(self) -> Callable[[Request, Principal], Awaitable[Response]]:
        """``GET /api/v1/devices/{device_id}/alarms``."""
        return self._visible(self._alarms)

    @property
    def daily_stats(self) -> Callable[[Request, Principal], Awaitable[Response]]:
        """``GET /api/v1/devices/{device_id}/daily-stats``."""
        return self._visible(self._daily_stats)

    @property
    def snapshots(self) -> Callable[[Request, Principal], Awaitable[Response]]:
        """``GET /api/v1/devices/{device_id}/snapshots``."""
        return self._visible(self._snapshots)

    @property
    def create_data_request(
        self,
    ) -> Callable[[Request, Principal], Awaitable[Response]]:
        """``POST /api/v1/devices/{device_id}/data-requests``."""
        return self._visible(self._create_data_request)

    @property
    def data_request(self) -> Callable[[Request, Principal], Awaitable[Response]]:
        """``GET /api/v1/devices/{device_id}/data-requests/{request_id}``."""
        return self._visible(self._data_request)

    @property
    def sessions(self) -> Callable[[Request, Principal], Awaitable[Response]]:
        """``GET /api/v1/devices/{device_id}/sessions``."""
        return self._visible(self._sessions)

    @property
    def export(self) -> Callable[[Request, Principal], Awaitable[Response]]:
        """``GET /api/v1/devices/{device_id}/exports/{dataset}``."""
        return self._visible(self._export)

    async def _records(
        self, device_id: str, kind: str, window: _Range, limit: int
    ) -> list[FeedRow]:
        return await trio.to_thread.run_sync(
            partial(
                self._store.list_feed_records,
                device_id,
                kinds=(kind,),
                since=window.since,
                until=window.until,
                limit=limit,
            )
        )

    async def _alarms(
        self, request: Request, _principal: Principal, device_id: str
    ) -> Response:
        return await self._listing(
            request, device_id, "alarm", "alarms", FEED_ALARMS_DEFAULT, FEED_ALARMS_MAX
        )

    async def _daily_stats(
        self, request: Request, _principal: Principal, device_id: str
    ) -> Response:
        return await self._listing(
            request,
            device_id,
            "daily_stats",
            "daily_stats",
            FEED_STATS_DEFAULT,
            FEED_STATS_MAX,
        )

    async def _listing(
        self,
        request: Request,
        device_id: str,
        kind: str,
        key: str,
        default: int,
        maximum: int,
    ) -> Response:
        """One kind's records in a time range: alarms newest first (a
        timeline), statistics oldest first (a chart's x axis)."""
        try:
            window = _range(
                request.query_params,
                allowed=frozenset({"since", "until", "limit"}),
                default=default,
                maximum=maximum,
            )
        except BadParameter as bad:
            return _error(400, bad.message)
        rows = await self._records(device_id, kind, window, window.limit)
        ordered = reversed(rows) if kind == "alarm" else rows
        return JSONResponse(
            {"device_id": device_id, key: [_record_json(row) for row in ordered]}
        )

    def _read_snapshots(self, device_id: str) -> dict[str, Any]:
        latest = {
            kind: self._store.latest_feed_record(device_id, kind)
            for kind in REQUESTED_KINDS
        }
        requests = self._store.list_data_requests(device_id, limit=10)
        return {
            "device_id": device_id,
            **{
                kind: None if row is None else _record_json(row)
                for kind, row in latest.items()
            },
            "data_requests": [_request_json(row) for row in requests],
        }

    async def _snapshots(
        self, request: Request, _principal: Principal, device_id: str
    ) -> Response:
        if request.query_params:
            return _error(400, "bad query: this route takes no parameters")
        return JSONResponse(
            await trio.to_thread.run_sync(self._read_snapshots, device_id)
        )

    async def _create_data_request(
        self, request: Request, principal: Principal, device_id: str
    ) -> Response:
        try:
            body: Any = await read_json_body(request, MAX_DATA_REQUEST_BODY_BYTES)
        except BadBody as bad:
            return _error(bad.status, bad.message)
        if not isinstance(body, dict) or not set(body) <= {"kind", "reason"}:
            return _error(400, "bad request: an object with kind and reason")
        kind, reason = body.get("kind"), body.get("reason", "")
        if kind not in REQUESTED_KINDS:
            return _error(400, "bad kind: " + " or ".join(REQUESTED_KINDS))
        if not _is_reason(reason):
            return _error(
                400,
                f"bad reason: at most {MAX_DATA_REQUEST_REASON_CHARS} characters "
                "of text",
            )
        if self._requester is None:
            return _error(
                503, "this broker does not take data requests", **{"Retry-After": "5"}
            )
        user = await trio.to_thread.run_sync(self._store.get_user, principal.username)
        organisation = None if user is None else user.organisation
        try:
            row = await self._requester.request(
                device_id=device_id,
                kind=str(kind),
                username=principal.username,
                role_text=_role_text(principal.role, organisation),
                reason=str(reason),
                source=request.client.host if request.client is not None else "unknown",
            )
        except DataRequestUnavailable as unavailable:
            if unavailable.reason == "offline":
                return _error(409, "the instrument is not connected; try again later")
            if unavailable.reason == "agent_too_old":
                return _error(
                    409,
                    "the instrument's agent is too old to answer data requests; "
                    "it needs an update",
                )
            return _error(
                503,
                "data requests cannot be sent right now; retry",
                **{"Retry-After": "5"},
            )
        return JSONResponse(_request_json(row), status_code=202)

    async def _data_request(
        self, request: Request, _principal: Principal, device_id: str
    ) -> Response:
        if request.query_params:
            return _error(400, "bad query: this route takes no parameters")
        request_id = str(request.path_params.get("request_id", ""))
        if not _REQUEST_ID_FORM.fullmatch(request_id):
            return _error(404, "unknown data request")
        row = await trio.to_thread.run_sync(self._store.get_data_request, request_id)
        if row is None or row.device_id != device_id:
            return _error(404, "unknown data request")
        answer = _request_json(row)
        answer["record"] = None
        if row.status == "answered" and row.record_id is not None:
            latest = await trio.to_thread.run_sync(
                self._store.latest_feed_record, device_id, row.kind
            )
            # The answer, unless a newer record of the kind came since (then
            # the snapshots route has the newer one).
            if latest is not None and latest.record_id == row.record_id:
                answer["record"] = _record_json(latest)
        return JSONResponse(answer)

    async def _sessions(
        self, request: Request, _principal: Principal, device_id: str
    ) -> Response:
        try:
            window = _range(
                request.query_params,
                allowed=frozenset({"since", "until", "limit"}),
                default=FEED_SESSIONS_DEFAULT,
                maximum=FEED_SESSIONS_MAX,
            )
        except BadParameter as bad:
            return _error(400, bad.message)
        rows = await trio.to_thread.run_sync(
            partial(
                self._store.list_remote_sessions,
                device_id=device_id,
                since=window.since,
                until=window.until,
                limit=window.limit,
            )
        )
        return JSONResponse(
            {"device_id": device_id, "sessions": [_session_json(r) for r in rows]}
        )

    async def _export(
        self, request: Request, principal: Principal, device_id: str
    ) -> Response:
        dataset = str(request.path_params.get("dataset", ""))
        if dataset not in EXPORT_DATASETS:
            return _error(404, "unknown data set: alarms or daily-stats")
        params = request.query_params
        try:
            window = _range(
                params,
                allowed=frozenset({"since", "until", "format"}),
                default=EXPORT_MAX_RECORDS,
                maximum=EXPORT_MAX_RECORDS,
            )
            form = single(params, "format") or "csv"
            if form not in EXPORT_FORMATS:
                raise BadParameter("format", " or ".join(EXPORT_FORMATS))
        except BadParameter as bad:
            return _error(400, bad.message)
        kind = "alarm" if dataset == "alarms" else "daily_stats"
        rows = await self._records(device_id, kind, window, EXPORT_MAX_RECORDS + 1)
        if len(rows) > EXPORT_MAX_RECORDS:
            return _error(
                400,
                f"the range holds more than {EXPORT_MAX_RECORDS} records; "
                "narrow it with since and until",
            )
        if form == "csv":
            body, lines = export_csv(dataset, rows)
            media_type = "text/csv; charset=utf-8"
        else:
            body = json.dumps(
                {
                    "device_id": device_id,
                    "data_set": dataset,
                    "since": _iso(window.since),
                    "until": _iso(window.until),
                    "records": [_record_json(row) for row in rows],
                },
                ensure_ascii=False,
            )
            lines = len(rows)
            media_type = "application/json"
        self._log.info(
            "feed.exported",
            username=principal.username,
            role=principal.role,
            device_id=device_id,
            data_set=dataset,
            format=form,
            since=_iso(window.since),
            until=_iso(window.until),
            records=len(rows),
            rows=lines,
            audit=True,
        )
        stamp = self._wall_clock().astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
        # The device id has the form DEVICE_ID_FORM (checked by the visibility
        # test): nothing in the file name needs quoting.
        filename = f"{device_id}-{dataset}-{stamp}.{form}"
        return Response(
            body,
            media_type=media_type,
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )
