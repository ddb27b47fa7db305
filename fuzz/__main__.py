"""``python -m fuzz``: run atheris targets and print what they found.

    python -m fuzz --target tunnel_frame --seconds 60
    python -m fuzz --target all --seconds 3600 --json

Exit status 1 if any target crashed, hung or ran out of memory; the inputs
that did are kept in a temporary directory (or ``--artifacts DIR``) and named
in the output. See fuzz/README.md for reproducing one.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from fuzz import TARGETS
from fuzz.runner import run


def main(argv: list[str] | None = None) -> int:
    """Run the chosen targets one after the other."""
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__)
    parser.add_argument("--target", choices=[*TARGETS, "all"], required=True)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--timeout", type=int, default=10, help="hang, per input (s)")
    parser.add_argument("--rss-limit-mb", type=int, default=2048)
    parser.add_argument("--artifacts", type=Path, help="where failing inputs go")
    parser.add_argument("--json", action="store_true", help="one JSON line per target")
    args = parser.parse_args(argv)
    targets = TARGETS if args.target == "all" else (args.target,)
    failed = False
    for target in targets:
        report = run(
            target,
            args.seconds,
            timeout_s=args.timeout,
            rss_limit_mb=args.rss_limit_mb,
            artifact_dir=args.artifacts / target if args.artifacts else None,
        )
        failed = failed or not report.clean
        if args.json:
            fields = asdict(report)
            fields["artifacts"] = [str(p) for p in report.artifacts]
            del fields["output"]
            print(json.dumps(fields, sort_keys=True))
            continue
        print(
            f"{target}: {report.executions} executions in {report.seconds:.0f} s, "
            f"corpus {report.corpus}, coverage {report.coverage}, "
            f"crashes {report.crashes}, timeouts {report.timeouts}, "
            f"ooms {report.ooms}"
        )
        for path in report.artifacts:
            print(f"  failing input: {path}")
        if not report.clean:
            print(report.output, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
