# -*- test-case-name: tests.test_config -*-
"""
Build the frozen L{GatewayConfig} from config.yaml, C{$HERMES_HOME/.env} and the environment,
with Hermes 0.19.0's names and precedence (environment over YAML over defaults), and refuse a
bad configuration with a L{ConfigError} naming the key.

Everything here runs once, before the reactor (twistd's C{postOptions}); it reads files but
never touches the network.  The table of names is L{hermes_twisted.config.envvars}.  The parts:
L{hermes_twisted.config.dotenv} (C{$HERMES_HOME} and C{.env}), L{hermes_twisted.config.layers} (the
document and environment by dotted key), L{hermes_twisted.config.values} (typed values),
L{hermes_twisted.config.platforms} (per-platform settings), L{hermes_twisted.config.relay_urls} and
L{hermes_twisted.config.redaction}; their public names are importable from here too.
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from types import MappingProxyType
from typing import Any, Mapping
from urllib.parse import urlsplit

import yaml
from twisted.logger import Logger

from hermes_twisted.config.dotenv import apply_dotenv, hermes_home, merged_environ, read_dotenv
from hermes_twisted.config.envvars import ENV_VARS, YAML_KEYS
from hermes_twisted.config.errors import ConfigError
from hermes_twisted.config.layers import ConfigLayers
from hermes_twisted.config.platforms import platform_settings
from hermes_twisted.config.redaction import REDACTED, redacted_yaml
from hermes_twisted.config.relay_urls import relay_dial_url, relay_http_base, relay_http_url
from hermes_twisted.config.settings import (
    DisplaySettings,
    FleetSettings,
    GatewayConfig,
    OpsSettings,
    PlatformSettings,
    RelaySettings,
    ResetPolicy,
    StreamingSettings,
    UpstreamSettings,
)
from hermes_twisted.config.values import RawValue, convert, freeze, kind_of

__all__ = [
    "REDACTED", "ConfigError", "apply_dotenv", "build_config", "hermes_home", "load_config",
    "merged_environ", "read_dotenv", "redacted_yaml", "relay_dial_url", "relay_http_base",
    "relay_http_url",
]

log = Logger(namespace="hermes_twisted.config")


def _db_path(layers: ConfigLayers) -> str:
    return layers.get("gateway.db_path", "") or os.path.join(layers.home, "gateway.db")


def _database_url(layers: ConfigLayers) -> str | None:
    url = layers.get("gateway.database_url", "") or None
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres") or not (parts.hostname or parts.path):
        raise ConfigError("GATEWAY_DATABASE_URL", "expected postgresql://user:password@host:"
                          "port/database (the value is not shown: it may hold a password)")
    return url


def _instance_id(layers: ConfigLayers) -> str:
    return layers.get("gateway.instance_id", "") or f"{socket.gethostname()}-{os.getpid()}"


def _fleet(layers: ConfigLayers) -> FleetSettings:
    fleet = FleetSettings(
        lease_ttl=layers.get("gateway.fleet.lease_ttl"),
        lease_renew=layers.get("gateway.fleet.lease_renew"),
        self_fence_after=layers.get("gateway.fleet.self_fence_after"),
        safety_poll=layers.get("gateway.fleet.safety_poll"),
        claim_ttl=layers.get("gateway.fleet.claim_ttl"),
        identity_lease_ttl=layers.get("gateway.fleet.identity_lease_ttl"),
    )
    # A lease must outlive the owner's own deadline, which must outlive a renewal period:
    # otherwise a healthy owner fences itself, or a takeover overlaps a live owner.
    if not fleet.lease_renew < fleet.self_fence_after:
        raise ConfigError("gateway.fleet.self_fence_after", f"must be longer than "
                          f"gateway.fleet.lease_renew ({fleet.lease_renew:g} s)")
    if not fleet.self_fence_after < fleet.lease_ttl:
        raise ConfigError("gateway.fleet.lease_ttl", f"must be longer than "
                          f"gateway.fleet.self_fence_after ({fleet.self_fence_after:g} s)")
    return fleet


def _upstream(layers: ConfigLayers) -> UpstreamSettings:
    return UpstreamSettings(
        proxy_url=layers.get("gateway.proxy_url"),
        proxy_key=layers.get("gateway.proxy_key"),
        model=layers.get("gateway.proxy_model"),
        connect_timeout=layers.get("gateway.proxy_connect_timeout"),
        idle_read_timeout=layers.get("gateway.proxy_idle_timeout"),
        max_event_bytes=layers.get("gateway.proxy_max_event_bytes"),
    )


def _ops(layers: ConfigLayers, platforms: Mapping[str, Any]) -> OpsSettings:
    ops = OpsSettings(
        listen=layers.get("gateway.ops.listen"),
        token=layers.get("gateway.ops.token"),
        trusted_proxies=tuple(layers.get("gateway.ops.trusted_proxies", ())),
        required_platforms=tuple(layers.get("gateway.ops.required_platforms", ())),
        debug_heap=layers.get("gateway.ops.debug_heap", "off"),
    )
    if ops.token is not None and len(ops.token) < 16:
        raise ConfigError("gateway.ops.token", "must be at least 16 characters")
    unknown = [p for p in ops.required_platforms
               if p not in platforms or not platforms[p].enabled]
    if unknown:
        raise ConfigError("gateway.ops.required_platforms",
                          f"not an enabled platform: {', '.join(unknown)}")
    return ops


def _bot_ids(layers: ConfigLayers) -> Mapping[str, Mapping[str, str]]:
    raw = layers.raw("$GATEWAY_RELAY_BOT_IDS")
    if raw is None:
        return freeze({})
    parsed = convert(raw, ENV_VARS["GATEWAY_RELAY_BOT_IDS"])
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
    return freeze(out)


def _relay(layers: ConfigLayers) -> RelaySettings:
    base = layers.get("gateway.relay_url")
    if base is None:
        # 0.19.0 also enables relay from platforms.relay.extra.relay_url (then registers
        # nothing); we honour it as the lowest-precedence source of the URL.
        for key in ("relay_url", "url"):
            raw = layers.raw(f"platforms.relay.extra.{key}")
            if raw is not None:
                base = convert(raw, ENV_VARS["GATEWAY_RELAY_URL"])
                break
    enabled = layers.get("platforms.relay.enabled", None) if layers.has(
        "platforms.relay.enabled") else None
    if enabled is True and not base:
        raise ConfigError("GATEWAY_RELAY_URL", "required when platforms.relay.enabled is true "
                                               "(or set gateway.relay_url)")
    url = relay_dial_url(base) if base and enabled is not False else None
    return RelaySettings(
        url=url,
        base_url=base,
        gateway_id=layers.get("gateway.relay_id"),
        secret=layers.get("gateway.relay_secret"),
        delivery_key=layers.get("$GATEWAY_RELAY_DELIVERY_KEY"),
        platforms=layers.relay_platforms,
        bot_ids=_bot_ids(layers),
        max_message_bytes=layers.get("gateway.relay_max_message_bytes"),
        request_timeout=layers.get("gateway.relay_request_timeout"),
        endpoint=layers.get("gateway.relay_endpoint"),
        route_keys=layers.get("gateway.relay_route_keys", ()),
        instance_id=layers.get("gateway.relay_instance_id"),
        wake_url=layers.get("gateway.relay_wake_url"),
        idp_token_url=layers.get("gateway.idp.token_url"),
        idp_client_id=layers.get("gateway.idp.client_id"),
        idp_client_secret=layers.get("gateway.idp.client_secret"),
        idp_scope=layers.get("gateway.idp.scope"),
        enroll_token=layers.get("$GATEWAY_RELAY_ENROLL_TOKEN"),
        identity_token=layers.get("$GATEWAY_RELAY_IDENTITY_TOKEN"),
        scale_to_zero=bool(layers.get("$HERMES_SCALE_TO_ZERO")),
        idle_timeout_minutes=layers.get("gateway.scale_to_zero.idle_timeout_minutes"),
        platform_env=freeze(_fronted_env(layers)),
    )


#: Hermes's per-platform variables ({PLATFORM}_<key in upper case>) the relay honours for
#: the platforms it fronts.
_FRONTED_ENV_KEYS = ("allow_bots", "reactions", "auto_thread")


def _fronted_env(layers: ConfigLayers) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for platform in layers.relay_platforms:
        for key in _FRONTED_ENV_KEYS:
            value = (layers.env.get(f"{platform}_{key}".upper()) or "").strip()
            if value:
                out.setdefault(platform, {})[key] = value
    return out


def _streaming(layers: ConfigLayers) -> StreamingSettings:
    mode = layers.get("streaming.mode")
    transport = layers.get("streaming.transport") if layers.has("streaming.transport") else None
    if layers.has("streaming.enabled"):
        enabled = layers.get("streaming.enabled")
    else:
        enabled = mode is not None  # "mode:" is an alias that also turns streaming on
    return StreamingSettings(
        enabled=enabled,
        transport=transport or mode or "auto",
        edit_interval=layers.get("streaming.edit_interval"),
        buffer_threshold=layers.get("streaming.buffer_threshold"),
        cursor=layers.get("streaming.cursor"),
        fresh_final_after_seconds=layers.get("streaming.fresh_final_after_seconds"),
    )


def _reset_policy(layers: ConfigLayers) -> ResetPolicy:
    return ResetPolicy(
        mode=layers.get("session_reset.mode"),
        at_hour=layers.get("session_reset.at_hour"),
        idle_minutes=layers.get("session_reset.idle_minutes"),
        notify=layers.get("session_reset.notify"),
        notify_exclude_platforms=tuple(layers.get("session_reset.notify_exclude_platforms")),
    )


_OVERRIDE_SPECS = {
    "mode": YAML_KEYS["session_reset.mode"],
    "at_hour": ENV_VARS["SESSION_RESET_HOUR"],
    "idle_minutes": ENV_VARS["SESSION_IDLE_MINUTES"],
    "notify": YAML_KEYS["session_reset.notify"],
}


def _reset_overrides(layers: ConfigLayers, name: str,
                     default: ResetPolicy) -> Mapping[str, ResetPolicy]:
    """C{reset_by_platform} / C{reset_by_type}: each entry is C{default} with its own keys."""
    raw = layers.raw(name)
    if raw is None:
        return freeze({})
    if not isinstance(raw.value, Mapping):
        raise ConfigError(raw.where, f"expected a mapping, got {kind_of(raw.value)}")
    out: dict[str, ResetPolicy] = {}
    for target, block in raw.value.items():
        where = f"{raw.where}.{target}"
        if not isinstance(block, Mapping):
            raise ConfigError(where, f"expected a mapping, got {kind_of(block)}")
        fields: dict[str, Any] = {}
        for key, value in block.items():
            spec = _OVERRIDE_SPECS.get(str(key))
            if spec is None:
                raise ConfigError(f"{where}.{key}", "unknown key (expected one of "
                                  f"{', '.join(_OVERRIDE_SPECS)})")
            converted = convert(RawValue(value, f"{where}.{key}"), spec)
            if converted is not None:
                fields[str(key)] = converted
        out[str(target)] = replace(default, **fields)
    return freeze(out)


def _display(layers: ConfigLayers) -> DisplaySettings:
    return DisplaySettings(
        busy_input_mode=layers.get("display.busy_input_mode"),
        tool_progress=layers.get("display.tool_progress"),
        typing_interval=layers.get("display.typing_interval"),
        typing_delay=layers.get("display.typing_delay"),
        busy_ack_interval=layers.get("display.busy_ack_interval"),
        busy_queue_cap=layers.get("display.busy_queue_cap"),
        busy_queue_drop=layers.get("display.busy_queue_drop"),
        collect_debounce=layers.get("display.collect_debounce"),
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
        raise ConfigError(source, f"expected a mapping at the top level, got {kind_of(document)}")
    layers = ConfigLayers(document, environ, home or hermes_home(environ))
    layers.read_document()
    layers.overlay_environment()
    upstream = _upstream(layers)
    relay = _relay(layers)
    platforms = platform_settings(layers, relay)
    _check_api_server_port(upstream, platforms.get("api_server"))
    behaviour = layers.get("unauthorized_dm_behavior")
    session_reset = _reset_policy(layers)
    config = GatewayConfig(
        hermes_home=layers.home,
        db_path=_db_path(layers),
        database_url=_database_url(layers),
        instance_id=_instance_id(layers),
        fleet=_fleet(layers),
        upstream=upstream,
        relay=relay,
        platforms=MappingProxyType(platforms),
        streaming=_streaming(layers),
        session_reset=session_reset,
        reset_by_platform=_reset_overrides(layers, "reset_by_platform", session_reset),
        reset_by_type=_reset_overrides(layers, "reset_by_type", session_reset),
        display=_display(layers),
        ops=_ops(layers, platforms),
        group_sessions_per_user=layers.get("group_sessions_per_user"),
        thread_sessions_per_user=layers.get("thread_sessions_per_user"),
        allowed_users=layers.get("$GATEWAY_ALLOWED_USERS", ()),
        allow_all_users=layers.get("$GATEWAY_ALLOW_ALL_USERS"),
        unauthorized_dm_behavior=behaviour,
        max_concurrent_runs=layers.get("gateway.api_server.max_concurrent_runs"),
        shutdown_timeout=layers.get("gateway.shutdown_timeout"),
        media_max_bytes=layers.get("gateway.media.max_bytes"),
    )
    if layers.unused:
        log.warn("{source}: keys not used by this daemon (ignored): {keys}",
                 source=source, keys=", ".join(layers.unused))
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

