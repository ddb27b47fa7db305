"""A simulated lab water purification instrument, for the demo and the tests.

Theory of operation
===================
The pure functions make the records a real instrument would hand its agent
(:mod:`relay.proto.feed`): a day's statistics, an alarm, the configuration and
the consumables' state. They read no clock and draw from the ``random.Random``
they are given, so a seed gives the same records every time (the browser tests
count on it).

:func:`run_simulated_instrument` is the instrument's side of the spool
directory (:mod:`relay.feed_spool`, docs/instrument-integration.md), doing
what an instrument maker's software would: it backfills daily statistics for
the last days (so the demo's charts have data at once), keeps the snapshots
current, raises an alarm now and then, and clears most of them a little later.
Every file is written under a temporary name and renamed, as the guide asks.

The figures follow a type I (ultrapure) water system: product water at about
18.2 MΩ·cm and a few ppb of TOC, fed from reverse osmosis water at a few
µS/cm; the resistivity drifts down slowly as the purification cartridge ages.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Final

import trio

from relay.proto import feed

__all__ = [
    "ALARM_CATALOGUE",
    "INSTRUMENT_OFFSET",
    "AlarmKind",
    "alarm_clears",
    "cleared",
    "configuration_snapshot",
    "consumables_snapshot",
    "daily_stats_for",
    "daily_stats_history",
    "random_alarm",
    "run_simulated_instrument",
    "write_record",
    "write_snapshot",
]

#: The instrument's clock runs on local time (UTC+1, a lab in central Europe).
INSTRUMENT_OFFSET: Final = timezone(timedelta(hours=1))
#: In the spool: the last day whose statistics the simulation wrote.
_BACKFILL_MARKER: Final = ".simulated-instrument-stats-through"
#: The day the simulated cartridge was installed; its age drives the drift.
_CARTRIDGE_DAY: Final = date(2026, 1, 5)


@dataclass(frozen=True, slots=True)
class AlarmKind:
    """One alarm the instrument can raise."""

    code: str
    severity: str
    text: str
    #: Whether it clears by itself after a while (a leak does not).
    clears: bool


#: Alarms of a water purification system, with realistic codes and texts.
ALARM_CATALOGUE: Final = (
    AlarmKind(
        "E101",
        "alarm",
        "Product water resistivity below limit (< 10.0 MΩ·cm)",
        clears=True,
    ),
    AlarmKind("E102", "warning", "TOC above limit (> 10 ppb)", clears=True),
    AlarmKind(
        "W201",
        "warning",
        "Purification cartridge nearing end of life (< 10 % remaining)",
        clears=False,
    ),
    AlarmKind("E301", "alarm", "UV lamp fault (185/254 nm): no intensity", clears=True),
    AlarmKind("C401", "critical", "Leak detected under the system", clears=False),
    AlarmKind("W501", "warning", "Storage tank level low (< 10 %)", clears=True),
    AlarmKind(
        "W502",
        "warning",
        "Feed water conductivity high (> 50 µS/cm)",
        clears=True,
    ),
    AlarmKind("I601", "info", "Sanitization due within 7 days", clears=False),
    AlarmKind(
        "E701",
        "alarm",
        "Final filter (0.22 µm) pressure drop high: replace the filter",
        clears=False,
    ),
)


def _round(value: float, digits: int) -> float:
    return float(round(value, digits))


def daily_stats_for(day: date, rng: random.Random) -> feed.DailyStats:
    """The statistics of *day* as the instrument reports them at 23:59 local time."""
    age_days = max(0, (day - _CARTRIDGE_DAY).days)
    weekend = day.weekday() >= 5
    dispensed = rng.uniform(8, 40) if weekend else rng.uniform(120, 420)
    # Resistivity: 18.2 at best, sagging a little as the cartridge ages.
    resistivity = min(18.2, 18.2 - age_days * 0.0015 - abs(rng.gauss(0, 0.03)))
    values = (
        feed.Measurement("product_water_resistivity", _round(resistivity, 2), "MΩ·cm"),
        feed.Measurement(
            "toc",
            _round(max(1.0, 2.5 + age_days * 0.004 + rng.gauss(0, 0.4)), 1),
            "ppb",
        ),
        feed.Measurement("volume_dispensed", _round(dispensed, 1), "L"),
        feed.Measurement(
            "dispense_count",
            float(int(dispensed / rng.uniform(1.5, 3.0))),
            "",
        ),
        feed.Measurement(
            "operating_hours",
            _round(rng.uniform(2, 5) if weekend else rng.uniform(9, 16), 1),
            "h",
        ),
        feed.Measurement(
            "feed_water_conductivity", _round(rng.uniform(4, 18), 1), "µS/cm"
        ),
        feed.Measurement("temperature", _round(rng.uniform(21.0, 25.5), 1), "°C"),
    )
    return feed.DailyStats(
        day=day,
        device_time=datetime.combine(day, time(23, 59), INSTRUMENT_OFFSET),
        values=values,
    )


def daily_stats_history(
    end_day: date, days: int, rng: random.Random
) -> list[feed.DailyStats]:
    """The statistics of the *days* days that end with *end_day*, oldest first."""
    return [
        daily_stats_for(end_day - timedelta(days=offset), rng)
        for offset in range(days - 1, -1, -1)
    ]


def random_alarm(at: datetime, rng: random.Random) -> feed.Alarm:
    """An alarm raised at *at* (timezone-aware), from :data:`ALARM_CATALOGUE`."""
    kind = rng.choice(ALARM_CATALOGUE)
    return feed.Alarm(
        code=kind.code,
        severity=kind.severity,
        text=kind.text,
        device_time=at.astimezone(INSTRUMENT_OFFSET).replace(microsecond=0),
        state="raised",
    )


def cleared(alarm: feed.Alarm, at: datetime) -> feed.Alarm:
    """*alarm*, cleared at *at*."""
    return feed.Alarm(
        code=alarm.code,
        severity=alarm.severity,
        text=alarm.text,
        device_time=at.astimezone(INSTRUMENT_OFFSET).replace(microsecond=0),
        state="cleared",
    )


def alarm_clears(alarm: feed.Alarm) -> bool:
    """Whether the condition behind *alarm* goes away by itself."""
    return any(k.code == alarm.code and k.clears for k in ALARM_CATALOGUE)


def configuration_snapshot(at: datetime) -> feed.Configuration:
    """The instrument's configuration as it stood at *at*."""
    p = feed.Parameter
    return feed.Configuration(
        device_time=at.astimezone(INSTRUMENT_OFFSET).replace(microsecond=0),
        parameters=(
            p("model", "Ultrapure 18 (type I)"),
            p("firmware_version", "4.2.1"),
            p("serial_number", "UP18-2026-004711"),
            p("resistivity_alarm_limit", 10.0, "MΩ·cm"),
            p("toc_alarm_limit", 10.0, "ppb"),
            p("feed_conductivity_alarm_limit", 50.0, "µS/cm"),
            p("temperature_compensation", True),
            p("reference_temperature", 25.0, "°C"),
            p("dispense_volume_default", 1.0, "L"),
            p("dispense_flow_rate", 2.0, "L/min"),
            p("recirculation_interval", 60.0, "min"),
            p("tank_low_level", 10.0, "%"),
            p("sanitization_interval", 90.0, "d"),
            p("uv_lamp", True),
            p("language", "en"),
            p("units", "metric"),
        ),
    )


#: The simulated consumables: (name, part, installed on, lifetime in days, serial).
_CONSUMABLES: Final = (
    (
        "purification_cartridge",
        "Purification cartridge (mixed-bed ion exchange + activated carbon)",
        _CARTRIDGE_DAY,
        365,
        "PC-260105-0117",
    ),
    ("final_filter", "Final filter 0.22 µm", date(2026, 10, 1), 90, "FF-261001-2240"),
    ("uv_lamp", "UV lamp 185/254 nm", date(2025, 6, 16), 730, "UV-250616-0932"),
    (
        "vent_filter",
        "Tank vent filter (CO2 trap)",
        date(2026, 8, 20),
        180,
        "VF-260820-0415",
    ),
)


def consumables_snapshot(at: datetime, rng: random.Random) -> feed.Consumables:
    """The consumables' state at *at*: what is left of each, since when it is in.

    What is left goes down with the days since installation (the instrument's
    own estimate, with a little of *rng*'s noise, as a sensor-based one has).
    """
    today = at.astimezone(INSTRUMENT_OFFSET).date()
    items = []
    for name, part, installed, lifetime_days, serial in _CONSUMABLES:
        installed_on = min(installed, today)
        used = (today - installed_on).days / lifetime_days * 100
        left = min(100.0, max(0.0, 100 - used + rng.uniform(-0.5, 0.5)))
        items.append(feed.Consumable(name, part, _round(left, 1), installed_on, serial))
    return feed.Consumables(
        device_time=at.astimezone(INSTRUMENT_OFFSET).replace(microsecond=0),
        items=tuple(items),
    )


# The instrument's side of the spool ---------------------------------------------


def write_record(spool: Path, record: feed.Record, name: str) -> Path:
    """Write *record* as ``outbox/<name>.<kind>.json``: temp file, then rename.

    Returns:
        The file's final path.
    """
    outbox = spool / "outbox"
    (outbox / "tmp").mkdir(parents=True, exist_ok=True)
    final = outbox / f"{name}.{feed.kind_of(record)}.json"
    _write_atomically(outbox / "tmp" / final.name, final, record)
    return final


def write_snapshot(spool: Path, record: feed.Configuration | feed.Consumables) -> Path:
    """Replace ``snapshots/<kind>.json`` with *record*, atomically."""
    snapshots = spool / "snapshots"
    snapshots.mkdir(parents=True, exist_ok=True)
    final = snapshots / f"{feed.kind_of(record)}.json"
    _write_atomically(snapshots / f".{final.name}.tmp", final, record)
    return final


def _write_atomically(tmp: Path, final: Path, record: feed.Record) -> None:
    tmp.write_text(
        json.dumps(feed.to_json(record), ensure_ascii=False, indent=1), encoding="utf-8"
    )
    os.replace(tmp, final)


async def run_simulated_instrument(
    spool: Path,
    *,
    rng: random.Random,
    alarm_every_s: float = 45.0,
    clear_after_s: float = 20.0,
    stats_backfill_days: int = 30,
    wall_clock: Callable[[], datetime] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Be the instrument's software on *spool* until cancelled.

    At start: the daily statistics of the last *stats_backfill_days* days
    (yesterday and before; after a restart only the days not written before)
    and both snapshots. Then, about every
    *alarm_every_s* (randomly spread), an alarm; one that clears by itself is
    cleared *clear_after_s* later. Snapshots are refreshed with each alarm.

    Args:
        spool: The agent's spool directory (``feed_dir``).
        rng: All randomness (a seed gives the same instrument).
        alarm_every_s: Mean time between alarms.
        clear_after_s: How long a self-clearing alarm stays raised.
        stats_backfill_days: Days of statistics written at start.
        wall_clock: A callable giving the current aware datetime (tests);
            the system clock by default.
        task_status: Started once the backfill and snapshots are written.
    """
    now = wall_clock if wall_clock is not None else (lambda: datetime.now(UTC))
    start = now()
    today = start.astimezone(INSTRUMENT_OFFSET).date()
    await trio.to_thread.run_sync(
        _backfill, spool, today, stats_backfill_days, rng, start
    )
    task_status.started()
    counter = 0
    last_day = today
    async with trio.open_nursery() as nursery:
        while True:
            await trio.sleep(rng.uniform(0.5, 1.5) * alarm_every_s)
            moment = now()
            counter += 1
            day = moment.astimezone(INSTRUMENT_OFFSET).date()
            if day != last_day:
                # Day's end passed while running: that day's statistics.
                stats = daily_stats_for(last_day, rng)
                await trio.to_thread.run_sync(_write_day, spool, stats)
                last_day = day
            alarm = random_alarm(moment, rng)
            await trio.to_thread.run_sync(
                _write_alarm_and_snapshots, spool, alarm, moment, rng, counter
            )
            if alarm_clears(alarm):
                nursery.start_soon(
                    _clear_later, spool, alarm, now, clear_after_s, counter
                )


def _backfill(
    spool: Path, today: date, days: int, rng: random.Random, at: datetime
) -> None:
    # A restarted demo writes only the days it has not written yet: a day's
    # statistics are reported once, as a real instrument does.
    marker = spool / _BACKFILL_MARKER
    try:
        done = date.fromisoformat(marker.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        done = date.min
    yesterday = today - timedelta(days=1)
    for stats in daily_stats_history(yesterday, days, rng):
        if stats.day > done:
            _write_day(spool, stats)
    write_snapshot(spool, configuration_snapshot(at))
    write_snapshot(spool, consumables_snapshot(at, rng))


def _write_day(spool: Path, stats: feed.DailyStats) -> None:
    write_record(spool, stats, f"stats-{stats.day.isoformat()}")
    (spool / _BACKFILL_MARKER).write_text(stats.day.isoformat(), encoding="ascii")


def _write_alarm_and_snapshots(
    spool: Path, alarm: feed.Alarm, at: datetime, rng: random.Random, counter: int
) -> None:
    write_record(spool, alarm, f"alarm-{at:%Y%m%dT%H%M%S}-{counter:06d}-raised")
    write_snapshot(spool, configuration_snapshot(at))
    write_snapshot(spool, consumables_snapshot(at, rng))


async def _clear_later(
    spool: Path,
    alarm: feed.Alarm,
    now: Callable[[], datetime],
    after_s: float,
    counter: int,
) -> None:
    await trio.sleep(after_s)
    moment = now()
    name = f"alarm-{moment:%Y%m%dT%H%M%S}-{counter:06d}-cleared"
    await trio.to_thread.run_sync(write_record, spool, cleared(alarm, moment), name)
