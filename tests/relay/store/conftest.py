"""The store's tests run on both engines it supports: a SQLite file and PostgreSQL.

``db_url`` is parametrized, so every test that takes it (or ``store``, built on
it) runs twice, ``[sqlite]`` and ``[postgresql]``. Tests of SQLite-only
behaviour (file modes, a locked file) build their own SQLite URL.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection

from relay.store import Store


def sqlite_url(path: Path) -> str:
    """Return the SQLAlchemy URL of the SQLite file at *path*."""
    return f"sqlite:///{path}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file in a directory that does not exist yet,
    or a new database on the suite's PostgreSQL server."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "data" / "relay.sqlite3")
    return str(request.getfixturevalue("postgres").new_database())


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """A migrated store, closed after the test."""
    opened = Store.open(db_url)
    try:
        yield opened
    finally:
        opened.close()


def foreign_keys_on(connection: Connection) -> None:
    """Enforce foreign keys on *connection*, as the store's own connections do:
    SQLite needs asking per connection, PostgreSQL always enforces them."""
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("PRAGMA foreign_keys = ON")


def make_room(url: str) -> str:
    """Create a SQLite file's directory (``Store.open`` does that itself, an
    engine opened directly does not); *url* unchanged, for chaining."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return url
