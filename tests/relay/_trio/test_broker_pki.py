"""The broker's certificate snapshot: loaded as one consistent set."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import relay._trio.broker_pki as broker_pki
from relay._trio.broker_pki import PKISnapshot, _Files, load_snapshot
from relay.config import BrokerConfig
from relay.pki_files import (
    DataDir,
    default_server_names,
    ensure_listener_certificate,
    init_ca,
    issued_by,
    load_ca_certificate,
    retire_previous_ca,
    rollover_ca,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
YEAR = timedelta(days=365)


def _rolled_over(tmp_path: Path) -> tuple[BrokerConfig, _Files]:
    """A dev-mode data dir in the middle of a rollover, its listener issued by the
    previous CA (as the broker does while agents have not renewed)."""
    data_dir = DataDir(tmp_path)
    init_ca(data_dir, now=NOW, lifetime=YEAR * 10)
    rollover_ca(data_dir, now=NOW, lifetime=YEAR * 10)
    config = BrokerConfig(data_dir=tmp_path)
    ensure_listener_certificate(
        data_dir,
        names=default_server_names(config.server_names),
        now=NOW,
        lifetime=timedelta(days=config.pki.server_cert_lifetime_days),
    )
    return config, _Files(data_dir.listener_cert, data_dir.listener_key, True)


def test_retire_during_the_read_never_pairs_the_new_trust_with_the_old_listener(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`relay ca retire-previous` landing between the listener check and the CA
    reads: the snapshot that trusts only the new CA serves a listener it issued
    (an agent that renewed and trusts only the new CA can connect)."""
    config, files = _rolled_over(tmp_path)
    data_dir = DataDir(tmp_path)
    calls: list[bool] = []

    def ensure_then_retire(*args: object, **kwargs: object) -> bool:
        issued = ensure_listener_certificate(*args, **kwargs)  # type: ignore[arg-type]
        if not calls:
            retire_previous_ca(data_dir)
        calls.append(issued)
        return issued

    monkeypatch.setattr(broker_pki, "ensure_listener_certificate", ensure_then_retire)
    snapshot = load_snapshot(config, files, now=NOW)
    assert isinstance(snapshot, PKISnapshot)
    try:
        assert snapshot.previous_ca_certificate is None
        assert issued_by(snapshot.listener_certificate, load_ca_certificate(data_dir))
        assert calls == [False, True]  # the second look issued the new listener
    finally:
        shutil.rmtree(snapshot.staged, ignore_errors=True)


def test_a_listener_no_ca_can_reissue_is_used_as_it_is(tmp_path: Path) -> None:
    """The CA key kept offline after a retirement: the old listener stays (there
    is nothing to issue a new one with) and the set still loads."""
    config, files = _rolled_over(tmp_path)
    data_dir = DataDir(tmp_path)
    retire_previous_ca(data_dir)
    data_dir.ca_key.unlink()
    snapshot = load_snapshot(config, files, now=NOW)
    assert isinstance(snapshot, PKISnapshot)
    try:
        assert snapshot.signing_ca is None
        assert not issued_by(
            snapshot.listener_certificate, load_ca_certificate(data_dir)
        )
    finally:
        shutil.rmtree(snapshot.staged, ignore_errors=True)
