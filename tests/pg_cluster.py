"""A throw-away PostgreSQL server for the tests, on a loopback port of its own.

The store's tests run against SQLite and PostgreSQL alike (issue 11: the same
SQLAlchemy Core code and migrations on both). The server is the machine's own
PostgreSQL (Debian's ``postgresql`` package; ``.ci/run`` installs it), started
by the tests in a temporary directory: ``initdb`` then ``pg_ctl start`` on a free
port, never the default 5432, so it cannot meet an operator's server. Each test
gets a database of its own (``new_database``), made in a few milliseconds.

Durability is switched off (``fsync``, ``synchronous_commit``,
``full_page_writes``): the tests check what the relay does, not the disk.
PostgreSQL refuses to run as root, so under root (CI) the server runs as the
``postgres`` account the package creates.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# The account the server runs as when the tests run as root.
SERVER_ACCOUNT = "postgres"
# The superuser initdb creates; trust authentication on loopback only.
SUPERUSER = "relay_test"
START_TIMEOUT_S = 60


def server_binaries() -> Path | None:
    """The directory of ``initdb`` and ``pg_ctl``, newest major version first."""
    found = shutil.which("pg_ctl")
    if found is not None and (Path(found).resolve().parent / "initdb").exists():
        return Path(found).resolve().parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda path: (
            int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0
        ),
        reverse=True,
    )
    return versions[0].parent if versions else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on at this instant."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class PostgresCluster:
    """A running server; :meth:`new_database` hands out empty databases."""

    bin_dir: Path
    data_dir: Path
    port: int
    _as_account: list[str]
    _start_argv: list[str] = field(default_factory=list)
    _names: Iterator[int] = field(default_factory=itertools.count)

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of *database* (psycopg 3 driver)."""
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """Create an empty database and return its URL."""
        import psycopg

        name = f"relay_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=SUPERUSER,
            dbname="postgres",
            autocommit=True,
        ) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def start(self) -> None:
        """Start again after :meth:`stop`, on the same port with the same data."""
        subprocess.run(
            [*self._as_account, *self._start_argv],
            capture_output=True,
            check=True,
            timeout=START_TIMEOUT_S,
        )

    def stop(self) -> None:
        """Stop at once (``-m immediate``): nothing here needs a clean shutdown."""
        subprocess.run(
            [
                *self._as_account,
                str(self.bin_dir / "pg_ctl"),
                "stop",
                "-D",
                str(self.data_dir),
                "-m",
                "immediate",
                "-w",
            ],
            capture_output=True,
            check=False,
            timeout=START_TIMEOUT_S,
        )


@contextlib.contextmanager
def postgres_cluster(base: Path) -> Iterator[PostgresCluster]:
    """Run a server with its files under *base* for the block; skipped (a failure
    under RELAY_TEST_REQUIRE_ALL=1) without PostgreSQL's server binaries."""
    bin_dir = server_binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed")
    as_account: list[str] = []
    base.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam(SERVER_ACCOUNT)
        except KeyError:
            pytest.skip(f"running as root and no {SERVER_ACCOUNT!r} account")
        os.chown(base, account.pw_uid, account.pw_gid)
        as_account = ["runuser", "-u", SERVER_ACCOUNT, "--"]
    data_dir = base / "data"

    def run(*argv: str) -> None:
        done = subprocess.run(
            [*as_account, *argv],
            capture_output=True,
            text=True,
            check=False,
            timeout=START_TIMEOUT_S,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stdout}{done.stderr}")

    run(
        str(bin_dir / "initdb"),
        "-D",
        str(data_dir),
        "-U",
        SUPERUSER,
        "-A",
        "trust",
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
    )
    port = free_port()
    options = " ".join(
        [
            f"-p {port}",
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={base}",
            "-c fsync=off",
            "-c synchronous_commit=off",
            "-c full_page_writes=off",
            "-c max_connections=200",
        ]
    )
    start = [
        str(bin_dir / "pg_ctl"),
        "start",
        "-D",
        str(data_dir),
        "-w",
        "-t",
        str(START_TIMEOUT_S),
        "-l",
        str(base / "server.log"),
        "-o",
        options,
    ]
    run(*start)
    cluster = PostgresCluster(bin_dir, data_dir, port, as_account, start)
    try:
        yield cluster
    finally:
        cluster.stop()
