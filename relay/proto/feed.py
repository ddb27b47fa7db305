"""Monitoring records: what an instrument reports, checked strictly.

Theory of operation
===================
An instrument hands its agent four kinds of record (docs/monitoring.md):

* ``alarm``: pushed as it occurs. A code, a severity, a text, the device's
  time, and whether the alarm was raised or cleared.
* ``daily_stats``: pushed at the end of the day. The day and named values
  with units (product water quality, volume dispensed, operating hours, ...).
* ``configuration`` and ``consumables``: request-only. Sent only as the
  answer to a :class:`relay.proto.control.DataRequest` a named user made.

:func:`parse_record` turns a record's JSON text into one of the frozen
dataclasses below, or raises :class:`RecordRejected` with a reason code that
both ends use in logs, metrics and acks. The same function runs on the agent
(when the instrument hands a record over, so a bad one is refused at once,
locally) and on the broker (which trusts no device). :func:`to_json` gives the
canonical form the broker stores and serves: parsing it again gives the same
record.

Rules: the JSON is an object with exactly the documented keys (an unknown key
is refused, so nothing rides along unchecked); strings are bounded and hold
no control characters (they end up on consoles, in CSV files and in logs);
numbers are finite; times are RFC 3339 with an offset (a device's clock may be
wrong, but it is never ambiguous); lists are bounded and their names unique.
Nothing here reads a clock or touches a socket.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Final

__all__ = [
    "KINDS",
    "PUSHED_KINDS",
    "REJECT_REASONS",
    "REQUESTED_KINDS",
    "SEVERITIES",
    "Alarm",
    "Configuration",
    "Consumable",
    "Consumables",
    "DailyStats",
    "Measurement",
    "Parameter",
    "Record",
    "RecordRejected",
    "kind_of",
    "parse_record",
    "to_json",
]

#: Records the instrument pushes on its own.
PUSHED_KINDS: Final = ("alarm", "daily_stats")
#: Records sent only when a user asks (Issue: "request-only data stays request-only").
REQUESTED_KINDS: Final = ("configuration", "consumables")
KINDS: Final = PUSHED_KINDS + REQUESTED_KINDS
#: Alarm severities, least severe first (metric label values: a closed set).
SEVERITIES: Final = ("info", "warning", "alarm", "critical")
ALARM_STATES: Final = ("raised", "cleared")
#: Every reason a record is refused for (metric label values: a closed set).
REJECT_REASONS: Final = (
    "too_large",
    "malformed",
    "unknown_kind",
    "bad_field",
    "unsolicited",
    "unknown_request",
)

MAX_TEXT_CHARS: Final = 500
MAX_NAME_CHARS: Final = 64
MAX_UNIT_CHARS: Final = 16
MAX_LABEL_CHARS: Final = 128
MAX_VALUES: Final = 64
MAX_PARAMETERS: Final = 256
MAX_CONSUMABLES: Final = 32
#: JSON numbers beyond this are refused: they do not survive a double.
_MAX_ABS_NUMBER: Final = 1e15

_ALARM_CODE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
_NAME: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
# Any C0 or C1 control character, DEL, or a bidirectional override: such text
# could rewrite what a console, a terminal or a spreadsheet shows.
_UNSAFE_TEXT: Final = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_DAY: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
# RFC 3339 with a numeric offset or Z, seconds required, fraction optional.
_TIMESTAMP: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?"
    r"(?:Z|[+-][0-9]{2}:[0-9]{2})"
)


class RecordRejected(ValueError):
    """A record that is not accepted.

    Attributes:
        reason: One of :data:`REJECT_REASONS`.
        detail: What is wrong, for logs (bounded, no record content beyond a
            key name).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail[:200]


@dataclass(frozen=True, slots=True)
class Alarm:
    """An alarm or alert as the instrument raised or cleared it."""

    code: str
    severity: str
    text: str
    device_time: datetime
    state: str = "raised"


@dataclass(frozen=True, slots=True)
class Measurement:
    """One named value of a day's statistics (``volume_dispensed``, 412.5, ``L``)."""

    name: str
    value: float
    unit: str


@dataclass(frozen=True, slots=True)
class DailyStats:
    """The statistics of one day, as the instrument measured them."""

    day: date
    device_time: datetime
    values: tuple[Measurement, ...]


@dataclass(frozen=True, slots=True)
class Parameter:
    """One configuration parameter; *unit* is ``""`` when it has none."""

    name: str
    value: str | float | bool
    unit: str = ""


@dataclass(frozen=True, slots=True)
class Configuration:
    """The instrument's configuration parameters when it was asked."""

    device_time: datetime
    parameters: tuple[Parameter, ...]


@dataclass(frozen=True, slots=True)
class Consumable:
    """A cartridge, filter or lamp: what is left of it and since when it is in."""

    name: str
    part: str
    remaining_percent: float
    installed_on: date
    serial: str = ""


@dataclass(frozen=True, slots=True)
class Consumables:
    """The consumables' state when the instrument was asked."""

    device_time: datetime
    items: tuple[Consumable, ...]


Record = Alarm | DailyStats | Configuration | Consumables


def parse_record(kind: str, body: str | bytes, *, max_bytes: int) -> Record:
    """Check one record's JSON text and return it parsed.

    Args:
        kind: One of :data:`KINDS`.
        body: The record's JSON text.
        max_bytes: The largest body accepted, in UTF-8 bytes.

    Raises:
        RecordRejected: The record is not accepted; ``reason`` says why.
    """
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    if len(raw) > max_bytes:
        raise RecordRejected("too_large", f"{len(raw)} bytes, limit {max_bytes}")
    if kind not in KINDS:
        raise RecordRejected("unknown_kind", f"kind {kind[:32]!r}")
    try:
        data = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_no_constant,
        )
    except (ValueError, RecursionError) as exc:
        raise RecordRejected("malformed", _short(str(exc))) from None
    if not isinstance(data, dict):
        raise RecordRejected("malformed", "a record is a JSON object")
    if kind == "alarm":
        return _alarm(data)
    if kind == "daily_stats":
        return _daily_stats(data)
    if kind == "configuration":
        return _configuration(data)
    return _consumables(data)


def kind_of(record: Record) -> str:
    """The kind name of a parsed record."""
    if isinstance(record, Alarm):
        return "alarm"
    if isinstance(record, DailyStats):
        return "daily_stats"
    if isinstance(record, Configuration):
        return "configuration"
    return "consumables"


def to_json(record: Record) -> dict[str, Any]:
    """The canonical JSON form of *record* (what :func:`parse_record` reads)."""
    if isinstance(record, Alarm):
        return {
            "code": record.code,
            "severity": record.severity,
            "text": record.text,
            "device_time": _time_text(record.device_time),
            "state": record.state,
        }
    if isinstance(record, DailyStats):
        return {
            "day": record.day.isoformat(),
            "device_time": _time_text(record.device_time),
            "values": [
                {"name": m.name, "value": m.value, "unit": m.unit}
                for m in record.values
            ],
        }
    if isinstance(record, Configuration):
        return {
            "device_time": _time_text(record.device_time),
            "parameters": [
                {"name": p.name, "value": p.value, "unit": p.unit}
                for p in record.parameters
            ],
        }
    return {
        "device_time": _time_text(record.device_time),
        "items": [
            {
                "name": c.name,
                "part": c.part,
                "remaining_percent": c.remaining_percent,
                "installed_on": c.installed_on.isoformat(),
                "serial": c.serial,
            }
            for c in record.items
        ],
    }


def _alarm(data: Mapping[str, Any]) -> Alarm:
    _keys(
        data, required=("code", "severity", "text", "device_time"), optional=("state",)
    )
    state = data.get("state", "raised")
    if state not in ALARM_STATES:
        raise RecordRejected("bad_field", "state must be raised or cleared")
    severity = data["severity"]
    if severity not in SEVERITIES:
        raise RecordRejected("bad_field", f"severity must be one of {SEVERITIES}")
    return Alarm(
        code=_matching(data, "code", _ALARM_CODE),
        severity=severity,
        text=_text(data, "text", MAX_TEXT_CHARS),
        device_time=_timestamp(data, "device_time"),
        state=state,
    )


def _daily_stats(data: Mapping[str, Any]) -> DailyStats:
    _keys(data, required=("day", "device_time", "values"))
    items = _list(data, "values", MAX_VALUES, minimum=1)
    values = []
    for item in items:
        _keys(item, required=("name", "value", "unit"), where="values[]")
        values.append(
            Measurement(
                name=_matching(item, "name", _NAME),
                value=_number(item, "value"),
                unit=_text(item, "unit", MAX_UNIT_CHARS),
            )
        )
    _unique([m.name for m in values], "values")
    return DailyStats(
        day=_day(data, "day"),
        device_time=_timestamp(data, "device_time"),
        values=tuple(values),
    )


def _configuration(data: Mapping[str, Any]) -> Configuration:
    _keys(data, required=("device_time", "parameters"))
    parameters = []
    for item in _list(data, "parameters", MAX_PARAMETERS):
        _keys(
            item, required=("name", "value"), optional=("unit",), where="parameters[]"
        )
        value = item["value"]
        if isinstance(value, str):
            value = _text(item, "value", MAX_LABEL_CHARS)
        elif not isinstance(value, bool):
            value = _number(item, "value")
        parameters.append(
            Parameter(
                name=_matching(item, "name", _NAME),
                value=value,
                unit=_text(item, "unit", MAX_UNIT_CHARS) if "unit" in item else "",
            )
        )
    _unique([p.name for p in parameters], "parameters")
    return Configuration(
        device_time=_timestamp(data, "device_time"), parameters=tuple(parameters)
    )


def _consumables(data: Mapping[str, Any]) -> Consumables:
    _keys(data, required=("device_time", "items"))
    items = []
    for item in _list(data, "items", MAX_CONSUMABLES):
        _keys(
            item,
            required=("name", "part", "remaining_percent", "installed_on"),
            optional=("serial",),
            where="items[]",
        )
        remaining = _number(item, "remaining_percent")
        if not 0 <= remaining <= 100:
            raise RecordRejected("bad_field", "remaining_percent must be in 0..100")
        items.append(
            Consumable(
                name=_matching(item, "name", _NAME),
                part=_text(item, "part", MAX_LABEL_CHARS),
                remaining_percent=remaining,
                installed_on=_day(item, "installed_on"),
                serial=_text(item, "serial", MAX_NAME_CHARS)
                if "serial" in item
                else "",
            )
        )
    _unique([c.name for c in items], "items")
    return Consumables(device_time=_timestamp(data, "device_time"), items=tuple(items))


def _keys(
    data: object,
    *,
    required: Sequence[str],
    optional: Sequence[str] = (),
    where: str = "record",
) -> None:
    if not isinstance(data, dict):
        raise RecordRejected("bad_field", f"{where} must be an object")
    missing = [key for key in required if key not in data]
    if missing:
        raise RecordRejected("bad_field", f"{where} lacks {missing[0]!r}")
    unknown = sorted(set(data) - set(required) - set(optional))
    if unknown:
        raise RecordRejected(
            "bad_field", f"{where} has unknown key {unknown[0][:40]!r}"
        )


def _text(data: Mapping[str, Any], key: str, limit: int) -> str:
    value = data[key]
    if not isinstance(value, str) or len(value) > limit:
        raise RecordRejected(
            "bad_field", f"{key} must be text of at most {limit} characters"
        )
    if _UNSAFE_TEXT.search(value) is not None:
        raise RecordRejected("bad_field", f"{key} holds a control character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RecordRejected("bad_field", f"{key} is not valid UTF-8") from None
    return value


def _matching(data: Mapping[str, Any], key: str, pattern: re.Pattern[str]) -> str:
    value = data[key]
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise RecordRejected("bad_field", f"{key} must match {pattern.pattern}")
    return value


def _number(data: Mapping[str, Any], key: str) -> float:
    value = data[key]
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or abs(value) > _MAX_ABS_NUMBER
    ):
        raise RecordRejected("bad_field", f"{key} must be a finite number")
    return float(value)


def _list(
    data: Mapping[str, Any], key: str, limit: int, *, minimum: int = 0
) -> list[Any]:
    value = data[key]
    if not isinstance(value, list) or not minimum <= len(value) <= limit:
        raise RecordRejected(
            "bad_field", f"{key} must be a list of {minimum}..{limit} items"
        )
    return value


def _unique(names: Sequence[str], key: str) -> None:
    if len(set(names)) != len(names):
        raise RecordRejected("bad_field", f"{key} names a value twice")


def _day(data: Mapping[str, Any], key: str) -> date:
    value = data[key]
    if not isinstance(value, str) or _DAY.fullmatch(value) is None:
        raise RecordRejected("bad_field", f"{key} must be a date YYYY-MM-DD")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise RecordRejected("bad_field", f"{key} is not a calendar date") from None


def _timestamp(data: Mapping[str, Any], key: str) -> datetime:
    value = data[key]
    if not isinstance(value, str) or _TIMESTAMP.fullmatch(value) is None:
        raise RecordRejected(
            "bad_field", f"{key} must be an RFC 3339 time with an offset"
        )
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise RecordRejected("bad_field", f"{key} is not a valid time") from None


def _time_text(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    body = dict(pairs)
    if len(body) != len(pairs):
        raise ValueError("a key appears twice")
    return body


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _short(text: str) -> str:
    return text if len(text) <= 120 else text[:117] + "..."
