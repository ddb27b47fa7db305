"""What a scenario hands back: tables for people, goals against the BRIEF, raw numbers.

Every scenario returns one :class:`ScenarioResult`; ``bench/__main__.py`` writes
all of them as raw JSON and renders ``docs/benchmarks.md`` from them. A goal
carries the figure as measured *and* the baseline beside it from the same run,
so the page never shows a number without what it should be compared to.
"""

from __future__ import annotations

import math
import os
import platform
import re
import ssl
import subprocess
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

Mode = Literal["quick", "full"]


@dataclass(frozen=True, slots=True)
class Table:
    """A table for ``docs/benchmarks.md``: a title, column names, rows of text."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True, slots=True)
class Goal:
    """One row of the BRIEF's performance table, as measured.

    Attributes:
        figure: The BRIEF's wording of the figure.
        goal: The BRIEF's goal, as text.
        measured: What this run measured, with units.
        baseline: The baseline it is set against in the same run ("" if none).
        ratio: measured / baseline where that makes sense, else None.
        met: Whether the goal is met by this run.
    """

    figure: str
    goal: str
    measured: str
    baseline: str
    ratio: float | None
    met: bool


@dataclass(slots=True)
class ScenarioResult:
    """A scenario's outcome (see the module docstring)."""

    name: str
    title: str
    tables: list[Table] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def ratio(value: float | None, baseline: float | None) -> float | None:
    """value / baseline, or None when either is missing, not finite, or the
    baseline is not positive."""
    if value is None or baseline is None or baseline <= 0:
        return None
    if not (math.isfinite(value) and math.isfinite(baseline)):
        return None
    return value / baseline


def fmt_ms(seconds: float) -> str:
    """Seconds as milliseconds with sensible precision."""
    ms = seconds * 1000
    return f"{ms:.2f} ms" if ms < 10 else f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"


def fmt_rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 2**20:.0f} MiB/s"


# What the numbers were taken on ------------------------------------------------


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
    """The machine and versions a run measured on (for the page and its notes)."""
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
