"""Suite-wide test policy.

Tests that need a system binary may skip locally with a reason. With
``RELAY_TEST_REQUIRE_ALL=1`` (set by ``.ci/run``) a skip is reported as a failure,
so CI can never pass by silently not running a test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.pg_cluster import PostgresCluster
    from tests.redis_server import RedisServer


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    required = os.environ.get("RELAY_TEST_REQUIRE_ALL") == "1"
    if required and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under RELAY_TEST_REQUIRE_ALL=1: {report.longrepr}"
    return report


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """One PostgreSQL server for the whole run, started on first use.

    Its files live under /tmp rather than pytest's own (0700) temporary tree,
    which the server's account could not enter when the tests run as root.
    """
    # Imported here, not at the top: tests/test_require_all.py runs this file
    # alone, outside the package.
    from tests.pg_cluster import postgres_cluster

    base = Path(tempfile.mkdtemp(prefix="relay-test-pg-"))
    try:
        with postgres_cluster(base) as cluster:
            yield cluster
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis server of the test's own (tests restart it, and every key goes)."""
    from tests.redis_server import redis_server

    with redis_server(tmp_path / "redis") as server:
        yield server
