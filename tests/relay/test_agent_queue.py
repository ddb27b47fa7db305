"""The agent's on-disk queue of monitoring records (relay.agent_queue)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from relay.agent_queue import QUEUE_FULL_CODE, AgentQueue, canonical_body
from relay.proto import feed

T0 = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)


def alarm_body(code: str, minutes: int, severity: str = "alarm") -> str:
    return canonical_body(
        feed.Alarm(
            code=code,
            severity=severity,
            text=f"alarm {code}",
            device_time=T0 + timedelta(minutes=minutes),
        )
    )


def stats_body(day: int) -> str:
    return canonical_body(
        feed.DailyStats(
            day=date(2026, 11, day),
            device_time=datetime(2026, 11, day, 23, 59, tzinfo=UTC),
            values=(feed.Measurement("volume_dispensed", float(day), "L"),),
        )
    )


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[AgentQueue]:
    queue = AgentQueue(tmp_path / "q.sqlite3", max_records=4)
    yield queue
    queue.close()


def test_records_get_a_hex_key_and_keep_their_order(queue: AgentQueue) -> None:
    """Each record gets 32 lowercase hex as its key; they come out in arrival order."""
    ids = []
    for minute in range(3):
        intake = queue.enqueue("alarm", alarm_body("E1", minute))
        assert intake.record is not None
        assert re.fullmatch(r"[0-9a-f]{32}", intake.record.record_id)
        ids.append(intake.record.record_id)
    assert len(set(ids)) == 3
    assert [r.record_id for r in queue.next_records(10)] == ids
    assert queue.depth() == 3


def test_answers_to_requests_come_first(queue: AgentQueue) -> None:
    """A data request's answer is sent before the backlog."""
    queue.enqueue("daily_stats", stats_body(1))
    answer = queue.enqueue("configuration", "{}", request_id="a" * 32).record
    assert answer is not None
    assert queue.next_records(1)[0].record_id == answer.record_id


def test_next_records_skips_records_in_flight(queue: AgentQueue) -> None:
    """Records in flight are not offered again by next_records."""
    first = queue.enqueue("alarm", alarm_body("E1", 0)).record
    second = queue.enqueue("alarm", alarm_body("E2", 1)).record
    assert first is not None
    assert second is not None
    assert queue.next_records(2, exclude={first.record_id}) == [second]


def test_remove_forgets_a_record(queue: AgentQueue) -> None:
    """An acknowledged record leaves the queue for good."""
    record = queue.enqueue("alarm", alarm_body("E1", 0)).record
    assert record is not None
    assert queue.remove(record.record_id)
    assert not queue.remove(record.record_id)
    assert queue.depth() == 0
    assert queue.get(record.record_id) is None


def test_the_same_record_taken_again_keeps_its_key(queue: AgentQueue) -> None:
    """A record taken twice (the agent crashed before it deleted the
    instrument's file) is queued once, and after its ack it comes back under
    the same key, which the broker drops as a duplicate."""
    first = queue.enqueue("alarm", alarm_body("E1", 0)).record
    again = queue.enqueue("alarm", alarm_body("E1", 0)).record
    assert first is not None
    assert again is not None
    assert again.record_id == first.record_id
    assert queue.depth() == 1
    assert queue.remove(first.record_id)
    later = queue.enqueue("alarm", alarm_body("E1", 0)).record
    assert later is not None
    assert later.record_id == first.record_id
    # Another request's answer with the same body is another record.
    answer = queue.enqueue(
        "consumables", alarm_body("E1", 0), request_id="ab" * 16
    ).record
    assert answer is not None
    assert answer.record_id != first.record_id


def test_the_queue_survives_reopening_the_file(tmp_path: Path) -> None:
    """Records, their keys and the drop count are on disk, not in memory."""
    path = tmp_path / "q.sqlite3"
    first = AgentQueue(path, max_records=2)
    for day in (1, 2, 3):  # the third drops the first
        first.enqueue("daily_stats", stats_body(day))
    before = first.all_records()
    first.close()
    again = AgentQueue(path, max_records=2)
    assert again.all_records() == before
    assert again.dropped == 1


def test_full_queue_drops_the_oldest_daily_statistics_first(queue: AgentQueue) -> None:
    """With statistics queued, the oldest day goes first, never an alarm."""
    queue.enqueue("daily_stats", stats_body(1))
    queue.enqueue("alarm", alarm_body("E1", 0))
    queue.enqueue("daily_stats", stats_body(2))
    queue.enqueue("alarm", alarm_body("E2", 1))
    intake = queue.enqueue("alarm", alarm_body("E3", 2))
    assert intake.dropped_kinds == ("daily_stats",)
    kinds_days = [
        (r.kind, json.loads(r.body).get("day") or json.loads(r.body)["code"])
        for r in queue.all_records()
    ]
    assert kinds_days == [
        ("alarm", "E1"),
        ("daily_stats", "2026-11-02"),
        ("alarm", "E2"),
        ("alarm", "E3"),
    ]
    assert queue.dropped == 1


def test_incoming_statistics_are_dropped_when_only_alarms_remain(
    queue: AgentQueue,
) -> None:
    """Statistics arriving at a queue of alarms are the oldest statistics: dropped, counted."""
    for minute in range(4):
        queue.enqueue("alarm", alarm_body("E1", minute))
    intake = queue.enqueue("daily_stats", stats_body(5))
    assert intake.record is None
    assert intake.dropped_kinds == ("daily_stats",)
    assert [r.kind for r in queue.all_records()] == ["alarm"] * 4
    assert queue.dropped == 1


def test_alarms_are_collapsed_into_a_summary_never_dropped_silently(
    queue: AgentQueue,
) -> None:
    """With only alarms, the oldest become one RC-QUEUE-FULL alarm that says what was lost."""
    codes = ["E101", "C401", "E101", "W501", "E301", "W201"]
    for minute, code in enumerate(codes):
        severity = "critical" if code == "C401" else "alarm"
        queue.enqueue("alarm", alarm_body(code, minute, severity))
    records = queue.all_records()
    assert len(records) == 4
    summary = feed.parse_record("alarm", records[0].body, max_bytes=16384)
    assert isinstance(summary, feed.Alarm)
    assert summary.code == QUEUE_FULL_CODE
    assert summary.severity == "warning"
    # Six alarms into a queue of four: the first three are one summary.
    assert "3 alarms were dropped" in summary.text
    assert "E101, C401" in summary.text
    assert "worst severity critical" in summary.text
    assert "2026-11-27T08:00:00Z" in summary.text
    assert "2026-11-27T08:02:00Z" in summary.text
    assert summary.device_time == T0 + timedelta(minutes=2)
    rest = [json.loads(r.body)["code"] for r in records[1:]]
    assert rest == ["W501", "E301", "W201"]
    assert queue.dropped == 3


def test_a_changed_summary_gets_a_new_key(queue: AgentQueue) -> None:
    """A summary that grows is a new record to the broker (its old copy may be stored)."""
    for minute in range(5):
        queue.enqueue("alarm", alarm_body("E1", minute))
    key = queue.all_records()[0].record_id
    queue.enqueue("alarm", alarm_body("E1", 5))
    summary = queue.all_records()[0]
    assert summary.record_id != key
    assert "3 alarms were dropped" in json.loads(summary.body)["text"]


def test_records_in_flight_are_never_dropped(queue: AgentQueue) -> None:
    """A record sent and not yet acknowledged may be stored: it is not dropped."""
    first = queue.enqueue("daily_stats", stats_body(1)).record
    assert first is not None
    for day in (2, 3, 4):
        queue.enqueue("daily_stats", stats_body(day))
    queue.enqueue("daily_stats", stats_body(5), in_flight={first.record_id})
    days = [json.loads(r.body)["day"] for r in queue.all_records()]
    assert days == ["2026-11-01", "2026-11-03", "2026-11-04", "2026-11-05"]


def test_only_records_in_flight_lets_the_queue_go_one_over(tmp_path: Path) -> None:
    """Nothing droppable: the alarm is still queued (briefly one over the bound)."""
    queue = AgentQueue(tmp_path / "q.sqlite3", max_records=1)
    first = queue.enqueue("alarm", alarm_body("E1", 0)).record
    assert first is not None
    intake = queue.enqueue("alarm", alarm_body("E2", 1), in_flight={first.record_id})
    assert intake.record is not None
    assert queue.depth() == 2
    assert queue.dropped == 0


def test_a_summary_stays_bounded_whatever_the_codes(tmp_path: Path) -> None:
    """Hundreds of distinct long codes: the summary is still a valid alarm that
    keeps the count and the time range."""
    queue = AgentQueue(tmp_path / "q.sqlite3", max_records=2)
    for n in range(200):
        queue.enqueue("alarm", alarm_body(f"VERY-LONG-ALARM-CODE-{n:010d}", n))
    summary = feed.parse_record("alarm", queue.all_records()[0].body, max_bytes=16384)
    queue.close()
    assert isinstance(summary, feed.Alarm)
    assert summary.text.startswith(
        "The agent's queue was full: 199 alarms were dropped, "
        "from 2026-11-27T08:00:00Z to 2026-11-27T11:18:00Z"
    )
    assert len(summary.text) <= feed.MAX_TEXT_CHARS
