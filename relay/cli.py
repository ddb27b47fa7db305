"""The ``relay`` command line.

Exit codes: 0 success; 1 the command ran but was refused or failed (unknown device,
revoked device, broker could not start, unusable CA, store failure); 2 bad usage or
bad input (argparse errors, an invalid CSR, a malformed address, an unsafe
``--out``). Messages for people go to stderr as ``relay: error: ...``, never as a
traceback: :func:`main` and :func:`_run_trio` turn the expected failures
(``_FAILURES``) into that one line. Structured JSON logs go to stderr too, so stdout
carries only what a script would parse (``relay ca cert``, ``--json`` output).
"""

from __future__ import annotations

import argparse
import errno
import getpass
import io
import json
import os
import shlex
import signal
import sys
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager, closing
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import auth
from policies import PolicyError
from policies.model import LABEL_KEY, LABEL_VALUE
from relay import __version__
from relay.config import AgentConfig, BrokerConfig, ListenAddress, data_dir_from_env
from relay.demo_engineer import DEMO_ENGINEER, DemoEngineer, ensure_demo_engineer
from relay.engineer_client import (
    ApiError,
    Credentials,
    LoginFailed,
    load_credentials,
    login as engineer_login,
    parse_broker_url as parse_engineer_broker_url,
    save_credentials,
)
from relay.enrollment import UnsafeDestination, sign_and_record
from relay.log import configure_logging, get_logger
from relay.pki_files import (
    AgentDir,
    CAError,
    DataDir,
    KeyExists,
    enroll_agent,
    init_ca,
    load_or_create_sealing_key,
)
from relay.store import (
    MAX_USER_GROUPS,
    DeviceRevoked,
    StoreError,
    UnknownDevice,
    UnknownUser,
    UserExists,
    UserRecord,
)
from relay.users import (
    NewUser,
    create_user,
    reset_totp,
    totp_policy,
    validate_organisation,
    validate_role,
    validate_username,
)

if TYPE_CHECKING:
    import trio

    from relay.audit_commands import CliAudit
    from relay.store import Store

DEMO_DEVICE_ID = "demo-0001"
# The store keeps at most this many characters of a revocation reason.
MAX_REVOKE_REASON_CHARS = 200

# What a command may fail with for reasons outside the program (a missing or broken
# CA, a locked or unreachable database, a port in use, a file that cannot be read):
# reported as one line with exit code 1, never as a traceback.
_FAILURES: tuple[type[Exception], ...] = (
    CAError,
    KeyExists,
    StoreError,
    OSError,
    PolicyError,
)


def _open_store(config: BrokerConfig) -> closing[Store]:
    """The broker's store, closed when the ``with`` block ends.

    Imported here, not at the top: SQLAlchemy and Alembic take about half a
    second to load, which every ``relay shell`` or ``relay agent run`` would pay.
    """
    from relay.store import Store

    return closing(Store.open(config.effective_database_url))


def _audited(config: BrokerConfig) -> AbstractContextManager[CliAudit]:
    """The data dir's audit log for one state-changing command (see
    :func:`relay.audit_commands.cli_audit`): opened before the change, so a log
    that cannot be written refuses the command with nothing changed; closed
    (sealed with a checkpoint) after it. Use its ``logger`` for ``audit=True``.
    """
    from relay.audit_commands import cli_audit

    return cli_audit(config)


class CLIError(Exception):
    """A failure to report as ``relay: error: ...`` with an exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, with usage errors worded like every other error (``relay: error:``)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"relay: error: {message}\n")


def _now() -> datetime:
    return datetime.now(UTC)


def _data_dir(path: Path | None = None) -> Path:
    """*path* or ``$RELAY_DATA_DIR``, refused when it exists and is not a directory."""
    if path is None:
        path = data_dir_from_env()
    if path.exists() and not path.is_dir():
        name = "RELAY_DATA_DIR" if os.environ.get("RELAY_DATA_DIR") else "data_dir"
        raise CLIError(
            f"{name} {path} is not a directory; point it at a directory "
            "(it is created if missing)"
        )
    return path


def _config_path(args: argparse.Namespace | None = None) -> Path | None:
    """``--config FILE``, else ``$RELAY_CONFIG``, else no file."""
    given = getattr(args, "config", None)
    if given is not None:
        return Path(given)
    from_env = os.environ.get("RELAY_CONFIG")
    return Path(from_env) if from_env else None


def _load_config(path: Path | None) -> BrokerConfig:
    """The configuration file at *path* (if any) under the ``RELAY_*`` environment.

    Raises:
        CLIError: Exit code 2, naming the file or variable and the key.
    """
    from relay.config_file import ConfigError, load_config

    try:
        return load_config(path, os.environ)
    except ConfigError as exc:
        raise CLIError(f"{exc.source}: {exc}", exit_code=2) from None


def _base_config(args: argparse.Namespace | None = None) -> BrokerConfig:
    """The configuration every command starts from: defaults < the configuration
    file (``--config`` or ``$RELAY_CONFIG``) < ``RELAY_*`` variables (the data dir,
    ``RELAY_AUDIT_CHECKPOINT_SINK``, ``RELAY_<TABLE>__<KEY>``; see
    :mod:`relay.config_file`). The command-line flags go on top of it."""
    config = _load_config(_config_path(args))
    return replace(config, data_dir=_data_dir(config.data_dir))


def _describe(exc: BaseException) -> str:
    """One line for *exc*, one of ``_FAILURES``, for ``relay: error: ...``."""
    if isinstance(exc, PolicyError):
        return f"the access policy does not load: {exc}"
    if isinstance(exc, StoreError):
        text = f"cannot use the store: {exc}"
        if "locked" in str(exc):
            text += " (another process holds the database's write lock; try again)"
        return text
    if isinstance(exc, OSError) and exc.strerror:
        # "[Errno 98] Address already in use" reads better without the number.
        if exc.filename is not None:
            return f"{exc.filename}: {exc.strerror}"
        return exc.strerror
    return str(exc)


def _reason(text: str) -> str:
    """argparse type of ``--reason``: what the store records and logs show verbatim."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    if len(text) > MAX_REVOKE_REASON_CHARS:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_REVOKE_REASON_CHARS} characters, got {len(text)}"
        )
    if not text.isprintable():
        raise argparse.ArgumentTypeError(
            "only printable characters (no control characters or line breaks)"
        )
    return text


def _address(text: str) -> ListenAddress:
    try:
        return ListenAddress.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _broker_config(args: argparse.Namespace) -> BrokerConfig:
    config = _base_config(args)
    overrides: dict[str, Any] = {}
    for name in ("device_listen", "engineer_listen", "metrics_listen"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if getattr(args, "server_name", None):
        overrides["server_names"] = tuple(args.server_name)
    if getattr(args, "tls_cert", None) or getattr(args, "tls_key", None):
        if not (args.tls_cert and args.tls_key):
            raise CLIError("--tls-cert and --tls-key go together", exit_code=2)
        overrides["tls_cert_file"], overrides["tls_key_file"] = (
            args.tls_cert,
            args.tls_key,
        )
    return replace(config, **overrides)


# ca ---------------------------------------------------------------------------------


def cmd_ca_init(args: argparse.Namespace) -> int:
    config = _base_config()
    data_dir = DataDir(config.data_dir)
    with _audited(config) as audit:
        created = init_ca(
            data_dir, now=_now(), lifetime=timedelta(days=config.pki.ca_lifetime_days)
        )
        if created:
            audit.logger.info("pki.ca_created", path=str(data_dir.ca_cert), audit=True)
    if created:
        print(f"created device CA in {data_dir.ca_cert.parent}", file=sys.stderr)
    else:
        print(
            f"device CA already exists in {data_dir.ca_cert.parent}; not overwritten",
            file=sys.stderr,
        )
    return 0


def cmd_ca_cert(args: argparse.Namespace) -> int:
    data_dir = DataDir(_data_dir())
    if not data_dir.ca_cert.exists():
        raise CLIError(f"no CA in {data_dir.root}; run `relay ca init` first")
    sys.stdout.write(data_dir.ca_cert.read_text())
    return 0


def cmd_ca_sign(args: argparse.Namespace) -> int:
    config = _base_config()
    csr_path: Path = args.csr
    out: Path = args.out
    # Checked before anything is signed: a typo must not leave a device
    # enrolled without the labels its policies expect.
    labels = _checked_label_pairs(args.label)
    try:
        with csr_path.open("rb") as handle:
            # Read one byte past the cap: enough to refuse, never the whole file.
            csr = handle.read(config.pki.max_csr_bytes + 1)
    except OSError as exc:
        raise CLIError(f"cannot read {csr_path}: {exc.strerror}", exit_code=2) from None
    with _audited(config) as audit:
        signed = _sign_csr(config, csr, csr_path, out, audit.logger)
        if labels:
            device_id = signed.identity.device_id
            with _open_store(config) as store:
                previous, labels = store.set_device_labels(
                    device_id, set=labels, remove=(), at=_now()
                )
            audit.logger.warning(
                "device.labels_changed",
                device_id=device_id,
                labels=_labels_text(labels),
                previous=_labels_text(previous),
                audit=True,
            )
    identity = signed.identity
    print(
        f"signed device {identity.device_id}: serial {identity.serial_hex}, "
        f"valid until {identity.not_after:%Y-%m-%d}, written to {out}",
        file=sys.stderr,
    )
    return 0


def cmd_ca_rollover(args: argparse.Namespace) -> int:
    """``relay ca rollover``: a new device CA; the current one stays trusted."""
    from relay.pki_files import rollover_ca

    config = _base_config()
    data_dir = DataDir(config.data_dir)
    with _audited(config) as audit:
        previous, new = rollover_ca(
            data_dir, now=_now(), lifetime=timedelta(days=config.pki.ca_lifetime_days)
        )
        audit.logger.warning(
            "pki.ca_rollover",
            previous_fingerprint=auth.certificate_fingerprint(previous),
            previous_not_after=previous.not_valid_after_utc.isoformat(),
            new_fingerprint=auth.certificate_fingerprint(new),
            new_not_after=new.not_valid_after_utc.isoformat(),
            audit=True,
        )
    print(
        f"new device CA in {data_dir.ca_cert}; the previous one is trusted until "
        "`relay ca retire-previous` (devices move over by renewing; see "
        "docs/certificates.md)",
        file=sys.stderr,
    )
    return 0


def cmd_ca_retire_previous(args: argparse.Namespace) -> int:
    """``relay ca retire-previous``: stop trusting the CA before the rollover."""
    from relay.pki_files import retire_previous_ca

    config = _base_config()
    data_dir = DataDir(config.data_dir)
    with _audited(config) as audit:
        retired = retire_previous_ca(data_dir)
        if retired is not None:
            audit.logger.warning(
                "pki.ca_previous_retired",
                fingerprint=auth.certificate_fingerprint(retired),
                not_after=retired.not_valid_after_utc.isoformat(),
                audit=True,
            )
    if retired is None:
        print("no previous device CA; nothing to retire", file=sys.stderr)
    else:
        print(
            "previous device CA retired: certificates it issued are refused from "
            "the broker's next look at the files (pki.tls_reload_poll_s)",
            file=sys.stderr,
        )
    return 0


def _sign_csr(
    config: BrokerConfig, csr: bytes, csr_path: Path, out: Path, log: Any
) -> auth.SignedDevice:
    """Sign and record *csr*; the refusal or the signature goes to *log*."""
    try:
        signed = sign_and_record(config, csr, out, now=_now())
    except auth.CertificateRequestError as exc:
        log.warning(
            "pki.csr_refused",
            reason=exc.reason,
            path=str(csr_path),
            detail=str(exc),
            audit=True,
        )
        raise CLIError(
            f"certificate request refused ({exc.reason}): {exc}", exit_code=2
        ) from None
    except DeviceRevoked as exc:
        log.warning(
            "pki.csr_refused", reason="device_revoked", detail=str(exc), audit=True
        )
        raise CLIError(f"{exc}; revoked device ids are not reused") from None
    except UnsafeDestination as exc:
        raise CLIError(f"--out refused: {exc}", exit_code=2) from None
    identity = signed.identity
    for item in signed.ignored_requests:
        print(
            f"warning: the request asked for {item}; not granted (fixed device profile)",
            file=sys.stderr,
        )
    log.info(
        "pki.device_signed",
        device_id=identity.device_id,
        serial=identity.serial_hex,
        fingerprint=identity.fingerprint_sha256,
        not_after=identity.not_after.isoformat(),
        ignored_requests=list(signed.ignored_requests),
        audit=True,
    )
    return signed


# agent --------------------------------------------------------------------------------


def cmd_agent_enroll(args: argparse.Namespace) -> int:
    agent_dir = AgentDir(args.dir)
    try:
        enroll_agent(agent_dir, args.device_id)
    except ValueError as exc:
        raise CLIError(str(exc), exit_code=2) from None
    print(f"wrote {agent_dir.key} (mode 0600) and {agent_dir.csr}", file=sys.stderr)
    print(
        f"next: have the operator run `relay ca sign {agent_dir.csr} --out {agent_dir.cert}`",
        file=sys.stderr,
    )
    return 0


def _load_agent_config(path: Path) -> AgentConfig:
    from relay.config_file import ConfigError, load_agent_config

    try:
        return load_agent_config(path)
    except ConfigError as exc:
        raise CLIError(f"{exc.source}: {exc}", exit_code=2) from None


def agent_config_from_args(args: argparse.Namespace) -> AgentConfig:
    """The agent's settings: its ``--config`` file (if any) under the
    ``relay agent run`` flags.

    Raises:
        CLIError: The file is invalid or a flag's value is out of range (exit 2).
    """
    config_file = getattr(args, "config", None)
    base = AgentConfig() if config_file is None else _load_agent_config(config_file)
    changes: dict[str, Any] = {}
    try:
        if args.ui_listen is not None:
            changes["ui_listen"] = ListenAddress.parse(args.ui_listen)
        if args.allow_port:
            changes["allowed_ports"] = tuple(dict.fromkeys(args.allow_port))
        if args.shell is not None:
            changes["shell_command"] = tuple(shlex.split(args.shell))
        if args.max_session_seconds is not None:
            changes["max_session_seconds"] = args.max_session_seconds
        if args.ui_allow_remote:
            changes["ui_allow_remote"] = True
        return replace(base, **changes)
    except ValueError as exc:
        raise CLIError(str(exc), exit_code=2) from None


def cmd_agent_run(args: argparse.Namespace) -> int:
    import trio

    from relay._trio.agent import (
        AgentSettings,
        make_session_runtime,
        parse_broker_url,
        run_agent,
    )
    from relay._trio.agent_feed import make_agent_feed
    from relay._trio.agent_ui import TerminalPrompt, serve_agent_ui

    try:
        parse_broker_url(args.broker)
    except ValueError as exc:
        raise CLIError(str(exc), exit_code=2) from None
    settings = AgentSettings(
        broker_url=args.broker,
        agent_dir=args.dir,
        ca_file=args.ca_file,
        limits=agent_config_from_args(args),
    )

    async def main() -> None:
        deciders = [TerminalPrompt.on_stdio()] if args.prompt else []
        runtime = make_session_runtime(settings, deciders=deciders)
        feed = make_agent_feed(settings.agent_dir, settings.limits)
        stopping = trio.Event()

        async def shutdown() -> None:
            await runtime.shutdown()
            stopping.set()  # run_agent closes the control channel and returns

        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                _stop_agent_on_signal,
                shutdown,
                nursery.cancel_scope.cancel,
                settings.limits.shutdown_grace_s,
            )
            await nursery.start(runtime.run)
            await nursery.start(feed.run)
            port = await nursery.start(
                partial(serve_agent_ui, data_requests=feed.recent_requests),
                runtime,
                settings.limits.ui_listen,
            )
            host = settings.limits.ui_listen.host
            print(f"device UI: http://{host}:{port}/", file=sys.stderr)
            await run_agent(settings, runtime=runtime, stopping=stopping, feed=feed)
            nursery.cancel_scope.cancel()
        if stopping.is_set():
            get_logger("agent").info("agent.stopped")

    _run_trio(main)
    return 0


# device -------------------------------------------------------------------------------


def _print_json(rows: list[dict[str, Any]], *, enabled: bool) -> bool:
    """Print *rows* as JSON on stdout when ``--json`` was given; say whether it was."""
    if enabled:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return enabled


def cmd_device_list(args: argparse.Namespace) -> int:
    from relay._trio.device_listener import presence_stale_after

    config = _base_config()
    with _open_store(config) as store:
        devices = store.list_devices(
            now=_now(), stale_after=presence_stale_after(config)
        )
    rows: list[dict[str, Any]] = [
        {
            "device_id": d.device_id,
            "online": d.online,
            "revoked": d.revoked_at is not None,
            "enrolled_at": d.enrolled_at.isoformat(),
            "revoked_at": d.revoked_at.isoformat() if d.revoked_at else None,
            "last_seen": d.presence.last_seen.isoformat() if d.presence else None,
            "agent_version": d.presence.agent_version if d.presence else None,
            "peer": d.presence.peer if d.presence and d.online else None,
            "labels": dict(sorted(d.labels.items())),
        }
        for d in devices
    ]
    if _print_json(rows, enabled=args.json):
        return 0
    print(
        f"{'DEVICE':<24} {'ONLINE':<7} {'REVOKED':<8} {'ENROLLED':<20} {'PEER':<22} LABELS"
    )
    for row in rows:
        print(
            f"{row['device_id']:<24} {'yes' if row['online'] else 'no':<7} "
            f"{'yes' if row['revoked'] else 'no':<8} {str(row['enrolled_at'])[:19]:<20} "
            f"{row['peer'] or '-':<22} {_labels_text(row['labels']) or '-'}"
        )
    return 0


def _labels_text(labels: Mapping[str, str]) -> str:
    """Labels as ``k=v,k2=v2``, keys sorted (``""`` for none).

    Unambiguous: neither keys nor values may hold ``,`` or ``=``
    (``policies.model.LABEL_KEY``, ``LABEL_VALUE``).
    """
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def _label_pairs(pairs: Sequence[str]) -> dict[str, str]:
    """The ``KEY=VALUE`` arguments of ``device label`` as a dict (exit 2 if malformed).

    Keys and values are checked by the store, against the policies' syntax.
    """
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CLIError(f"malformed label {pair!r}: expected KEY=VALUE", exit_code=2)
        if key in labels:
            raise CLIError(f"label {key!r} is given twice", exit_code=2)
        labels[key] = value
    return labels


def _checked_label_pairs(pairs: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` arguments, keys and values checked here (exit 2) rather than
    by the store, for commands that must not act on a bad label."""
    labels = _label_pairs(pairs)
    for key, value in labels.items():
        if not LABEL_KEY.fullmatch(key):
            raise CLIError(
                f"invalid label key {key!r}: a-z first, then a-z, 0-9, '.', '_', '-'",
                exit_code=2,
            )
        if not LABEL_VALUE.fullmatch(value):
            raise CLIError(
                f"invalid value for label {key!r}: 1..128 letters, digits, "
                "'_.:/@+-' and inner spaces",
                exit_code=2,
            )
    return labels


def cmd_device_label(args: argparse.Namespace) -> int:
    changes = _label_pairs(args.labels)
    removals = list(dict.fromkeys(args.remove))
    if not changes and not removals:
        raise CLIError("nothing to change: give KEY=VALUE or --remove KEY", exit_code=2)
    config = _base_config()
    with _audited(config) as audit, _open_store(config) as store:
        try:
            previous, labels = store.set_device_labels(
                args.device_id, set=changes, remove=removals, at=_now()
            )
        except UnknownDevice:
            raise CLIError(f"unknown device {args.device_id!r}") from None
        except ValueError as exc:
            raise CLIError(str(exc), exit_code=2) from None
        audit.logger.warning(
            "device.labels_changed",
            device_id=args.device_id,
            labels=_labels_text(labels),
            previous=_labels_text(previous),
            audit=True,
        )
    if args.json:
        json.dump(
            {"device_id": args.device_id, "labels": dict(sorted(labels.items()))},
            sys.stdout,
        )
        sys.stdout.write("\n")
        return 0
    for key, value in sorted(labels.items()):
        print(f"{key}={value}")
    unchanged = " (unchanged)" if labels == previous else ""
    print(
        f"device {args.device_id} has {len(labels)} label(s){unchanged}",
        file=sys.stderr,
    )
    return 0


def cmd_device_revoke(args: argparse.Namespace) -> int:
    config = _base_config()
    with _audited(config) as audit, _open_store(config) as store:
        try:
            revoked = store.revoke_device(args.device_id, at=_now(), reason=args.reason)
        except UnknownDevice:
            raise CLIError(f"unknown device {args.device_id!r}") from None
        audit.logger.warning(
            "device.revoked" if revoked else "device.revoke_repeated",
            device_id=args.device_id,
            reason=args.reason,
            serials=[r.serial_hex for r in revoked],
            audit=True,
        )
    if revoked:
        print(
            f"revoked device {args.device_id} ({len(revoked)} certificate(s)); a live connection closes within seconds",
            file=sys.stderr,
        )
        _tell_the_fleet(config, "revoke_device", {"device_id": args.device_id})
    else:
        print(f"device {args.device_id} was already revoked", file=sys.stderr)
    return 0


def _tell_the_fleet(
    config: BrokerConfig, kind: str, args: dict[str, str]
) -> dict[str, bool] | None:
    """With several nodes, have every live node act on the change now and say
    which did (relay._trio.fleet_notice); the change is in the store already.
    Returns node -> confirmed, or None when Redis could not be reached."""
    if config.cluster.redis_url is None:
        return {}
    import trio

    from relay._trio.fleet_notice import notify_fleet
    from relay._trio.redis_state import SharedStateUnavailable
    from relay.proto.node_command import CommandKind

    try:
        confirmed = trio.run(notify_fleet, config.cluster, CommandKind(kind), args)
    except SharedStateUnavailable as exc:
        print(
            f"Redis unreachable ({exc}); every node reads the change from the "
            f"store within {config.engineer_listener.revocation_poll_s:g} s",
            file=sys.stderr,
        )
        return None
    for node_id, done in sorted(confirmed.items()):
        state = "done" if done else "no confirmation (it reads the store's feed)"
        print(f"node {node_id}: {state}", file=sys.stderr)
    return confirmed


# user ---------------------------------------------------------------------------------

# Recorded with the sessions that `relay user disable` ends.
_DISABLE_REASON = "user disabled by operator"


def _user_name(text: str) -> str:
    try:
        return validate_username(text)
    except ValueError as exc:
        raise CLIError(f"invalid user name {text!r}: {exc}", exit_code=2) from None


def _totp_sealer(config: BrokerConfig) -> auth.SecretSealer:
    """The sealer for TOTP secrets: key from ``RELAY_TOTP_SEALING_KEY`` or its file.

    Logs ``secrets.sealing_key`` with the key's source (never the key), and says
    when the key file was created by this call.
    """
    data_dir = DataDir(config.data_dir)
    configured = config.engineer_auth.totp_sealing_key or os.environ.get(
        "RELAY_TOTP_SEALING_KEY"
    )
    existed = data_dir.totp_sealing_key.exists()
    try:
        key, source = load_or_create_sealing_key(data_dir, configured)
    except ValueError as exc:
        if os.environ.get("RELAY_TOTP_SEALING_KEY"):
            where = "RELAY_TOTP_SEALING_KEY"
        elif configured:
            where = "engineer_auth.totp_sealing_key"
        else:
            where = str(data_dir.totp_sealing_key)
        raise CLIError(f"unusable TOTP sealing key in {where}: {exc}") from None
    created = not configured and not existed
    get_logger("cli").info("secrets.sealing_key", source=source, created=created)
    if created:
        print(
            f"created the TOTP sealing key {source} (mode 0600); keep it with the "
            "database's backups but apart from them, or set RELAY_TOTP_SEALING_KEY",
            file=sys.stderr,
        )
    return auth.SecretSealer(key)


def _read_password(args: argparse.Namespace) -> str:
    """The new user's password: one line of stdin, or typed twice without echo."""
    try:
        if args.password_stdin:
            line = sys.stdin.readline()
            if not line:
                raise CLIError("--password-stdin: no password on stdin", exit_code=2)
            return line.removesuffix("\n").removesuffix("\r")
        with warnings.catch_warnings():
            # Without a terminal getpass reads stdin and prints its own one-line
            # warning; the Python warning with a source line would only be noise.
            warnings.simplefilter("ignore", getpass.GetPassWarning)
            first = getpass.getpass("Password for the new user: ")
            second = getpass.getpass("Repeat the password: ")
    except EOFError:
        raise CLIError(
            "no password: input ended (use --password-stdin to pipe one in)",
            exit_code=2,
        ) from None
    except UnicodeDecodeError:
        raise CLIError("the password is not valid text", exit_code=2) from None
    except KeyboardInterrupt:
        raise CLIError("interrupted; no user added") from None
    if first != second:
        raise CLIError("passwords do not match; no user added", exit_code=2)
    return first


def _ask(prompt: str, *, secret: bool) -> str:
    """One answer from the person at the terminal (no echo when *secret*)."""
    try:
        if secret:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", getpass.GetPassWarning)
                return getpass.getpass(prompt)
        print(prompt, end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.strip()
    except EOFError:
        raise CLIError(
            "input ended before the login was complete", exit_code=2
        ) from None
    except KeyboardInterrupt:
        raise CLIError("interrupted; not logged in") from None


def cmd_login(args: argparse.Namespace) -> int:
    try:
        broker = parse_engineer_broker_url(args.broker)
    except ValueError as exc:
        raise CLIError(str(exc), exit_code=2) from None
    username = args.username or _ask("Username: ", secret=False)
    password = _ask("Password: ", secret=True)
    code = _ask("Authenticator code: ", secret=True)
    try:
        credentials = engineer_login(
            broker,
            username=username,
            password=password,
            totp=code.strip(),
            ca_file=args.ca_file,
        )
    except LoginFailed as exc:
        raise CLIError(f"login failed: {exc}") from None
    path = save_credentials(credentials)
    print(
        f"logged in to {broker} as {username} until {credentials.expires_at}; token in {path} (0600)",
        file=sys.stderr,
    )
    return 0


def _session_credentials() -> Credentials:
    try:
        return load_credentials()
    except LoginFailed as exc:
        raise CLIError(str(exc)) from None


def _run_engineer_session(
    args: argparse.Namespace, channels: list[str], work: Any
) -> int:
    import trio

    from relay._trio.engineer_session import SessionOutcome, run_session
    from relay._trio.websocket import HandshakeFailed

    credentials = _session_credentials()
    outcome: list[SessionOutcome] = []

    async def main() -> None:
        outcome.append(
            await run_session(
                credentials,
                device_id=args.device,
                reason=args.reason,
                channels=channels,
                work=work,
            )
        )

    try:
        trio.run(main)
    except ApiError as exc:
        raise CLIError(
            f"session refused: {exc.message}", exit_code=3 if exc.status else 1
        ) from None
    except HandshakeFailed as exc:
        raise CLIError(f"cannot attach to the session: {exc}") from None
    except OSError as exc:
        raise CLIError(f"cannot reach {credentials.broker}: {exc}") from None
    return outcome[0].exit_code


def cmd_shell(args: argparse.Namespace) -> int:
    from relay._trio.engineer_session import shell_work

    return _run_engineer_session(args, ["shell"], shell_work)


def cmd_forward(args: argparse.Namespace) -> int:
    local_text, sep, device_text = args.ports.partition(":")
    if (
        not sep
        or not local_text.isdigit()
        or not device_text.isdigit()
        or not 0 <= int(local_text) <= 65535
        or not 1 <= int(device_text) <= 65535
    ):
        raise CLIError(
            f"expected LPORT:DPORT (0..65535 and 1..65535), got {args.ports!r}",
            exit_code=2,
        )
    from relay._trio.engineer_session import forward_work

    local_port, device_port = int(local_text), int(device_text)
    return _run_engineer_session(
        args,
        [f"tcp:{device_port}"],
        partial(forward_work, local_port=local_port, device_port=device_port),
    )


def _print_qr(uri: str, out: TextIO) -> None:
    """*uri* as a QR code drawn with block characters, if the terminal can."""
    import segno  # only here: the QR codes are the one use

    qr = io.StringIO()
    segno.make(uri).terminal(out=qr, compact=True)
    try:
        out.write(qr.getvalue())
    except UnicodeEncodeError:
        print(
            "(this terminal's encoding cannot draw the QR code; enter the URI above)",
            file=out,
        )


def _print_enrolment(new_user: NewUser) -> None:
    """The otpauth URI, its QR code, and that they are shown only now (stdout)."""
    out = sys.stdout
    print(f"TOTP for {new_user.username}: {new_user.otpauth_uri}", file=out)
    _print_qr(new_user.otpauth_uri, out)
    print(
        "Scan this QR code (or enter the URI) into an authenticator app now: it is "
        f"not shown again. `relay user reset-totp {new_user.username}` makes a new one.",
        file=out,
    )


def _check_can_enroll(role: str, can_enroll: bool) -> None:
    """Refuse the enroll permission for an auditor or a customer (exit 2): they
    never enroll."""
    if can_enroll and role in ("auditor", "customer"):
        raise CLIError(
            f"{role}s never enroll devices; --can-enroll is for engineers "
            "(admins may always enroll)",
            exit_code=2,
        )


def _organisation(role: str, organisation: str | None) -> str | None:
    """A customer's organisation from the command line, checked (exit 2)."""
    try:
        return validate_organisation(role, organisation)
    except ValueError as exc:
        raise CLIError(str(exc), exit_code=2) from None


def cmd_user_add(args: argparse.Namespace) -> int:
    username = _user_name(args.name)
    try:
        role = validate_role(args.role)
    except ValueError as exc:
        raise CLIError(f"invalid role {args.role!r}: {exc}", exit_code=2) from None
    _check_can_enroll(role, args.can_enroll)
    organisation = _organisation(role, args.organisation)
    groups = _group_names(args.group)
    if len(groups) > MAX_USER_GROUPS:
        raise CLIError(
            f"{len(groups)} groups; a user is in at most {MAX_USER_GROUPS}",
            exit_code=2,
        )
    config = _base_config()
    exists = CLIError(f"user {username} exists")
    with _audited(config) as audit, _open_store(config) as store:
        # Checked before the prompt too, so nobody types a password for nothing.
        if store.get_user(username) is not None:
            raise exists
        password = _read_password(args)
        try:
            auth.validate_new_password(password)
        except ValueError as exc:
            raise CLIError(str(exc), exit_code=2) from None
        sealer = _totp_sealer(config)
        try:
            new_user = create_user(
                store,
                auth.PasswordHasher(),
                sealer,
                username=username,
                role=role,
                password=password,
                now=_now(),
                can_enroll=args.can_enroll,
                policy=totp_policy(config.engineer_auth),
                organisation=organisation,
            )
        except UserExists:
            raise exists from None
        if groups:
            # relay.users.create_user takes no groups (yet), so they are a
            # second transaction; the names were checked above.
            store.set_user_groups(username, add=groups, remove=(), at=_now())
        audit.logger.info(
            "user.added",
            username=username,
            role=role,
            can_enroll=args.can_enroll,
            groups=",".join(sorted(groups)),
            organisation=organisation,
            audit=True,
        )
    if args.json:
        json.dump(
            {
                "username": new_user.username,
                "role": new_user.role,
                "otpauth_uri": new_user.otpauth_uri,
                "organisation": organisation,
            },
            sys.stdout,
        )
        sys.stdout.write("\n")
        return 0
    enroll = ", may enroll devices" if args.can_enroll else ""
    in_groups = f", groups {','.join(sorted(groups))}" if groups else ""
    of = f", organisation {organisation}" if organisation is not None else ""
    print(f"added user {username} (role {role}{of}{enroll}{in_groups})")
    _print_enrolment(new_user)
    return 0


def cmd_user_disable(args: argparse.Namespace) -> int:
    username = _user_name(args.name)
    config = _base_config()
    with _audited(config) as audit, _open_store(config) as store:
        before = store.get_user(username)
        try:
            revoked = store.disable_user(username, at=_now(), reason=_DISABLE_REASON)
        except UnknownUser:
            raise CLIError(f"unknown user {username!r}") from None
        already = before is not None and before.disabled_at is not None
        audit.logger.warning(
            "user.disabled",
            username=username,
            sessions_revoked=len(revoked),
            already_disabled=already,
            audit=True,
        )
    if already:
        print(
            f"user {username} was already disabled ({len(revoked)} session(s) ended)",
            file=sys.stderr,
        )
    else:
        print(f"disabled {username} ({len(revoked)} session(s) ended)", file=sys.stderr)
    if revoked:
        _tell_the_fleet(config, "disable_user", {"username": username})
    return 0


def cmd_user_reset_totp(args: argparse.Namespace) -> int:
    username = _user_name(args.name)
    config = _base_config()
    unknown = CLIError(f"unknown user {username!r}")
    with _audited(config) as audit, _open_store(config) as store:
        # Checked first, so that a typo creates no sealing key file.
        if store.get_user(username) is None:
            raise unknown
        sealer = _totp_sealer(config)
        try:
            new_user, revoked = reset_totp(
                store,
                sealer,
                username=username,
                now=_now(),
                policy=totp_policy(config.engineer_auth),
            )
        except UnknownUser:
            raise unknown from None
        audit.logger.warning(
            "user.totp_reset",
            username=username,
            sessions_revoked=len(revoked),
            audit=True,
        )
    print(f"new TOTP secret for {username} ({len(revoked)} session(s) ended)")
    _print_enrolment(new_user)
    return 0


def _yes_no(text: str) -> bool:
    """argparse type of a yes/no option value."""
    answers = {"yes": True, "no": False}
    if text not in answers:
        raise argparse.ArgumentTypeError(f"expected yes or no, got {text!r}")
    return answers[text]


def _group_names(names: Sequence[str]) -> frozenset[str]:
    """Group names from the command line, checked as the store checks them (exit 2)."""
    from relay.store._labels import check_group_names

    try:
        return check_group_names(list(names), "groups")
    except ValueError as exc:
        raise CLIError(str(exc), exit_code=2) from None


def _user_row(user: UserRecord) -> dict[str, Any]:
    """What ``user list`` and ``user set`` show of *user*.

    Built field by field: hashes and sealed secrets never reach the output.
    ``can_enroll`` is the stored flag; admins may enroll whatever it says.
    """
    return {
        "username": user.username,
        "role": user.role,
        "created_at": user.created_at.isoformat(),
        "disabled": user.disabled_at is not None,
        "can_enroll": user.can_enroll,
        "groups": sorted(user.groups),
        "organisation": user.organisation,
    }


def cmd_user_set(args: argparse.Namespace) -> int:
    username = _user_name(args.name)
    # One optional flag per setting; at least one is needed.
    joins = _group_names(args.add_group)
    leaves = _group_names(args.remove_group)
    if (
        args.can_enroll is None
        and not joins
        and not leaves
        and args.organisation is None
    ):
        raise CLIError(
            "nothing to set: give --can-enroll yes|no, --add-group, --remove-group "
            "or --organisation",
            exit_code=2,
        )
    both = joins & leaves
    if both:
        raise CLIError(f"group {min(both)!r} is both added and removed", exit_code=2)
    config = _base_config()
    unknown = CLIError(f"unknown user {username!r}")
    with _audited(config) as audit, _open_store(config) as store:
        user = store.get_user(username)
        if user is None:
            raise unknown
        if args.can_enroll is not None:
            _check_can_enroll(user.role, args.can_enroll)
        previous_organisation = user.organisation
        if args.organisation is not None:
            # Checked before anything is written: a refusal changes nothing.
            _organisation(user.role, args.organisation)
        try:
            # Groups first: they are the change that can still be refused (too
            # many), and a refusal must leave the enroll permission as it was.
            if joins or leaves:
                previous_groups, groups = store.set_user_groups(
                    username, add=joins, remove=leaves, at=_now()
                )
                audit.logger.warning(
                    "user.groups_changed",
                    username=username,
                    groups=",".join(sorted(groups)),
                    previous=",".join(sorted(previous_groups)),
                    audit=True,
                )
            if args.can_enroll is not None:
                previous = store.set_user_can_enroll(
                    username, args.can_enroll, at=_now()
                )
            if args.organisation is not None:
                store.set_user_organisation(username, args.organisation, at=_now())
                audit.logger.warning(
                    "user.organisation_changed",
                    username=username,
                    organisation=args.organisation,
                    previous=previous_organisation,
                    audit=True,
                )
        except UnknownUser:
            raise unknown from None
        except ValueError as exc:  # too many groups, or the role changed
            raise CLIError(str(exc), exit_code=2) from None
        user = store.get_user(username)
        if user is None:
            raise unknown
        if args.can_enroll is not None:
            audit.logger.warning(
                "user.permissions_changed",
                username=username,
                role=user.role,
                can_enroll=user.can_enroll,
                previous_can_enroll=previous,
                audit=True,
            )
    if args.json:
        json.dump(_user_row(user), sys.stdout)
        sys.stdout.write("\n")
        return 0
    if joins or leaves:
        unchanged = " (unchanged)" if groups == previous_groups else ""
        listed = ", ".join(sorted(groups)) if groups else "none"
        print(f"{username} is in groups: {listed}{unchanged}", file=sys.stderr)
    if args.can_enroll is not None:
        state = "may" if user.can_enroll else "may not"
        unchanged = " (unchanged)" if previous == user.can_enroll else ""
        note = (
            " (admins may always enroll, whatever this says)"
            if user.role == "admin"
            else ""
        )
        print(f"{username} {state} enroll devices{unchanged}{note}", file=sys.stderr)
    if args.organisation is not None:
        unchanged = " (unchanged)" if previous_organisation == args.organisation else ""
        print(
            f"{username} belongs to organisation {args.organisation}{unchanged}; it "
            f"sees the instruments labelled customer={args.organisation}",
            file=sys.stderr,
        )
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    config = _base_config()
    with _open_store(config) as store:
        users = store.list_users()
    rows = [_user_row(user) for user in users]
    if _print_json(rows, enabled=args.json):
        return 0
    print(
        f"{'USER':<24} {'ROLE':<9} {'CREATED':<20} {'ENROLL':<7} {'DISABLED':<8} "
        f"{'ORGANISATION':<16} GROUPS"
    )
    for row in rows:
        # Admins may always enroll, so their stored flag would only mislead.
        enroll = (
            "always"
            if row["role"] == "admin"
            else ("yes" if row["can_enroll"] else "no")
        )
        print(
            f"{row['username']:<24} {row['role']:<9} {str(row['created_at'])[:19]:<20} "
            f"{enroll:<7} {'yes' if row['disabled'] else 'no':<8} "
            f"{row['organisation'] or '-':<16} {','.join(row['groups']) or '-'}"
        )
    return 0


# audit ------------------------------------------------------------------------------------
# The implementations live in relay/audit_commands.py (imported on use).


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from relay.audit_commands import cmd_audit_verify as verify

    if args.path is not None:
        return verify(args, data_dir_from_env())
    config = _base_config()
    if args.sink is None:
        # The data dir's own log: its sink is where the broker puts it.
        args.sink = config.audit.checkpoint_sink
    return verify(args, config.data_dir)


def cmd_audit_show(args: argparse.Namespace) -> int:
    from relay.audit_commands import cmd_audit_show as show

    return show(args, _base_config())


def cmd_audit_export(args: argparse.Namespace) -> int:
    from relay.audit_commands import cmd_audit_export as export

    return export(args, _base_config())


# policy -----------------------------------------------------------------------------------
# The implementations live in relay/policy_commands.py (imported on use).


def cmd_policy_check(args: argparse.Namespace) -> int:
    from relay.policy_commands import cmd_policy_check as check

    return check(args)


def cmd_policy_reload(args: argparse.Namespace) -> int:
    """Have every live broker node load its policy files again now."""
    config = _base_config()
    if config.cluster.redis_url is None:
        raise CLIError(
            "no [cluster] redis_url: on a single node send SIGHUP to the broker "
            "(systemctl reload relay-broker); it also reloads on file change",
            exit_code=2,
        )
    with _audited(config) as audit:
        audit.logger.info("policy.reload_requested", audit=True)
    confirmed = _tell_the_fleet(config, "policy_reload", {})
    if not confirmed:
        print("no broker node confirmed a reload", file=sys.stderr)
        return 1
    return 0 if all(confirmed.values()) else 1


def cmd_policy_explain(args: argparse.Namespace) -> int:
    from relay.policy_commands import cmd_policy_explain as explain

    return explain(args, _base_config(), _open_store)


def _iso_time(text: str) -> datetime:
    """argparse type of ``--from``/``--to`` (see audit_commands.parse_time)."""
    from relay.audit_commands import parse_time

    return parse_time(text)


# serve and demo --------------------------------------------------------------------------


def _run_trio(
    main: Callable[[], Awaitable[None]], *, listening: Sequence[ListenAddress] = ()
) -> None:
    """trio.run(main), turning expected failures (``_FAILURES``) into a CLI error.

    Inside a nursery an error arrives wrapped in an exception group; a port in use,
    a broken CA or a locked database should still read as one line, not a
    traceback. A group with anything unexpected in it is re-raised as is.

    Args:
        main: The async main function.
        listening: The addresses *main* listens on, named when one is in use
            (the error itself does not say which).
    """
    import trio

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        expected, unexpected = group.split(_FAILURES)
        if unexpected is not None or expected is None:
            raise
        first: BaseException = expected
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise CLIError(_start_failure(first, listening)) from None
    except _FAILURES as exc:
        raise CLIError(_start_failure(exc, listening)) from None


def _start_failure(exc: BaseException, listening: Sequence[ListenAddress]) -> str:
    text = _describe(exc)
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE and listening:
        addresses = ", ".join(str(address) for address in listening)
        text += f": another process listens on one of {addresses}"
    return text


def _listen_addresses(config: BrokerConfig) -> tuple[ListenAddress, ...]:
    return (config.device_listen, config.engineer_listen, config.metrics_listen)


async def _cancel_on_signal(stop: Callable[[], None]) -> None:
    import trio

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            stop()
            return


async def _stop_agent_on_signal(
    shutdown: Callable[[], Awaitable[None]], stop: Callable[[], None], grace_s: float
) -> None:
    """SIGTERM/SIGINT: end what is live in order (*shutdown*; the agent then
    closes its control channel and returns by itself). *stop* cancels whatever
    is left once *grace_s* has passed since the signal (at most 9 s: the BRIEF's
    10 s exit budget), or at once on a second signal."""
    import trio

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            break
        get_logger("agent").info("agent.stopping")
        with trio.move_on_after(grace_s):
            async with trio.open_nursery() as nursery:

                async def on_second_signal() -> None:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(on_second_signal)
                await shutdown()
                await trio.sleep_forever()  # cancelled when the agent returns
        stop()


def _session_config(args: argparse.Namespace, config: BrokerConfig) -> BrokerConfig:
    overrides: dict[str, Any] = {}
    if args.max_session_seconds is not None:
        overrides["max_session_seconds"] = args.max_session_seconds
    if args.grant_timeout_seconds is not None:
        overrides["grant_timeout_s"] = args.grant_timeout_seconds
    if getattr(args, "record_input", False):
        config = replace(config, audit=replace(config.audit, record_input=True))
    if not overrides:
        return config
    try:
        sessions = replace(config.sessions, **overrides)
    except ValueError as exc:
        raise CLIError(str(exc), exit_code=2) from None
    return replace(config, sessions=sessions)


def cmd_serve(args: argparse.Namespace) -> int:
    import trio

    from relay._trio.broker import serve_broker

    config = _session_config(args, _broker_config(args))

    async def main() -> None:
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signal, shutdown.set)
            await serve_broker(config, shutdown, freeze_startup=True)
            nursery.cancel_scope.cancel()

    _run_trio(main, listening=_listen_addresses(config))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import random

    import trio

    from relay._trio.agent import (
        AgentSettings,
        AgentStatus,
        make_session_runtime,
        run_agent,
    )
    from relay._trio.agent_feed import make_agent_feed
    from relay._trio.agent_ui import serve_agent_ui
    from relay._trio.broker import serve_broker
    from relay.simulated_instrument import run_simulated_instrument

    config = _session_config(args, _broker_config(args))
    # The demo's standard output is for a person (addresses, credentials): its
    # audit records stay in the log, not mirrored there as for `relay serve`.
    config = replace(config, audit=replace(config.audit, stdout=False))
    data_dir = DataDir(config.data_dir)
    agent_dir = AgentDir(config.data_dir / "demo-device")
    # Closed (sealed) before the broker opens its own log on the same directory.
    with _audited(config) as audit:
        lifetime = timedelta(days=config.pki.ca_lifetime_days)
        if init_ca(data_dir, now=_now(), lifetime=lifetime):
            audit.logger.info("pki.ca_created", path=str(data_dir.ca_cert), audit=True)
        _enroll_demo_device(config, agent_dir, audit.logger)
        engineer, created = _demo_engineer(config, audit.logger)
    out = sys.stdout

    async def main() -> None:
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signal, shutdown.set)
            ports = await nursery.start(serve_broker, config, shutdown)
            device_url = f"wss://127.0.0.1:{ports.device}"
            print("Remote Care relay demo", file=out)
            print(f"  data dir           {config.data_dir.resolve()}", file=out)
            print(
                f"  device listener    {device_url}/v1/device/control (mTLS)", file=out
            )
            print(f"  engineer listener  https://127.0.0.1:{ports.engineer}/", file=out)
            print(
                f"  metrics            http://127.0.0.1:{ports.metrics}/metrics",
                file=out,
            )
            print(f"  device CA          {data_dir.ca_cert}", file=out)
            _print_demo_engineer(
                out, engineer, created, ports.engineer, data_dir.ca_cert
            )
            status = AgentStatus()
            settings = AgentSettings(
                broker_url=device_url,
                agent_dir=agent_dir.root,
                ca_file=data_dir.ca_cert,
                # The demo's device UI takes any free loopback port (printed).
                limits=AgentConfig(ui_listen=ListenAddress(host="127.0.0.1", port=0)),
            )
            runtime = make_session_runtime(settings)
            feed = make_agent_feed(settings.agent_dir, settings.limits)
            agent_scope, ui_scope = trio.CancelScope(), trio.CancelScope()

            async def device_ui(
                task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                with ui_scope:
                    await serve_agent_ui(
                        runtime,
                        settings.limits.ui_listen,
                        data_requests=feed.recent_requests,
                        task_status=task_status,
                    )

            ui_port: int = await nursery.start(device_ui)
            print(
                f"  device page        http://127.0.0.1:{ui_port}/ (the instrument's "
                "touchscreen: allow, deny or end sessions)",
                file=out,
            )

            async def agent() -> None:
                with agent_scope:
                    async with trio.open_nursery() as agent_nursery:
                        await agent_nursery.start(runtime.run)
                        await agent_nursery.start(feed.run)
                        agent_nursery.start_soon(
                            partial(
                                run_simulated_instrument,
                                feed.spool.root,
                                rng=random.Random(),  # noqa: S311 - simulated readings, not secrets
                            )
                        )
                        await run_agent(
                            settings, status=status, runtime=runtime, feed=feed
                        )

            nursery.start_soon(agent)
            print(
                "  instrument feed    a simulated water purifier: 30 days of daily "
                f"statistics, an alarm now and then (spool {feed.spool.root})",
                file=out,
            )
            reported = False
            while not shutdown.is_set():
                if status.connected and not reported:
                    print(
                        f"  simulated device   {status.device_id} connected (relay device list shows it)",
                        file=out,
                    )
                    print("Press Ctrl-C to stop.", file=out, flush=True)
                    reported = True
                elif not status.connected and reported:
                    print(
                        f"  simulated device   disconnected: {status.last_error}",
                        file=out,
                        flush=True,
                    )
                    reported = False
                with trio.move_on_after(1):
                    await status.changed.wait()
            agent_scope.cancel()
            ui_scope.cancel()
            print("stopping...", file=out, flush=True)

    _run_trio(main, listening=_listen_addresses(config))
    print("stopped", file=out)
    return 0


def _demo_engineer(config: BrokerConfig, log: Any) -> tuple[DemoEngineer | None, bool]:
    """The demo engineer's credentials (made on first run), and whether they are new."""
    with _open_store(config) as store:
        existed = store.get_user(DEMO_ENGINEER) is not None
        engineer = ensure_demo_engineer(
            store,
            _totp_sealer(config),
            config.data_dir,
            now=_now(),
            policy=totp_policy(config.engineer_auth),
        )
    if engineer is not None and not existed:
        log.info("user.added", username=engineer.username, role="engineer", audit=True)
    return engineer, not existed


def _print_demo_engineer(
    out: TextIO,
    engineer: DemoEngineer | None,
    created: bool,
    port: int,
    ca_cert: Path,
) -> None:
    console = f"https://localhost:{port}/"
    print(f"  console            {console} (engineers' browser console)", file=out)
    print(
        f"                     the browser does not know the demo CA {ca_cert}: "
        "trust it, or accept the warning",
        file=out,
    )
    login = f"relay login --broker {console.rstrip('/')} --ca-file {ca_cert}"
    if engineer is None:
        print(
            f"  demo engineer      `{DEMO_ENGINEER}` exists but its saved credentials "
            "are gone; add an engineer with `relay user add NAME --role engineer`, "
            f"then `{login}`",
            file=out,
        )
        return
    print(
        f"  demo engineer      user {engineer.username}, password {engineer.password}",
        file=out,
    )
    print(
        f"                     TOTP secret {engineer.totp_secret} (any authenticator "
        f"app; URI {engineer.otpauth_uri})",
        file=out,
    )
    if created:
        _print_qr(engineer.otpauth_uri, out)
    print(f"                     command line: `{login} --username demo`", file=out)


def _enroll_demo_device(config: BrokerConfig, agent_dir: AgentDir, log: Any) -> None:
    """Enroll and sign the demo device on first run; refuse a revoked one.

    Raises:
        CLIError: The demo device is revoked in this data dir. Its id is never
            signed again, and with its old certificate it would only be refused,
            so the demo could never show a connected device.
    """
    revoked = CLIError(
        f"the demo device {DEMO_DEVICE_ID} is revoked in {config.data_dir} (revoked "
        "ids are never reused); use a fresh RELAY_DATA_DIR for the demo"
    )
    if agent_dir.cert.exists():
        from relay._trio.device_listener import presence_stale_after

        with _open_store(config) as store:
            devices = store.list_devices(
                now=_now(), stale_after=presence_stale_after(config)
            )
        if any(d.device_id == DEMO_DEVICE_ID and d.revoked_at for d in devices):
            raise revoked
        return
    if not agent_dir.key.exists():
        enroll_agent(agent_dir, DEMO_DEVICE_ID)
    try:
        signed = sign_and_record(
            config, agent_dir.csr.read_bytes(), agent_dir.cert, now=_now()
        )
    except DeviceRevoked:
        raise revoked from None
    log.info(
        "pki.device_signed",
        device_id=signed.identity.device_id,
        serial=signed.identity.serial_hex,
        fingerprint=signed.identity.fingerprint_sha256,
        not_after=signed.identity.not_after.isoformat(),
        ignored_requests=list(signed.ignored_requests),
        audit=True,
    )


# parser -----------------------------------------------------------------------------------


# config -----------------------------------------------------------------------------


def cmd_config_example(args: argparse.Namespace) -> int:
    from relay.config_file import example_agent_config, example_config

    sys.stdout.write(example_agent_config() if args.agent else example_config())
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from relay.config_file import agent_changes, effective_changes

    if args.agent:
        lines = agent_changes(_load_agent_config(args.file))
    else:
        config = _load_config(args.file)
        lines = effective_changes(config)
        if config.policy.dir is not None:
            # The broker would refuse to start on it: say so here, with where.
            from relay.policy_files import load_policy_dir

            try:
                load_policy_dir(config.policy.dir)
            except PolicyError as exc:
                raise CLIError(
                    f"{args.file}: policy.dir {config.policy.dir}: {exc}", exit_code=2
                ) from None
    print("ok")
    for line in lines:
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="relay",
        description="Remote Care relay. Broker state lives in $RELAY_DATA_DIR (default ./relay-data).",
    )
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def listen_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--device-listen",
            type=_address,
            metavar="HOST:PORT",
            help="device listener (default 0.0.0.0:8443)",
        )
        p.add_argument(
            "--engineer-listen",
            type=_address,
            metavar="HOST:PORT",
            help="engineer listener (default 0.0.0.0:9443)",
        )
        p.add_argument(
            "--metrics-listen",
            type=_address,
            metavar="HOST:PORT",
            help="metrics listener (default 127.0.0.1:9464)",
        )
        p.add_argument(
            "--server-name",
            action="append",
            metavar="NAME",
            help="extra DNS name or IP for the dev listener certificate (repeatable)",
        )
        p.add_argument(
            "--tls-cert",
            type=Path,
            metavar="FILE",
            help="operator-provided listener certificate chain (PEM)",
        )
        p.add_argument(
            "--tls-key", type=Path, metavar="FILE", help="key for --tls-cert (PEM)"
        )

    def config_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            type=Path,
            metavar="FILE",
            help="TOML configuration file (default $RELAY_CONFIG; see "
            "`relay config example`); RELAY_* variables and flags override it",
        )

    def session_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--max-session-seconds",
            type=int,
            metavar="N",
            help="cap of every remote session, from the grant (default and ceiling 3600)",
        )
        p.add_argument(
            "--grant-timeout-seconds",
            type=float,
            metavar="N",
            help="how long the person at the device has to answer an offer (default 60)",
        )
        p.add_argument(
            "--record-input",
            action="store_true",
            help="also record what engineers type in shell sessions (off by "
            "default: typed input holds passwords; see docs/audit.md)",
        )

    demo = commands.add_parser(
        "demo", help="broker + one simulated device, embedded defaults"
    )
    config_flag(demo)
    listen_flags(demo)
    session_flags(demo)
    demo.set_defaults(func=cmd_demo)

    serve = commands.add_parser("serve", help="run the broker")
    config_flag(serve)
    listen_flags(serve)
    session_flags(serve)
    serve.set_defaults(func=cmd_serve)

    config = commands.add_parser(
        "config", help="the broker's TOML configuration file"
    ).add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config.add_parser(
        "check",
        help="check a configuration file (with the RELAY_* variables) and print "
        "the values that differ from the defaults; exit 2 when invalid",
    )
    check.add_argument("file", type=Path, metavar="FILE")
    check.add_argument(
        "--agent", action="store_true", help="FILE is an agent's (relay agent run)"
    )
    check.set_defaults(func=cmd_config_check)
    example = config.add_parser(
        "example", help="print a commented configuration with every key at its default"
    )
    example.add_argument(
        "--agent", action="store_true", help="the agent's file (relay agent run)"
    )
    example.set_defaults(func=cmd_config_example)

    ca = commands.add_parser("ca", help="the device CA").add_subparsers(
        dest="ca_command", required=True, metavar="ACTION"
    )
    ca.add_parser(
        "init", help="create the device CA (idempotent; never overwrites)"
    ).set_defaults(func=cmd_ca_init)
    ca.add_parser("cert", help="print the device CA certificate (PEM)").set_defaults(
        func=cmd_ca_cert
    )
    sign = ca.add_parser("sign", help="sign a device CSR with the fixed device profile")
    sign.add_argument("csr", type=Path, metavar="CSR")
    sign.add_argument("--out", type=Path, required=True, metavar="CERT")
    sign.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a device label for access policies (customer, site, model, "
        "region ...); repeat for several",
    )
    sign.set_defaults(func=cmd_ca_sign)
    ca.add_parser(
        "rollover",
        help="create a new device CA; the current one stays trusted until "
        "retire-previous (docs/certificates.md)",
    ).set_defaults(func=cmd_ca_rollover)
    ca.add_parser(
        "retire-previous",
        help="stop trusting the device CA that `ca rollover` replaced",
    ).set_defaults(func=cmd_ca_retire_previous)

    agent = commands.add_parser("agent", help="the device agent").add_subparsers(
        dest="agent_command", required=True, metavar="ACTION"
    )
    enroll = agent.add_parser("enroll", help="generate the device key and CSR")
    enroll.add_argument("--device-id", required=True, metavar="ID")
    enroll.add_argument("--dir", type=Path, required=True, metavar="DIR")
    enroll.set_defaults(func=cmd_agent_enroll)
    run = agent.add_parser("run", help="connect out to the broker and stay connected")
    run.add_argument("--broker", required=True, metavar="wss://HOST:PORT")
    run.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="the agent's TOML settings (relay config example --agent); flags win",
    )
    run.add_argument(
        "--dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="holds device.key and device.crt",
    )
    run.add_argument(
        "--ca-file",
        type=Path,
        required=True,
        metavar="FILE",
        help="CA that signed the broker's certificate",
    )
    run.add_argument(
        "--ui-listen",
        metavar="HOST:PORT",
        help="the local device UI and its JSON API (default 127.0.0.1:7070)",
    )
    run.add_argument(
        "--ui-allow-remote",
        action="store_true",
        help="allow --ui-listen on a non-loopback address (anyone reaching it can grant)",
    )
    run.add_argument(
        "--allow-port",
        type=int,
        action="append",
        metavar="PORT",
        help="local TCP port engineers may reach (repeatable; default 22 and 443)",
    )
    run.add_argument(
        "--shell",
        metavar="CMD",
        help="command of the shell channel (default: the login shell; '' disables it)",
    )
    run.add_argument(
        "--max-session-seconds",
        type=int,
        metavar="N",
        help="the device's own session cap, 1..3600 (default 3600)",
    )
    run.add_argument(
        "--prompt",
        action="store_true",
        help="also ask on this terminal (headless devices)",
    )
    run.set_defaults(func=cmd_agent_run)

    device = commands.add_parser("device", help="enrolled devices").add_subparsers(
        dest="device_command", required=True, metavar="ACTION"
    )
    device_list = device.add_parser(
        "list", help="enrolled devices, revoked and online flags, labels"
    )
    device_list.add_argument("--json", action="store_true")
    device_list.set_defaults(func=cmd_device_list)
    revoke = device.add_parser(
        "revoke",
        help="revoke a device: refused at once, live connection closed within 5 s",
    )
    revoke.add_argument("device_id", metavar="ID")
    revoke.add_argument(
        "--reason",
        type=_reason,
        default="revoked by operator",
        help=f"recorded with the revocation (printable, at most {MAX_REVOKE_REASON_CHARS} characters)",
    )
    revoke.set_defaults(func=cmd_device_revoke)
    label = device.add_parser(
        "label",
        help="set or remove a device's labels (what access policies match on)",
    )
    label.add_argument("device_id", metavar="ID")
    label.add_argument(
        "labels",
        nargs="*",
        metavar="KEY=VALUE",
        help="labels to set, e.g. customer=acme site=lyon",
    )
    label.add_argument(
        "--remove",
        action="append",
        default=[],
        metavar="KEY",
        help="a label to remove (repeatable); a missing one is no error",
    )
    label.add_argument(
        "--json",
        action="store_true",
        help='print {"device_id","labels"} instead of KEY=VALUE lines',
    )
    label.set_defaults(func=cmd_device_label)

    login = commands.add_parser(
        "login", help="log in to a broker as an engineer (password + TOTP)"
    )
    login.add_argument("--broker", required=True, metavar="https://HOST:PORT")
    login.add_argument(
        "--ca-file",
        type=Path,
        metavar="FILE",
        help="CA that signed the broker's certificate (dev: `relay ca cert`)",
    )
    login.add_argument("--username", metavar="NAME", help="asked for when not given")
    login.set_defaults(func=cmd_login)

    shell = commands.add_parser(
        "shell",
        help="a shell on an instrument, once the person there allows it (after relay login)",
    )
    shell.add_argument("device", metavar="DEVICE")
    shell.add_argument(
        "--reason", required=True, help="why: shown to the person at the instrument"
    )
    shell.set_defaults(func=cmd_shell)

    forward = commands.add_parser(
        "forward",
        help="forward a local port to a port of an instrument (after relay login)",
    )
    forward.add_argument("device", metavar="DEVICE")
    forward.add_argument(
        "ports", metavar="LPORT:DPORT", help="local port (0: any free) and device port"
    )
    forward.add_argument(
        "--reason", required=True, help="why: shown to the person at the instrument"
    )
    forward.set_defaults(func=cmd_forward)

    user = commands.add_parser("user", help="user accounts").add_subparsers(
        dest="user_command", required=True, metavar="ACTION"
    )
    user_add = user.add_parser(
        "add", help="add a user; prints the TOTP URI and QR code (shown once)"
    )
    user_add.add_argument("name", metavar="NAME")
    user_add.add_argument(
        "--role",
        required=True,
        metavar="ROLE",
        help="engineer, auditor, admin or customer (an instrument owner's staff: "
        "sees only its organisation's instruments, holds no sessions)",
    )
    user_add.add_argument(
        "--organisation",
        metavar="ORG",
        help="a customer's organisation (required for customers, refused for "
        "other roles): it sees the instruments labelled customer=ORG",
    )
    user_add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of stdin instead of prompting",
    )
    user_add.add_argument(
        "--can-enroll",
        action="store_true",
        help="may enroll devices over the API (engineers; admins always may, "
        "auditors never)",
    )
    user_add.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="GROUP",
        help="a group the user is in (repeatable); access policies match on it",
    )
    user_add.add_argument(
        "--json",
        action="store_true",
        help='print {"username","role","otpauth_uri"} instead of the QR code',
    )
    user_add.set_defaults(func=cmd_user_add)
    user_disable = user.add_parser(
        "disable", help="disable a user and end its sessions at once"
    )
    user_disable.add_argument("name", metavar="NAME")
    user_disable.set_defaults(func=cmd_user_disable)
    user_reset = user.add_parser(
        "reset-totp",
        help="give a user a new TOTP secret (prints URI and QR); its sessions end",
    )
    user_reset.add_argument("name", metavar="NAME")
    user_reset.set_defaults(func=cmd_user_reset_totp)
    user_set = user.add_parser(
        "set", help="change a user's settings (at least one option); effective at once"
    )
    user_set.add_argument("name", metavar="NAME")
    # Each setting is optional and None when not given, so that one command can
    # change any subset of them (more settings join here).
    user_set.add_argument(
        "--can-enroll",
        type=_yes_no,
        metavar="yes|no",
        help="the enroll permission of an engineer (admins always may, auditors "
        "and customers never)",
    )
    user_set.add_argument(
        "--organisation",
        metavar="ORG",
        help="move a customer to organisation ORG (it then sees the instruments "
        "labelled customer=ORG)",
    )
    user_set.add_argument(
        "--add-group",
        action="append",
        default=[],
        metavar="GROUP",
        help="put the user in a group (repeatable)",
    )
    user_set.add_argument(
        "--remove-group",
        action="append",
        default=[],
        metavar="GROUP",
        help="take the user out of a group (repeatable); a missing one is no error",
    )
    user_set.add_argument(
        "--json",
        action="store_true",
        help="print the user as `user list --json` shows it",
    )
    user_set.set_defaults(func=cmd_user_set)
    user_list = user.add_parser(
        "list",
        help="users: role, created, enroll permission, disabled, organisation, groups",
    )
    user_list.add_argument("--json", action="store_true")
    user_list.set_defaults(func=cmd_user_list)

    audit = commands.add_parser(
        "audit", help="the tamper-evident audit log: verify, show, export"
    ).add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    verify = audit.add_parser(
        "verify",
        help="verify an audit log, one of its files, or an evidence bundle "
        "(exit 0 verified, 1 problem found, 2 cannot read)",
    )
    verify.add_argument(
        "path",
        nargs="?",
        type=Path,
        metavar="PATH",
        help="a bundle directory (has manifest.json), an audit directory, or one "
        "audit-*.jsonl file (default: $RELAY_DATA_DIR/audit)",
    )
    verify.add_argument(
        "--public-key",
        type=Path,
        metavar="FILE",
        help="the audit public key (PEM) to verify with; default audit-key.pem "
        "in the directory (for a bundle: must be the key the bundle holds)",
    )
    verify.add_argument(
        "--sink",
        type=Path,
        metavar="FILE",
        help="the checkpoint sink to check the tail against (default: "
        "checkpoints.jsonl in the directory; none for a single file)",
    )
    verify.add_argument(
        "--partial",
        action="store_true",
        help="the oldest files were archived on purpose: check the rest as a "
        "part of the chain",
    )
    verify.add_argument("--json", action="store_true", help="a machine-readable report")
    verify.set_defaults(func=cmd_audit_verify)
    show = audit.add_parser(
        "show",
        help="one session: who, why, the grant, its audit records, receipts, "
        "recordings (reads files; no broker needed)",
    )
    show.add_argument("--session", required=True, metavar="ID")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_audit_show)
    export = audit.add_parser(
        "export",
        help="write an evidence bundle of [--from, --to) that verifies offline",
    )
    export.add_argument(
        "--from",
        dest="since",
        required=True,
        type=_iso_time,
        metavar="T",
        help="ISO 8601; a date alone is midnight UTC, a time without offset is UTC",
    )
    export.add_argument(
        "--to", dest="until", required=True, type=_iso_time, metavar="T"
    )
    export.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="a new or empty directory",
    )
    export.add_argument("--json", action="store_true")
    export.set_defaults(func=cmd_audit_export)

    policy = commands.add_parser(
        "policy",
        help="access policies: check a directory, explain a decision, reload",
    ).add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    policy_check = policy.add_parser(
        "check",
        help="load a policy directory as the broker would; name what is wrong",
    )
    policy_check.add_argument("dir", type=Path, metavar="DIR")
    policy_check.add_argument("--json", action="store_true")
    policy_check.set_defaults(func=cmd_policy_check)
    policy_reload = policy.add_parser(
        "reload",
        help="have every live broker node load its policy files now (several "
        "nodes; a single node reloads on SIGHUP); exit 1 if a node did not "
        "confirm",
    )
    policy_reload.set_defaults(func=cmd_policy_reload)
    explain = policy.add_parser(
        "explain",
        help="the decision the broker would make on a request, and the rules "
        "behind it (exit 0 allowed, 1 refused)",
    )
    explain.add_argument("--engineer", required=True, metavar="NAME")
    explain.add_argument("--device", required=True, metavar="ID")
    explain.add_argument(
        "--channel",
        action="append",
        metavar="C",
        help="shell or tcp:PORT; repeat for several (none: channels not judged)",
    )
    explain.add_argument("--reason", default="", metavar="TEXT")
    explain.add_argument(
        "--at",
        type=_iso_time,
        metavar="T",
        help="judge this moment instead of now (time windows); ISO 8601",
    )
    explain.add_argument(
        "--policy",
        type=Path,
        metavar="DIR",
        help="this directory instead of the broker's [policy] dir",
    )
    explain.add_argument("--json", action="store_true")
    explain.set_defaults(func=cmd_policy_explain)
    return parser


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``relay`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()
    try:
        code = args.func(args)
    except CLIError as exc:
        print(f"relay: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except _FAILURES as exc:
        print(f"relay: error: {_describe(exc)}", file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.exit(code)
