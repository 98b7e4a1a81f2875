# -*- test-case-name: tests.test_config -*-
"""
The per-platform part of the configuration (L{platform_settings}): which platforms are
present and enabled, their C{extra} blocks, home channels and allowlists, the blocks the
relay fronts, and the keys an enabled platform cannot do without.
"""

from __future__ import annotations

from typing import Any, Mapping

from hermes_twisted.config.envvars import ENV_VARS, YAML_KEYS
from hermes_twisted.config.errors import ConfigError
from hermes_twisted.config.layers import ConfigLayers
from hermes_twisted.config.recovery_key import RecoveryKeyError, decode_recovery_key
from hermes_twisted.config.settings import PlatformSettings, RelaySettings
from hermes_twisted.config.values import RawValue, convert, freeze


def _env_enables(layers: ConfigLayers, platform: str) -> bool | None:
    """
    True when an enabling variable of C{platform} is set in the environment, False when one is
    explicitly false (C{API_SERVER_ENABLED=false}), None when none is set.
    """
    result = None
    for var in ENV_VARS.values():
        if var.platform != platform or not var.enables:
            continue
        raw = layers.raw(var.setting)
        if raw is None or not raw.from_env:
            continue
        value = convert(raw, var)
        if var.type == "bool":
            if value is False:
                return False
            result = result or value
        else:
            result = True
    return result


def _require(layers: ConfigLayers, platform: str, key: str, label: str) -> None:
    path = f"platforms.{platform}.extra.{key}"
    if layers.get(path) in (None, ""):
        var = next(v.name for v in ENV_VARS.values() if v.setting == path)
        raise ConfigError(var, f"required when {label} is enabled (or set {path})")


def _check_platform(layers: ConfigLayers, settings: PlatformSettings) -> None:
    name, extra = settings.name, settings.extra
    if name == "irc":
        for key in ("server", "nickname", "channel"):
            _require(layers, "irc", key, "IRC")
    elif name == "matrix":
        _require(layers, "matrix", "homeserver", "Matrix")
        if not (extra.get("access_token") or settings.token) and not (extra.get("user_id")
                                                  and extra.get("password")):
            raise ConfigError("MATRIX_ACCESS_TOKEN", "Matrix needs an access token, or "
                              "MATRIX_USER_ID and MATRIX_PASSWORD (or platforms.matrix.extra."
                              "access_token / user_id and password)")
        recovery = extra.get("recovery_key")
        if recovery not in (None, ""):
            try:
                decode_recovery_key(str(recovery))
            except RecoveryKeyError as e:
                raise ConfigError("MATRIX_RECOVERY_KEY", f"{e} (or fix platforms.matrix.extra."
                                  "recovery_key)") from None
    elif name == "email":
        for key in ("password", "imap_host", "smtp_host"):
            _require(layers, "email", key, "email")
    elif name == "telegram":
        if not settings.token:
            raise ConfigError("TELEGRAM_BOT_TOKEN", "required when Telegram is enabled "
                                                    "(or set platforms.telegram.token)")
    elif name == "discord":
        if not settings.token:
            raise ConfigError("DISCORD_BOT_TOKEN", "required when Discord is enabled "
                                                   "(or set platforms.discord.token)")
    elif name == "slack":
        if not settings.token:
            raise ConfigError("SLACK_BOT_TOKEN", "required when Slack is enabled "
                                                 "(or set platforms.slack.token)")
        _require(layers, "slack", "app_token", "Slack (Socket Mode)")
    elif name == "xmpp":
        for key in ("jid", "password"):
            _require(layers, "xmpp", key, "XMPP")
        jid = str(extra.get("jid") or "")
        local, _, domain = jid.partition("@")
        if not local or not domain or "@" in domain:
            raise ConfigError("XMPP_JID", f"expected user@domain, got {jid!r}")
    elif name == "api_server":
        key = extra.get("key") or settings.api_key
        if not key or len(key) < 16:
            raise ConfigError("API_SERVER_KEY", "the API server needs a key of at least 16 "
                              "characters (or set platforms.api_server.extra.key)")


def _home_channel(layers: ConfigLayers, prefix: str, extra: dict[str, Any]) -> str | None:
    raw = layers.raw(f"{prefix}.home_channel")
    if raw is not None and isinstance(raw.value, Mapping):
        # Hermes's HomeChannel shape: {platform, chat_id, name, thread_id}.
        block = raw.value
        chat_id = convert(RawValue(block.get("chat_id"), f"{raw.where}.chat_id"),
                          YAML_KEYS["platforms.<name>.home_channel"])
        for src, dst in (("name", "home_channel_name"), ("thread_id", "home_channel_thread_id")):
            if block.get(src) is not None:
                extra.setdefault(dst, str(block[src]))
        return chat_id
    return layers.get(f"{prefix}.home_channel")


def _merge_fronted_blocks(layers: ConfigLayers, extra: dict[str, Any]) -> None:
    """The relay's C{extra.<platform>}: the platform's own block, its extra, then the relay's."""
    for platform, block in layers.fronted_blocks.items():
        merged = {key: raw.value for key, raw in block.items() if key != "extra"}
        nested = block.get("extra")
        if nested is not None and isinstance(nested.value, Mapping):
            merged.update(nested.value)
        if isinstance(extra.get(platform), Mapping):
            merged.update(extra[platform])
        extra[platform] = merged


def _discord_user_id(entry: Any) -> str:
    """0.19.0 accepts C{<@id>}, C{<@!id>} and C{user:id} in DISCORD_ALLOWED_USERS."""
    text = str(entry).strip()
    for prefix in ("<@!", "<@", "user:"):
        if text.startswith(prefix):
            text = text[len(prefix):].rstrip(">").strip()
            break
    return text


def _platform(layers: ConfigLayers, name: str, relay: RelaySettings) -> PlatformSettings:
    prefix = f"platforms.{name}"
    extra: dict[str, Any] = {}
    for path in sorted(layers.values):
        if path.startswith(f"{prefix}.extra."):
            extra[path[len(prefix) + 7:]] = layers.get(path)
    for var in ENV_VARS.values():
        if var.platform == name and var.extra_key and var.default is not None:
            extra.setdefault(var.extra_key, var.default)
    if name == "email":
        # 0.19.0 (gateway/config.py): an unknown sender is never mailed a pairing code.
        extra.setdefault("unauthorized_dm_behavior", "ignore")
    home = _home_channel(layers, prefix, extra)
    if home is None and name == "matrix":
        home = extra.get("home_room")
    if home is not None:
        extra.setdefault("home_channel", home)
    allowed = layers.get(f"{prefix}.allowed_users", ())
    if not allowed and "allowed_users" in extra:
        # Hermes's IRC adapter reads its allowlist from extra.allowed_users.
        allowed = convert(layers.values[f"{prefix}.extra.allowed_users"],
                          YAML_KEYS["platforms.<name>.allowed_users"]) or ()
    if name == "discord":
        allowed = tuple(_discord_user_id(entry) for entry in allowed)
    if name == "relay":
        _merge_fronted_blocks(layers, extra)
        enabled = relay.enabled
    else:
        explicit = layers.get(f"{prefix}.enabled") if layers.has(f"{prefix}.enabled") else None
        by_env = _env_enables(layers, name)
        enabled = explicit if explicit is not None else bool(by_env)
        if by_env is False:
            enabled = False
        if explicit is None and name in layers.relay_platforms:
            enabled = False  # the relay fronts it; a native connection needs enabled: true
    settings = PlatformSettings(
        name=name,
        enabled=enabled,
        token=layers.get(f"{prefix}.token"),
        api_key=layers.get(f"{prefix}.api_key"),
        reply_to_mode=layers.get(f"{prefix}.reply_to_mode"),
        typing_indicator=layers.get(f"{prefix}.typing_indicator"),
        allowed_users=tuple(allowed),
        allow_all_users=layers.get(f"{prefix}.allow_all_users"),
        home_channel=home,
        extra=freeze(extra),
    )
    if settings.enabled:
        _check_platform(layers, settings)
    return settings


def platform_settings(layers: ConfigLayers,
                      relay: RelaySettings) -> dict[str, PlatformSettings]:
    """
    The settings of every platform the configuration mentions (a block, a variable, or the
    relay), by name; raises L{ConfigError} when an enabled one lacks a required key.
    """
    present = {path.split(".")[1] for path in layers.values if path.startswith("platforms.")}
    for var in ENV_VARS.values():
        if var.platform and layers.raw(var.setting) is not None:
            present.add(var.platform)
    if relay.base_url or layers.fronted_blocks:
        present.add("relay")
    return {name: _platform(layers, name, relay) for name in sorted(present)}
