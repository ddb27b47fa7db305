"""RELAY_TEST_REQUIRE_ALL=1 turns a skip into a failure (what .ci/run relies on)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")


@pytest.mark.parametrize(("require_all", "expected_rc"), [("1", 1), ("0", 0)])
def test_skip_fails_only_when_everything_is_required(
    tmp_path: Path, require_all: str, expected_rc: int
) -> None:
    """A test that skips fails the run under RELAY_TEST_REQUIRE_ALL=1 and passes otherwise."""
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "test_needs_binary.py").write_text(
        "import pytest\n\ndef test_needs_binary():\n    pytest.skip('binary missing')\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        env={**os.environ, "RELAY_TEST_REQUIRE_ALL": require_all},
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == expected_rc, result.stdout
    if expected_rc:
        assert "skipped under RELAY_TEST_REQUIRE_ALL=1" in result.stdout
