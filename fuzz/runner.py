"""Run one atheris target under libFuzzer in a subprocess and read its report.

Theory of operation: the target runs as ``python -m fuzz.<target>`` with
libFuzzer's flags: ``-max_total_time`` (the run's length), ``-timeout`` (one
input slower than this is a hang), ``-rss_limit_mb`` (more memory is an OOM),
``-print_final_stats=1``, and ``-artifact_prefix`` pointing at a directory
outside the repository, where libFuzzer writes each crashing, hanging or
out-of-memory input as ``crash-*``, ``timeout-*`` or ``oom-*``. Two corpus
directories are given: a scratch one first (libFuzzer writes the inputs it
keeps into the first) and the committed seeds second (read only), so a run
never writes into the repository.

The report counts those artefacts and reads the executions
(``stat::number_of_executed_units``, else ``Done N runs``), the corpus size and
coverage (the last ``cov: N ft: M corp: C/...`` status line) and the peak RSS
from libFuzzer's output. libFuzzer stops at the first crash, so ``crashes`` is
0 or 1 per run; a run that fails without leaving an artefact (the target did
not even start) counts as a crash, with its output kept for the report.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fuzz import TARGETS

REPO: Final = Path(__file__).resolve().parent.parent
CORPUS: Final = Path(__file__).resolve().parent / "corpus"
#: Exit codes asked of libFuzzer, to tell a crash from a hang at a glance.
CRASH_EXIT: Final = 77
TIMEOUT_EXIT: Final = 70
#: Time a run may take beyond -max_total_time (start-up, seeds, final stats).
GRACE_S: Final = 120.0

_EXECUTED = re.compile(rb"stat::number_of_executed_units:\s*(\d+)")
_DONE = re.compile(rb"Done (\d+) runs in")
_STATUS = re.compile(rb"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/")
_PEAK_RSS = re.compile(rb"stat::peak_rss_mb:\s*(\d+)")


@dataclass(frozen=True, slots=True)
class FuzzReport:
    """What one run did.

    Attributes:
        target: The target's name.
        executions: Inputs run.
        seconds: Wall time of the run.
        crashes: Crashing inputs (an uncaught exception or a signal).
        timeouts: Inputs slower than the timeout (hangs).
        ooms: Inputs that took the process over the RSS limit.
        corpus: Inputs in the corpus at the end (seeds and inputs kept).
        coverage: libFuzzer's ``cov`` (edges and Python branches covered), if
            reported.
        features: libFuzzer's ``ft`` (coverage features), if reported.
        peak_rss_mb: Peak memory as libFuzzer reports it (getrusage). On Linux
            a child inherits its parent's high-water mark, so when the parent is
            a large process (pytest) this is the parent's figure, not the
            target's.
        returncode: The process's exit code.
        artifacts: The files of crashing, hanging or OOM inputs.
        output: The end of libFuzzer's output, for a report.
    """

    target: str
    executions: int
    seconds: float
    crashes: int
    timeouts: int
    ooms: int
    corpus: int
    coverage: int | None
    features: int | None
    peak_rss_mb: int | None
    returncode: int
    artifacts: tuple[Path, ...]
    output: str

    @property
    def clean(self) -> bool:
        """No crash, hang or OOM."""
        return self.crashes == self.timeouts == self.ooms == 0


def target_command(target: str) -> list[str]:
    """The command that runs *target* (one of :data:`fuzz.TARGETS`)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    return [sys.executable, "-m", f"fuzz.{target}"]


def parse_output(output: bytes) -> dict[str, int | None]:
    """Executions, coverage, features, corpus size and peak RSS from libFuzzer."""
    executed = _EXECUTED.findall(output) or _DONE.findall(output)
    status = _STATUS.findall(output)
    last = status[-1] if status else None
    peak = _PEAK_RSS.findall(output)
    executions = int(executed[-1]) if executed else int(last[0]) if last else 0
    return {
        "executions": executions,
        "coverage": int(last[1]) if last else None,
        "features": int(last[2]) if last else None,
        "corpus": int(last[3]) if last else None,
        "peak_rss_mb": int(peak[-1]) if peak else None,
    }


def run(
    target: str,
    seconds: float,
    *,
    timeout_s: int = 10,
    rss_limit_mb: int = 2048,
    artifact_dir: Path | None = None,
    command: Sequence[str] | None = None,
    seeds: Path | None = None,
) -> FuzzReport:
    """Fuzz *target* for *seconds* and report what happened.

    Args:
        target: A name from :data:`fuzz.TARGETS` (or any label with *command*).
        seconds: libFuzzer's ``-max_total_time``; at least 1.
        timeout_s: One input slower than this is a hang.
        rss_limit_mb: More memory than this is an OOM.
        artifact_dir: Where crashing inputs go; a new temporary directory if
            not given. Never the repository.
        command: The command to run instead of the target's (tests of this
            runner use a target of their own).
        seeds: The seed corpus; ``fuzz/corpus/<target>`` if not given.

    Raises:
        subprocess.TimeoutExpired: The run took GRACE_S longer than asked
            (libFuzzer itself stuck); the process has been killed.
    """
    argv = list(command) if command is not None else target_command(target)
    seed_dir = seeds if seeds is not None else CORPUS / target
    artifacts = artifact_dir or Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-"))
    artifacts.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"fuzz-corpus-{target}-") as scratch:
        flags = [
            scratch,
            str(seed_dir),
            f"-max_total_time={max(1, round(seconds))}",
            f"-timeout={timeout_s}",
            f"-rss_limit_mb={rss_limit_mb}",
            f"-error_exitcode={CRASH_EXIT}",
            f"-timeout_exitcode={TIMEOUT_EXIT}",
            "-print_final_stats=1",
            f"-artifact_prefix={artifacts}{os.sep}",
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *filter(None, [env.get("PYTHONPATH")])]
        )
        start = time.monotonic()
        done = subprocess.run(  # noqa: S603 - our own interpreter and flags
            [*argv, *flags],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=seconds + GRACE_S,
            check=False,
        )
        elapsed = time.monotonic() - start
        kept = sum(1 for p in Path(scratch).iterdir() if p.is_file())
    output = done.stdout + done.stderr
    stats = parse_output(output)
    found = tuple(sorted(p for p in artifacts.iterdir() if p.is_file()))
    crashes = sum(1 for p in found if p.name.startswith(("crash-", "leak-")))
    timeouts = sum(1 for p in found if p.name.startswith("timeout-"))
    ooms = sum(1 for p in found if p.name.startswith("oom-"))
    if done.returncode != 0 and not found:
        crashes = 1  # it failed before libFuzzer could save an input
    if artifact_dir is None and not found:
        shutil.rmtree(artifacts, ignore_errors=True)
    seed_count = (
        sum(1 for p in seed_dir.iterdir() if p.is_file()) if seed_dir.is_dir() else 0
    )
    corpus = stats["corpus"]
    return FuzzReport(
        target=target,
        executions=stats["executions"] or 0,
        seconds=elapsed,
        crashes=crashes,
        timeouts=timeouts,
        ooms=ooms,
        corpus=corpus if corpus is not None else seed_count + kept,
        coverage=stats["coverage"],
        features=stats["features"],
        peak_rss_mb=stats["peak_rss_mb"],
        returncode=done.returncode,
        artifacts=found,
        output=output[-4000:].decode("utf-8", "replace"),
    )
