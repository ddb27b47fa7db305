"""``python -m bench``: run the scenarios, write the raw JSON and ``docs/benchmarks.md``.

Theory of operation
===================
Each scenario (``SCENARIOS``) starts its own broker and load, measures the
product beside its baselines, and returns a
:class:`~bench.results.ScenarioResult`; they run one after another, never at
the same time, so that none measures another's load. The page is rendered
from the results of this one run only, with the machine, versions, commit and
date, so that every ratio on it compares numbers taken side by side.

Two modes. ``--quick`` (CI smoke, seconds per scenario): small counts, goals
reported but never "met" (a goal is about the full figure), output to
``bench/results/quick/`` unless told otherwise. ``--full`` (the numbers):
writes ``docs/benchmarks.md`` and ``bench/results/full.json``, with profiles
in ``bench/results/profiles/``. The reading of the profiles and the plan for
goals not met are people's work: ``bench/analysis.md``, included verbatim;
``--render JSON`` renders the page again from a full run's JSON after it
changed, without measuring anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any, Final

from bench.results import Goal, Mode, ScenarioResult, Table

ROOT: Final = Path(__file__).resolve().parent.parent
RESULTS: Final = ROOT / "bench" / "results"
ANALYSIS: Final = ROOT / "bench" / "analysis.md"

Scenario = Callable[[Mode, Path], ScenarioResult]


def _throughput(mode: Mode, profiles: Path) -> ScenarioResult:
    from bench.throughput import run

    return run(mode, profile_dir=profiles if mode == "full" else None)


def _latency(mode: Mode, profiles: Path) -> ScenarioResult:
    from bench.sessions import run_latency

    return run_latency(mode)


def _setup(mode: Mode, profiles: Path) -> ScenarioResult:
    from bench.sessions import run_setup

    return run_setup(mode)


def _idle(mode: Mode, profiles: Path) -> ScenarioResult:
    from bench.capacity import run_idle

    return run_idle(mode)


def _storm(mode: Mode, profiles: Path) -> ScenarioResult:
    from bench.capacity import run_storm

    return run_storm(mode)


#: In the order of the BRIEF's performance table.
SCENARIOS: Final[dict[str, Scenario]] = {
    "throughput": _throughput,
    "latency": _latency,
    "idle": _idle,
    "storm": _storm,
    "setup": _setup,
}


def _socat_version() -> str:
    try:
        out = subprocess.run(
            ["socat", "-V"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except OSError:
        return "not installed"
    found = re.search(r"socat version (\S+)", out)
    return found.group(1) if found else "?"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or "?"


def machine() -> dict[str, str]:
    """What the numbers were taken on."""
    memory_kib = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return {
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "memory": f"{memory_kib / 2**20:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "trio": version("trio"),
        "websockets": version("websockets"),
        "cryptography": version("cryptography"),
        "hypercorn": version("hypercorn"),
        "socat": _socat_version(),
    }


def _git(*args: str) -> str:
    out = subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return out.stdout.strip() or "?"


def _goal_row(goal: Goal, mode: Mode) -> str:
    if mode == "quick":
        verdict = "(quick run: not judged)"
    else:
        verdict = "**met**" if goal.met else "**not met**"
    ratio = f"{goal.ratio:.2f}x" if goal.ratio is not None else ""
    return f"| {goal.figure} | {goal.goal} | {goal.measured} | {goal.baseline} | {ratio} | {verdict} |"


def _from_json(data: dict[str, Any]) -> ScenarioResult:
    return ScenarioResult(
        name=data["name"],
        title=data["title"],
        tables=[
            Table(t["title"], tuple(t["columns"]), tuple(tuple(r) for r in t["rows"]))
            for t in data["tables"]
        ],
        goals=[Goal(**g) for g in data["goals"]],
        notes=list(data["notes"]),
        raw=data["raw"],
    )


def render(results: list[ScenarioResult], meta: dict[str, object], mode: Mode) -> str:
    """``docs/benchmarks.md`` from one run's results."""
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`python -m bench --full`) from one run; do not edit by",
        "hand: the reading of the profiles and the plans are in `bench/analysis.md`,",
        "included at the end. Raw numbers: `bench/results/full.json`. How the",
        "scenarios are built: `bench/README.md`.",
        "",
        f"- date: {meta['date']}",
        f"- commit: `{meta['commit']}`",
        f"- mode: {mode}, {meta['duration_s']:.0f} s in all",
    ]
    machine_info = meta["machine"]
    assert isinstance(machine_info, dict)
    lines += [f"- {k}: {v}" for k, v in machine_info.items()]
    lines += [
        "",
        "## The BRIEF's performance goals",
        "",
        "| figure | goal | measured | baseline (same run) | ratio | verdict |",
        "|---|---|---|---|---|---|",
    ]
    lines += [_goal_row(g, mode) for r in results for g in r.goals]
    for result in results:
        lines += ["", f"## {result.title}", ""]
        for table in result.tables:
            lines += [f"**{table.title}**", ""]
            lines.append("| " + " | ".join(table.columns) + " |")
            lines.append("|" + "---|" * len(table.columns))
            lines += ["| " + " | ".join(row) + " |" for row in table.rows]
            lines.append("")
        lines += [note for note in result.notes for note in (note, "")]
    if ANALYSIS.exists():
        lines += ["", ANALYSIS.read_text().rstrip()]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n")[0]
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--quick",
        dest="mode",
        action="store_const",
        const="quick",
        help="CI smoke run (default)",
    )
    group.add_argument(
        "--full",
        dest="mode",
        action="store_const",
        const="full",
        help="the numbers for docs/benchmarks.md",
    )
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of {','.join(SCENARIOS)}"
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="only render docs/benchmarks.md again from a full run's JSON "
        "(after bench/analysis.md changed)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="directory for the JSON and the page (default: by mode)",
    )
    args = parser.parse_args(argv)
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        page_file = ROOT / "docs" / "benchmarks.md"
        page_file.write_text(
            render(
                [_from_json(r) for r in saved["results"]], saved["meta"], saved["mode"]
            )
        )
        print(f"bench: rendered {page_file} from {args.render}", file=sys.stderr)
        return 0
    mode: Mode = args.mode or "quick"
    names = [n for n in args.only.split(",") if n] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(
            f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}"
        )
    out = args.out or (RESULTS if mode == "full" else RESULTS / "quick")
    profiles = out / "profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    # Taken before anything runs: the code measured is the code of this commit.
    # The run's own outputs (bench/results, the page) do not count as changes.
    dirty = _git(
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        ":!bench/results",
        ":!docs/benchmarks.md",
    )
    commit = _git("rev-parse", "--short", "HEAD") + (
        " (with local changes)" if dirty != "?" else ""
    )
    started = time.monotonic()
    results: list[ScenarioResult] = []
    for name in names:
        print(f"bench: {name} ({mode}) ...", file=sys.stderr, flush=True)
        began = time.monotonic()
        results.append(SCENARIOS[name](mode, profiles))
        print(
            f"bench: {name} done in {time.monotonic() - began:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    meta: dict[str, object] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "duration_s": time.monotonic() - started,
        "machine": machine(),
    }
    document = {"meta": meta, "mode": mode, "results": [r.as_json() for r in results]}
    json_file = out / f"{mode}.json"
    json_file.write_text(json.dumps(document, indent=1, default=str) + "\n")
    page = render(results, meta, mode)
    page_file = (
        ROOT / "docs" / "benchmarks.md"
        if mode == "full" and args.out is None
        else out / "benchmarks.md"
    )
    page_file.write_text(page)
    print(f"bench: wrote {json_file} and {page_file}", file=sys.stderr)
    for result in results:
        for goal in result.goals:
            print(
                f"  {goal.figure}: {goal.measured} (goal {goal.goal})", file=sys.stderr
            )
    return 0


if __name__ == "__main__":
    if shutil.which("socat") is None:
        print(
            "bench: socat is not installed (apt-get install socat); the throughput baseline needs it",
            file=sys.stderr,
        )
    sys.exit(main())
