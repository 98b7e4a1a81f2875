# -*- test-case-name: tests.test_config -*-
"""
One configuration value, typed and validated: L{convert} turns what YAML or the environment
gave (a L{RawValue}) into the registry type of its L{EnvVar}/L{ConfigKey}, or raises a
L{ConfigError} that names where it came from and never shows a secret.
"""

from __future__ import annotations

import datetime
import json
import math
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple
from urllib.parse import urlsplit

from twisted.logger import Logger

from hermes_twisted.config.envvars import ConfigKey, EnvVar
from hermes_twisted.config.errors import ConfigError

# Shared with the rest of the loader, so operators filter every config warning by one name.
log = Logger(namespace="hermes_twisted.config")

Spec = EnvVar | ConfigKey

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


class RawValue(NamedTuple):
    """A value as YAML or the environment gave it, before conversion."""

    value: Any
    where: str  # the dotted YAML key as written, or the env var name
    from_env: bool = False


def kind_of(value: Any) -> str:
    """How a value's type reads in an error message ("a mapping", "a list", ...)."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return f"a {type(value).__name__}"


def _shown(value: Any, secret: bool) -> str:
    """How a bad value appears in an error: secrets never, URLs without credentials."""
    if secret:
        return kind_of(value)
    if isinstance(value, str):
        parts = urlsplit(value) if "://" in value else None
        if parts is not None and (parts.username or parts.password):
            value = value.replace(parts.netloc, parts.hostname or "", 1)
        return repr(value if len(value) <= 80 else value[:77] + "...")
    return repr(value)


def _is_secret(spec: Spec) -> bool:
    return spec.password or spec.type == "secret"


def _range_text(spec: Spec) -> str:
    if spec.minimum is not None and spec.maximum is not None:
        return f" between {spec.minimum:g} and {spec.maximum:g}"
    if spec.minimum is not None:
        return f" >= {spec.minimum:g}"
    if spec.maximum is not None:
        return f" <= {spec.maximum:g}"
    return ""


def _check_range(number: float, spec: Spec, noun: str, raw: RawValue) -> None:
    if (spec.minimum is not None and number < spec.minimum) or (
            spec.maximum is not None and number > spec.maximum):
        raise ConfigError(raw.where, f"expected {noun}{_range_text(spec)}, got {raw.value!r}")


def _url(raw: RawValue, schemes: tuple[str, ...]) -> str | None:
    value = raw.value
    if not isinstance(value, str):
        raise ConfigError(raw.where, f"expected a URL, got {kind_of(value)}")
    text = value.strip().rstrip("/")
    if not text:
        return None
    parts = urlsplit(text)
    names = [f"{s}://" for s in schemes]
    wanted = ", ".join(names[:-1]) + " or " + names[-1]
    if parts.scheme.lower() not in schemes:
        raise ConfigError(raw.where, f"expected an {wanted} URL, got {_shown(value, False)}")
    try:
        host = parts.hostname
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError:
        host = None
    if not host:
        raise ConfigError(raw.where, f"expected an {wanted} URL with a host, "
                                     f"got {_shown(value, False)}")
    return text


def _text(raw: RawValue, spec: Spec) -> str | None:
    value, kind = raw.value, spec.type
    if isinstance(value, (datetime.date, datetime.time)):
        value = value.isoformat()  # YAML read an unquoted id like 2024-01-01 as a date
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(raw.where, f"expected a string, got {kind_of(value)}")
    text = value if isinstance(value, str) else str(value)
    if kind == "secret":
        text = text.strip()
    if kind == "path" and text.strip():
        return text.strip()
    return text if text.strip() or kind == "str" else None


def _integer(raw: RawValue, spec: Spec) -> int:
    value = raw.value
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        try:
            number = int(value.strip(), 10)
        except ValueError:
            number = None
    if number is None:
        raise ConfigError(raw.where, f"expected an integer, got {_shown(value, _is_secret(spec))}")
    _check_range(number, spec, "an integer", raw)
    return number


def _number(raw: RawValue, spec: Spec) -> float:
    value = raw.value
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise ConfigError(raw.where, f"expected a number, got {_shown(value, _is_secret(spec))}")
    _check_range(number, spec, "a number", raw)
    return number


def _boolean(raw: RawValue, spec: Spec) -> bool:
    value = raw.value
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise ConfigError(raw.where, f"expected true or false, got {_shown(value, _is_secret(spec))}")


def _flag(raw: RawValue, spec: Spec) -> bool:
    value = raw.value
    if isinstance(value, str):
        return value.strip().lower() not in (FALSE_WORDS | {"", "none"})
    return bool(value)


def _string_list(raw: RawValue, spec: Spec) -> tuple[str, ...]:
    value = raw.value
    if isinstance(value, str):
        items: list[Any] = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        items = [value]
    else:
        raise ConfigError(raw.where, "expected a list or a comma separated string, "
                                     f"got {kind_of(value)}")
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise ConfigError(raw.where, f"expected a list of strings, got an item that "
                                         f"is {kind_of(item)}")
        text = str(item).strip()
        if text:
            out.append(text)
    return tuple(out)


def _choice(raw: RawValue, spec: Spec) -> str | None:
    value = raw.value
    if isinstance(value, bool) and "off" in spec.choices:
        # YAML 1.1 reads a bare on/off as a boolean (Hermes normalises it the same way).
        value = "auto" if value and "auto" in spec.choices else "off"
    if isinstance(value, str) and value.strip().lower() in spec.choices:
        return value.strip().lower()
    if isinstance(value, str) and not value.strip():
        return None
    raise ConfigError(raw.where, f"expected one of {', '.join(spec.choices)}, "
                                 f"got {_shown(value, _is_secret(spec))}")


def _json_object(raw: RawValue, spec: Spec) -> Mapping[str, Any]:
    value = raw.value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            log.warn("{key} is not valid JSON; ignored", key=raw.where)
            return {}
    if not isinstance(value, Mapping):
        log.warn("{key} is not a JSON object; ignored", key=raw.where)
        return {}
    return value


def _mapping(raw: RawValue, spec: Spec) -> Mapping[str, Any]:
    if not isinstance(raw.value, Mapping):
        raise ConfigError(raw.where, f"expected a mapping, got {kind_of(raw.value)}")
    return raw.value


def _endpoint(raw: RawValue, spec: Spec) -> str | None:
    text = _text(raw, spec)
    if text is None or text.strip().lower() in ("none", "off"):
        return text
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(None, text)  # parses only; nothing listens
    except Exception as e:
        raise ConfigError(raw.where, f"expected a Twisted endpoint string such as "
                                     f"tcp:9469:interface=127.0.0.1 or unix:/path "
                                     f"({e.__class__.__name__}), got {_shown(text, False)}")
    return text.strip()


_CONVERTERS: dict[str, Callable[[RawValue, Spec], Any]] = {
    "str": _text,
    "secret": _text,
    "path": _text,
    "url": lambda raw, spec: _url(raw, ("http", "https")),
    "relay_url": lambda raw, spec: _url(raw, ("http", "https", "ws", "wss")),
    "int": _integer,
    "float": _number,
    "bool": _boolean,
    "flag": _flag,
    "list": _string_list,
    "enum": _choice,
    "json": _json_object,
    "mapping": _mapping,
    "endpoint": _endpoint,
}


def convert(raw: RawValue, spec: Spec) -> Any:
    """The typed value of C{raw} per C{spec}; ConfigError naming C{raw.where} when it is bad."""
    if raw.value is None:
        return None
    converter = _CONVERTERS.get(spec.type)
    if converter is None:
        raise AssertionError(f"unknown type {spec.type!r} for {raw.where}")
    return converter(raw, spec)


def freeze(value: Any) -> Any:
    """C{value} with every mapping made read-only and every list a tuple, recursively."""
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value
