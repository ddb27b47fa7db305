"""Soak, short mode: sessions opening and closing under load against a real
``relay serve``, then nothing left over (reference section 5.6 i-iii; F5).

The harness is :mod:`reliability.soak` (its docstring describes the load and the
measurements); the hour-long run is ``python -m reliability.soak --minutes 60``.
Here: 50 devices and 4 engineers with 2 session workers each, for
``scorecard.scaled(60, 300)`` seconds of load (500 devices, 8 x 3 workers in
the scorecard run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from prometheus_client import generate_latest

from relay.metrics import RelayMetrics
from reliability import scorecard
from reliability.soak import (
    CI_RSS_GROWTH_LIMIT_PCT,
    DRIFT_TOLERANCE,
    ENDINGS,
    RSS_GROWTH_LIMIT_PCT,
    SoakConfig,
    SoakResult,
    run_soak,
)


def _tasks_gauge(metrics: RelayMetrics) -> float:
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith("relay_trio_tasks "):
            return float(line.split()[1])
    raise AssertionError("relay_trio_tasks is not exposed")


async def test_the_trio_tasks_gauge_follows_the_tasks_alive_at_scrape_time() -> None:
    """relay_trio_tasks (added for the soak) goes up by the tasks started and
    back down when they end; outside a trio run it is NaN, not an error."""
    metrics = RelayMetrics()
    before = _tasks_gauge(metrics)
    assert before >= 1
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(trio.sleep_forever)
        await trio.testing.wait_all_tasks_blocked()
        assert _tasks_gauge(metrics) == before + 5
        nursery.cancel_scope.cancel()
    assert _tasks_gauge(metrics) == before
    outside = await trio.to_thread.run_sync(_tasks_gauge, metrics)
    assert math.isnan(outside)


@dataclass(frozen=True)
class _Soak:
    config: SoakConfig
    result: SoakResult


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> _Soak:
    """One soak run, which the tests below read (it takes a minute or more)."""
    full = scorecard.full()
    config = SoakConfig(
        load_s=scorecard.scaled(60, 300),
        devices=int(scorecard.scaled(50, 500)),
        engineers=8 if full else 4,
        workers_per_engineer=3 if full else 2,
        max_transfer=(4 if full else 1) * 1024 * 1024,
    )
    result = run_soak(config, keep=tmp_path_factory.mktemp("soak"))
    print(result.summary())  # shown with -s, and on failure
    return _Soak(config, result)


def _rss_limit() -> float:
    return RSS_GROWTH_LIMIT_PCT if scorecard.full() else CI_RSS_GROWTH_LIMIT_PCT


def test_sessions_under_load_leave_no_fd_task_or_session_behind(soak: _Soak) -> None:
    """Every transfer arrives intact, every session has one start and one end
    with the reason it was ended by, the audit chain verifies, and the broker's
    fds and trio tasks come back to their baseline."""
    config, result = soak.config, soak.result
    assert result.errors == []
    assert result.fleet_problems == []
    assert result.baseline is not None
    assert result.warmed is not None
    assert result.after is not None
    # The load was real: every session moved data, every way of ending was used.
    assert len(result.runs) >= 2 * len(ENDINGS)
    assert result.transfers == len(result.runs)
    assert result.sha_mismatches == 0
    assert result.keys_echoed > 0
    assert set(result.audit.ends_by_reason) == set(ENDINGS)
    # Nothing left open.
    assert result.sessions_open_after == 0
    assert result.devices_connected_after == config.devices
    # Resources back at the baseline (resident memory: the next test).
    assert abs(result.drift("counted_fds")) <= DRIFT_TOLERANCE, result.summary()
    assert abs(result.drift("tasks")) <= DRIFT_TOLERANCE, result.summary()
    # The audit log adds up.
    assert result.audit.sessions_started == len(result.runs)
    assert result.audit.sessions_with_one_end == result.audit.sessions_started
    assert result.audit.reason_mismatches == []
    assert result.audit.unknown_sessions == []
    assert result.audit.chain == "verified"
    assert result.problems(math.inf) == []
    name = f"soak {config.devices} devices, {result.seconds_of_load / 60:.0f} min"
    scorecard.record_load(
        name,
        devices=config.devices,
        engineers=config.engineers,
        concurrent_sessions=config.engineers * config.workers_per_engineer,
        sessions=len(result.runs),
        transfers=result.transfers,
        bytes=result.bytes_transferred,
        keys_echoed=result.keys_echoed,
        minutes=round(result.seconds_of_load / 60, 2),
        ends_by_reason=result.audit.ends_by_reason,
    )
    scorecard.record_nothing_lost(
        name,
        sessions_started=result.audit.sessions_started,
        sessions_with_one_end=result.audit.sessions_with_one_end,
        sha_mismatches=result.sha_mismatches,
        transfers=result.transfers,
        bytes=result.bytes_transferred,
        fd_drift=result.drift("counted_fds"),
        socket_drift=result.drift("sockets"),
        store_connections=result.after.store_connections,
        task_drift=result.drift("tasks"),
        rss_growth_pct=round(result.rss_growth_pct(), 2),
        rss_growth_limit_pct=_rss_limit(),
        rss_back_to_baseline=result.rss_growth_pct() < _rss_limit(),
        rss_growth_since_baseline_pct=round(result.rss_growth_pct("baseline"), 2),
        rss_mib={
            "baseline": round(result.baseline.rss_bytes / 2**20, 1),
            "warmed": round(result.warmed.rss_bytes / 2**20, 1),
            "end": round(result.after.rss_bytes / 2**20, 1),
        },
        malloc=result.allocator,
        sessions_open_after=result.sessions_open_after,
        chain=result.audit.chain,
    )


def test_sessions_under_load_leave_no_memory_behind(soak: _Soak) -> None:
    """The broker's resident memory comes back to its level after the warm-up."""
    result = soak.result
    assert result.rss_growth_pct() < _rss_limit(), result.summary()
