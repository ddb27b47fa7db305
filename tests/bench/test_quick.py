"""The benchmark suite's quick mode runs end to end (CI smoke; the numbers are `make bench`).

Never a timing assertion: a benchmark measures, it does not pass or fail on a
duration. What is checked is that every scenario ran against a real broker and
produced the figures the page is made of, and that the relayed data arrived
(a broken tunnel must not look fast).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.__main__ import SCENARIOS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if shutil.which("socat") is None:
        pytest.skip(
            "socat is not installed (the throughput baseline); .ci/run installs it"
        )
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    document: dict[str, Any] = json.loads((out / "quick.json").read_text())
    document["page"] = (out / "benchmarks.md").read_text()
    return document


def _result(run: dict[str, Any], name: str) -> dict[str, Any]:
    found = [r for r in run["results"] if r["name"] == name]
    assert len(found) == 1, [r["name"] for r in run["results"]]
    result: dict[str, Any] = found[0]
    return result


def test_every_scenario_reports_its_goals_and_tables(quick_run: dict[str, Any]) -> None:
    """Each scenario ran and put its goal rows and tables on the page."""
    assert [r["name"] for r in quick_run["results"]] == list(SCENARIOS)
    page = quick_run["page"]
    for result in quick_run["results"]:
        assert result["goals"], result["name"]
        assert result["tables"], result["name"]
        for goal in result["goals"]:
            assert goal["figure"] in page
            assert goal["met"] in (True, False)
    assert "(quick run: not judged)" in page
    assert quick_run["meta"]["machine"]["cores"] == str(os.cpu_count())


def test_latency_measured_both_paths_for_every_keystroke(
    quick_run: dict[str, Any],
) -> None:
    """Every keystroke came back through the relay and directly; no round trip is empty."""
    raw = _result(quick_run, "latency")["raw"]
    rounds = {k: v for k, v in raw.items() if k.isdigit()}
    assert set(rounds) == {"1", "10"}
    for sessions, rtts in rounds.items():
        assert len(rtts["relay"]) == len(rtts["direct"]) > 0, sessions
        assert all(math.isfinite(x) and x > 0 for x in rtts["relay"] + rtts["direct"])
    # The broker's CPU per keystroke was measured, and is not nothing.
    assert raw["cpu_per_key_s"]["broker"] > 0


def test_setup_measured_each_step_of_each_session(quick_run: dict[str, Any]) -> None:
    """Request → offer, grant → first byte, End → closed: one sample per session each."""
    raw = _result(quick_run, "setup")["raw"]
    counts = {k: len(v) for k, v in raw.items()}
    assert len(set(counts.values())) == 1, counts
    assert min(counts.values()) > 0, counts
    assert all(x > 0 for values in raw.values() for x in values)


def test_throughput_moved_every_byte_on_every_path(quick_run: dict[str, Any]) -> None:
    """Each path (direct, socat, relay) moved the full volume both ways (checked
    byte for byte at the receiver, or the run would have failed) at a rate > 0."""
    raw = _result(quick_run, "throughput")["raw"]
    rates = raw["median_bytes_per_s"]
    assert set(rates) == {
        f"{path}_{direction}"
        for path in ("direct", "socat", "relay")
        for direction in ("up", "down")
    }
    assert all(rate > 0 for rate in rates.values())
    timed = [t for t in raw["transfers"] if t["run"] != "warm-up"]
    assert {t["bytes"] for t in timed} == {raw["volume_bytes"]}
    assert raw["cpu_s_per_gib"]["broker_up"] > 0


def test_idle_held_every_channel_and_lost_none(quick_run: dict[str, Any]) -> None:
    """All devices connected to the broker and to the baseline; no disconnects; RTTs timed."""
    raw = _result(quick_run, "idle")["raw"]
    for side in ("relay", "baseline"):
        assert raw[side]["connected"] == raw["devices"], side
        assert raw[side]["disconnects"] == 0, side
    assert raw["relay"]["rss_per_conn"] > 0


def test_storm_brought_every_device_back(quick_run: dict[str, Any]) -> None:
    """After the broker restart every device was back, none waiting in a long backoff."""
    raw = _result(quick_run, "storm")["raw"]
    for side in ("relay", "baseline"):
        assert raw[side]["not_back"] == 0, side
    assert raw["relay"]["connected_end"] == raw["devices"]
    assert raw["relay"]["auth_waits_end"] == 0


def test_crossing_measured_every_session_on_one_node_and_across(
    quick_run: dict[str, Any],
) -> None:
    """The same sessions on one node and across two: each step of each timed."""
    raw = _result(quick_run, "crossing")["raw"]
    for where in ("one_node", "across_nodes"):
        steps = raw[where]
        counts = {len(samples) for samples in steps.values()}
        assert len(counts) == 1, (where, counts)
        assert counts.pop() > 0
        assert all(math.isfinite(s) and s > 0 for v in steps.values() for s in v)


def test_feed_stored_every_record_once_and_timed_each_phase(
    quick_run: dict[str, Any],
) -> None:
    """Every record sent was acknowledged, as stored (and is in the store
    exactly once) or as retry/busy (the node's record rate: the agent's to
    send again); each phase timed its sessions and heartbeats, each feeding
    phase its acks."""
    raw = _result(quick_run, "feed")["raw"]
    check = raw["sqlite_check"]
    assert check["exact"], check
    assert set(check["acks"]) <= {"stored", "retry"}, check
    assert sum(check["acks"].values()) == check["sent"]
    assert check["rows_in_store"] == check["acks"]["stored"] > 0
    assert set(check["not_stored_reasons"]) <= {"retry/busy"}, check
    assert check["devices"] == raw["devices"]
    phases = {p["name"]: p for p in raw["sqlite"]}
    assert list(phases) == ["quiet", "end-of-day", "flood"]
    assert phases["quiet"]["sent"] is None
    assert sum(p["sent"] for p in phases.values() if p["sent"]) == check["sent"]
    for name, phase in phases.items():
        sessions = {len(v) for v in phase["setup_s"].values()}
        assert len(sessions) == 1, name
        assert sessions.pop() > 0, name
        assert all(x > 0 for v in phase["setup_s"].values() for x in v), name
        assert phase["probe_heartbeat_rtt_s"], name
        if phase["sent"] is not None:
            assert len(phase["ack_latency_s"]) == phase["sent"] > 0, name
            assert phase["stored_per_s"] > 0, name
            assert all(math.isfinite(x) and x > 0 for x in phase["ack_latency_s"])
