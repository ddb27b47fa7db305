"""A small tmpfs to fill, for the tests of what happens when a disk is full."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_disk(mountpoint: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of *size* (``64k``) on *mountpoint* (made if missing) for the
    block; skipped (a failure under RELAY_TEST_REQUIRE_ALL=1) where mounting is
    not permitted. Unmounted on the way out, whatever happened."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount(8): cannot make a small disk to fill")
    done = subprocess.run(
        [
            "mount",
            "-t",
            "tmpfs",
            "-o",
            f"size={size},mode=0700",
            "tmpfs",
            str(mountpoint),
        ],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted: {done.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)
