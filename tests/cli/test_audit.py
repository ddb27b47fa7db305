"""``relay audit ...`` and the CLI's own audit records, run as real subprocesses.

The data dir with a session in it is built in this process through the classes
the broker uses (AuditLog, Store, SessionRecording, signed receipts, the device
CA), as the broker's SessionArchive writes them; the commands under test then
run as ``python -m relay audit ...`` against it. Evidence bundles are verified
by a fresh process in another working directory, with nothing but the bundle.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relay._trio.session_archive import receipt_document
from relay.audit import AuditChain
from relay.audit_commands import cli_audit, cmd_audit_verify
from relay.audit_log import AuditLog, load_or_create_audit_key
from relay.audit_reader import (
    BUNDLE_SIG_CONTEXT,
    BundleReport,
    export_bundle,
    sha256_file,
    verify_bundle,
)
from relay.cli import CLIError
from relay.config import AuditConfig, BrokerConfig
from relay.enrollment import sign_and_record
from relay.pki_files import AgentDir, DataDir, enroll_agent, init_ca
from relay.proto import receipts
from relay.proto.tunnel import Side, StreamClose, StreamData, StreamOpen, StreamOpenOk
from relay.recordings import SessionRecording
from relay.store import RemoteSessionRecord, Store
from tests.small_disk import small_disk

PASSWORD = "correct horse battery staple"  # noqa: S105 - a test input
DEVICE_ID = "pump-7"
SESSION_ID = "0123456789abcdef0123456789abcdef"
REASON = "ticket 4711: conductivity alarm"


def run_relay(
    *args: str | Path,
    data_dir: Path | None,
    cwd: Path,
    stdin: str | None = None,
    env_extra: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m relay ARGS`` in *cwd*; RELAY_DATA_DIR is *data_dir* (or unset).

    Fails the test on a traceback or private key material in the output.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RELAY_DATA_DIR", "RELAY_AUDIT_CHECKPOINT_SINK")
    }
    if data_dir is not None:
        env["RELAY_DATA_DIR"] = str(data_dir)
    env.update(env_extra or {})
    result = subprocess.run(
        [sys.executable, "-m", "relay", *(str(arg) for arg in args)],
        env=env,
        cwd=cwd,
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        start_new_session=True,
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert "PRIVATE KEY" not in result.stdout + result.stderr
    return result


@dataclass(frozen=True)
class Data:
    """A data dir and a way to run the CLI on it."""

    workdir: Path

    @property
    def root(self) -> Path:
        return self.workdir / "data"

    @property
    def audit_dir(self) -> Path:
        return DataDir(self.root).audit_dir

    @property
    def chain_file(self) -> Path:
        return self.audit_dir / "audit-000000000001.jsonl"

    def __call__(
        self, *args: str | Path, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run_relay(*args, data_dir=self.root, cwd=self.workdir, stdin=stdin)

    def records(self) -> list[dict[str, Any]]:
        lines = self.chain_file.read_bytes().splitlines()
        return [json.loads(line) for line in lines]


@pytest.fixture
def data(tmp_path: Path) -> Data:
    return Data(tmp_path)


def _nonce() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode("ascii")


def _receipt_file(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, sort_keys=True, indent=2) + "\n", "ascii")


@pytest.fixture
def session_data(data: Data) -> Data:
    """A data dir holding one finished session, written as the broker writes it:
    row, records (checkpoint every 4), grant and end receipts, device
    certificate, and a shell recording whose hash is in the chain."""
    now = datetime.now(UTC)
    config = BrokerConfig(data_dir=data.root)
    data_dir = DataDir(data.root)
    init_ca(data_dir, now=now, lifetime=timedelta(days=30))
    agent = AgentDir(data.workdir / "agent")
    enroll_agent(agent, DEVICE_ID)
    signed = sign_and_record(config, agent.csr.read_bytes(), agent.cert, now=now)
    device_key = serialization.load_pem_private_key(
        agent.key.read_bytes(), password=None
    )
    key = load_or_create_audit_key(data_dir.audit_key, data_dir.audit_public_key)
    log = AuditLog(
        data_dir.audit_dir,
        signer=key,
        config=AuditConfig(checkpoint_every_records=4),
        mirror=None,
    )
    store = Store.open(config.effective_database_url)
    try:
        log.append("user.added", {"username": "alice", "role": "engineer"})
        fingerprint = signed.identity.fingerprint_sha256
        store.record_session_request(
            RemoteSessionRecord(
                session_id=SESSION_ID,
                node_id="node-1",
                device_id=DEVICE_ID,
                engineer="alice",
                reason=REASON,
                channels=("shell",),
                source="127.0.0.1",
                device_fingerprint=fingerprint,
                requested_at=now,
                start_seq=log.seq,
            )
        )
        log.append(
            "session.requested",
            {
                "session_id": SESSION_ID,
                "device_id": DEVICE_ID,
                "engineer": "alice",
                "reason": REASON,
                "channels": ["shell"],
                "device_fingerprint": fingerprint,
            },
        )
        nonce = _nonce()
        grant = receipts.GrantReceipt(
            session_id=SESSION_ID,
            device_id=DEVICE_ID,
            nonce=nonce,
            engineer="alice",
            channels=("shell",),
            max_seconds=3600,
            granted_at_ms=int(now.timestamp() * 1000),
            decided_by="nurse on site",
        )
        folder = data_dir.recordings / SESSION_ID
        folder.mkdir(parents=True)
        _receipt_file(
            folder / "grant-receipt.json",
            receipt_document("grant", receipts.sign_grant(device_key, grant)),  # type: ignore[arg-type]
        )
        shutil.copyfile(agent.cert, folder / "device.crt")
        store.record_session_grant(
            SESSION_ID,
            at=now,
            decided_by="nurse on site",
            channels=("shell",),
            max_seconds=3600,
        )
        log.append(
            "session.granted",
            {
                "session_id": SESSION_ID,
                "device_id": DEVICE_ID,
                "channels": ["shell"],
                "max_seconds": 3600,
                "decided_by": "nurse on site",
            },
        )
        recording = SessionRecording(
            data_dir.recordings,
            session_id=SESSION_ID,
            started_at=now,
            record_input=False,
            max_bytes=1 << 20,
        )
        recording.observe(
            StreamOpen(stream_id=1, channel="shell", cols=80, rows=24), Side.ENGINEER, 1
        )
        recording.observe(StreamOpenOk(stream_id=1), Side.DEVICE, 1.1)
        recording.observe(
            StreamData(stream_id=1, payload=b"$ uptime\r\n"), Side.DEVICE, 1.5
        )
        recording.observe(StreamClose(stream_id=1), Side.DEVICE, 2)
        recording.observe(StreamClose(stream_id=1), Side.ENGINEER, 2)
        summary = recording.close(3)
        end = receipts.EndReceipt(
            session_id=SESSION_ID,
            device_id=DEVICE_ID,
            nonce=nonce,
            reason="engineer",
            ended_at_ms=int(now.timestamp() * 1000) + 3000,
            bytes_to_device=7,
            bytes_from_device=10,
            streams_opened=1,
        )
        _receipt_file(
            folder / "end-receipt.json",
            receipt_document("end", receipts.sign_end(device_key, end)),  # type: ignore[arg-type]
        )
        log.append(
            "session.end",
            {
                "session_id": SESSION_ID,
                "reason": "engineer",
                "bytes_to_device": 7,
                "device_fingerprint": fingerprint,
            },
        )
        files = [
            {
                "name": f.name,
                "kind": f.kind,
                "size_bytes": f.size_bytes,
                "sha256": f.sha256,
            }
            for f in summary.files
        ]
        for entry in files:
            log.append("session.recording", {"session_id": SESSION_ID, **entry})
        store.record_session_end(
            SESSION_ID,
            at=now + timedelta(seconds=3),
            reason="engineer",
            bytes_to_device=7,
            bytes_from_device=10,
            recordings=files,
        )
    finally:
        log.close()
        store.close()
    return data


def _export(data: Data, out: Path) -> subprocess.CompletedProcess[str]:
    today = datetime.now(UTC).date()
    return data(
        "audit",
        "export",
        "--from",
        str(today - timedelta(days=1)),
        "--to",
        str(today + timedelta(days=1)),
        "--out",
        out,
    )


# The CLI's own records --------------------------------------------------------------


def test_user_add_is_audited_and_the_log_verifies(data: Data) -> None:
    """`user add` appends user.added (with the OS user) and seals it; verify says 0."""
    added = data(
        "user",
        "add",
        "alice",
        "--role",
        "engineer",
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )
    assert added.returncode == 0, added.stderr
    records = data.records()
    assert [r["event"] for r in records] == [
        "cli.command",
        "user.added",
        "audit.checkpoint",
    ]
    assert records[0]["command"] == "user add"
    assert records[1]["username"] == "alice"
    assert records[1]["role"] == "engineer"
    assert records[0]["by"]
    assert (data.audit_dir / "checkpoints.jsonl").read_bytes().count(b"\n") == 1

    human = data("audit", "verify")
    assert human.returncode == 0, human.stdout + human.stderr
    assert "records verified   3 (seq 1 to 3)" in human.stdout
    assert "OK: the log verifies" in human.stdout
    assert "out of band" in human.stdout

    report = json.loads(data("audit", "verify", "--json").stdout)
    assert report["ok"] is True
    assert (report["records"], report["last_checkpoint_seq"]) == (3, 3)
    assert len(report["key_fingerprint"]) == 64

    # One file on its own, with the key beside it.
    single = data("audit", "verify", data.chain_file)
    assert single.returncode == 0, single.stdout + single.stderr


def test_a_log_that_cannot_be_continued_refuses_the_change(data: Data) -> None:
    """Fail closed: a damaged last line stops `user add` before the user exists."""
    data.audit_dir.mkdir(parents=True)
    data.chain_file.write_bytes(b"this is not an audit record\n")
    added = data(
        "user",
        "add",
        "bob",
        "--role",
        "engineer",
        "--password-stdin",
        stdin=PASSWORD + "\n",
    )
    assert added.returncode == 1
    assert "relay: error: the audit log cannot be continued" in added.stderr
    assert "nothing was changed" in added.stderr
    listed = data("user", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []


# verify: tampering -------------------------------------------------------------------


def _lines(data: Data) -> list[bytes]:
    return data.chain_file.read_bytes().splitlines(keepends=True)


def _flip_byte(data: Data) -> tuple[str, int]:
    lines = _lines(data)
    index = next(i for i, line in enumerate(lines) if b"conductivity" in line)
    lines[index] = lines[index].replace(b"conductivity", b"conductivitz")
    data.chain_file.write_bytes(b"".join(lines))
    # The changed record still parses; the next one no longer follows it.
    return "bad_prev", index + 2


def _delete_line(data: Data) -> tuple[str, int]:
    lines = _lines(data)
    index = next(i for i, line in enumerate(lines) if b"session.granted" in line)
    del lines[index]
    data.chain_file.write_bytes(b"".join(lines))
    return "seq_gap", index + 2


def _cut_tail(data: Data) -> tuple[str, int]:
    lines = _lines(data)
    assert b"audit.checkpoint" in lines[-1]
    data.chain_file.write_bytes(b"".join(lines[:-2]))  # the sink still has it
    return "truncated", len(lines) - 2


@pytest.mark.parametrize("tamper", [_flip_byte, _delete_line, _cut_tail])
def test_tampering_is_found_and_named(
    session_data: Data, tamper: Callable[[Data], tuple[str, int]]
) -> None:
    """A changed byte, a deleted line, a cut tail: exit 1, first bad record named."""
    reason, seq = tamper(session_data)
    result = session_data("audit", "verify", "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    problem = json.loads(result.stdout)["problem"]
    assert problem["reason"] == reason
    human = session_data("audit", "verify")
    assert human.returncode == 1
    assert "TAMPERED OR DAMAGED" in human.stdout
    if reason == "bad_prev":
        assert problem["seq"] == seq
        assert (
            f"record {seq} does not follow record {seq - 1}: a record before it "
            "was changed, removed or reordered"
        ) in human.stdout
    elif reason == "seq_gap":
        assert problem["seq"] == seq
        assert (
            f"record {seq} follows record {seq - 2}: record {seq - 1} is missing"
            in (human.stdout)
        )
    else:
        assert f"the log ends at record {seq}" in human.stdout
        assert "records after it were cut off" in human.stdout


def test_verify_cannot_read_is_exit_2(data: Data) -> None:
    result = data("audit", "verify", data.workdir / "nowhere")
    assert result.returncode == 2
    assert "relay: error: cannot read" in result.stderr


# export and verify a bundle ------------------------------------------------------------


def test_export_verifies_offline_and_tampering_is_found(
    session_data: Data, tmp_path: Path
) -> None:
    """Export, copy the bundle away, verify it in a fresh process: 0; tamper: 1."""
    out = session_data.workdir / "bundle"
    exported = _export(session_data, out)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert f"verify it anywhere: relay audit verify {out}" in exported.stdout
    last = session_data.records()
    assert last[-1]["event"] == "audit.checkpoint"
    record = last[-2]
    assert record["event"] == "audit.exported"
    assert record["out"] == str(out.resolve())
    assert record["by"]
    assert record["from"].endswith("T00:00:00Z")

    elsewhere = tmp_path / "auditor"
    elsewhere.mkdir()
    bundle = elsewhere / "evidence"
    shutil.copytree(out, bundle)

    def verify(*extra: str) -> subprocess.CompletedProcess[str]:
        return run_relay(
            "audit", "verify", "evidence", *extra, data_dir=None, cwd=elsewhere
        )

    good = verify()
    assert good.returncode == 0, good.stdout + good.stderr
    assert "evidence bundle evidence" in good.stdout
    assert "1 recording(s) and 2 receipt(s) verified" in good.stdout
    assert "OK: the log verifies" in good.stdout
    report = json.loads(verify("--json").stdout)
    assert report["ok"] is True
    assert report["bundle"]["sessions"] == 1

    # A recording changed, and the manifest rewritten to match: the chain's
    # session.recording record still names the old hash.
    cast = bundle / "sessions" / SESSION_ID / "shell-1.cast"
    cast.write_bytes(cast.read_bytes().replace(b"uptime", b"rm -rf"))
    manifest_path = bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    digest = hashlib.sha256(cast.read_bytes()).hexdigest()
    manifest["files"][f"sessions/{SESSION_ID}/shell-1.cast"] = digest
    manifest_path.write_text(json.dumps(manifest))
    changed = verify()
    assert changed.returncode == 1
    assert (
        f"PROBLEM: sessions/{SESSION_ID}/shell-1.cast: SHA-256 differs from the "
        "audit record"
    ) in changed.stdout

    # A record changed.
    shutil.rmtree(bundle)
    shutil.copytree(out, bundle)
    records = bundle / "records.jsonl"
    records.write_bytes(
        records.read_bytes().replace(b"nurse on site", b"nurse on sitf")
    )
    forged = verify("--json")
    assert forged.returncode == 1
    report = json.loads(forged.stdout)
    assert report["problem"]["reason"] == "bad_prev"
    assert "records.jsonl: SHA-256 differs from the manifest" in report["problems"]

    # A recording slipped in that no record vouches for, manifest rewritten.
    shutil.rmtree(bundle)
    shutil.copytree(out, bundle)
    planted = bundle / "sessions" / SESSION_ID / "shell-9.cast"
    planted.write_bytes(b'{"version": 2, "width": 80, "height": 24}\n')
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][f"sessions/{SESSION_ID}/shell-9.cast"] = hashlib.sha256(
        planted.read_bytes()
    ).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    slipped = verify()
    assert slipped.returncode == 1
    assert (
        f"sessions/{SESSION_ID}/shell-9.cast: no session.recording record in the "
        "bundle vouches for it"
    ) in slipped.stdout


def test_export_refuses_bad_ranges_and_non_empty_directories(
    session_data: Data,
) -> None:
    out = session_data.workdir / "used"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused = _export(session_data, out)
    assert refused.returncode == 2
    assert "is not empty" in refused.stderr
    backwards = session_data(
        "audit",
        "export",
        "--from",
        "2026-06-02",
        "--to",
        "2026-06-01",
        "--out",
        session_data.workdir / "new",
    )
    assert backwards.returncode == 2
    assert "--from must be before --to" in backwards.stderr


# show --------------------------------------------------------------------------------


def test_show_a_session_and_an_unknown_one(session_data: Data) -> None:
    shown = session_data("audit", "show", "--session", SESSION_ID)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    text = shown.stdout
    for expected in (
        f"session {SESSION_ID}",
        "engineer           alice",
        f"reason             {REASON}",
        "by nurse on site",
        "(engineer)",
        "7 to the device, 10 from it",
        "session.requested",
        "session.recording",
        'grant  decided_by="nurse on site"',
        "end    reason=engineer bytes_to_device=7",
        "shell-1.cast",
        "file matches",
    ):
        assert expected in text, (expected, text)
    report = json.loads(
        session_data("audit", "show", "--session", SESSION_ID, "--json").stdout
    )
    assert report["session"]["duration_s"] == 3.0
    assert [r["event"] for r in report["timeline"]] == [
        "session.requested",
        "session.granted",
        "session.end",
        "session.recording",
    ]
    assert report["notes"] == []

    unknown = session_data("audit", "show", "--session", "f" * 32)
    assert unknown.returncode == 1
    assert f"relay: error: unknown session '{'f' * 32}'" in unknown.stderr


# verify: a log cut back and written again, archived head -------------------------------


def _audit_key(data: Data) -> Ed25519PrivateKey:
    data_dir = DataDir(data.root)
    return load_or_create_audit_key(data_dir.audit_key, data_dir.audit_public_key)


def test_a_log_cut_back_and_written_again_is_found(session_data: Data) -> None:
    """The sink's last checkpoint line must be the log's record at its seq: a log
    cut back before it and extended past it (with the key) does not verify."""
    sink = session_data.audit_dir / "checkpoints.jsonl"
    sealed = json.loads(sink.read_bytes().splitlines()[-1])["seq"]
    lines = _lines(session_data)
    kept = lines[:2]
    chain = AuditChain.resume(kept[-1])
    now = datetime.now(UTC)
    key = _audit_key(session_data)
    while chain.seq < sealed + 1:
        kept.append(chain.append("user.added", {"username": "mallory"}, now))
    kept.append(chain.checkpoint(now, key))
    session_data.chain_file.write_bytes(b"".join(kept))

    result = session_data("audit", "verify", "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    problem = json.loads(result.stdout)["problem"]
    assert (problem["reason"], problem["seq"]) == ("truncated", sealed)
    assert problem["file_line"] == sealed
    human = session_data("audit", "verify")
    assert human.returncode == 1
    assert (
        f"record {sealed} of the log is not the checkpoint the checkpoint sink "
        f"holds for seq {sealed}"
    ) in human.stdout
    assert f"records verified   {sealed - 1} (seq 1 to {sealed - 1})" in human.stdout


def _verify_in_process(
    path: Path, capsys: pytest.CaptureFixture[str], *, partial: bool, json_out: bool
) -> tuple[int, str]:
    args = argparse.Namespace(
        path=path, public_key=None, sink=None, json=json_out, partial=partial
    )
    code = cmd_audit_verify(args, path.parent)
    return code, capsys.readouterr().out


def test_an_archived_head_is_a_problem_unless_partial(
    session_data: Data, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory whose first file does not start at record 1 fails, naming the
    missing records; with --partial it verifies from its first record on."""
    lines = _lines(session_data)
    start = 3  # records 1 and 2 archived
    session_data.chain_file.unlink()
    (session_data.audit_dir / f"audit-{start:012d}.jsonl").write_bytes(
        b"".join(lines[start - 1 :])
    )
    code, out = _verify_in_process(
        session_data.audit_dir, capsys, partial=False, json_out=True
    )
    assert code == 1
    problem = json.loads(out)["problem"]
    assert (problem["reason"], problem["line"], problem["seq"]) == ("seq_gap", 1, 3)
    code, out = _verify_in_process(
        session_data.audit_dir, capsys, partial=False, json_out=False
    )
    assert code == 1
    assert "the first 2 records are missing: the oldest files were removed" in out
    assert "--partial" in out

    code, out = _verify_in_process(
        session_data.audit_dir, capsys, partial=True, json_out=False
    )
    assert code == 0, out
    assert "OK: the log verifies from record 3 on (--partial)" in out
    assert "records 1 to 2 are in the archived files" in out


# bundles: signed manifest, range, receipts tied to the chain, paths ---------------------


def _bundle(data: Data) -> Path:
    """An in-process export of the whole of *data*'s log, signed with its key."""
    data_dir = DataDir(data.root)
    now = datetime.now(UTC)
    out = data.workdir / "bundle"
    export_bundle(
        audit_dir=data_dir.audit_dir,
        recordings_dir=data_dir.recordings,
        since=now - timedelta(days=1),
        until=now + timedelta(days=1),
        out=out,
        signer=_audit_key(data),
    )
    return out


def _reseal(bundle: Path, key: Ed25519PrivateKey) -> None:
    """Rehash every file into the manifest and sign it again with *key*."""
    manifest_path = bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = {name: sha256_file(bundle / name) for name in manifest["files"]}
    raw = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    manifest_path.write_bytes(raw)
    signature = key.sign(BUNDLE_SIG_CONTEXT + raw)
    (bundle / "manifest.sig").write_bytes(
        base64.urlsafe_b64encode(signature).rstrip(b"=") + b"\n"
    )


def _rewrite_records(
    bundle: Path, key: Ed25519PrivateKey, change: Callable[[dict[str, Any]], None]
) -> None:
    """Rebuild the bundle's chain with *change* applied to each record, as the
    key's holder could: re-chained, checkpoints re-signed, manifest re-signed."""
    chain = AuditChain()
    lines: list[bytes] = []
    sink: list[bytes] = []
    for raw in (bundle / "records.jsonl").read_bytes().splitlines():
        record = json.loads(raw)
        change(record)
        ts = datetime.fromisoformat(record["ts"])
        if record["event"] == "audit.checkpoint":
            line = chain.checkpoint(ts, key)
            sink.append(line)
        else:
            fields = {
                k: v
                for k, v in record.items()
                if k not in ("seq", "prev", "ts", "event")
            }
            line = chain.append(record["event"], fields, ts)
        lines.append(line)
    (bundle / "records.jsonl").write_bytes(b"".join(lines))
    (bundle / "checkpoints.jsonl").write_bytes(b"".join(sink))
    _reseal(bundle, key)


def test_bundle_manifest_is_signed_and_names_the_records(session_data: Data) -> None:
    bundle = _bundle(session_data)
    key = _audit_key(session_data)
    good = verify_bundle(bundle)
    assert good.ok, good.problems
    assert good.receipts_checked == 2
    assert (bundle / "manifest.sig").is_file()
    assert (
        "manifest.sig"
        not in json.loads((bundle / "manifest.json").read_text())["files"]
    )

    # The manifest changed (its range widened), the signature not renewed.
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["from"] = "2000-01-01T00:00:00.000Z"
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    changed = verify_bundle(bundle)
    assert any(
        p.startswith("manifest.sig: the signature over manifest.json does not verify")
        for p in changed.problems
    ), changed.problems
    # Signed with another key.
    _reseal(bundle, Ed25519PrivateKey.generate())
    assert any(p.startswith("manifest.sig") for p in verify_bundle(bundle).problems)
    # No signature at all.
    _reseal(bundle, key)
    assert verify_bundle(bundle).ok
    (bundle / "manifest.sig").unlink()
    assert any(
        p.startswith("manifest.sig: missing") for p in verify_bundle(bundle).problems
    )


def _problems_after(bundle: Path, key: Ed25519PrivateKey, **fields: Any) -> list[str]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.update(fields)
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    _reseal(bundle, key)
    return verify_bundle(bundle).problems


def test_bundle_records_must_be_the_manifests_range(session_data: Data) -> None:
    """Records trimmed off the start, the manifest re-signed but its seqs left
    as they were: found; so are seqs or a range that do not agree."""
    bundle = _bundle(session_data)
    key = _audit_key(session_data)
    records = (bundle / "records.jsonl").read_bytes().splitlines(keepends=True)
    first = json.loads(records[0])["seq"]
    (bundle / "records.jsonl").write_bytes(b"".join(records[1:]))
    _reseal(bundle, key)
    problems = verify_bundle(bundle).problems
    assert any(
        p.startswith(f"manifest.json: names seq {first} to") for p in problems
    ), problems
    # Seqs and range consistent again, then a range that ends before it starts.
    problems = _problems_after(bundle, key, first_seq=first + 1)
    assert problems == []
    manifest = json.loads((bundle / "manifest.json").read_text())
    problems = _problems_after(bundle, key, to=manifest["from"])
    assert "manifest.json: from is not before to" in problems
    problems = _problems_after(
        bundle,
        key,
        **{"from": "2999-01-01T00:00:00.000Z", "to": "3000-01-01T00:00:00.000Z"},
    )
    assert any("is older than the manifest's from" in p for p in problems), problems
    problems = _problems_after(bundle, key, last_seq=True)
    assert any(p.startswith("manifest.json: names seq") for p in problems), problems


def _requested(value: str) -> Callable[[dict[str, Any]], None]:
    def change(record: dict[str, Any]) -> None:
        if record["event"] == "session.requested":
            record["device_fingerprint"] = value

    return change


def _granted_by(value: str) -> Callable[[dict[str, Any]], None]:
    def change(record: dict[str, Any]) -> None:
        if record["event"] == "session.granted":
            record["decided_by"] = value

    return change


def _no_change(record: dict[str, Any]) -> None:
    del record


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_no_change, None),
        (_requested("0" * 64), "device.crt: its fingerprint"),
        (_granted_by("the engineer"), "grant-receipt.json: decided_by 'nurse on site'"),
    ],
)
def test_bundle_receipts_are_tied_to_the_chain(
    session_data: Data,
    change: Callable[[dict[str, Any]], None],
    expected: str | None,
) -> None:
    """The device certificate's fingerprint is the one the session's records
    name, and the grant receipt says what the session.granted record says."""
    bundle = _bundle(session_data)
    _rewrite_records(bundle, _audit_key(session_data), change)
    report: BundleReport = verify_bundle(bundle)
    if expected is None:
        assert report.ok, report.problems
        assert report.receipts_checked == 2
        return
    assert any(f"sessions/{SESSION_ID}/{expected}" in p for p in report.problems), (
        report.problems
    )


def test_bundle_paths_stay_inside_the_bundle(session_data: Data) -> None:
    """A session id from a record is a path only if it is a plain id; a symlink
    anywhere in the bundle is a problem and is not followed."""
    bundle = _bundle(session_data)
    key = _audit_key(session_data)
    outside = bundle.parent / "outside"
    outside.mkdir()
    (outside / "grant-receipt.json").write_text("{}")

    def escape(record: dict[str, Any]) -> None:
        if record["event"] == "session.requested":
            record["session_id"] = "../../outside"

    _rewrite_records(bundle, key, escape)
    report = verify_bundle(bundle)
    assert not any("outside" in p for p in report.problems), report.problems
    assert any("its session id is not of the form" in n for n in report.notes)

    shutil.rmtree(bundle)
    bundle = _bundle(session_data)
    crt = bundle / "sessions" / SESSION_ID / "device.crt"
    (outside / "device.crt").write_bytes(crt.read_bytes())
    crt.unlink()
    crt.symlink_to(outside / "device.crt")
    report = verify_bundle(bundle)
    assert report.problems == [
        f"symlink in the bundle: sessions/{SESSION_ID}/device.crt"
    ]
    human = run_relay(
        "audit", "verify", bundle, data_dir=None, cwd=session_data.workdir
    )
    assert human.returncode == 1
    assert f"PROBLEM: symlink in the bundle: sessions/{SESSION_ID}/device.crt" in (
        human.stdout
    )


def test_the_checkpoint_sink_can_live_elsewhere(tmp_path: Path) -> None:
    """RELAY_AUDIT_CHECKPOINT_SINK puts the sink on another volume: the CLI's
    checkpoints go there, and verify checks the log's tail against it."""
    data_dir = tmp_path / "data"
    sink = tmp_path / "elsewhere" / "checkpoints.jsonl"
    sink.parent.mkdir()
    env = {"RELAY_AUDIT_CHECKPOINT_SINK": str(sink)}
    done = run_relay("ca", "init", data_dir=data_dir, cwd=tmp_path, env_extra=env)
    assert done.returncode == 0, done.stderr
    assert sink.is_file()
    assert not (data_dir / "audit" / "checkpoints.jsonl").exists()
    good = run_relay("audit", "verify", data_dir=data_dir, cwd=tmp_path, env_extra=env)
    assert good.returncode == 0, good.stdout + good.stderr
    # Cut the log back to nothing sealed: only the sink elsewhere knows.
    [log_file] = sorted((data_dir / "audit").glob("audit-*.jsonl"))
    lines = log_file.read_bytes().splitlines(keepends=True)
    log_file.write_bytes(b"".join(lines[:-1]))
    cut = run_relay("audit", "verify", data_dir=data_dir, cwd=tmp_path, env_extra=env)
    assert cut.returncode == 1, cut.stdout + cut.stderr


def test_a_full_audit_disk_stops_a_command_before_it_changes_anything(
    tmp_path: Path,
) -> None:
    """The command's own record (``cli.command``) comes first: on a full disk it
    cannot be written, and the command refuses before touching the store."""
    data_dir = tmp_path / "data"
    config = BrokerConfig(data_dir=data_dir)
    with small_disk(DataDir(data_dir).audit_dir, "64k") as disk:
        key = load_or_create_audit_key(
            DataDir(data_dir).audit_key, DataDir(data_dir).audit_public_key
        )
        # Fill the disk with records, down to the last bytes of the log's
        # last page: smaller and smaller, each size until one fails.
        for size in (200, 20, 0):
            filler = AuditLog(disk, signer=key, config=AuditConfig())
            while filler.append("a.b", {"t": "y" * size}) is not None:
                pass
            filler.close()
        ran = False
        with (
            pytest.raises(CLIError, match="nothing was changed"),
            cli_audit(config),
        ):
            ran = True
        assert not ran
