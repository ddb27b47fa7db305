"""The scorecard's recorder and page: what a test records is what the page shows,
and a failure anywhere cannot render as a pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from reliability import scorecard
from reliability.__main__ import outcomes
from reliability.render import Outcomes, Page, render


def _page(outcomes: Outcomes | None = None) -> Page:
    return Page(
        date="2026-11-26T00:00:00+00:00",
        commit="abc1234",
        scale="full",
        machine={"cores": "2"},
        outcomes=outcomes or Outcomes(passed=3, seconds=12.0),
        duration_s=60.0,
    )


def test_recorder_is_silent_without_a_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(scorecard.RECORD_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    scorecard.record_load("idle", devices=10)
    assert list(tmp_path.iterdir()) == []


def test_records_append_and_read_back_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "records.jsonl"
    monkeypatch.setenv(scorecard.RECORD_ENV, str(target))
    scorecard.record_fault("kill", row="E10", budget_s=1.0, times_s=[0.2, 0.5, 0.3])
    scorecard.record_fuzzing(
        "frames", tool="atheris", executions=10, seconds=1.0, crashes=0, hangs=0
    )
    first, second = scorecard.read(target)
    assert first["section"] == "faults"
    assert (first["worst_s"], first["median_s"], first["passed"]) == (0.5, 0.3, 3)
    assert second["section"] == "fuzzing"


def test_unknown_section_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown scorecard section"):
        scorecard.record("misc", "x")


def test_scale_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(scorecard.SCALE_ENV, raising=False)
    assert (scorecard.repeats(ci=2), scorecard.scaled(1, 9)) == (2, 1)
    monkeypatch.setenv(scorecard.SCALE_ENV, "full")
    assert (scorecard.repeats(ci=2), scorecard.scaled(1, 9)) == (20, 9)


def _fault(worst: float, passed: int) -> dict[str, object]:
    return {
        "section": "faults",
        "name": "device RST -> engineer told",
        "row": "E7",
        "budget_s": 2.0,
        "repeats": 20,
        "passed": passed,
        "worst_s": worst,
        "median_s": 0.4,
    }


def test_a_fault_over_budget_on_one_repeat_fails_the_page() -> None:
    good = render([_fault(0.41, 20)], _page())
    bad = render([_fault(2.3, 19)], _page())
    assert "| 410 ms | 2.00 s | pass |" in good
    assert "| 2.30 s | 2.00 s | **FAIL** |" in bad
    assert "| faults survived | 0 of 1 faults" in bad


def _bad_input(counter: int | None, audit: int | None) -> dict[str, object]:
    return {
        "section": "bad_inputs",
        "name": "oversized message",
        "row": "C5",
        "category": "C",
        "sent": 50,
        "rejected": 50,
        "counter_delta": counter,
        "audit_events": audit,
        "answer": "close 1009",
    }


def test_bad_inputs_reconcile_only_when_every_count_matches() -> None:
    assert "| 50 | 50 | 50 | - | pass |" in render([_bad_input(50, None)], _page())
    page = render([_bad_input(49, 50)], _page())
    assert "| 50 | 50 | 49 | 50 | **FAIL** |" in page
    assert "| C (engineer WebSocket and HTTP surface) | 50 |" in page


def test_failed_tests_are_listed_at_the_top() -> None:
    page = render(
        [], _page(Outcomes(passed=1, failed=("tests/x.py::test_y",), seconds=1.0))
    )
    assert "1 failed" in page
    assert "- failed: `tests/x.py::test_y`" in page
    assert page.index("failed: `tests/x.py") < page.index("## Summary")


def test_table_cells_cannot_break_the_markdown_table() -> None:
    record = {
        "section": "conformance",
        "name": "scan",
        "tool": "t",
        "verdict": "pass",
        "details": {"finding": "a | b\nc"},
    }
    assert "| finding | a \\| b c |" in render([record], _page())


def test_known_defects_are_listed_apart_from_failures() -> None:
    page = render(
        [],
        _page(Outcomes(passed=2, known_defects=("tests/x.py::test_leak",))),
    )
    assert "0 failed, 0 skipped, 1 known defects" in page
    assert "- `tests/x.py::test_leak`" in page
    assert "Tests that did not pass" not in page


def test_outcomes_are_read_from_pytest_junit_xml(tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite time="3.5">'
        '<testcase classname="t" name="ok"/>'
        '<testcase classname="t" name="bad"><failure message="x"/></testcase>'
        '<testcase classname="t" name="gone"><skipped type="pytest.skip"/></testcase>'
        '<testcase classname="t" name="leak"><skipped type="pytest.xfail"/></testcase>'
        "</testsuite></testsuites>"
    )
    assert outcomes(junit) == Outcomes(
        passed=1,
        failed=("t::bad",),
        skipped=("t::gone",),
        seconds=3.5,
        known_defects=("t::leak",),
    )
    assert outcomes(tmp_path / "missing.xml").failed == ("pytest wrote no report",)


def test_a_check_not_met_fails_nothing_lost() -> None:
    record = {
        "section": "nothing_lost",
        "name": "soak",
        "figures": {"chain_verified": True, "rss_back_to_baseline": False},
    }
    page = render([record], _page())
    assert (
        "| nothing lost | 1 accounting checks, 1 not met (soak: rss back to baseline) | **FAIL** |"
        in page
    )
