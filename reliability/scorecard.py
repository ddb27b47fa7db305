"""What the reliability tests measured, in one machine-readable stream.

Theory of operation: a test calls one of the ``record_*`` functions after its
assertions. When ``RELAY_RELIABILITY_RECORD`` names a file, the record is appended
to it as one JSON line (the test process may be one of several pytest runs, so the
file is opened in append mode per record); otherwise the call does nothing. The
size of a run comes from ``RELAY_RELIABILITY_SCALE``: ``ci`` (default, the short
mode of the default suite) or ``full`` (the scorecard run). Tests ask
:func:`repeats` and :func:`scaled` instead of reading the variables themselves.

Records are grouped in the sections of the scorecard (reference/
reliability-security.md, section 5): load held, faults survived, bad inputs
tried, conformance and scanners, fuzzing, nothing lost.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

RECORD_ENV: Final = "RELAY_RELIABILITY_RECORD"
SCALE_ENV: Final = "RELAY_RELIABILITY_SCALE"

SECTIONS: Final = (
    "load",
    "faults",
    "bad_inputs",
    "conformance",
    "fuzzing",
    "nothing_lost",
)

#: Repeats of a timed fault in the scorecard run (reference section 5: >= 20).
FULL_REPEATS: Final = 20


def full() -> bool:
    """True in the scorecard run, False in the default suite."""
    return os.environ.get(SCALE_ENV, "ci") == "full"


def repeats(ci: int = 3) -> int:
    """How many times a timed fault is repeated: *ci* in the suite, 20 in full."""
    return FULL_REPEATS if full() else ci


def scaled(ci: float, full_value: float) -> float:
    """A size (seconds, count, bytes) for this run: *ci* or *full_value*."""
    return full_value if full() else ci


def record(section: str, name: str, **fields: Any) -> None:
    """Append one record; a no-op unless ``RELAY_RELIABILITY_RECORD`` is set."""
    if section not in SECTIONS:
        raise ValueError(f"unknown scorecard section {section!r}")
    target = os.environ.get(RECORD_ENV)
    if not target:
        return
    line = json.dumps({"section": section, "name": name, **fields}, sort_keys=True)
    with Path(target).open("a", encoding="utf-8") as stream:
        stream.write(line + "\n")


def record_fault(
    name: str, *, row: str, budget_s: float, times_s: Sequence[float]
) -> None:
    """A fault repeated ``len(times_s)`` times; the worst time is what counts."""
    passed = sum(1 for t in times_s if t <= budget_s)
    record(
        "faults",
        name,
        row=row,
        budget_s=budget_s,
        repeats=len(times_s),
        passed=passed,
        worst_s=max(times_s) if times_s else None,
        median_s=sorted(times_s)[len(times_s) // 2] if times_s else None,
    )


def record_bad_inputs(
    name: str,
    *,
    row: str,
    sent: int,
    rejected: int,
    counter_delta: int | None,
    audit_events: int | None,
    answer: str,
) -> None:
    """Bad inputs of one kind: sent = rejected = counter change = audit events.

    *answer* is what the sender saw (``"close 1009"``, ``"HTTP 431"``,
    ``"TLS handshake failed"``). ``None`` for the counter or the audit count means
    the row has none by design (say why in the test), never "not checked".
    """
    record(
        "bad_inputs",
        name,
        row=row,
        category=row[0],
        sent=sent,
        rejected=rejected,
        counter_delta=counter_delta,
        audit_events=audit_events,
        answer=answer,
    )


def record_conformance(name: str, *, tool: str, verdict: str, **details: Any) -> None:
    """A conformance suite or scanner run against one target."""
    record("conformance", name, tool=tool, verdict=verdict, details=details)


def record_fuzzing(
    name: str,
    *,
    tool: str,
    executions: int,
    seconds: float,
    crashes: int,
    hangs: int,
    **details: Any,
) -> None:
    """One fuzz target or property: how much input it tried and what broke."""
    record(
        "fuzzing",
        name,
        tool=tool,
        executions=executions,
        seconds=round(seconds, 2),
        crashes=crashes,
        hangs=hangs,
        details=details,
    )


def record_load(name: str, **figures: Any) -> None:
    """A load held (connections, sessions, throughput) and its figures."""
    record("load", name, figures=figures)


def record_nothing_lost(name: str, **figures: Any) -> None:
    """An accounting check: sessions, transfers, resources, secrets."""
    record("nothing_lost", name, figures=figures)


def read(path: Path) -> list[dict[str, Any]]:
    """Every record of a run, in the order written."""
    if not path.exists():
        return []
    return [
        json.loads(line)
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
