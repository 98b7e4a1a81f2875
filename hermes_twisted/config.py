# -*- test-case-name: tests.test_config -*-
"""
Build the frozen L{GatewayConfig} from config.yaml, C{$HERMES_HOME/.env} and the environment,
with Hermes 0.19.0's names and precedence (environment over YAML over defaults), and refuse a
bad configuration with a L{ConfigError} naming the key.

Everything here runs once, before the reactor (twistd's C{postOptions}); it reads files but
never touches the network.  The table of names is L{hermes_twisted.envvars}.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
from dataclasses import fields, is_dataclass
from types import MappingProxyType
from typing import Any, Mapping, MutableMapping, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import yaml
from twisted.logger import Logger

from hermes_twisted.envvars import (
    ENV_VARS,
    SHORTCUT_KEYS,
    SHORTCUT_KEYS_BY_PLATFORM,
    UNSUPPORTED_PLATFORMS,
    YAML_KEYS,
    ConfigKey,
    EnvVar,
)
from hermes_twisted.platforms import SUPPORTED
from hermes_twisted.settings import (
    DisplaySettings,
    GatewayConfig,
    PlatformSettings,
    RelaySettings,
    ResetPolicy,
    StreamingSettings,
    UpstreamSettings,
)

log = Logger(namespace="hermes_twisted.config")

REDACTED = "<redacted>"


class ConfigError(Exception):
    """A configuration problem: C{key} is a dotted YAML key, an env var name or a file."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(key, problem)
        self.key = key
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.key}: {self.problem}"


# -- HERMES_HOME and .env -------------------------------------------------------------------

def _expand_user(path: str, environ: Mapping[str, str]) -> str:
    if path.startswith("~") and (path == "~" or path[1] in "/\\") and environ.get("HOME"):
        return environ["HOME"] + path[1:]
    return os.path.expanduser(path)


def hermes_home(environ: Mapping[str, str]) -> str:
    """C{$HERMES_HOME} (C{~/.hermes} when unset or blank), with C{~} expanded."""
    home = (environ.get("HERMES_HOME") or "").strip() or "~/.hermes"
    # Absolute, so a later chdir (twistd's --rundir) cannot move the database.
    return os.path.abspath(_expand_user(home, environ))


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}


def _dotenv_value(raw: str) -> str | None:
    """The value of one C{KEY=} right-hand side; None when a quote is never closed."""
    if raw[:1] == "'":
        end = raw.find("'", 1)
        return None if end == -1 else raw[1:end]
    if raw[:1] == '"':
        out, i = [], 1
        while i < len(raw):
            ch = raw[i]
            if ch == "\\" and i + 1 < len(raw):
                out.append(_ESCAPES.get(raw[i + 1], "\\" + raw[i + 1]))
                i += 2
                continue
            if ch == '"':
                return "".join(out)
            out.append(ch)
            i += 1
        return None
    comment = re.search(r"\s#", raw)
    return (raw[:comment.start()] if comment else raw).strip()


def read_dotenv(path: str) -> dict[str, str]:
    """
    Parse a C{.env} file: C{KEY=VALUE} lines, C{#} comments (whole-line, or after whitespace
    in an unquoted value), an optional C{export } prefix, optional single or double quotes
    (double quotes understand C{\\n}, C{\\t}, C{\\"} and C{\\\\}).  A missing file is empty;
    malformed lines are logged by line number (never by content) and skipped.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(path, f"cannot read: {e.__class__.__name__}: "
                                f"{getattr(e, 'strerror', None) or e}")
    values: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export "):
            stripped = stripped[len("export "):].lstrip()
        key, sep, raw = stripped.partition("=")
        key = key.strip()
        if not sep or not _ENV_NAME.fullmatch(key):
            log.warn("{path}:{lineno}: not a KEY=VALUE line; ignored", path=path, lineno=lineno)
            continue
        value = _dotenv_value(raw.strip())
        if value is None:
            log.warn("{path}:{lineno}: {key} has an unterminated quote; ignored",
                     path=path, lineno=lineno, key=key)
            continue
        values[key] = value
    return values


def merged_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """C{environ} over C{$HERMES_HOME/.env}: the file never overrides a variable already set."""
    merged = read_dotenv(os.path.join(hermes_home(environ), ".env"))
    merged.update(environ)
    return merged


def apply_dotenv(target: MutableMapping[str, str]) -> list[str]:
    """
    Copy the variables of C{$HERMES_HOME/.env} that C{target} (e.g. C{os.environ}) lacks into
    it, for child processes; L{load_config} does not need this.  Returns the names set.
    """
    added = []
    for key, value in read_dotenv(os.path.join(hermes_home(target), ".env")).items():
        if key not in target:
            target[key] = value
            added.append(key)
    return added


# -- relay URL derivations (relay.md 1.3) ---------------------------------------------------

def relay_dial_url(url: str) -> str:
    """
    The WebSocket URL to dial for a configured connector URL: C{https} becomes C{wss} and
    C{http} becomes C{ws}, trailing slashes go, and C{/relay} is added to the I{path} unless
    it already ends with it.  Unlike 0.19.0 a query string survives in place:
    C{wss://h/base?x=1} gives C{wss://h/base/relay?x=1}.  Idempotent.
    """
    parts = urlsplit(url.strip().rstrip("/"))
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme.lower(), parts.scheme.lower())
    path = parts.path.rstrip("/")
    if not path.endswith("/relay"):
        path += "/relay"
    return urlunsplit((scheme, parts.netloc, path, parts.query, parts.fragment))


def relay_http_base(url: str) -> str:
    """
    The HTTP(S) base for the connector's POST endpoints: C{ws}/C{wss} become C{http}/C{https},
    trailing slashes and one trailing C{/relay} are removed, and any query string is dropped.
    Append C{/relay/provision}, C{/relay/policy}, C{/relay/enroll} or C{/relay/media}.
    """
    parts = urlsplit(url.strip().rstrip("/"))
    scheme = {"wss": "https", "ws": "http"}.get(parts.scheme.lower(), parts.scheme.lower())
    path = parts.path.rstrip("/")
    if path.endswith("/relay"):
        path = path[: -len("/relay")]
    return urlunsplit((scheme, parts.netloc, path.rstrip("/"), "", ""))


def relay_http_url(url: str, endpoint: str) -> str:
    """C{relay_http_base(url) + "/relay/" + endpoint}, keeping a configured query string."""
    query = urlsplit(url.strip().rstrip("/")).query
    base = relay_http_base(url) + "/relay/" + endpoint.strip("/")
    return base + (f"?{query}" if query else "")


# -- the loader -----------------------------------------------------------------------------

class _Raw(NamedTuple):
    value: Any
    where: str  # the dotted YAML key as written, or the env var name
    from_env: bool = False


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_PLATFORM_FIELDS = frozenset({
    "enabled", "token", "api_key", "home_channel", "reply_to_mode", "typing_indicator",
    "allowed_users", "allow_all_users",
})
_SHARED = ("session_reset", "streaming", "group_sessions_per_user", "thread_sessions_per_user",
           "unauthorized_dm_behavior")
#: Every name Hermes treats as a platform (used to recognise top-level shortcut blocks).
_HERMES_PLATFORMS = frozenset(SUPPORTED) | frozenset(UNSUPPORTED_PLATFORMS)

_SPECS: dict[str, EnvVar | ConfigKey] = {
    **{v.setting: v for v in ENV_VARS.values()},
    **YAML_KEYS,
}


def _spec(path: str) -> EnvVar | ConfigKey | None:
    spec = _SPECS.get(path)
    if spec is None and path.startswith("platforms."):
        parts = path.split(".")
        if len(parts) == 3:
            spec = _SPECS.get(f"platforms.<name>.{parts[2]}")
    return spec


def _kind(value: Any) -> str:
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
        return _kind(value)
    if isinstance(value, str):
        parts = urlsplit(value) if "://" in value else None
        if parts is not None and (parts.username or parts.password):
            value = value.replace(parts.netloc, parts.hostname or "", 1)
        return repr(value if len(value) <= 80 else value[:77] + "...")
    return repr(value)


def _range_text(spec: EnvVar | ConfigKey) -> str:
    if spec.minimum is not None and spec.maximum is not None:
        return f" between {spec.minimum:g} and {spec.maximum:g}"
    if spec.minimum is not None:
        return f" >= {spec.minimum:g}"
    if spec.maximum is not None:
        return f" <= {spec.maximum:g}"
    return ""


def _check_range(number: float, spec: EnvVar | ConfigKey, noun: str, raw: _Raw) -> None:
    if (spec.minimum is not None and number < spec.minimum) or (
            spec.maximum is not None and number > spec.maximum):
        raise ConfigError(raw.where, f"expected {noun}{_range_text(spec)}, got {raw.value!r}")


def _url(raw: _Raw, schemes: tuple[str, ...]) -> str | None:
    value = raw.value
    if not isinstance(value, str):
        raise ConfigError(raw.where, f"expected a URL, got {_kind(value)}")
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


def _convert(raw: _Raw, spec: EnvVar | ConfigKey) -> Any:
    """The typed value of C{raw} per C{spec}; ConfigError naming C{raw.where} when it is bad."""
    value, kind = raw.value, spec.type
    secret = spec.password or kind == "secret"
    if value is None:
        return None
    if kind in ("str", "secret", "path"):
        if isinstance(value, (datetime.date, datetime.time)):
            value = value.isoformat()  # YAML read an unquoted id like 2024-01-01 as a date
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(raw.where, f"expected a string, got {_kind(value)}")
        text = value if isinstance(value, str) else str(value)
        if kind == "secret":
            text = text.strip()
        if kind == "path" and text.strip():
            return text.strip()
        return text if text.strip() or kind == "str" else None
    if kind == "url":
        return _url(raw, ("http", "https"))
    if kind == "relay_url":
        return _url(raw, ("http", "https", "ws", "wss"))
    if kind == "int":
        number: Any = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str):
            try:
                number = int(value.strip(), 10)
            except ValueError:
                number = None
        if number is None:
            raise ConfigError(raw.where, f"expected an integer, got {_shown(value, secret)}")
        _check_range(number, spec, "an integer", raw)
        return number
    if kind == "float":
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        if number is None or not math.isfinite(number):
            raise ConfigError(raw.where, f"expected a number, got {_shown(value, secret)}")
        _check_range(number, spec, "a number", raw)
        return number
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            word = value.strip().lower()
            if word in _TRUE:
                return True
            if word in _FALSE:
                return False
        raise ConfigError(raw.where, f"expected true or false, got {_shown(value, secret)}")
    if kind == "flag":
        if isinstance(value, str):
            return value.strip().lower() not in (_FALSE | {"", "none"})
        return bool(value)
    if kind == "list":
        if isinstance(value, str):
            items: list[Any] = value.split(",")
        elif isinstance(value, (list, tuple)):
            items = list(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            items = [value]
        else:
            raise ConfigError(raw.where, "expected a list or a comma separated string, "
                                         f"got {_kind(value)}")
        out = []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                raise ConfigError(raw.where, f"expected a list of strings, got an item that "
                                             f"is {_kind(item)}")
            text = str(item).strip()
            if text:
                out.append(text)
        return tuple(out)
    if kind == "enum":
        if isinstance(value, bool) and "off" in spec.choices:
            # YAML 1.1 reads a bare on/off as a boolean (Hermes normalises it the same way).
            value = "auto" if value and "auto" in spec.choices else "off"
        if isinstance(value, str) and value.strip().lower() in spec.choices:
            return value.strip().lower()
        if isinstance(value, str) and not value.strip():
            return None
        raise ConfigError(raw.where, f"expected one of {', '.join(spec.choices)}, "
                                     f"got {_shown(value, secret)}")
    if kind == "json":
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
    if kind == "mapping":
        if not isinstance(value, Mapping):
            raise ConfigError(raw.where, f"expected a mapping, got {_kind(value)}")
        return value
    raise AssertionError(f"unknown type {kind!r} for {raw.where}")


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


class _Loader:
    """One load: the YAML document flattened to dotted keys, the environment laid over it."""

    def __init__(self, document: Mapping[str, Any], environ: Mapping[str, str],
                 home: str) -> None:
        self.doc = document
        self.env = environ
        self.home = home
        self.values: dict[str, _Raw] = {}
        self.unused: list[str] = []
        self.fronted_blocks: dict[str, dict[str, _Raw]] = {}
        self.relay_platforms: tuple[str, ...] = ()

    # -- reading the document -------------------------------------------------------------

    @staticmethod
    def _mapping(value: Any, where: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(where, f"expected a mapping, got {_kind(value)}")
        return value

    def _put(self, path: str, value: Any, where: str) -> None:
        self.values[path] = _Raw(value, where)

    def _block(self, block: Mapping[str, Any], where: str, canonical: str,
               known: set[str] | frozenset[str]) -> None:
        for key, value in block.items():
            key = str(key)
            if key in known:
                self._put(f"{canonical}.{key}", value, f"{where}.{key}")
            else:
                self.unused.append(f"{where}.{key}")

    def _known_leaves(self, prefix: str) -> set[str]:
        n = len(prefix) + 1
        return {p[n:] for p in _SPECS if p.startswith(prefix + ".") and "." not in p[n:]}

    def read_document(self) -> None:
        doc = self.doc
        gateway = self._mapping(doc.get("gateway"), "gateway")
        # Shared settings: the top level wins over gateway.* (as in Hermes), block by block.
        for name in _SHARED:
            if name in doc:
                where, value = name, doc[name]
            elif name in gateway:
                where, value = f"gateway.{name}", gateway[name]
            else:
                continue
            if name in ("session_reset", "streaming"):
                known = self._known_leaves(name)
                if name == "session_reset":
                    known.add("bg_process_max_age_hours")  # Hermes's; nothing to do here
                self._block(self._mapping(value, where), where, name, known)
            else:
                self._put(name, value, where)
        if "display" in doc:
            self._block(self._mapping(doc["display"], "display"), "display", "display",
                        self._known_leaves("display"))
        self._read_gateway(gateway)
        self.relay_platforms = self._relay_platforms()
        self._read_platforms(gateway)
        # relay.md 2.4: the relay's policy falls back to these top-level keys.
        for key in ("require_mention", "free_response_channels"):
            if doc.get(key) is not None and not self.has(f"platforms.relay.extra.{key}"):
                self._put(f"platforms.relay.extra.{key}", doc[key], key)

    def _read_gateway(self, gateway: Mapping[str, Any]) -> None:
        known = self._known_leaves("gateway")
        for key, value in gateway.items():
            key = str(key)
            where = f"gateway.{key}"
            if key in _SHARED or key == "platforms" or key == "api_server":
                continue  # handled elsewhere
            if key == "idp":
                self._block(self._mapping(value, where), where, where,
                            self._known_leaves("gateway.idp"))
            elif key in known:
                self._put(where, value, where)
            elif key in _HERMES_PLATFORMS:
                continue  # a gateway.<platform> block, read with the platforms
            else:
                self.unused.append(where)

    def _relay_platforms(self) -> tuple[str, ...]:
        raw = self.env.get("GATEWAY_RELAY_PLATFORMS", "")
        return _convert(_Raw(raw, "GATEWAY_RELAY_PLATFORMS", True),
                        ENV_VARS["GATEWAY_RELAY_PLATFORMS"]) or ()

    def _read_platforms(self, gateway: Mapping[str, Any]) -> None:
        # Lowest precedence first: gateway.platforms, gateway.<platform>, platforms, shortcut.
        sources: list[tuple[str, Mapping[str, Any], bool]] = []
        for where in ("gateway.platforms", "platforms"):
            holder = gateway.get("platforms") if where == "gateway.platforms" else \
                self.doc.get("platforms")
            block = self._mapping(holder, where)
            for name, value in block.items():
                sources.append((f"{where}.{name}", self._mapping(value, f"{where}.{name}"),
                                False))
            if where == "gateway.platforms":
                for name in gateway:
                    if name in _HERMES_PLATFORMS:
                        value = self._mapping(gateway[name], f"gateway.{name}")
                        if name == "api_server" and "max_concurrent_runs" in value:
                            self._put("gateway.api_server.max_concurrent_runs",
                                      value["max_concurrent_runs"],
                                      "gateway.api_server.max_concurrent_runs")
                            value = {k: v for k, v in value.items()
                                     if k != "max_concurrent_runs"}
                        sources.append((f"gateway.{name}", value, True))
        for name in self.doc:
            if name in _HERMES_PLATFORMS:
                sources.append((str(name), self._mapping(self.doc[name], str(name)), True))
        for where, block, shortcut in sources:
            self._platform_block(where.rsplit(".", 1)[-1], where, block, shortcut)

    def _platform_block(self, name: str, where: str, block: Mapping[str, Any],
                        shortcut: bool) -> None:
        if name in self.relay_platforms:
            # The relay fronts it: the block also configures the relay's view of it (policy).
            fronted = self.fronted_blocks.setdefault(name, {})
            for key, value in block.items():
                fronted[str(key)] = _Raw(value, f"{where}.{key}")
        if name not in SUPPORTED:
            if name in self.relay_platforms:
                return
            enabled = block.get("enabled")
            disabled = enabled is False or (isinstance(enabled, str)
                                            and enabled.strip().lower() in _FALSE)
            wants_it = not disabled and (enabled is not None
                                         or any(block.get(k) for k in ("token", "api_key")))
            if name in UNSUPPORTED_PLATFORMS and not wants_it:
                # Hermes's stock config.yaml carries behaviour blocks (require_mention, ...)
                # for platforms it may never enable; a copied file must still load.
                log.warn("{where}: {name} is not supported by this daemon; the block is ignored "
                         "(front {name} through the relay to use it)", where=where, name=name)
                return
            supported = ", ".join(sorted(SUPPORTED))
            if name in UNSUPPORTED_PLATFORMS:
                raise ConfigError(where, f"{name} is not supported by this daemon (supported: "
                                         f"{supported}); front it through the relay "
                                         f"(GATEWAY_RELAY_URL and GATEWAY_RELAY_PLATFORMS="
                                         f"{name}), or set enabled: false")
            raise ConfigError(where, f"unknown platform {name!r} (supported: {supported})")
        prefix = f"platforms.{name}"
        specific = SHORTCUT_KEYS_BY_PLATFORM.get(name, frozenset())
        for key, value in block.items():
            key = str(key)
            key_where = f"{where}.{key}"
            if key == "extra":
                extra = self._mapping(value, key_where)
                for extra_key, extra_value in extra.items():
                    self._put(f"{prefix}.extra.{extra_key}", extra_value,
                              f"{key_where}.{extra_key}")
            elif key in _PLATFORM_FIELDS and (not shortcut or key == "enabled"):
                self._put(f"{prefix}.{key}", value, key_where)
            elif key in SHORTCUT_KEYS or key in specific:
                self._put(f"{prefix}.extra.{key}", value, key_where)
                if key == "typing_indicator":
                    self._put(f"{prefix}.typing_indicator", value, key_where)
            else:
                self.unused.append(key_where)

    # -- the environment ------------------------------------------------------------------

    def overlay_environment(self) -> None:
        for var in ENV_VARS.values():
            value = self.env.get(var.name)
            if value is None or not value.strip():
                continue  # whitespace-only counts as unset and falls through to YAML
            self.values[var.setting] = _Raw(value.strip(), var.name, True)
        for platform, names in UNSUPPORTED_PLATFORMS.items():
            for name in names:
                if (self.env.get(name) or "").strip() and platform not in self.relay_platforms:
                    log.warn("{name} is set but {platform} is not supported by this daemon; "
                             "ignored (front {platform} through the relay)",
                             name=name, platform=platform)

    # -- typed access ---------------------------------------------------------------------

    def raw(self, path: str) -> _Raw | None:
        raw = self.values.get(path)
        return None if raw is None or raw.value is None else raw

    def get(self, path: str, default: Any = None) -> Any:
        spec = _spec(path)
        raw = self.raw(path)
        if spec is None:
            return default if raw is None else raw.value
        if raw is None:
            return spec.default if default is None else default
        value = _convert(raw, spec)
        if value is None:
            return spec.default if default is None else default
        if spec.type == "path":
            value = _expand_user(value, self.env)
            value = value if os.path.isabs(value) else os.path.join(self.home, value)
        return value

    def has(self, path: str) -> bool:
        return self.raw(path) is not None


def _db_path(loader: _Loader) -> str:
    return loader.get("gateway.db_path", "") or os.path.join(loader.home, "gateway.db")


def _upstream(loader: _Loader) -> UpstreamSettings:
    return UpstreamSettings(
        proxy_url=loader.get("gateway.proxy_url"),
        proxy_key=loader.get("gateway.proxy_key"),
        model=loader.get("gateway.proxy_model"),
        connect_timeout=loader.get("gateway.proxy_connect_timeout"),
        idle_read_timeout=loader.get("gateway.proxy_idle_timeout"),
        max_event_bytes=loader.get("gateway.proxy_max_event_bytes"),
    )


def _bot_ids(loader: _Loader) -> Mapping[str, Mapping[str, str]]:
    raw = loader.raw("$GATEWAY_RELAY_BOT_IDS")
    if raw is None:
        return _freeze({})
    parsed = _convert(raw, ENV_VARS["GATEWAY_RELAY_BOT_IDS"])
    out: dict[str, dict[str, str]] = {}
    for platform, entry in parsed.items():
        if not isinstance(entry, Mapping):
            log.warn("GATEWAY_RELAY_BOT_IDS entry for {platform} is not an object; ignored",
                     platform=str(platform))
            continue
        item = {str(k): str(v) for k, v in entry.items()
                if isinstance(v, (str, int)) and not isinstance(v, bool)}
        if "username" in item:
            item["username"] = item["username"].lstrip("@")
        out[str(platform)] = item
    return _freeze(out)


def _relay(loader: _Loader) -> RelaySettings:
    base = loader.get("gateway.relay_url")
    if base is None:
        # 0.19.0 also enables relay from platforms.relay.extra.relay_url (then registers
        # nothing); we honour it as the lowest-precedence source of the URL.
        for key in ("relay_url", "url"):
            raw = loader.raw(f"platforms.relay.extra.{key}")
            if raw is not None:
                base = _convert(raw, ENV_VARS["GATEWAY_RELAY_URL"])
                break
    enabled = loader.get("platforms.relay.enabled", None) if loader.has(
        "platforms.relay.enabled") else None
    if enabled is True and not base:
        raise ConfigError("GATEWAY_RELAY_URL", "required when platforms.relay.enabled is true "
                                               "(or set gateway.relay_url)")
    url = relay_dial_url(base) if base and enabled is not False else None
    return RelaySettings(
        url=url,
        base_url=base,
        gateway_id=loader.get("gateway.relay_id"),
        secret=loader.get("gateway.relay_secret"),
        delivery_key=loader.get("$GATEWAY_RELAY_DELIVERY_KEY"),
        platforms=loader.relay_platforms,
        bot_ids=_bot_ids(loader),
        max_message_bytes=loader.get("gateway.relay_max_message_bytes"),
        request_timeout=loader.get("gateway.relay_request_timeout"),
        endpoint=loader.get("gateway.relay_endpoint"),
        route_keys=loader.get("gateway.relay_route_keys", ()),
        instance_id=loader.get("gateway.relay_instance_id"),
        wake_url=loader.get("gateway.relay_wake_url"),
        idp_token_url=loader.get("gateway.idp.token_url"),
        idp_client_id=loader.get("gateway.idp.client_id"),
        idp_client_secret=loader.get("gateway.idp.client_secret"),
        idp_scope=loader.get("gateway.idp.scope"),
        enroll_token=loader.get("$GATEWAY_RELAY_ENROLL_TOKEN"),
    )


def _env_enables(loader: _Loader, platform: str) -> bool | None:
    """
    True when an enabling variable of C{platform} is set in the environment, False when one is
    explicitly false (C{API_SERVER_ENABLED=false}), None when none is set.
    """
    result = None
    for var in ENV_VARS.values():
        if var.platform != platform or not var.enables:
            continue
        raw = loader.raw(var.setting)
        if raw is None or not raw.from_env:
            continue
        value = _convert(raw, var)
        if var.type == "bool":
            if value is False:
                return False
            result = result or value
        else:
            result = True
    return result


def _require(loader: _Loader, platform: str, key: str, label: str) -> None:
    path = f"platforms.{platform}.extra.{key}"
    if loader.get(path) in (None, ""):
        var = next(v.name for v in ENV_VARS.values() if v.setting == path)
        raise ConfigError(var, f"required when {label} is enabled (or set {path})")


def _check_platform(loader: _Loader, settings: PlatformSettings) -> None:
    name, extra = settings.name, settings.extra
    if name == "irc":
        for key in ("server", "nickname", "channel"):
            _require(loader, "irc", key, "IRC")
    elif name == "matrix":
        _require(loader, "matrix", "homeserver", "Matrix")
        if not (extra.get("access_token") or settings.token) and not (extra.get("user_id")
                                                  and extra.get("password")):
            raise ConfigError("MATRIX_ACCESS_TOKEN", "Matrix needs an access token, or "
                              "MATRIX_USER_ID and MATRIX_PASSWORD (or platforms.matrix.extra."
                              "access_token / user_id and password)")
    elif name == "telegram":
        if not settings.token:
            raise ConfigError("TELEGRAM_BOT_TOKEN", "required when Telegram is enabled "
                                                    "(or set platforms.telegram.token)")
    elif name == "api_server":
        key = extra.get("key") or settings.api_key
        if not key or len(key) < 16:
            raise ConfigError("API_SERVER_KEY", "the API server needs a key of at least 16 "
                              "characters (or set platforms.api_server.extra.key)")


def _home_channel(loader: _Loader, prefix: str, extra: dict[str, Any]) -> str | None:
    raw = loader.raw(f"{prefix}.home_channel")
    if raw is not None and isinstance(raw.value, Mapping):
        # Hermes's HomeChannel shape: {platform, chat_id, name, thread_id}.
        block = raw.value
        chat_id = _convert(_Raw(block.get("chat_id"), f"{raw.where}.chat_id"),
                           YAML_KEYS["platforms.<name>.home_channel"])
        for src, dst in (("name", "home_channel_name"), ("thread_id", "home_channel_thread_id")):
            if block.get(src) is not None:
                extra.setdefault(dst, str(block[src]))
        return chat_id
    return loader.get(f"{prefix}.home_channel")


def _platform(loader: _Loader, name: str, relay: RelaySettings) -> PlatformSettings:
    prefix = f"platforms.{name}"
    extra: dict[str, Any] = {}
    for path in sorted(loader.values):
        if path.startswith(f"{prefix}.extra."):
            extra[path[len(prefix) + 7:]] = loader.get(path)
    for var in ENV_VARS.values():
        if var.platform == name and var.extra_key and var.default is not None:
            extra.setdefault(var.extra_key, var.default)
    home = _home_channel(loader, prefix, extra)
    if home is None and name == "matrix":
        home = extra.get("home_room")
    if home is not None:
        extra.setdefault("home_channel", home)
    allowed = loader.get(f"{prefix}.allowed_users", ())
    if not allowed and "allowed_users" in extra:
        # Hermes's IRC adapter reads its allowlist from extra.allowed_users.
        allowed = _convert(loader.values[f"{prefix}.extra.allowed_users"],
                           YAML_KEYS["platforms.<name>.allowed_users"]) or ()
    if name == "relay":
        for platform, block in loader.fronted_blocks.items():
            merged = {key: raw.value for key, raw in block.items() if key != "extra"}
            nested = block.get("extra")
            if nested is not None and isinstance(nested.value, Mapping):
                merged.update(nested.value)
            if isinstance(extra.get(platform), Mapping):
                merged.update(extra[platform])
            extra[platform] = merged
        enabled = relay.enabled
    else:
        explicit = loader.get(f"{prefix}.enabled") if loader.has(f"{prefix}.enabled") else None
        by_env = _env_enables(loader, name)
        enabled = explicit if explicit is not None else bool(by_env)
        if by_env is False:
            enabled = False
    settings = PlatformSettings(
        name=name,
        enabled=enabled,
        token=loader.get(f"{prefix}.token"),
        api_key=loader.get(f"{prefix}.api_key"),
        reply_to_mode=loader.get(f"{prefix}.reply_to_mode"),
        typing_indicator=loader.get(f"{prefix}.typing_indicator"),
        allowed_users=tuple(allowed),
        allow_all_users=loader.get(f"{prefix}.allow_all_users"),
        home_channel=home,
        extra=_freeze(extra),
    )
    if settings.enabled:
        _check_platform(loader, settings)
    return settings


def _platforms(loader: _Loader, relay: RelaySettings) -> dict[str, PlatformSettings]:
    present = {path.split(".")[1] for path in loader.values if path.startswith("platforms.")}
    for var in ENV_VARS.values():
        if var.platform and loader.raw(var.setting) is not None:
            present.add(var.platform)
    if relay.base_url or loader.fronted_blocks:
        present.add("relay")
    return {name: _platform(loader, name, relay) for name in sorted(present)}


def _streaming(loader: _Loader) -> StreamingSettings:
    mode = loader.get("streaming.mode")
    transport = loader.get("streaming.transport") if loader.has("streaming.transport") else None
    if loader.has("streaming.enabled"):
        enabled = loader.get("streaming.enabled")
    else:
        enabled = mode is not None  # "mode:" is an alias that also turns streaming on
    return StreamingSettings(
        enabled=enabled,
        transport=transport or mode or "auto",
        edit_interval=loader.get("streaming.edit_interval"),
        buffer_threshold=loader.get("streaming.buffer_threshold"),
        cursor=loader.get("streaming.cursor"),
        fresh_final_after_seconds=loader.get("streaming.fresh_final_after_seconds"),
    )


def _reset_policy(loader: _Loader) -> ResetPolicy:
    return ResetPolicy(
        mode=loader.get("session_reset.mode"),
        at_hour=loader.get("session_reset.at_hour"),
        idle_minutes=loader.get("session_reset.idle_minutes"),
        notify=loader.get("session_reset.notify"),
        notify_exclude_platforms=tuple(loader.get("session_reset.notify_exclude_platforms")),
    )


def _display(loader: _Loader) -> DisplaySettings:
    mode = loader.get("display.busy_input_mode")
    if mode == "steer":
        log.warn("display.busy_input_mode: steer is not supported by this daemon; "
                 "using interrupt")
        mode = "interrupt"
    return DisplaySettings(
        busy_input_mode=mode,
        tool_progress=loader.get("display.tool_progress"),
        typing_interval=loader.get("display.typing_interval"),
        busy_ack_interval=loader.get("display.busy_ack_interval"),
    )


def _check_api_server_port(upstream: UpstreamSettings, api: PlatformSettings | None) -> None:
    """Our own API server must not listen where we send turns (a shared .env makes it easy)."""
    if api is None or not api.enabled or not upstream.proxy_url:
        return
    target = urlsplit(upstream.proxy_url)
    port = target.port or (443 if target.scheme == "https" else 80)
    host = api.extra.get("host")
    same_host = host in (target.hostname, "0.0.0.0", "::") or (
        target.hostname in ("localhost", "127.0.0.1", "::1")
        and host in ("localhost", "127.0.0.1", "::1"))
    if same_host and api.extra.get("port") == port:
        raise ConfigError("API_SERVER_PORT", f"the API server would listen on {host}:{port}, "
                          "which is the proxy target (GATEWAY_PROXY_URL); pick another port "
                          "or disable the API server")


def build_config(document: Mapping[str, Any], environ: Mapping[str, str], *,
                 home: str | None = None, source: str = "config.yaml") -> GatewayConfig:
    """
    The configuration from an already parsed YAML C{document} and a complete C{environ}
    (.env already merged).  Raises L{ConfigError}.
    """
    if not isinstance(document, Mapping):
        raise ConfigError(source, f"expected a mapping at the top level, got {_kind(document)}")
    loader = _Loader(document, environ, home or hermes_home(environ))
    loader.read_document()
    loader.overlay_environment()
    upstream = _upstream(loader)
    relay = _relay(loader)
    platforms = _platforms(loader, relay)
    _check_api_server_port(upstream, platforms.get("api_server"))
    behaviour = loader.get("unauthorized_dm_behavior")
    if behaviour == "pair":
        log.warn("unauthorized_dm_behavior: pair is not supported by this daemon (no pairing); "
                 "unauthorized DMs are ignored")
        behaviour = "ignore"
    config = GatewayConfig(
        hermes_home=loader.home,
        db_path=_db_path(loader),
        upstream=upstream,
        relay=relay,
        platforms=MappingProxyType(platforms),
        streaming=_streaming(loader),
        session_reset=_reset_policy(loader),
        display=_display(loader),
        group_sessions_per_user=loader.get("group_sessions_per_user"),
        thread_sessions_per_user=loader.get("thread_sessions_per_user"),
        allowed_users=loader.get("$GATEWAY_ALLOWED_USERS", ()),
        allow_all_users=loader.get("$GATEWAY_ALLOW_ALL_USERS"),
        unauthorized_dm_behavior=behaviour,
        max_concurrent_runs=loader.get("gateway.api_server.max_concurrent_runs"),
        shutdown_timeout=loader.get("gateway.shutdown_timeout"),
    )
    if loader.unused:
        log.warn("{source}: keys not used by this daemon (ignored): {keys}",
                 source=source, keys=", ".join(loader.unused))
    return config


def _read_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(path, "no such file")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(path, f"cannot read: {getattr(e, 'strerror', None) or e}")
    except yaml.YAMLError as e:
        # Built from the parts, not str(e): that quotes the offending line, maybe a secret.
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or e.__class__.__name__
        context = getattr(e, "context", None)
        raise ConfigError(path, f"malformed YAML: {(context + ', ') if context else ''}"
                                f"{problem}{where}")


def load_config(config_path: str | None, environ: Mapping[str, str]) -> GatewayConfig:
    """
    The gateway configuration.  C{config_path} is C{--config FILE} or None, in which case
    C{$HERMES_HOME/config.yaml} is read when it exists (no file at all is fine: environment
    only).  C{$HERMES_HOME/.env} is read in both cases, never overriding C{environ}.
    C{environ} is not modified.  Raises L{ConfigError}.
    """
    home = hermes_home(environ)
    env = merged_environ(environ)
    if config_path is None:
        default = os.path.join(home, "config.yaml")
        config_path = default if os.path.exists(default) else None
    document = {} if config_path is None else _read_yaml(config_path)
    if document is None:
        document = {}  # an empty file
    return build_config(document, env, home=home, source=config_path or "environment")


# -- redaction ------------------------------------------------------------------------------

_SECRET_NAMES = frozenset(
    {"token", "api_key", "password", "access_token", "key", "secret", "delivery_key",
     "proxy_key", "client_secret", "enroll_token"}
    | {v.extra_key for v in ENV_VARS.values() if v.password and v.extra_key}
    | {v.setting.rsplit(".", 1)[-1] for v in ENV_VARS.values() if v.password}
    | {k.path.rsplit(".", 1)[-1] for k in YAML_KEYS.values() if k.password}
)
_SECRET_SUFFIXES = ("_token", "_secret", "_key", "_password", "_json")


def _is_secret_name(name: str) -> bool:
    name = name.lower()
    return name in _SECRET_NAMES or name.endswith(_SECRET_SUFFIXES)


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    return value


def _redact(value: Any, secrets: set[str], name: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _redact(v, secrets, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, secrets, name) for v in value]
    if _is_secret_name(name) and value not in (None, ""):
        if isinstance(value, str):
            secrets.add(value)
        return REDACTED
    return value


def _scrub(value: Any, secrets: list[str]) -> Any:
    """Remove secret values and URL credentials that sit under innocent names."""
    if isinstance(value, dict):
        return {k: _scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, secrets) for v in value]
    if isinstance(value, str) and value != REDACTED:
        if "://" in value:
            parts = urlsplit(value)
            if parts.password:
                value = value.replace(f":{parts.password}@", f":{REDACTED}@", 1)
        for secret in secrets:
            value = value.replace(secret, REDACTED)
    return value


def redacted_yaml(config: GatewayConfig) -> str:
    """
    The effective configuration as YAML, every secret replaced by C{"<redacted>"}: values
    under secret names (token, api_key, password, access_token, key, secret, delivery_key,
    any C{*_token}/C{*_secret}/C{*_key}/C{*_password}, every registry password), URL
    passwords, and any other occurrence of those values.  Unset secrets show as null.
    """
    secrets: set[str] = set()
    tree = _redact(_plain(config), secrets)
    # Longest first, so a secret containing a shorter one is replaced whole.
    tree = _scrub(tree, sorted((s for s in secrets if len(s) >= 3), key=len, reverse=True))
    header = "# Effective hermes-gateway configuration (secrets redacted)\n"
    return header + yaml.safe_dump(tree, sort_keys=False, allow_unicode=True,
                                   default_flow_style=False)
