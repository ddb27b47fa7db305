"""Structured logging: JSON lines on stderr, safe to ship to a SIEM.

Every event has a dotted name (``device.connected``, ``device.rejected``) and
key/value fields. Security-relevant events carry ``audit=True`` so that the audit
issue's tamper-evident sink can pick exactly these up. Field values are
length-capped here and JSON-encoded by the renderer, which escapes control
characters, so a hostile value (a CSR subject, a peer-sent string) cannot forge a
log line.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Final

import structlog

MAX_FIELD_CHARS: Final = 512


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


def get_logger(name: str) -> Any:
    """A structlog logger bound to a component name."""
    return structlog.get_logger(component=name)
