# -*- test-case-name: tests.test_config -*-
"""
The configuration's raw values by dotted key (L{ConfigLayers}): the YAML document read with
Hermes 0.19.0's block names and precedence, the environment laid over it, and typed access
per the registry (L{hermes_twisted.config.envvars}).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from twisted.logger import Logger

from hermes_twisted.config.dotenv import expand_user
from hermes_twisted.config.envvars import (
    ENV_VARS,
    SHORTCUT_KEYS,
    SHORTCUT_KEYS_BY_PLATFORM,
    SUPPORTED_PLATFORMS,
    UNSUPPORTED_PLATFORMS,
    YAML_KEYS,
)
from hermes_twisted.config.errors import ConfigError
from hermes_twisted.config.values import FALSE_WORDS, RawValue, Spec, convert, kind_of

# Shared with the rest of the loader, so operators filter every config warning by one name.
log = Logger(namespace="hermes_twisted.config")

_PLATFORM_FIELDS = frozenset({
    "enabled", "token", "api_key", "home_channel", "reply_to_mode", "typing_indicator",
    "allowed_users", "allow_all_users",
})
_SHARED = ("session_reset", "streaming", "group_sessions_per_user", "thread_sessions_per_user",
           "unauthorized_dm_behavior", "reset_by_platform", "reset_by_type")
#: Every name Hermes treats as a platform (used to recognise top-level shortcut blocks).
_HERMES_PLATFORMS = frozenset(SUPPORTED_PLATFORMS) | frozenset(UNSUPPORTED_PLATFORMS)

_SPECS: dict[str, Spec] = {
    **{v.setting: v for v in ENV_VARS.values()},
    **YAML_KEYS,
}


def _spec(path: str) -> Spec | None:
    spec = _SPECS.get(path)
    if spec is None and path.startswith("platforms."):
        parts = path.split(".")
        if len(parts) == 3:
            spec = _SPECS.get(f"platforms.<name>.{parts[2]}")
        elif len(parts) == 4 and parts[2] == "extra":
            spec = _SPECS.get(f"platforms.<name>.extra.{parts[3]}")
    return spec


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(where, f"expected a mapping, got {kind_of(value)}")
    return value


def _known_leaves(prefix: str) -> set[str]:
    n = len(prefix) + 1
    return {p[n:] for p in _SPECS if p.startswith(prefix + ".") and "." not in p[n:]}


class ConfigLayers:
    """One load: the YAML document flattened to dotted keys, the environment laid over it."""

    def __init__(self, document: Mapping[str, Any], environ: Mapping[str, str],
                 home: str) -> None:
        self.doc = document
        self.env = environ
        self.home = home
        self.values: dict[str, RawValue] = {}
        self.unused: list[str] = []
        self.fronted_blocks: dict[str, dict[str, RawValue]] = {}
        self.relay_platforms: tuple[str, ...] = ()

    # -- reading the document -------------------------------------------------------------

    def _put(self, path: str, value: Any, where: str) -> None:
        self.values[path] = RawValue(value, where)

    def _block(self, block: Mapping[str, Any], where: str, canonical: str,
               known: set[str] | frozenset[str]) -> None:
        for key, value in block.items():
            key = str(key)
            if key in known:
                self._put(f"{canonical}.{key}", value, f"{where}.{key}")
            else:
                self.unused.append(f"{where}.{key}")

    def read_document(self) -> None:
        doc = self.doc
        gateway = _mapping(doc.get("gateway"), "gateway")
        # Shared settings: the top level wins over gateway.* (as in Hermes), block by block.
        for name in _SHARED:
            if name in doc:
                where, value = name, doc[name]
            elif name in gateway:
                where, value = f"gateway.{name}", gateway[name]
            else:
                continue
            if name in ("session_reset", "streaming"):
                known = _known_leaves(name)
                if name == "session_reset":
                    known.add("bg_process_max_age_hours")  # Hermes's; nothing to do here
                self._block(_mapping(value, where), where, name, known)
            else:
                self._put(name, value, where)
        if "display" in doc:
            self._block(_mapping(doc["display"], "display"), "display", "display",
                        _known_leaves("display"))
        self._read_gateway(gateway)
        self.relay_platforms = self._relay_platforms()
        self._read_platforms(gateway)
        # relay.md 2.4: the relay's policy falls back to these top-level keys.
        for key in ("require_mention", "free_response_channels"):
            if doc.get(key) is not None and not self.has(f"platforms.relay.extra.{key}"):
                self._put(f"platforms.relay.extra.{key}", doc[key], key)

    def _read_gateway(self, gateway: Mapping[str, Any]) -> None:
        known = _known_leaves("gateway")
        for key, value in gateway.items():
            key = str(key)
            where = f"gateway.{key}"
            if key in _SHARED or key == "platforms" or key == "api_server":
                continue  # handled elsewhere
            if key in ("idp", "scale_to_zero", "ops", "fleet", "media"):
                self._block(_mapping(value, where), where, where,
                            _known_leaves(f"gateway.{key}"))
            elif key in known:
                self._put(where, value, where)
            elif key in _HERMES_PLATFORMS:
                continue  # a gateway.<platform> block, read with the platforms
            else:
                self.unused.append(where)

    def _relay_platforms(self) -> tuple[str, ...]:
        raw = self.env.get("GATEWAY_RELAY_PLATFORMS", "")
        return convert(RawValue(raw, "GATEWAY_RELAY_PLATFORMS", True),
                       ENV_VARS["GATEWAY_RELAY_PLATFORMS"]) or ()

    def _read_platforms(self, gateway: Mapping[str, Any]) -> None:
        # Lowest precedence first: gateway.platforms, gateway.<platform>, platforms, shortcut.
        sources: list[tuple[str, Mapping[str, Any], bool]] = []
        for where in ("gateway.platforms", "platforms"):
            holder = gateway.get("platforms") if where == "gateway.platforms" else \
                self.doc.get("platforms")
            block = _mapping(holder, where)
            for name, value in block.items():
                sources.append((f"{where}.{name}", _mapping(value, f"{where}.{name}"), False))
            if where == "gateway.platforms":
                for name in gateway:
                    if name in _HERMES_PLATFORMS:
                        value = _mapping(gateway[name], f"gateway.{name}")
                        if name == "api_server" and "max_concurrent_runs" in value:
                            self._put("gateway.api_server.max_concurrent_runs",
                                      value["max_concurrent_runs"],
                                      "gateway.api_server.max_concurrent_runs")
                            value = {k: v for k, v in value.items()
                                     if k != "max_concurrent_runs"}
                        sources.append((f"gateway.{name}", value, True))
        for name in self.doc:
            if name in _HERMES_PLATFORMS:
                sources.append((str(name), _mapping(self.doc[name], str(name)), True))
        for where, block, shortcut in sources:
            self._platform_block(where.rsplit(".", 1)[-1], where, block, shortcut)

    def _platform_block(self, name: str, where: str, block: Mapping[str, Any],
                        shortcut: bool) -> None:
        if name in self.relay_platforms:
            # The relay fronts it: the block also configures the relay's view of it (policy).
            fronted = self.fronted_blocks.setdefault(name, {})
            for key, value in block.items():
                fronted[str(key)] = RawValue(value, f"{where}.{key}")
        if name not in SUPPORTED_PLATFORMS:
            self._unsupported_block(name, where, block)
            return
        prefix = f"platforms.{name}"
        specific = SHORTCUT_KEYS_BY_PLATFORM.get(name, frozenset())
        for key, value in block.items():
            key = str(key)
            key_where = f"{where}.{key}"
            if key == "extra":
                extra = _mapping(value, key_where)
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

    def _unsupported_block(self, name: str, where: str, block: Mapping[str, Any]) -> None:
        """A platform this daemon does not run: fine if the relay fronts it or it is off."""
        if name in self.relay_platforms:
            return
        enabled = block.get("enabled")
        disabled = enabled is False or (isinstance(enabled, str)
                                        and enabled.strip().lower() in FALSE_WORDS)
        wants_it = not disabled and (enabled is not None
                                     or any(block.get(k) for k in ("token", "api_key")))
        if name in UNSUPPORTED_PLATFORMS and not wants_it:
            # Hermes's stock config.yaml carries behaviour blocks (require_mention, ...)
            # for platforms it may never enable; a copied file must still load.
            log.warn("{where}: {name} is not supported by this daemon; the block is ignored "
                     "(front {name} through the relay to use it)", where=where, name=name)
            return
        supported = ", ".join(sorted(SUPPORTED_PLATFORMS))
        if name in UNSUPPORTED_PLATFORMS:
            raise ConfigError(where, f"{name} is not supported by this daemon (supported: "
                                     f"{supported}); front it through the relay "
                                     f"(GATEWAY_RELAY_URL and GATEWAY_RELAY_PLATFORMS="
                                     f"{name}), or set enabled: false")
        raise ConfigError(where, f"unknown platform {name!r} (supported: {supported})")

    # -- the environment ------------------------------------------------------------------

    def overlay_environment(self) -> None:
        for var in ENV_VARS.values():
            value = self.env.get(var.name)
            if value is None or not value.strip():
                continue  # whitespace-only counts as unset and falls through to YAML
            self.values[var.setting] = RawValue(value.strip(), var.name, True)
        for platform, names in UNSUPPORTED_PLATFORMS.items():
            for name in names:
                if (self.env.get(name) or "").strip() and platform not in self.relay_platforms:
                    log.warn("{name} is set but {platform} is not supported by this daemon; "
                             "ignored (front {platform} through the relay)",
                             name=name, platform=platform)

    # -- typed access ---------------------------------------------------------------------

    def raw(self, path: str) -> RawValue | None:
        raw = self.values.get(path)
        return None if raw is None or raw.value is None else raw

    def get(self, path: str, default: Any = None) -> Any:
        spec = _spec(path)
        raw = self.raw(path)
        if spec is None:
            return default if raw is None else raw.value
        if raw is None:
            return spec.default if default is None else default
        value = convert(raw, spec)
        if value is None:
            return spec.default if default is None else default
        if spec.type == "path":
            value = expand_user(value, self.env)
            value = value if os.path.isabs(value) else os.path.join(self.home, value)
        return value

    def has(self, path: str) -> bool:
        return self.raw(path) is not None
