"""End-to-end tests again, with the broker's store on PostgreSQL.

The store's own tests run on both engines (tests/relay/store); here whole
sessions do: a real broker whose ``database_url`` names a database on the
suite's PostgreSQL server, everything else as in the SQLite runs. The tests are
the very functions of the other modules, imported under a name that says where
they run; this module's ``pki`` fixture, which overrides the package's, is what
puts them on PostgreSQL. Chosen so that every kind of store use in a session is
crossed: presence and the session rows (an on-site end, a real shell), the
device revocation feed, the login-session revocation feed, the label feed of
the policy recheck, and the auditors' listing. Not the happy-path test: it
counts the process's sockets, and the PostgreSQL pool's connections are
sockets that open as the pool grows.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import PKI, make_pki
from tests.e2e.test_audit_api import (
    test_auditor_lists_recorded_sessions_newest_first_with_filters as test_audit_listing_on_postgresql,
)
from tests.e2e.test_sessions_broker import (
    test_logout_ends_the_session as test_logout_ends_the_session_on_postgresql,
    test_onsite_end_tells_the_engineer as test_a_session_on_postgresql,
    test_revocation_ends_the_session as test_revocation_ends_the_session_on_postgresql,
)
from tests.e2e.test_sessions_end_to_end import (
    test_shell_on_the_device_through_a_real_pty as test_a_real_shell_on_postgresql,
)
from tests.e2e.test_sessions_policy import (
    test_a_label_change_ends_the_live_session as test_a_label_change_on_postgresql,
)
from tests.pg_cluster import PostgresCluster

__all__ = [
    "test_a_label_change_on_postgresql",
    "test_a_real_shell_on_postgresql",
    "test_a_session_on_postgresql",
    "test_audit_listing_on_postgresql",
    "test_logout_ends_the_session_on_postgresql",
    "test_revocation_ends_the_session_on_postgresql",
]


@pytest.fixture
def pki(tmp_path: Path, postgres: PostgresCluster) -> PKI:
    """As the package's ``pki``, with the store in a new PostgreSQL database."""
    return make_pki(tmp_path / "relay-data", database_url=postgres.new_database())
