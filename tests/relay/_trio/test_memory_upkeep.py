"""The memory upkeep: cycles collected, the C heap trimmed, each run measured."""

from __future__ import annotations

import gc
import platform
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client import generate_latest

from relay._trio.memory_upkeep import _load_malloc_trim, run_memory_upkeep
from relay.config import BrokerConfig
from relay.config_file import ConfigError, load_config
from relay.metrics import RelayMetrics


class _Cycle:
    """An object that only the cyclic collector frees (like a closed SSLStream)."""

    def __init__(self) -> None:
        self.me = self


def _runs(metrics: RelayMetrics) -> float:
    value = metrics.registry.get_sample_value("relay_memory_upkeep_seconds_count")
    return value or 0.0


@pytest.fixture
def patient_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after 0.1 s of real idleness.

    The trim runs in a worker thread; a clock that jumped at once would race
    past the test's deadline while the thread is still running.
    """
    return trio.testing.MockClock(autojump_threshold=0.1)


class _FakeTrim:
    """Stands for malloc_trim: records its argument, tells the test it ran."""

    def __init__(self) -> None:
        self.pads: list[int] = []
        self.ran = trio.Event()

    def __call__(self, pad: int) -> int:  # called in a worker thread
        self.pads.append(pad)
        trio.from_thread.run_sync(self.ran.set)
        return 1

    async def next_run(self) -> float:
        """Wait (virtual time) for the next run; the time it took."""
        start = trio.current_time()
        with trio.fail_after(120):  # a broken upkeep fails, never hangs
            await self.ran.wait()
        self.ran = trio.Event()
        return trio.current_time() - start


async def test_each_run_collects_cycles_then_trims_the_heap(
    patient_clock: trio.testing.MockClock,
) -> None:
    metrics = RelayMetrics()
    trim = _FakeTrim()
    collected_before = metrics.registry.get_sample_value(
        "relay_gc_collected_objects_total"
    )
    assert collected_before is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: run_memory_upkeep(30, metrics, malloc_trim=trim))
        for _ in range(50):
            _Cycle()
        assert await trim.next_run() == pytest.approx(30)
        assert trim.pads == [0]  # pad 0: nothing kept at the top of the heap
        # A run is measured once its trim has returned: the first run's
        # figures are in by the time the second run trims.
        assert await trim.next_run() == pytest.approx(30)
        assert _runs(metrics) == 1
        collected = metrics.registry.get_sample_value(
            "relay_gc_collected_objects_total"
        )
        assert collected is not None
        # 50 objects and their instance dicts, at least.
        assert collected - collected_before >= 50
        assert await trim.next_run() == pytest.approx(30)
        assert trim.pads == [0, 0, 0]
        assert _runs(metrics) == 2
        nursery.cancel_scope.cancel()


async def test_without_malloc_trim_the_collection_still_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = RelayMetrics()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: run_memory_upkeep(10, metrics, load_trim=lambda: None)
        )
        await trio.sleep(25)
        assert _runs(metrics) == 2
        nursery.cancel_scope.cancel()


async def test_interval_zero_turns_it_off() -> None:
    metrics = RelayMetrics()
    trim = _FakeTrim()
    with trio.fail_after(1):
        await run_memory_upkeep(0, metrics, malloc_trim=trim)
    assert trim.pads == []
    assert _runs(metrics) == 0


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="malloc_trim is glibc's",
)
def test_glibc_malloc_trim_is_found_and_callable() -> None:
    trim = _load_malloc_trim()
    assert trim is not None
    assert trim(0) in (0, 1)


def test_collected_objects_are_really_gone_after_a_full_collection() -> None:
    # What the upkeep relies on: a full collection frees a cycle that
    # reference counting left behind.
    gc.collect()
    cycle = _Cycle()
    ref_count_before = len(gc.get_referrers(_Cycle))
    del cycle
    assert any(isinstance(o, _Cycle) for o in gc.get_objects())
    gc.collect()
    assert not any(isinstance(o, _Cycle) for o in gc.get_objects())
    assert len(gc.get_referrers(_Cycle)) <= ref_count_before


def test_process_memory_is_exported() -> None:
    text = generate_latest(RelayMetrics().registry).decode()
    if Path("/proc/self/stat").exists():
        assert "process_resident_memory_bytes" in text
        assert "process_open_fds" in text
    assert "relay_memory_upkeep_seconds_bucket" in text


@pytest.mark.parametrize("value", ["-1", "0.5", "3601"])
def test_bad_interval_names_the_key(tmp_path: Path, value: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(f"memory_upkeep_s = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert "memory_upkeep_s must be 0 (off) or in 1..3600" in str(info.value)


def test_default_and_off() -> None:
    assert BrokerConfig().memory_upkeep_s == 30.0
    assert BrokerConfig(memory_upkeep_s=0).memory_upkeep_s == 0
