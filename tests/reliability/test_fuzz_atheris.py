"""Coverage-guided fuzzing of the frame codec, the WebSocket upgrade and frames,
and the CSR intake with atheris (reference matrix section 5, fuzzing).

Each target in ``fuzz/`` runs under libFuzzer for ``scorecard.scaled(10, 300)``
seconds, all of them at once (one process each), starting from the committed
seed corpus; a run must end with no crash, hang or OOM and a non-trivial number
of executions, and is recorded for the scorecard. Two deliberately broken
targets check the runner itself: it must count a crash and a hang, and leave
their inputs outside the repository.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from fuzz import TARGETS, make_corpus
from fuzz.runner import REPO, FuzzReport, run
from reliability import scorecard

SECONDS = scorecard.scaled(10, 300)
#: One input slower than this is a hang. Every target handles an input in
#: milliseconds; the margin is for a machine busy with other tests.
TIMEOUT_S = 10
RSS_LIMIT_MB = 2048
#: Far below what any target does in SECONDS even on a loaded machine
#: (thousands per second idle), far above a target that barely runs.
MIN_EXECUTIONS = 200

_CRASHES = """
import sys, atheris
def one(data):
    if data.startswith(b"boom"):
        raise ValueError("the parser broke")
atheris.Setup(sys.argv, one)
atheris.Fuzz()
"""
_HANGS = """
import sys, time, atheris
def one(data):
    if data.startswith(b"slow"):
        time.sleep(30)
atheris.Setup(sys.argv, one)
atheris.Fuzz()
"""


def _broken(tmp: Path, name: str, source: str, seed: bytes) -> tuple[list[str], Path]:
    script = tmp / f"{name}.py"
    script.write_text(textwrap.dedent(source))
    seeds = tmp / f"{name}-seeds"
    seeds.mkdir()
    (seeds / "seed").write_bytes(seed)
    return [sys.executable, str(script)], seeds


def _timeout(job: partial[FuzzReport]) -> dict[str, Any]:
    """The per-input timeout, unless the job sets its own."""
    return {} if "timeout_s" in job.keywords else {"timeout_s": TIMEOUT_S}


@pytest.fixture(scope="module")
def reports(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, FuzzReport]]:
    """Every target's run, and the two broken targets' runs, done in parallel."""
    tmp = tmp_path_factory.mktemp("atheris")
    crash_cmd, crash_seeds = _broken(tmp, "crashes", _CRASHES, b"boom")
    hang_cmd, hang_seeds = _broken(tmp, "hangs", _HANGS, b"slow")
    jobs = [partial(run, target, SECONDS) for target in TARGETS] + [
        partial(
            run,
            "broken-crash",
            5,
            command=crash_cmd,
            seeds=crash_seeds,
            artifact_dir=tmp / "crash-artifacts",
        ),
        partial(
            run,
            "broken-hang",
            5,
            command=hang_cmd,
            seeds=hang_seeds,
            artifact_dir=tmp / "hang-artifacts",
            timeout_s=1,
        ),
    ]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [
            pool.submit(job, rss_limit_mb=RSS_LIMIT_MB, **_timeout(job)) for job in jobs
        ]
        done = [future.result() for future in futures]
        yield {report.target: report for report in done}


@pytest.mark.parametrize("target", TARGETS)
def test_target_runs_clean(target: str, reports: dict[str, FuzzReport]) -> None:
    """The target ran its time with no crash, hang or OOM, executed a non-trivial
    number of inputs, and wrote nothing into the repository."""
    report = reports[target]
    assert report.clean, (report.artifacts, report.output)
    assert report.returncode == 0, report.output
    assert report.executions >= MIN_EXECUTIONS, report.output
    assert all(REPO not in path.parents for path in report.artifacts)
    assert make_corpus.differences() == []
    scorecard.record_fuzzing(
        target,
        tool="atheris 3.0.0",
        executions=report.executions,
        seconds=report.seconds,
        crashes=report.crashes,
        hangs=report.timeouts,
        ooms=report.ooms,
        corpus=report.corpus,
        coverage=report.coverage,
        features=report.features,
        max_total_time_s=SECONDS,
        timeout_s=TIMEOUT_S,
        rss_limit_mb=RSS_LIMIT_MB,
    )


def test_runner_counts_a_crash_and_keeps_its_input(
    reports: dict[str, FuzzReport],
) -> None:
    """A target that raises is reported as one crash, with the crashing input
    saved where it was told (outside the repository), byte for byte."""
    report = reports["broken-crash"]
    assert (report.crashes, report.timeouts) == (1, 0), report.output
    assert not report.clean
    [artifact] = report.artifacts
    assert artifact.name.startswith("crash-")
    assert artifact.read_bytes().startswith(b"boom")
    assert REPO not in artifact.parents


def test_runner_counts_a_hang(reports: dict[str, FuzzReport]) -> None:
    """A target slower than -timeout on one input is reported as a hang, not a
    crash, with that input saved."""
    report = reports["broken-hang"]
    assert (report.crashes, report.timeouts) == (0, 1), report.output
    [artifact] = report.artifacts
    assert artifact.name.startswith("timeout-")
    assert artifact.read_bytes().startswith(b"slow")


def test_seed_corpus_is_what_make_corpus_writes() -> None:
    """The committed seeds are exactly what ``python -m fuzz.make_corpus``
    writes (it is deterministic), so the corpus can be regenerated and
    reviewed."""
    assert make_corpus.differences() == []
    assert all(any((make_corpus.CORPUS / t).iterdir()) for t in TARGETS)
