"""Tests for policies.windows: days, times and zones, and when a window's occurrence ends.

Time is always an explicit aware datetime (the package has no clock): 2026-03-02
is a Monday, 2026-03-06 a Friday; Europe/Berlin changes to summer time in the
night of Sunday 2026-03-29 (02:00 CET -> 03:00 CEST, 01:00 UTC) and back in the
night of Sunday 2026-10-25 (03:00 CEST -> 02:00 CET, 01:00 UTC).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from policies.windows import TimeWindow, WindowSyntaxError, parse_days

BERLIN = "Europe/Berlin"
MON, TUE, WED, THU, FRI, SAT, SUN = range(7)


def utc(month: int, day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    """A moment of 2026 in UTC."""
    return datetime(2026, month, day, hour, minute, second, tzinfo=UTC)


def window(days: list[str], start: str, end: str, zone: str = "UTC") -> TimeWindow:
    return TimeWindow.parse(days, start, end, zone)


# --- Days -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "days"),
    [
        pytest.param(["mon-fri"], {MON, TUE, WED, THU, FRI}, id="mon-fri"),
        pytest.param(["fri-mon"], {FRI, SAT, SUN, MON}, id="fri-mon-across-week-end"),
        pytest.param(["sat-sun"], {SAT, SUN}, id="week-end"),
        pytest.param(["sun"], {SUN}, id="single-day"),
        pytest.param(["mon", "wed"], {MON, WED}, id="two-days"),
        pytest.param(["mon-mon"], {MON}, id="range-of-one"),
        pytest.param(["sun-sat"], set(range(7)), id="whole-week-from-sunday"),
        pytest.param(["mon-wed", "tue-thu"], {MON, TUE, WED, THU}, id="overlapping"),
    ],
)
def test_parse_days(items: list[str], days: set[int]) -> None:
    """Day names and ranges give weekday numbers, Monday 0; a range may wrap the week."""
    assert parse_days(items) == frozenset(days)


@pytest.mark.parametrize(
    "items",
    [
        pytest.param(["monday"], id="long-name"),
        pytest.param(["Mon"], id="capitalised"),
        pytest.param(["mon-funday"], id="unknown-range-end"),
        pytest.param(["mon-fri-sat"], id="three-part-range"),
        pytest.param(["mon fri"], id="space"),
        pytest.param(["-"], id="dash"),
        pytest.param(["-fri"], id="no-range-start"),
        pytest.param([""], id="empty-name"),
        pytest.param(["mon", "xyz"], id="one-bad-of-two"),
    ],
)
def test_unknown_day_names_are_refused(items: list[str]) -> None:
    """A word that is not a day or a day range raises, quoting it."""
    with pytest.raises(WindowSyntaxError, match="not a day or day range"):
        parse_days(items)


def test_no_days_is_refused() -> None:
    """An empty day list raises (a window on no day is a mistake)."""
    with pytest.raises(WindowSyntaxError, match="at least one day"):
        parse_days([])


def test_range_without_an_end_is_refused() -> None:
    """'mon-' (a range cut short, e.g. a typo for 'mon-fri') raises."""
    with pytest.raises(WindowSyntaxError):
        parse_days(["mon-"])


# --- Times and zones ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end", "minutes"),
    [
        pytest.param("07:30", "19:00", (450, 1140), id="day"),
        pytest.param("00:00", "24:00", (0, 1440), id="whole-day-24-00-end"),
        pytest.param("22:00", "06:00", (1320, 360), id="over-midnight"),
        pytest.param("23:59", "00:00", (1439, 0), id="last-minute"),
    ],
)
def test_parse_times(start: str, end: str, minutes: tuple[int, int]) -> None:
    """HH:MM is minutes after midnight; 24:00 is the end of the day."""
    parsed = window(["mon"], start, end)
    assert (parsed.start_minute, parsed.end_minute) == minutes


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        pytest.param("07:00", "24:30", "to must be HH:MM", id="24-30"),
        pytest.param("7:00", "19:00", "from must be HH:MM", id="one-digit-hour"),
        pytest.param("07:00", "19:60", "to must be HH:MM", id="minute-60"),
        pytest.param("25:00", "19:00", "from must be HH:MM", id="hour-25"),
        pytest.param("07:00:00", "19:00", "from must be HH:MM", id="seconds"),
        pytest.param("0700", "19:00", "from must be HH:MM", id="no-colon"),
        pytest.param(" 07:00", "19:00", "from must be HH:MM", id="leading-space"),
        pytest.param("07:00", "", "to must be HH:MM", id="empty"),
        pytest.param("24:00", "06:00", "from must be before 24:00", id="start-24-00"),
    ],
)
def test_bad_times_are_refused(start: str, end: str, message: str) -> None:
    """A time that is not HH:MM in 00:00..24:00 raises, naming from or to."""
    with pytest.raises(WindowSyntaxError, match=message):
        window(["mon"], start, end)


@pytest.mark.parametrize(
    "zone",
    [
        pytest.param("Mars/Olympus_Mons", id="unknown"),
        pytest.param("", id="empty"),
        pytest.param("../../etc/passwd", id="path-escape"),
        pytest.param("/etc/localtime", id="absolute-path"),
        pytest.param("Europe", id="directory"),
        pytest.param("europe/berlin", id="wrong-case"),
    ],
)
def test_unknown_zone_is_refused(zone: str) -> None:
    """A zone that is not an IANA zone name raises (never an OSError or a KeyError)."""
    with pytest.raises(WindowSyntaxError, match="unknown time zone"):
        window(["mon"], "07:00", "19:00", zone)


def test_str_shows_the_window_as_written() -> None:
    """str() is the days, times and zone (what an outside_window refusal shows)."""
    assert str(window(["mon-fri"], "07:00", "19:00", BERLIN)) == (
        "mon,tue,wed,thu,fri 07:00-19:00 Europe/Berlin"
    )


# --- End of the occurrence ------------------------------------------------------------

OFFICE = window(["mon-fri"], "07:00", "19:00")
FRIDAY_NIGHT = window(["fri"], "22:00", "06:00")
WEEKNIGHTS = window(["mon-fri"], "22:00", "06:00")
WHOLE_SATURDAY = window(["sat"], "00:00", "24:00")
BERLIN_OFFICE = window(["mon-fri"], "07:00", "19:00", BERLIN)
BERLIN_SATURDAY = window(["sat"], "00:00", "24:00", BERLIN)
BERLIN_EARLY_SUNDAY = window(["sun"], "00:00", "06:00", BERLIN)
BERLIN_SATURDAY_NIGHT = window(["sat"], "22:00", "06:00", BERLIN)


@pytest.mark.parametrize(
    ("tw", "at", "end"),
    [
        # A day window, Monday to Friday 07:00-19:00 UTC.
        pytest.param(OFFICE, utc(3, 2, 12), utc(3, 2, 19), id="day-inside"),
        pytest.param(OFFICE, utc(3, 2, 7), utc(3, 2, 19), id="day-at-start"),
        pytest.param(
            OFFICE, utc(3, 2, 18, 59, 59), utc(3, 2, 19), id="day-last-second"
        ),
        pytest.param(OFFICE, utc(3, 2, 6, 59, 59), None, id="day-before-start"),
        pytest.param(OFFICE, utc(3, 2, 19), None, id="day-at-end-is-outside"),
        pytest.param(OFFICE, utc(3, 7, 12), None, id="day-on-saturday"),
        pytest.param(WHOLE_SATURDAY, utc(3, 7, 23, 59), utc(3, 8, 0), id="until-24-00"),
        pytest.param(WHOLE_SATURDAY, utc(3, 8, 0), None, id="24-00-end-is-outside"),
        # Over midnight: Friday 22:00 to Saturday 06:00 UTC.
        pytest.param(FRIDAY_NIGHT, utc(3, 6, 23), utc(3, 7, 6), id="night-evening"),
        pytest.param(FRIDAY_NIGHT, utc(3, 6, 22), utc(3, 7, 6), id="night-at-start"),
        pytest.param(FRIDAY_NIGHT, utc(3, 7, 3), utc(3, 7, 6), id="night-next-morning"),
        pytest.param(FRIDAY_NIGHT, utc(3, 7, 6), None, id="night-at-end"),
        pytest.param(FRIDAY_NIGHT, utc(3, 6, 21, 59), None, id="night-before-start"),
        pytest.param(
            FRIDAY_NIGHT, utc(3, 6, 3), None, id="night-morning-after-unlisted-thursday"
        ),
        pytest.param(FRIDAY_NIGHT, utc(3, 7, 23), None, id="night-unlisted-saturday"),
        pytest.param(
            WEEKNIGHTS, utc(3, 2, 3), None, id="weeknights-monday-morning-after-sunday"
        ),
        pytest.param(
            WEEKNIGHTS, utc(3, 3, 3), utc(3, 3, 6), id="weeknights-tuesday-morning"
        ),
        pytest.param(
            WEEKNIGHTS, utc(3, 7, 3), utc(3, 7, 6), id="weeknights-saturday-morning"
        ),
        # Europe/Berlin judged with UTC moments: +01:00 in winter, +02:00 in summer.
        pytest.param(
            BERLIN_OFFICE, utc(3, 2, 6, 30), utc(3, 2, 18), id="berlin-winter-inside"
        ),
        pytest.param(BERLIN_OFFICE, utc(3, 2, 5, 59), None, id="berlin-winter-before"),
        pytest.param(BERLIN_OFFICE, utc(3, 2, 18), None, id="berlin-winter-at-end"),
        pytest.param(
            BERLIN_OFFICE, utc(7, 6, 5, 30), utc(7, 6, 17), id="berlin-summer-inside"
        ),
        pytest.param(BERLIN_OFFICE, utc(7, 6, 17, 30), None, id="berlin-summer-after"),
        pytest.param(
            BERLIN_SATURDAY,
            utc(3, 6, 23, 30),
            utc(3, 7, 23),
            id="berlin-friday-utc-is-saturday-local",
        ),
        pytest.param(
            BERLIN_SATURDAY, utc(3, 7, 23, 30), None, id="berlin-saturday-utc-is-sunday"
        ),
        # Daylight saving changes inside the window: the end moves with the clock.
        pytest.param(
            BERLIN_EARLY_SUNDAY,
            utc(3, 29, 0, 30),
            utc(3, 29, 4),
            id="dst-spring-before",
        ),
        pytest.param(
            BERLIN_EARLY_SUNDAY, utc(3, 29, 2), utc(3, 29, 4), id="dst-spring-after"
        ),
        pytest.param(BERLIN_EARLY_SUNDAY, utc(3, 29, 4), None, id="dst-spring-at-end"),
        pytest.param(
            BERLIN_EARLY_SUNDAY, utc(10, 25, 0, 30), utc(10, 25, 5), id="dst-autumn"
        ),
        pytest.param(
            BERLIN_SATURDAY_NIGHT,
            utc(3, 28, 22),
            utc(3, 29, 4),
            id="dst-spring-over-midnight",
        ),
    ],
)
def test_end_of_occurrence(tw: TimeWindow, at: datetime, end: datetime | None) -> None:
    """The end of the occurrence a moment falls in, as UTC; None outside the window."""
    got = tw.end_of_occurrence(at)
    assert got == end
    if got is not None:
        assert got.utcoffset() == timedelta(0)
        assert got > at


def test_any_aware_datetime_gives_the_same_end() -> None:
    """A moment given in another offset is judged as the same instant."""
    plus_five = datetime(2026, 3, 2, 17, 30, tzinfo=timezone(timedelta(hours=5)))
    assert BERLIN_OFFICE.end_of_occurrence(plus_five) == utc(3, 2, 18)
    assert BERLIN_OFFICE.end_of_occurrence(plus_five) == (
        BERLIN_OFFICE.end_of_occurrence(utc(3, 2, 12, 30))
    )


def test_naive_datetime_is_refused() -> None:
    """A naive datetime raises ValueError (a window needs to know the zone of a moment)."""
    with pytest.raises(ValueError, match="aware datetime"):
        OFFICE.end_of_occurrence(datetime(2026, 3, 2, 12, 0))


def test_end_is_after_the_moment_in_the_repeated_autumn_hour() -> None:
    """In the hour repeated in autumn, the occurrence ends at the next 02:30 (01:30 UTC)."""
    tw = window(["sun"], "00:00", "02:30", BERLIN)
    at = utc(10, 25, 1, 10)
    assert tw.end_of_occurrence(at) == utc(10, 25, 1, 30)


def test_end_in_the_spring_gap_is_when_the_window_closes() -> None:
    """An end time skipped by the clock change ends the occurrence when the clock jumps."""
    tw = window(["sun"], "00:00", "02:30", BERLIN)
    assert tw.end_of_occurrence(utc(3, 29, 1, 15)) is None  # 03:15 CEST: closed
    assert tw.end_of_occurrence(utc(3, 29, 0, 30)) == utc(3, 29, 1)
