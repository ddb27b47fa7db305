"""Time windows: when a rule applies, in the local time of a named zone.

A window is a set of weekdays and a time of day range in an IANA time zone
(``Europe/Berlin``): ``mon-fri 07:00-19:00``. A range whose end is not after its
start runs over midnight (``22:00-06:00``: from 22:00 on a listed day to 06:00
the next morning). ``24:00`` is the end of the day.

Time is always given (an aware :class:`datetime`); nothing here reads a clock.
The end of the occurrence a moment falls in is what caps a session that starts
inside a window: it never runs past the end of the window it started in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["DAY_NAMES", "TimeWindow", "WindowSyntaxError", "parse_days"]

DAY_NAMES: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_CLOCK: Final = re.compile(r"([01][0-9]|2[0-4]):([0-5][0-9])")


class WindowSyntaxError(ValueError):
    """A window whose days, times or zone do not parse."""


def parse_days(items: list[str]) -> frozenset[int]:
    """``["mon-fri", "sun"]`` as weekday numbers (Monday 0).

    Raises:
        WindowSyntaxError: An unknown day name, or an empty list.
    """
    if not items:
        raise WindowSyntaxError("days must name at least one day")
    days: set[int] = set()
    for item in items:
        first, dash, last = item.partition("-")
        if first not in DAY_NAMES or (dash and last not in DAY_NAMES):
            raise WindowSyntaxError(
                f"not a day or day range (mon..sun, e.g. mon-fri): {item!r}"
            )
        start = DAY_NAMES.index(first)
        end = DAY_NAMES.index(last) if last else start
        day = start
        while True:  # mon-fri, and fri-mon across the week end
            days.add(day)
            if day == end:
                break
            day = (day + 1) % 7
    return frozenset(days)


def _parse_clock(text: str, key: str) -> int:
    """``"07:30"`` as minutes after midnight (``"24:00"`` is 1440)."""
    match = _CLOCK.fullmatch(text)
    if match is None or (match.group(1) == "24" and match.group(2) != "00"):
        raise WindowSyntaxError(f"{key} must be HH:MM (00:00..24:00), got {text!r}")
    return int(match.group(1)) * 60 + int(match.group(2))


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """Weekdays and a daily time range in one time zone."""

    days: frozenset[int]
    start_minute: int
    end_minute: int
    zone: str

    @classmethod
    def parse(cls, days: list[str], start: str, end: str, zone: str) -> TimeWindow:
        """From a policy file's ``days``, ``from``, ``to`` and ``timezone``.

        Raises:
            WindowSyntaxError: Something does not parse, or the zone is unknown.
        """
        start_minute = _parse_clock(start, "from")
        end_minute = _parse_clock(end, "to")
        if start_minute == 1440:
            raise WindowSyntaxError("from must be before 24:00")
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise WindowSyntaxError(f"unknown time zone: {zone!r}") from None
        return cls(parse_days(days), start_minute, end_minute, zone)

    def end_of_occurrence(self, at: datetime) -> datetime | None:
        """When the occurrence of this window that *at* falls in ends; None if outside.

        Raises:
            ValueError: *at* is naive.
        """
        if at.tzinfo is None:
            raise ValueError("a time window needs an aware datetime")
        local = at.astimezone(ZoneInfo(self.zone))
        minute = local.hour * 60 + local.minute + local.second / 60
        overnight = self.end_minute <= self.start_minute
        today = local.weekday()
        if not overnight:
            if today in self.days and self.start_minute <= minute < self.end_minute:
                return self._at(local, 0, self.end_minute)
            return None
        # Over midnight: from start on a listed day to end the next morning.
        if today in self.days and minute >= self.start_minute:
            return self._at(local, 1, self.end_minute)
        if (today - 1) % 7 in self.days and minute < self.end_minute:
            return self._at(local, 0, self.end_minute)
        return None

    def _at(self, local: datetime, days_later: int, minute: int) -> datetime:
        """The first moment after *local* at which the zone's wall clock reads
        *minute* of the day *days_later* days after *local*'s, as UTC.

        Wall-clock time, so a daylight saving change inside the window moves
        the end with the clock. In the autumn's repeated hour the end is the
        reading still to come; in the spring's skipped hour (the end is never
        read) it is the jump over it.
        """
        zone = ZoneInfo(self.zone)
        day = local.date() + timedelta(days=days_later)
        if minute == 1440:
            day, minute = day + timedelta(days=1), 0
        wall = datetime.combine(day, time(minute // 60, minute % 60))
        after = local.astimezone(UTC)
        readings = [wall.replace(tzinfo=zone, fold=f).astimezone(UTC) for f in (0, 1)]
        real = [
            t
            for t in readings
            if t > after and t.astimezone(zone).replace(tzinfo=None) == wall
        ]
        if real:
            return min(real)
        # Skipped: the first whole second whose wall clock is past *wall*.
        low, high = int(after.timestamp()), int(max(readings).timestamp())
        while high - low > 1:
            middle = (low + high) // 2
            reading = datetime.fromtimestamp(middle, zone).replace(tzinfo=None)
            if reading >= wall:
                high = middle
            else:
                low = middle
        return datetime.fromtimestamp(high, UTC)

    def __str__(self) -> str:
        days = ",".join(DAY_NAMES[d] for d in sorted(self.days))
        return (
            f"{days} {self.start_minute // 60:02d}:{self.start_minute % 60:02d}-"
            f"{self.end_minute // 60:02d}:{self.end_minute % 60:02d} {self.zone}"
        )
