"""``python -m reliability``: run the reliability tests at full size, write the page.

Theory of operation
===================
The figures come from the tests in ``tests/reliability`` (see
:mod:`reliability.scorecard`). This command runs them in a child pytest with
``RELAY_RELIABILITY_SCALE=full`` (20 repeats per timed fault, longer fuzzing
and soak) and ``RELAY_RELIABILITY_RECORD`` pointing at a fresh records file,
then renders ``docs/reliability.md`` from those records, the test outcomes
(JUnit XML) and the machine. The records are kept in
``reliability/results/full.jsonl`` so that ``--render`` can rebuild the page
without measuring again. The exit status is pytest's: a page is written even
for a run with failures, and lists them at the top.

``--scale ci`` runs the default-suite sizes (a quick look at the page);
extra arguments after ``--`` go to pytest (``-k faults``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from bench.results import machine
from reliability import scorecard
from reliability.render import Outcomes, Page, render

ROOT: Final = Path(__file__).resolve().parent.parent
RESULTS: Final = ROOT / "reliability" / "results"
PAGE: Final = ROOT / "docs" / "reliability.md"


def _git(*args: str) -> str:
    out = subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return out.stdout.strip()


def _commit() -> str:
    # The run's own outputs do not count as local changes.
    dirty = _git(
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        ":!reliability/results",
        ":!docs/reliability.md",
    )
    head = _git("rev-parse", "--short", "HEAD") or "?"
    return head + (" (with local changes)" if dirty else "")


def outcomes(junit: Path) -> Outcomes:
    """Passed, failed and skipped tests of a run, from pytest's JUnit XML."""
    if not junit.exists():
        return Outcomes(failed=("pytest wrote no report",))
    # Our own pytest's report, written a moment ago: not untrusted input.
    root = ElementTree.parse(junit).getroot()  # noqa: S314
    passed, failed, skipped, xfailed, seconds = 0, [], [], [], 0.0
    for suite in root.iter("testsuite"):
        seconds += float(suite.get("time", "0"))
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif (skip := case.find("skipped")) is not None:
            if skip.get("type") == "pytest.xfail":
                xfailed.append(name)
            else:
                skipped.append(name)
        else:
            passed += 1
    return Outcomes(passed, tuple(failed), tuple(skipped), seconds, tuple(xfailed))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m reliability", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--scale",
        choices=("full", "ci"),
        default="full",
        help="full: the scorecard's sizes (default); ci: the default suite's",
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="only render the page again from reliability/results/<scale>.jsonl",
    )
    parser.add_argument(
        "--out", type=Path, help="page to write (default docs/reliability.md for full)"
    )
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest after --")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    records_file = RESULTS / f"{args.scale}.jsonl"
    meta_file = RESULTS / f"{args.scale}.meta.json"
    junit = RESULTS / f"{args.scale}.junit.xml"
    page_file = args.out or (PAGE if args.scale == "full" else RESULTS / "ci.md")
    if not args.render:
        records_file.unlink(missing_ok=True)
        env = {
            **os.environ,
            scorecard.RECORD_ENV: str(records_file),
            scorecard.SCALE_ENV: args.scale,
        }
        started = time.monotonic()
        commit = _commit()
        status = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "tests/reliability",
                "-p",
                "no:cacheprovider",
                f"--junitxml={junit}",
                *args.pytest_args,
            ],
            cwd=ROOT,
            env=env,
            check=False,
        ).returncode
        meta = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "commit": commit,
            "duration_s": time.monotonic() - started,
            "machine": machine(),
            "outcomes": asdict(outcomes(junit)),
            "status": status,
        }
        meta_file.write_text(json.dumps(meta, indent=1) + "\n")
    meta = json.loads(meta_file.read_text())
    if junit.exists():  # read again: how outcomes are read may have changed
        meta["outcomes"] = asdict(outcomes(junit))
    page = Page(
        date=meta["date"],
        commit=meta["commit"],
        scale=args.scale,
        machine=meta["machine"],
        outcomes=Outcomes(
            passed=meta["outcomes"]["passed"],
            failed=tuple(meta["outcomes"]["failed"]),
            skipped=tuple(meta["outcomes"]["skipped"]),
            seconds=meta["outcomes"]["seconds"],
            known_defects=tuple(meta["outcomes"].get("known_defects", ())),
        ),
        duration_s=meta["duration_s"],
    )
    page_file.write_text(render(scorecard.read(records_file), page))
    print(f"reliability: wrote {page_file} from {records_file}", file=sys.stderr)
    return int(meta["status"])


if __name__ == "__main__":
    sys.exit(main())
