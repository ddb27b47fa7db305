"""What a scenario hands back: tables for people, goals against the BRIEF, raw numbers.

Every scenario returns one :class:`ScenarioResult`; ``bench/__main__.py`` writes
all of them as raw JSON and renders ``docs/benchmarks.md`` from them. A goal
carries the figure as measured *and* the baseline beside it from the same run,
so the page never shows a number without what it should be compared to.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
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
