# -*- test-case-name: tests.test_config -*-
"""
The effective configuration as YAML with every secret replaced (L{redacted_yaml}), for
C{twistd hermes-gateway --print-config} and bug reports.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

import yaml

from hermes_twisted.config.envvars import ENV_VARS, YAML_KEYS
from hermes_twisted.config.settings import GatewayConfig

REDACTED = "<redacted>"

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


def url_without_password(url: str) -> str:
    """C{url} with its password (if any) replaced by C{***}, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
