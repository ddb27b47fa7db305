"""Structured logging: JSON lines on stderr, safe to ship to a SIEM.

Every event has a dotted name (``device.connected``, ``device.rejected``) and
key/value fields. Security-relevant events carry ``audit=True``; a logger made
with ``get_logger(name, audit=log)`` also appends those to the tamper-evident
audit log (:class:`relay.audit_log.AuditLog`), as records whose fields are
turned into what a record may hold (:func:`audit_fields`). Field values are
length-capped here and JSON-encoded by the renderer, which escapes control
characters, so a hostile value (a CSR subject, a peer-sent string) cannot forge a
log line.

Never log a secret: passwords, TOTP codes and tokens never reach a logger;
tokens appear only as their hashes (``token_hash``).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, Final, Protocol

import structlog

MAX_FIELD_CHARS: Final = 512

# What an audit record's field names and event names may be (relay/audit/chain.py).
_FIELD_NAME: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
_EVENT_NAME: Final = re.compile(r"[a-z][a-z0-9_]{0,31}(?:\.[a-z][a-z0-9_]{0,31}){1,3}")
# structlog's own keys, and ours, that are not the event's fields.
_NOT_FIELDS: Final = frozenset({"event", "audit", "level", "timestamp", "exc_info"})
_MAX_INT: Final = 2**53 - 1
_MAX_AUDIT_FIELDS: Final = 31  # the chain allows 32; one is kept for the count cut


class AuditSink(Protocol):
    """Where audit events go (:class:`relay.audit_log.AuditLog`)."""

    def append(self, event: str, fields: Mapping[str, object]) -> int | None: ...


def _scalar(value: object) -> object:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value if -_MAX_INT <= value <= _MAX_INT else str(value)
    return str(value)


def audit_fields(event_dict: Mapping[str, Any]) -> dict[str, object]:
    """The fields of a log event as an audit record can hold them.

    Scalars stay (integers beyond 2**53 become strings), lists and tuples keep
    their scalars, anything else becomes its ``str``; a field whose name a
    record cannot have is left out and counted in ``dropped_fields``, as are
    fields beyond the record's limit. The record itself caps long strings.
    """
    fields: dict[str, object] = {}
    dropped = 0
    for name, value in event_dict.items():
        if name in _NOT_FIELDS:
            continue
        if not _FIELD_NAME.fullmatch(name) or len(fields) >= _MAX_AUDIT_FIELDS:
            dropped += 1
            continue
        if isinstance(value, (list, tuple)):
            fields[name] = [_scalar(item) for item in value][:16]
        else:
            fields[name] = _scalar(value)
    if dropped:
        fields["dropped_fields"] = dropped
    return fields


def _record(sink: AuditSink, event: str, fields: dict[str, object]) -> int | None:
    if not _EVENT_NAME.fullmatch(event):
        fields = {"name": event[:200], **dict(list(fields.items())[:30])}
        event = "log.unnamed_event"
    try:
        return sink.append(event, fields)
    except ValueError as exc:
        # A field the record refused (a bug here, not an attack): the fact is
        # still recorded, without the fields.
        return sink.append(
            "log.unrecordable_event", {"name": event, "detail": str(exc)[:200]}
        )


class AuditingLogger:
    """A structlog logger that also appends its ``audit=True`` events to an
    audit log, whatever structlog's global configuration (tests keep theirs).

    The record is written before the log line, and the line carries its
    ``audit_seq`` (absent while the audit log fails).
    """

    __slots__ = ("_logger", "_sink")

    def __init__(self, logger: Any, sink: AuditSink) -> None:
        self._logger = logger
        self._sink = sink

    def _emit(self, method: str, event: str, fields: dict[str, Any]) -> Any:
        if fields.get("audit"):
            seq = _record(self._sink, event, audit_fields(fields))
            if seq is not None:
                fields["audit_seq"] = seq
        return getattr(self._logger, method)(event, **fields)

    def debug(self, event: str, **fields: Any) -> Any:
        return self._emit("debug", event, fields)

    def info(self, event: str, **fields: Any) -> Any:
        return self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> Any:
        return self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> Any:
        return self._emit("error", event, fields)

    def exception(self, event: str, **fields: Any) -> Any:
        return self._emit("exception", event, fields)


def _cap_fields(
    _logger: object, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event_dict.items():
        if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
            event_dict[key] = value[:MAX_FIELD_CHARS] + "...[truncated]"
    return event_dict


def configure_logging(*, level: int = logging.INFO, stream: Any = None) -> None:
    """Send structlog events (and stdlib logging) as JSON lines to *stream*."""
    target = stream if stream is not None else sys.stderr
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _cap_fields,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=target),
        cache_logger_on_first_use=False,
    )
    # Libraries (hypercorn, websockets) log through the standard library; keep
    # their warnings, drop their per-connection chatter.
    logging.basicConfig(
        level=logging.WARNING,
        stream=target,
        format="%(name)s %(levelname)s %(message)s",
    )


def get_logger(name: str, *, audit: AuditSink | None = None) -> Any:
    """A structlog logger bound to a component name.

    With *audit*, its events marked ``audit=True`` are also appended to that
    audit log (the stderr line then carries the record's ``audit_seq``).
    """
    logger = structlog.get_logger(component=name)
    return logger if audit is None else AuditingLogger(logger, audit)
