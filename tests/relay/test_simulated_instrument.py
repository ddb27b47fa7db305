"""The simulated water purification instrument (relay.simulated_instrument)."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import trio

from relay.agent_queue import canonical_body
from relay.feed_spool import FeedSpool
from relay.proto import feed
from relay.simulated_instrument import (
    ALARM_CATALOGUE,
    configuration_snapshot,
    consumables_snapshot,
    daily_stats_for,
    daily_stats_history,
    random_alarm,
    run_simulated_instrument,
)


def seeded(seed: int) -> random.Random:
    """Repeatable simulated readings (not secrets)."""
    return random.Random(seed)  # noqa: S311 - a seeded generator on purpose


T0 = datetime(2026, 11, 27, 9, 30, tzinfo=UTC)


def roundtrip(record: feed.Record) -> feed.Record:
    return feed.parse_record(
        feed.kind_of(record), canonical_body(record), max_bytes=16 * 1024
    )


def test_every_record_passes_the_feeds_check() -> None:
    """All simulated records are valid feed records and survive their canonical form."""
    rng = seeded(7)
    records: list[feed.Record] = [
        *daily_stats_history(date(2026, 11, 26), 30, rng),
        *(random_alarm(T0 + timedelta(minutes=n), rng) for n in range(50)),
        configuration_snapshot(T0),
        consumables_snapshot(T0, rng),
    ]
    for record in records:
        assert roundtrip(record) == record


def test_daily_statistics_are_realistic_and_named_with_units() -> None:
    """A day has the named values of a type I water system, at 23:59 local time."""
    stats = daily_stats_for(date(2026, 11, 26), seeded(1))
    values = {m.name: (m.value, m.unit) for m in stats.values}
    assert set(values) == {
        "product_water_resistivity",
        "toc",
        "volume_dispensed",
        "dispense_count",
        "operating_hours",
        "feed_water_conductivity",
        "temperature",
    }
    resistivity, unit = values["product_water_resistivity"]
    assert 17.0 < resistivity <= 18.2
    assert unit == "MΩ·cm"
    assert values["toc"][1] == "ppb"
    assert values["temperature"][1] == "°C"
    assert values["feed_water_conductivity"][1] == "µS/cm"
    assert (stats.device_time.hour, stats.device_time.minute) == (23, 59)
    assert stats.device_time.utcoffset() == timedelta(hours=1)


def test_history_is_consecutive_days_and_reproducible() -> None:
    """The history ends on the given day, oldest first; a seed gives the same days."""
    history = daily_stats_history(date(2026, 11, 26), 30, seeded(3))
    assert [s.day for s in history] == [
        date(2026, 10, 28) + timedelta(days=n) for n in range(30)
    ]
    assert history == daily_stats_history(date(2026, 11, 26), 30, seeded(3))


def test_alarms_come_from_the_catalogue() -> None:
    """Random alarms use the catalogue's codes, texts and severities."""
    rng = seeded(5)
    alarms = [random_alarm(T0, rng) for _ in range(40)]
    catalogue = {(k.code, k.severity, k.text) for k in ALARM_CATALOGUE}
    assert {(a.code, a.severity, a.text) for a in alarms} <= catalogue
    assert len({a.code for a in alarms}) > 3


def test_consumables_name_the_four_parts() -> None:
    """Cartridge, 0.22 µm filter, 185/254 nm lamp and vent filter, with what is left."""
    items = consumables_snapshot(T0, seeded(2)).items
    assert [i.name for i in items] == [
        "purification_cartridge",
        "final_filter",
        "uv_lamp",
        "vent_filter",
    ]
    assert "0.22 µm" in items[1].part
    assert "185/254 nm" in items[2].part
    assert all(0 <= i.remaining_percent <= 100 and i.serial for i in items)


async def test_the_task_backfills_and_raises_alarms(tmp_path: Path) -> None:
    """The instrument writes 30 days of statistics and snapshots, then alarms, via the spool."""
    spool = FeedSpool(tmp_path / "feed", max_record_bytes=16 * 1024)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: run_simulated_instrument(
                    spool.root,
                    rng=seeded(1),
                    alarm_every_s=0.05,
                    clear_after_s=0.01,
                    stats_backfill_days=30,
                    wall_clock=lambda: T0,
                    task_status=task_status,
                )
            )
            assert spool.read_snapshot("configuration") == configuration_snapshot(T0)
            assert isinstance(spool.read_snapshot("consumables"), feed.Consumables)
            await trio.sleep(0.3)
            nursery.cancel_scope.cancel()
    records: list[feed.Record] = []
    taken = spool.take_outbox(records.append)
    assert not taken.refused
    stats = [r for r in records if isinstance(r, feed.DailyStats)]
    alarms = [r for r in records if isinstance(r, feed.Alarm)]
    assert len(stats) == 30
    assert stats[-1].day == date(2026, 11, 26)
    assert alarms


async def test_a_restart_does_not_report_a_day_twice(tmp_path: Path) -> None:
    """Started again (the next day), the instrument backfills only the new day."""
    spool = FeedSpool(tmp_path / "feed", max_record_bytes=16 * 1024)

    async def start_at(moment: datetime) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: run_simulated_instrument(
                    spool.root,
                    rng=seeded(1),
                    alarm_every_s=3600,
                    stats_backfill_days=30,
                    wall_clock=lambda: moment,
                    task_status=task_status,
                )
            )
            nursery.cancel_scope.cancel()

    await start_at(T0)
    first: list[feed.Record] = []
    spool.take_outbox(first.append)
    await start_at(T0)
    await start_at(T0 + timedelta(days=1))
    second: list[feed.Record] = []
    spool.take_outbox(second.append)
    assert len(first) == 30
    assert [r.day for r in second if isinstance(r, feed.DailyStats)] == [
        date(2026, 11, 27)
    ]
