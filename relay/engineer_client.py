"""The engineer side of the API, for the CLI: log in, keep the token safely, call
the API with it.

``relay login`` posts the credentials to ``/api/v1/login`` over HTTPS (verifying
the broker against ``--ca-file`` or the system store) and keeps the returned token
in ``$XDG_CONFIG_HOME/relay/credentials.json`` (default ``~/.config/relay``),
created with mode 0600 in a 0700 directory, with the CA file's absolute path when
one was given. Later engineer commands (``relay shell``, ``relay forward``) read it
from there and call the API with :func:`api_call`. Only the standard library is used: the CLI must not need the broker's
dependencies on an engineer's laptop beyond the package itself.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

LOGIN_PATH: Final = "/api/v1/login"
TIMEOUT_S: Final = 30.0


class LoginFailed(Exception):
    """The broker refused the login or could not be reached; the message says why."""


class ApiError(Exception):
    """The API answered an error (``status``; 0 when it could not be reached)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Credentials:
    """A token for one broker."""

    broker: str
    username: str
    token: str
    expires_at: str
    #: The CA file given at login (absolute), for the later commands.
    ca_file: str | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts the broker as ``relay login`` did."""
        return ssl.create_default_context(cafile=self.ca_file)


def parse_broker_url(url: str) -> str:
    """Normalise ``https://HOST:PORT`` (no path); raise ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"broker must be an https://HOST:PORT URL, got {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"broker URL must not have a path or query, got {url!r}")
    return f"https://{parts.netloc}"


def login(
    broker: str, *, username: str, password: str, totp: str, ca_file: Path | None
) -> Credentials:
    """Log in and return the session token.

    Raises:
        LoginFailed: Wrong credentials (401), rate limited (429, with the wait),
            or the broker is unreachable or not trusted.
        ValueError: *broker* is not an https://HOST:PORT URL.
    """
    broker = parse_broker_url(broker)
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    body = json.dumps(
        {"username": username, "password": password, "totp": totp}
    ).encode()
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked to be https
        broker + LOGIN_PATH,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    try:
        # The scheme is https (checked by parse_broker_url), never file: or custom.
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S, context=context)  # noqa: S310
        with response:
            answer = json.loads(response.read(65536))
    except urllib.error.HTTPError as exc:
        if exc.code == 429:
            wait = exc.headers.get("Retry-After", "a while")
            raise LoginFailed(f"too many attempts; try again in {wait} s") from None
        if exc.code == 401:
            raise LoginFailed("invalid username, password or code") from None
        raise LoginFailed(f"the broker answered {exc.code}") from None
    except urllib.error.URLError as exc:
        raise LoginFailed(f"cannot reach {broker}: {exc.reason}") from None
    except (OSError, ValueError) as exc:
        raise LoginFailed(f"cannot log in at {broker}: {exc}") from None
    token, expires_at = answer.get("token"), answer.get("expires_at")
    if not isinstance(token, str) or not isinstance(expires_at, str):
        raise LoginFailed("the broker's answer has no token")
    return Credentials(
        broker=broker,
        username=username,
        token=token,
        expires_at=expires_at,
        ca_file=str(ca_file.resolve()) if ca_file is not None else None,
    )


def credentials_path() -> Path:
    """Where the token is kept: ``$XDG_CONFIG_HOME/relay/credentials.json``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "relay" / "credentials.json"


def save_credentials(credentials: Credentials, path: Path | None = None) -> Path:
    """Write the token file with mode 0600 (replacing an older one atomically)."""
    target = path or credentials_path()
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(
            {
                "broker": credentials.broker,
                "username": credentials.username,
                "token": credentials.token,
                "expires_at": credentials.expires_at,
                "ca_file": credentials.ca_file,
            },
            handle,
        )
    os.replace(tmp, target)
    return target


def load_credentials(path: Path | None = None) -> Credentials:
    """The token saved by ``relay login``.

    Raises:
        LoginFailed: There is none, or the file is not one we wrote.
    """
    source = path or credentials_path()
    try:
        data = json.loads(source.read_text())
        return Credentials(
            broker=str(data["broker"]),
            username=str(data["username"]),
            token=str(data["token"]),
            expires_at=str(data["expires_at"]),
            ca_file=None if data.get("ca_file") is None else str(data["ca_file"]),
        )
    except FileNotFoundError:
        raise LoginFailed(
            "not logged in: run `relay login --broker URL` first"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LoginFailed(
            f"cannot read {source}: {exc}; run `relay login` again"
        ) from None


def api_call(
    credentials: Credentials, method: str, path: str, body: object = None
) -> Any:
    """Call the API with the saved token; return the JSON answer.

    Raises:
        ApiError: An error answer (its ``error`` text), or the broker is
            unreachable (status 0).
    """
    data = None if body is None else json.dumps(body).encode()
    headers = {
        "Authorization": f"Bearer {credentials.token}",
        "Accept": "application/json",
    }
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(  # noqa: S310 - the saved broker URL is https
        credentials.broker + path, data=data, method=method, headers=headers
    )
    try:
        response = urllib.request.urlopen(  # noqa: S310 - https only (parse_broker_url)
            request, timeout=TIMEOUT_S, context=credentials.ssl_context()
        )
        with response:
            raw = response.read(1024 * 1024)
    except urllib.error.HTTPError as exc:
        message = f"the broker answered {exc.code}"
        try:
            error = json.loads(exc.read(65536)).get("error")
        except (ValueError, AttributeError):
            error = None
        if exc.code == 401:
            message = "the login has ended (logged out, expired or disabled): run `relay login` again"
        elif isinstance(error, str):
            message = error
        raise ApiError(exc.code, message) from None
    except (urllib.error.URLError, OSError) as exc:
        raise ApiError(0, f"cannot reach {credentials.broker}: {exc}") from None
    return json.loads(raw) if raw else None
