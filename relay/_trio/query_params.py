"""Query-string parameters of the JSON routes: one form, one error message.

The auditors' routes and the monitoring routes read the same kinds of
parameter (a time range, a limit, an id) and answer a bad one the same way:
400 with ``bad NAME: what it should be``. Nothing here touches a socket.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

from starlette.datastructures import QueryParams

__all__ = ["BadParameter", "single", "time_param"]

#: Longest time value looked at (an ISO 8601 time with microseconds and an
#: offset is 32 characters).
MAX_TIME_CHARS: Final = 40
_TIME_FORM: Final = "an ISO 8601 time with a timezone, e.g. 2026-05-04T13:02:00Z"


class BadParameter(Exception):
    """A query parameter has the wrong form; the message names it."""

    def __init__(self, name: str, expected: str) -> None:
        self.message = f"bad {name}: {expected}"
        super().__init__(self.message)


def single(params: QueryParams, name: str) -> str | None:
    """The one value of *name*, or None; a parameter given twice is refused."""
    values = params.getlist(name)
    if len(values) > 1:
        raise BadParameter(name, "give it at most once")
    return values[0] if values else None


def time_param(name: str, text: str | None) -> datetime | None:
    """An ISO 8601 time with a timezone, in UTC (``2026-05-04T13:02:00Z``)."""
    if text is None:
        return None
    if len(text) > MAX_TIME_CHARS or not text.isascii():
        raise BadParameter(name, _TIME_FORM)
    try:
        value = datetime.fromisoformat(text)
        if value.tzinfo is None or value.utcoffset() is None:
            raise BadParameter(name, _TIME_FORM)
        # Year 1 with a positive offset is before the first UTC instant.
        return value.astimezone(UTC)
    except (ValueError, OverflowError):
        raise BadParameter(name, _TIME_FORM) from None
