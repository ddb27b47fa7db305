"""The broker's configuration file (TOML) and its environment overrides.

Precedence, lowest first: the defaults in :mod:`relay.config` < the TOML file <
``RELAY_*`` environment variables < command-line flags (applied by the CLI).

The file maps onto :class:`~relay.config.BrokerConfig` field by field: top-level
keys are its plain fields (``data_dir``, ``device_listen = "0.0.0.0:8443"``, ...),
and each nested dataclass is a table named after its field (``[sessions]``,
``[audit]``, ``[engineer_auth]``, ...). Nothing is implied: an unknown table or key,
a value of the wrong type (``true`` for an integer, ``"10"`` for a number) or a
value out of range is a :class:`ConfigError` naming the full key.

Environment overrides are named ``RELAY_<TABLE>__<KEY>`` (``RELAY_SESSIONS__MAX_SESSION_SECONDS=600``)
and ``RELAY_<KEY>`` for top-level keys (``RELAY_DATA_DIR``, ``RELAY_DATABASE_URL``).
Their values are TOML values (``true``, ``600``, ``["shell"]``), except for keys
holding a string, a path or an address, which take the text as it is. An empty
value counts as unset. A ``RELAY_`` variable with ``__`` that names no key is an
error. Two older names stay: ``RELAY_AUDIT_CHECKPOINT_SINK`` and
``RELAY_TOTP_SEALING_KEY``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import textwrap
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from relay.config import AgentConfig, BrokerConfig, ListenAddress

__all__ = [
    "ConfigError",
    "agent_changes",
    "effective_changes",
    "example_agent_config",
    "example_config",
    "load_agent_config",
    "load_config",
]

_ENV_PREFIX = "RELAY_"
#: Older environment names, kept working: name -> (table, key).
_ENV_ALIASES: Mapping[str, tuple[str, str]] = {
    "RELAY_AUDIT_CHECKPOINT_SINK": ("audit", "checkpoint_sink"),
    "RELAY_TOTP_SEALING_KEY": ("engineer_auth", "totp_sealing_key"),
}
#: Keys whose values are secrets: never printed.
_SECRET_KEYS = frozenset({"engineer_auth.totp_sealing_key"})


class ConfigError(Exception):
    """An invalid configuration: the message names the key, *source* where it came from.

    Attributes:
        source: The file path, or the environment variable, that held the bad value.
    """

    def __init__(self, message: str, *, source: str) -> None:
        super().__init__(message)
        self.source = source


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_table(tp: Any) -> bool:
    return (
        isinstance(tp, type)
        and dataclasses.is_dataclass(tp)
        and tp is not ListenAddress
    )


def _tables() -> dict[str, type]:
    """Table name -> dataclass, for the nested dataclasses of BrokerConfig."""
    hints = _hints(BrokerConfig)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(BrokerConfig)
        if _is_table(hints[f.name])
    }


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _shown(value: object) -> str:
    """*value* as TOML would spell it, for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _type_name(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string"}
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return names.get(type(value), type(value).__name__)


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_stringlike(tp: Any) -> bool:
    return _strip_optional(tp) in (str, Path, ListenAddress)


def _convert(value: object, tp: Any) -> object:
    """*value* from TOML as type *tp*; ValueError (naming no key) when it is not one."""
    tp = _strip_optional(tp)
    if tp is bool:
        if type(value) is bool:
            return value
        raise ValueError(
            f"expected true or false, got {_type_name(value)} {_shown(value)}"
        )
    if tp is int:
        if type(value) is int:
            return value
        raise ValueError(
            f"expected an integer, got {_type_name(value)} {_shown(value)}"
        )
    if tp is float:
        if type(value) in (int, float):
            try:
                number = float(value)  # type: ignore[arg-type]
            except OverflowError:  # an integer beyond any float
                raise ValueError(f"expected a finite number, got {value!r}") from None
            if not math.isfinite(number):
                raise ValueError(f"expected a finite number, got {value!r}")
            return number
        raise ValueError(f"expected a number, got {_type_name(value)} {_shown(value)}")
    if tp in (str, Path, ListenAddress):
        if type(value) is not str:
            raise ValueError(
                f"expected a string, got {_type_name(value)} {_shown(value)}"
            )
        if tp is Path:
            return Path(value)
        if tp is ListenAddress:
            return ListenAddress.parse(value)
        return value
    if typing.get_origin(tp) is tuple:
        item_type = typing.get_args(tp)[0]
        if not isinstance(value, list):
            raise ValueError(
                f"expected an array, got {_type_name(value)} {_shown(value)}"
            )
        items = []
        for index, item in enumerate(value):
            try:
                items.append(_convert(item, item_type))
            except ValueError as exc:
                raise ValueError(f"item {index}: {exc}") from None
        return tuple(items)
    raise ValueError(f"cannot be set from the file (type {tp})")  # pragma: no cover


def _check_positive(cls: type, name: str, value: object) -> None:
    """Range check for classes without their own: a number defaulting > 0 stays > 0."""
    if "__post_init__" in vars(cls):
        return
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = field.default
    if type(default) is int and default > 0 and type(value) is int and value < 1:
        raise ValueError(f"must be an integer >= 1, got {value!r}")
    if (
        type(default) is float
        and default > 0
        and isinstance(value, float)
        and not value > 0
    ):
        raise ValueError(f"must be > 0, got {value!r}")


def _build(
    cls: type,
    prefix: str,
    values: Mapping[str, object],
    sources: Mapping[str, str],
    default_source: str,
) -> Any:
    """An instance of *cls* from *values* (TOML table, already merged with env)."""
    hints = _hints(cls)
    known = _field_names(cls)
    kwargs: dict[str, object] = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        source = sources.get(full, default_source)
        if key not in known:
            what = "table" if isinstance(value, dict) and not prefix else "key"
            raise ConfigError(
                f"{full}: unknown {what}; known {'keys' if prefix else 'keys and tables'}: "
                + ", ".join(known),
                source=source,
            )
        tp = hints[key]
        if _is_table(tp):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{full}: expected a table [{full}], got {_type_name(value)}",
                    source=source,
                )
            kwargs[key] = _build(tp, f"{full}.", value, sources, default_source)
            continue
        if isinstance(value, dict):
            raise ConfigError(f"{full}: expected a value, got a table", source=source)
        try:
            converted = _convert(value, tp)
            _check_positive(cls, key, converted)
        except ValueError as exc:
            raise ConfigError(f"{full}: {exc}", source=source) from None
        kwargs[key] = converted
    try:
        return cls(**kwargs)
    except ValueError as exc:
        message = str(exc)
        named = next(
            (n for n in known if re.search(rf"\b{re.escape(n)}\b", message)), None
        )
        full = f"{prefix}{named}" if named else prefix.rstrip(".") or "config"
        source = sources.get(full, default_source)
        if named and message.startswith(f"{named} "):
            text = f"{full}{message[len(named) :]}"
        else:
            text = f"{full}: {message}"
        raise ConfigError(text, source=source) from None


def _env_names() -> dict[str, tuple[str | None, str, Any]]:
    """Environment name -> (table or None, key, type)."""
    names: dict[str, tuple[str | None, str, Any]] = {}
    hints = _hints(BrokerConfig)
    for name in _field_names(BrokerConfig):
        tp = hints[name]
        if _is_table(tp):
            sub_hints = _hints(tp)
            for key in _field_names(tp):
                env = f"{_ENV_PREFIX}{name.upper()}__{key.upper()}"
                names[env] = (name, key, sub_hints[key])
        else:
            names[f"{_ENV_PREFIX}{name.upper()}"] = (None, name, tp)
    for env, (table, key) in _ENV_ALIASES.items():
        names[env] = (table, key, _hints(_tables()[table])[key])
    return names


def _env_value(env: str, full: str, text: str, tp: Any) -> object:
    if _is_stringlike(tp) and not text.startswith('"'):
        return text
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except (ValueError, RecursionError):
        # ValueError: TOMLDecodeError, or an integer of more than 4300 digits
        # (CPython's int conversion limit); RecursionError: arrays or inline
        # tables nested deeper than tomllib's (recursive) parser can follow.
        if _strip_optional(tp) is bool:
            raise ConfigError(
                f"{full}: expected true or false, got {text!r}", source=env
            ) from None
        raise ConfigError(
            f"{full}: not a TOML value: {text!r} (a string goes in double quotes, "
            'an array as ["a", "b"])',
            source=env,
        ) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read: {reason}", source=str(path)) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=str(path)) from None
    except ValueError:
        # CPython refuses to convert an integer of more than 4300 digits.
        raise ConfigError(
            "not valid TOML: an integer with too many digits", source=str(path)
        ) from None
    except RecursionError:
        # tomllib's parser is recursive: deep nesting exhausts the stack.
        raise ConfigError(
            "not valid TOML: arrays or tables nested too deeply", source=str(path)
        ) from None


def load_agent_config(path: Path) -> AgentConfig:
    """The agent's settings from the TOML file at *path*: the keys of
    :class:`~relay.config.AgentConfig` at the top level, checked like the
    broker's (``relay agent run`` flags override them).

    Raises:
        ConfigError: As for :func:`load_config`.
    """
    config: AgentConfig = _build(AgentConfig, "", _read_toml(path), {}, str(path))
    return config


def load_config(path: Path | None, env: Mapping[str, str]) -> BrokerConfig:
    """The broker configuration from the file at *path* (if any) and *env*.

    Raises:
        ConfigError: The file cannot be read or parsed, or a key or value in it
            or in *env* is unknown, of the wrong type or out of range.
    """
    data: dict[str, Any] = {}
    file_source = str(path) if path is not None else "configuration"
    if path is not None:
        data = _read_toml(path)
    sources: dict[str, str] = {}
    known = _env_names()
    # Aliases first, so that the RELAY_<TABLE>__<KEY> spelling wins over them.
    ordered = sorted(env.items(), key=lambda item: item[0] not in _ENV_ALIASES)
    for name, text in ordered:
        if not name.startswith(_ENV_PREFIX) or not text:
            continue
        if name not in known:
            if "__" in name:
                raise ConfigError(
                    "unknown override; names are RELAY_<TABLE>__<KEY>, e.g. "
                    "RELAY_SESSIONS__MAX_SESSION_SECONDS (see `relay config example`)",
                    source=name,
                )
            continue  # RELAY_CONFIG and other settings that are not keys
        table, key, tp = known[name]
        full = f"{table}.{key}" if table else key
        if table is not None and not isinstance(data.setdefault(table, {}), dict):
            raise ConfigError(f"{table}: expected a table", source=file_source)
        target = data[table] if table is not None else data
        target[key] = _env_value(name, full, text, tp)
        sources[full] = name
    config: BrokerConfig = _build(BrokerConfig, "", data, sources, file_source)
    return config


# The example and the differences --------------------------------------------------


def toml_value(value: object) -> str:
    """*value* as a TOML value (also used by bench/ to write broker config files)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path | ListenAddress):
        return json.dumps(str(value))
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot render {value!r}")  # pragma: no cover


def _attribute_docs(cls: type) -> dict[str, str]:
    """``Attributes:`` of *cls*'s docstring: name -> one paragraph of text."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    lines = doc.splitlines()
    docs: dict[str, str] = {}
    try:
        start = lines.index("Attributes:") + 1
    except ValueError:
        return docs
    current: str | None = None
    for line in lines[start:]:
        if not line.strip():
            if current is not None and docs:
                break
            continue
        if not line.startswith("    "):
            break
        match = re.match(r"^    (\w+): (.*)$", line)
        if match:
            current = match.group(1)
            docs[current] = match.group(2)
        elif current is not None:
            docs[current] += " " + line.strip()
    return {name: text.replace("``", "`") for name, text in docs.items()}


def _wrap(text: str, indent: str = "# ", width: int = 88) -> list[str]:
    return textwrap.wrap(
        text, width=width, initial_indent=indent, subsequent_indent=indent
    )


def _example_fields(cls: type, instance: object) -> Iterator[str]:
    docs = _attribute_docs(cls)
    hints = _hints(cls)
    for name in _field_names(cls):
        if _is_table(hints[name]):
            continue
        if name in docs:
            yield from _wrap(docs[name])
        value = getattr(instance, name)
        if value is None:
            yield f"# {name} = ...  (unset by default)"
        else:
            yield f"{name} = {toml_value(value)}"
        yield ""


def example_config() -> str:
    """A commented TOML file with every key at its default.

    ``load_config`` on it gives ``BrokerConfig()``.
    """
    default = BrokerConfig()
    lines = [
        "# Remote Care relay broker configuration: every key at its default.",
        "#",
        "# Precedence, lowest first: defaults < this file < RELAY_* environment",
        "# variables < command-line flags. Environment names: RELAY_<TABLE>__<KEY>",
        "# (e.g. RELAY_SESSIONS__MAX_SESSION_SECONDS=600) and RELAY_<KEY> for the",
        "# top-level keys (e.g. RELAY_DATA_DIR). Check a file: relay config check FILE",
        "",
    ]
    lines.extend(_example_fields(BrokerConfig, default))
    top_docs = _attribute_docs(BrokerConfig)
    for table, cls in _tables().items():
        summary = top_docs.get(table) or inspect.cleandoc(cls.__doc__ or "").split(
            "\n"
        )[0].replace("``", "`")
        lines.extend(_wrap(summary))
        lines.append(f"[{table}]")
        lines.extend(_example_fields(cls, getattr(default, table)))
    return "\n".join(lines).rstrip("\n") + "\n"


def example_agent_config() -> str:
    """A commented TOML file with every agent key at its default.

    ``load_agent_config`` on it gives ``AgentConfig()``.
    """
    lines = [
        "# Remote Care agent configuration (relay agent run --config FILE): every",
        "# key at its default. Command-line flags override these values.",
        "# Check a file: relay config check --agent FILE",
        "",
    ]
    lines.extend(_example_fields(AgentConfig, AgentConfig()))
    return "\n".join(lines).rstrip("\n") + "\n"


def _flatten(config: BrokerConfig) -> dict[str, object]:
    flat: dict[str, object] = {}
    for name in _field_names(BrokerConfig):
        value = getattr(config, name)
        if dataclasses.is_dataclass(value) and not isinstance(value, ListenAddress):
            for key in _field_names(type(value)):
                flat[f"{name}.{key}"] = getattr(value, key)
        else:
            flat[name] = value
    return flat


def effective_changes(config: BrokerConfig) -> list[str]:
    """``key = value`` lines for the values of *config* that differ from the defaults.

    Secrets show as ``(set)``; a password in ``database_url`` as ``***``.
    """
    defaults = _flatten(BrokerConfig())
    lines = []
    for key, value in _flatten(config).items():
        if value == defaults[key]:
            continue
        if key in _SECRET_KEYS:
            shown = "(set)"
        elif value is None:
            shown = "(unset)"
        else:
            shown = toml_value(value)
            if key in ("database_url", "cluster.redis_url"):
                shown = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", shown)
        lines.append(f"{key} = {shown}")
    return lines


def agent_changes(config: AgentConfig) -> list[str]:
    """``key = value`` lines for the agent settings that differ from the defaults."""
    default = AgentConfig()
    lines = []
    for key in _field_names(AgentConfig):
        value = getattr(config, key)
        if value != getattr(default, key):
            lines.append(f"{key} = {'(unset)' if value is None else toml_value(value)}")
    return lines
