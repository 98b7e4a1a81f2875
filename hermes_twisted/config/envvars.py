# -*- test-case-name: tests.test_envvars -*-
"""
The registry of every environment variable and config.yaml key this daemon reads.

L{ENV_VARS} mirrors Hermes's C{OPTIONAL_ENV_VARS} metadata (description, prompt, category,
password, url, advanced, help) and adds what our loader needs: the value's type, the
config.yaml key it overrides (C{yaml_key}), and for platform variables the platform and the
key of C{PlatformSettings.extra} it fills.  L{YAML_KEYS} lists the keys that only exist in
config.yaml.  C{config.py} is driven by these two tables (there is no second list of names)
and C{docs/configuration.md} is rendered from them by L{render_reference}::

    python -m hermes_twisted.config.envvars > docs/configuration.md
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

#: Value types understood by the loader (see C{config._convert}).
TYPES = frozenset({
    "str",         # a scalar, as text
    "secret",      # text, never shown (redacted, never logged, never echoed in errors)
    "url",         # http(s)://host[...]
    "relay_url",   # http(s)://host or ws(s)://host[...]
    "int", "float", "bool",
    "list",        # a YAML list, or a comma separated string: stripped, empties dropped
    "enum",        # one of C{choices}, case-insensitive
    "json",        # a JSON object (env) or a mapping (YAML)
    "path",        # a filesystem path; ~ expanded, relative to $HERMES_HOME
    "mapping",     # a YAML mapping, passed through
    "flag",        # off/false/no/none/0/empty: False; any other value: True
    "endpoint",    # a Twisted server endpoint string (tcp:PORT:interface=..., unix:PATH), or none
})


@dataclass(frozen=True)
class EnvVar:
    name: str
    description: str
    prompt: str
    category: str = "messaging"  # provider | messaging | tool | skill | setting
    password: bool = False
    url: str | None = None
    advanced: bool = False
    help: str | None = None
    # ours:
    type: str = "str"
    yaml_key: str | None = None  # dotted config.yaml key this variable overrides
    platform: str | None = None
    extra_key: str | None = None  # key in PlatformSettings.extra
    default: Any = None
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    ours: bool = False  # not a Hermes 0.19.0 variable
    enables: bool = False  # a non-empty (truthy, for bools) value turns its platform on

    @property
    def setting(self) -> str:
        """Where the loader keeps this value: its YAML key, or C{$NAME} when env-only."""
        return self.yaml_key or f"${self.name}"


@dataclass(frozen=True)
class ConfigKey:
    """A config.yaml key with no environment variable.  C{<name>} stands for any platform."""

    path: str
    description: str
    type: str = "str"
    default: Any = None
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    password: bool = False
    ours: bool = False


def _var(name: str, description: str, prompt: str, **kw: Any) -> EnvVar:
    if kw.get("type") == "secret":
        kw.setdefault("password", True)
    return EnvVar(name=name, description=description, prompt=prompt, **kw)


def _pvar(platform: str, name: str, key: str, description: str, prompt: str,
          **kw: Any) -> EnvVar:
    """A platform variable filling C{PlatformSettings.extra[key]}."""
    return _var(name, description, prompt, platform=platform, extra_key=key,
                yaml_key=f"platforms.{platform}.extra.{key}", **kw)


def _pfield(platform: str, name: str, field_name: str, description: str, prompt: str,
            **kw: Any) -> EnvVar:
    """A platform variable filling a C{PlatformSettings} field (token, allowed_users, ...)."""
    return _var(name, description, prompt, platform=platform,
                yaml_key=f"platforms.{platform}.{field_name}", **kw)


def _common(platform: str, prefix: str, label: str) -> list[EnvVar]:
    """Hermes's per-platform pattern: allowlist, allow-all, home channel."""
    return [
        _pfield(platform, f"{prefix}_ALLOWED_USERS", "allowed_users",
                f"Comma separated {label} user ids allowed to talk to the agent.",
                f"{label} allowed users (comma separated)", type="list"),
        _pfield(platform, f"{prefix}_ALLOW_ALL_USERS", "allow_all_users",
                f"Allow every {label} user (no allowlist).", f"Allow all {label} users (true/false)",
                type="bool", default=False, advanced=True),
        _pfield(platform, f"{prefix}_HOME_CHANNEL", "home_channel",
                f"{label} chat id for proactive messages (cron deliveries, restart notices).",
                f"{label} home channel", advanced=True),
        _pvar(platform, f"{prefix}_HOME_CHANNEL_NAME", "home_channel_name",
              f"Display name of the {label} home channel.", f"{label} home channel name",
              advanced=True),
        _pvar(platform, f"{prefix}_HOME_CHANNEL_THREAD_ID", "home_channel_thread_id",
              f"Thread id inside the {label} home channel.", f"{label} home channel thread id",
              advanced=True),
    ]


_ENV_VAR_LIST: list[EnvVar] = [
    # -- daemon ---------------------------------------------------------------------------
    _var("HERMES_HOME", "Hermes home directory: config.yaml, .env and gateway.db live here.",
         "Hermes home directory", category="setting", type="path", default="~/.hermes",
         advanced=True),
    _var("HERMES_GATEWAY_DB", "Session database (SQLite). Relative paths are under $HERMES_HOME.",
         "Session database path", category="setting", type="path",
         yaml_key="gateway.db_path", default="$HERMES_HOME/gateway.db", advanced=True, ours=True),
    _var("GATEWAY_DATABASE_URL",
         "PostgreSQL session store (postgresql://user:password@host:port/db) instead of the "
         "SQLite file: several gateway processes can then share one store. Tables live in "
         "the hermes_gateway schema.", "PostgreSQL URL for the session store", type="secret",
         yaml_key="gateway.database_url", advanced=True, ours=True),
    _var("GATEWAY_INSTANCE_ID",
         "This process's name in a fleet sharing one PostgreSQL store (default: host name "
         "and pid).", "Gateway instance id", yaml_key="gateway.instance_id", advanced=True,
         ours=True),
    _var("GATEWAY_MEDIA_MAX_BYTES",
         "Largest image a user may send that is passed to the agent (as an image_url part); "
         "a larger one is not downloaded: the agent gets a text note and the user a short "
         "notice. Applies to every platform.", "Largest image passed to the agent (bytes)",
         type="int", yaml_key="gateway.media.max_bytes", default=10 * 1024 * 1024, minimum=1,
         advanced=True, ours=True),
    _var("GATEWAY_FLEET_LEASE_TTL",
         "Seconds a session lease lasts without renewal, timed by the PostgreSQL server's "
         "clock: a crashed instance's sessions are taken over after at most this long. Must "
         "exceed GATEWAY_FLEET_SELF_FENCE_AFTER.", "Fleet session lease TTL (seconds)",
         category="setting", type="float", yaml_key="gateway.fleet.lease_ttl", default=15.0,
         minimum=0.1, advanced=True, ours=True),
    _var("GATEWAY_FLEET_LEASE_RENEW",
         "Seconds between renewals of this instance's session leases and inbox claims.",
         "Fleet lease renewal interval (seconds)", category="setting", type="float",
         yaml_key="gateway.fleet.lease_renew", default=5.0, minimum=0.1, advanced=True,
         ours=True),
    _var("GATEWAY_FLEET_SELF_FENCE_AFTER",
         "Seconds without a successful renewal (PostgreSQL unreachable) after which an "
         "instance cancels its own runs: it stops before another instance can take over. "
         "Must exceed GATEWAY_FLEET_LEASE_RENEW.", "Fleet self-fence deadline (seconds)",
         category="setting", type="float", yaml_key="gateway.fleet.self_fence_after",
         default=10.0, minimum=0.1, advanced=True, ours=True),
    _var("GATEWAY_FLEET_SAFETY_POLL",
         "Seconds between re-reads of the generations of this instance's running sessions, "
         "so a /stop whose notification was lost still cancels the run.",
         "Fleet safety poll (seconds)", category="setting", type="float",
         yaml_key="gateway.fleet.safety_poll", default=2.0, minimum=0.05, advanced=True,
         ours=True),
    _var("GATEWAY_FLEET_CLAIM_TTL",
         "Seconds an inbox claim lasts without renewal: a message claimed by an instance "
         "that died is run by another one after this long.", "Fleet inbox claim TTL (seconds)",
         category="setting", type="float", yaml_key="gateway.fleet.claim_ttl", default=30.0,
         minimum=1, advanced=True, ours=True),
    _var("GATEWAY_FLEET_IDENTITY_LEASE_TTL",
         "Seconds a fleet instance holds the identity lease of a single-owner platform (IRC "
         "nick, Matrix device, Telegram poller, mailbox, XMPP JID, Discord bot) without "
         "renewing it, timed by the PostgreSQL server's clock; renewed every third of it, and "
         "the holder disconnects by itself after two thirds without a renewal. A standby "
         "takes over within about this time after a crash.",
         "Fleet identity lease TTL (seconds)", category="setting", type="float",
         yaml_key="gateway.fleet.identity_lease_ttl", default=15.0, minimum=1, advanced=True,
         ours=True),
    # -- proxy mode (proxy.md 1.1, 4) -----------------------------------------------------
    _var("GATEWAY_PROXY_URL",
         "URL of a remote Hermes API server to forward messages to. The gateway then does "
         "platform I/O only and the remote server runs the agent. Also gateway.proxy_url in "
         "config.yaml.",
         "Remote Hermes API server URL (e.g. http://192.168.1.100:8642)",
         type="url", yaml_key="gateway.proxy_url", advanced=True),
    _var("GATEWAY_PROXY_KEY",
         "Bearer token for the remote API server; must match its API_SERVER_KEY. (Hermes "
         "reads only the variable; the config.yaml key is ours.)",
         "Remote API server auth key", type="secret", yaml_key="gateway.proxy_key",
         advanced=True),
    _var("HERMES_PROXY_MODEL", "The \"model\" field sent to the remote API server.",
         "Model name sent to the remote API server", type="str",
         yaml_key="gateway.proxy_model", default="hermes-agent", advanced=True, ours=True),
    # -- relay (relay.md 1.1) -------------------------------------------------------------
    _var("GATEWAY_RELAY_URL",
         "Connector base URL. Setting it activates the relay platform. Accepts http(s)://host "
         "or ws(s)://host/relay; the dial URL is ws(s)://.../relay.",
         "Relay connector URL", type="relay_url", yaml_key="gateway.relay_url",
         enables=True, platform="relay", advanced=True),
    _var("GATEWAY_RELAY_ID", "Per-gateway relay id (the auth token payload).", "Relay gateway id",
         yaml_key="gateway.relay_id", advanced=True),
    _var("GATEWAY_RELAY_SECRET", "Per-gateway relay HMAC secret.", "Relay gateway secret",
         type="secret", yaml_key="gateway.relay_secret", advanced=True),
    _var("GATEWAY_RELAY_DELIVERY_KEY",
         "Per-tenant delivery key written by enroll/provision (unused by 0.19.0's wire).",
         "Relay delivery key", type="secret", advanced=True),
    _var("GATEWAY_RELAY_PLATFORMS",
         "Comma separated platforms the relay fronts (e.g. discord,slack). Empty: one "
         "identity, platform \"relay\".", "Relay platforms (comma separated)", type="list",
         advanced=True),
    _var("GATEWAY_RELAY_BOT_IDS",
         "JSON object {\"<platform>\": {\"botId\": \"...\", \"username\": \"@h\"}}. Invalid "
         "JSON or a non-object is logged and ignored.", "Relay bot ids (JSON)", type="json",
         advanced=True),
    _var("GATEWAY_RELAY_ENDPOINT", "Gateway's public inbound URL (retired; still sent at "
         "provision).", "Relay gateway endpoint", type="url",
         yaml_key="gateway.relay_endpoint", advanced=True),
    _var("GATEWAY_RELAY_ROUTE_KEYS", "Discriminators (guild/chat ids, paths) this tenant owns.",
         "Relay route keys (comma separated)", type="list",
         yaml_key="gateway.relay_route_keys", advanced=True),
    _var("GATEWAY_RELAY_INSTANCE_ID", "Instance id forwarded at provision.",
         "Relay instance id", yaml_key="gateway.relay_instance_id", advanced=True),
    _var("GATEWAY_RELAY_WAKE_URL", "URL the connector requests to wake a suspended gateway.",
         "Relay wake URL", type="url", yaml_key="gateway.relay_wake_url", advanced=True),
    _var("GATEWAY_RELAY_IDP_TOKEN_URL", "OAuth2 client-credentials token URL used to get the "
         "identity token for relay provisioning.", "Relay IdP token URL", type="url",
         yaml_key="gateway.idp.token_url", advanced=True),
    _var("GATEWAY_RELAY_IDP_CLIENT_ID", "Relay IdP client id.", "Relay IdP client id",
         yaml_key="gateway.idp.client_id", advanced=True),
    _var("GATEWAY_RELAY_IDP_CLIENT_SECRET", "Relay IdP client secret.",
         "Relay IdP client secret", type="secret", yaml_key="gateway.idp.client_secret",
         advanced=True),
    _var("GATEWAY_RELAY_IDP_SCOPE", "Relay IdP scope.", "Relay IdP scope",
         yaml_key="gateway.idp.scope", advanced=True),
    _var("GATEWAY_RELAY_ENROLL_TOKEN", "Single-use relay enrollment token (hermes-gateway "
         "enroll).", "Relay enrollment token", type="secret", advanced=True),
    _var("GATEWAY_RELAY_IDENTITY_TOKEN", "A caller-identity token for relay enrollment and "
         "provisioning when no IdP token URL is set (stands in for Hermes's Nous Portal "
         "login).", "Relay identity token", type="secret", advanced=True, ours=True),
    _var("HERMES_SCALE_TO_ZERO", "Let an idle relay-only gateway go dormant: the connector "
         "buffers and wakes it through GATEWAY_RELAY_WAKE_URL. Needs the relay as the only "
         "messaging platform and a wake URL.", "Scale to zero (true/false)",
         category="setting", type="bool", default=False, advanced=True),
    # -- operations (docs/operations.md) --------------------------------------------------
    _var("GATEWAY_OPS_LISTEN",
         "Where the ops listener (/livez, /readyz, /metrics, /status, /status.json) listens: "
         "a Twisted server endpoint string such as tcp:9469:interface=127.0.0.1 or "
         "unix:/run/hermes/ops.sock; none turns it off.", "Ops listener endpoint",
         category="setting", type="endpoint", yaml_key="gateway.ops.listen",
         default="tcp:9469:interface=127.0.0.1", advanced=True, ours=True),
    _var("GATEWAY_OPS_TOKEN",
         "Bearer token (at least 16 characters) that lets non-loopback callers read "
         "/metrics, /status and the /readyz details.", "Ops bearer token", type="secret",
         category="setting", yaml_key="gateway.ops.token", advanced=True, ours=True),
    _var("GATEWAY_OPS_DEBUG_HEAP",
         "Heap diagnostics on the ops listener's /debug/heap, for leak hunts (bench/soak.py): "
         "off; counts (objects by type, pymalloc blocks, malloc arenas, timers, fds; one "
         "heap walk per request); tracemalloc (also traces every allocation: slow, "
         "never for production).", "Ops heap diagnostics (off/counts/tracemalloc)",
         category="setting", type="enum", choices=("off", "counts", "tracemalloc"),
         yaml_key="gateway.ops.debug_heap", default="off", advanced=True, ours=True),
    # -- gateway-wide access and sessions -------------------------------------------------
    _var("GATEWAY_ALLOWED_USERS", "Comma separated user ids allowed on every platform.",
         "Gateway allowed users (comma separated)", type="list"),
    _var("GATEWAY_ALLOW_ALL_USERS", "Allow every user on every platform (no allowlist).",
         "Allow all users (true/false)", type="bool", default=False, advanced=True),
    _var("SESSION_IDLE_MINUTES", "Idle minutes before a session resets (mode idle or both).",
         "Session idle minutes", category="setting", type="int",
         yaml_key="session_reset.idle_minutes", default=1440, minimum=1, advanced=True),
    _var("SESSION_RESET_HOUR", "Local hour of the daily session reset (mode daily or both).",
         "Session reset hour (0-23)", category="setting", type="int",
         yaml_key="session_reset.at_hour", default=4, minimum=0, maximum=23, advanced=True),
    # -- XMPP (ours: Hermes 0.19.0 has no XMPP platform) ----------------------------------
    _pvar("xmpp", "XMPP_JID", "jid", "The bot's account, user@domain (a resource is ignored: "
          "it binds /hermes). Setting it enables XMPP.", "XMPP JID", enables=True, ours=True),
    _pvar("xmpp", "XMPP_PASSWORD", "password", "The account's password (SASL PLAIN or "
          "DIGEST-MD5, over TLS only).", "XMPP password", type="secret", ours=True),
    _pvar("xmpp", "XMPP_HOST", "host", "Server to connect to. Default: the JID's domain.",
          "XMPP server host", ours=True),
    _pvar("xmpp", "XMPP_PORT", "port", "Server port. Default: 5222 (STARTTLS, required); "
          "5223 with XMPP_DIRECT_TLS.", "XMPP port", type="int", minimum=1, maximum=65535,
          ours=True),
    _pvar("xmpp", "XMPP_DIRECT_TLS", "direct_tls", "TLS from the first byte (XEP-0368, port "
          "5223 style) instead of STARTTLS.", "Direct TLS (true/false)", type="bool",
          default=False, ours=True),
    _pvar("xmpp", "XMPP_CA_FILE", "ca_file", "PEM file of the CA (or self-signed certificate) "
          "to trust instead of the system's; the certificate must still name the JID's "
          "domain.", "XMPP CA file", type="path", advanced=True, ours=True),
    _pvar("xmpp", "XMPP_ROOMS", "rooms", "MUC rooms to join, comma separated room JIDs "
          "(room@conference.example.org).", "XMPP rooms (comma separated)", type="list",
          ours=True),
    _pvar("xmpp", "XMPP_NICK", "nick", "Nick in rooms. Default: the JID's local part.",
          "XMPP room nick", ours=True),
    _pvar("xmpp", "XMPP_REQUIRE_MENTION", "require_mention", "In rooms, answer only messages "
          "that address the nick (nick: / nick, / @nick).", "Require mention in rooms "
          "(true/false)", type="bool", default=True, ours=True),
    *_common("xmpp", "XMPP", "XMPP"),
    # -- IRC ------------------------------------------------------------------------------
    _pvar("irc", "IRC_SERVER", "server", "IRC server host name. Setting it enables IRC.",
          "IRC server", enables=True),
    _pvar("irc", "IRC_PORT", "port", "IRC server port.", "IRC port", type="int", default=6697,
          minimum=1, maximum=65535),
    _pvar("irc", "IRC_USE_TLS", "use_tls", "Connect with TLS.", "Use TLS (true/false)",
          type="bool", default=True),
    _pvar("irc", "IRC_NICKNAME", "nickname", "The bot's nick.", "IRC nickname"),
    _pvar("irc", "IRC_CHANNEL", "channel", "Channel(s) to join, comma separated.",
          "IRC channel(s)"),
    _pvar("irc", "IRC_SERVER_PASSWORD", "server_password", "Server password (PASS).",
          "IRC server password", type="secret", advanced=True),
    _pvar("irc", "IRC_NICKSERV_PASSWORD", "nickserv_password", "NickServ IDENTIFY password.",
          "NickServ password", type="secret", advanced=True),
    *_common("irc", "IRC", "IRC"),
    # -- Matrix ---------------------------------------------------------------------------
    _pvar("matrix", "MATRIX_HOMESERVER", "homeserver",
          "Homeserver URL. With an access token (or user id and password) it enables Matrix.",
          "Matrix homeserver URL", type="url", enables=True),
    _pvar("matrix", "MATRIX_ACCESS_TOKEN", "access_token", "Access token of the bot account.",
          "Matrix access token", type="secret"),
    _pvar("matrix", "MATRIX_USER_ID", "user_id", "Bot user id (@bot:example.org).",
          "Matrix user id"),
    _pvar("matrix", "MATRIX_PASSWORD", "password", "Bot password (login instead of a token).",
          "Matrix password", type="secret"),
    _pvar("matrix", "MATRIX_DEVICE_ID", "device_id", "Device id to log in as.",
          "Matrix device id", advanced=True),
    _pvar("matrix", "MATRIX_ALLOWED_ROOMS", "allowed_rooms",
          "Only these room ids (comma separated).", "Matrix allowed rooms", type="list",
          advanced=True),
    _pvar("matrix", "MATRIX_REQUIRE_MENTION", "require_mention",
          "In group rooms, answer only when mentioned.", "Require mention (true/false)",
          type="bool", default=True),
    _pvar("matrix", "MATRIX_FREE_RESPONSE_ROOMS", "free_response_rooms",
          "Rooms where no mention is needed (comma separated).", "Matrix free-response rooms",
          type="list", advanced=True),
    _pvar("matrix", "MATRIX_HOME_ROOM", "home_room", "Room id for proactive messages.",
          "Matrix home room", advanced=True),
    _pvar("matrix", "MATRIX_MAX_MESSAGE_LENGTH", "max_message_length",
          "Longest message sent before splitting.", "Matrix max message length", type="int",
          default=16000, minimum=500, maximum=65535, advanced=True),
    _pvar("matrix", "MATRIX_AUTO_JOIN", "auto_join", "Accept room invites.",
          "Auto-join invited rooms (true/false)", type="bool", default=True, advanced=True,
          ours=True),
    _pvar("matrix", "MATRIX_ENCRYPTION", "encryption",
          "Legacy switch for end-to-end encryption: true means MATRIX_E2EE_MODE=required.",
          "Matrix encryption (true/false)", type="bool", default=False),
    _pvar("matrix", "MATRIX_E2EE_MODE", "e2ee_mode",
          "End-to-end encryption: off, optional (answer in encrypted and plain rooms) or "
          "required (answer only in encrypted rooms). Overrides MATRIX_ENCRYPTION; 0.19.0's "
          "aliases (require/true/yes/on, prefer/preferred, false/no/0) are accepted.",
          "Matrix E2EE mode (off/optional/required)", type="enum",
          choices=("off", "optional", "required", "require", "prefer", "preferred", "true",
                   "false", "yes", "no", "on", "1", "0")),
    _pvar("matrix", "MATRIX_STORE_KEY", "store_key",
          "Secret that encrypts the Matrix crypto store at rest (any length; keep it out of "
          "the volume). Unset: a random key is kept in the store directory, protected by the "
          "file permissions only.", "Matrix crypto store key", type="secret", advanced=True,
          ours=True),
    _pvar("matrix", "MATRIX_RECOVERY_KEY", "recovery_key",
          "Recovery key (base58, as Element shows it): secret storage key or key backup key. "
          "Room keys are backed up to the account's server-side key backup and restored "
          "from it, so a lost crypto store does not lose the history; with a secret storage "
          "key the bot also signs its device with the account's cross-signing identity. "
          "Checked at start (a typo is a usage error).",
          "Matrix recovery key", type="secret"),
    _pvar("matrix", "MATRIX_E2EE_TRUST", "e2ee_trust",
          "Which devices get room keys: tofu (every device of every member, each device's "
          "signing key pinned on first use, as 0.19.0) or allowed (only devices of allowed "
          "users and the bot's own).", "Matrix device trust (tofu/allowed)", type="enum",
          choices=("tofu", "allowed"), default="tofu", advanced=True, ours=True),
    _pvar("matrix", "MATRIX_AUTO_THREAD", "auto_thread",
          "In group rooms, answer each new top-level message in a thread rooted at it (one "
          "session per thread).", "Matrix auto-thread (true/false)", type="bool",
          default=True),
    _pvar("matrix", "MATRIX_DM_AUTO_THREAD", "dm_auto_thread",
          "Auto-thread in direct messages too.", "Matrix DM auto-thread (true/false)",
          type="bool", default=False, advanced=True),
    _pvar("matrix", "MATRIX_MAX_MEDIA_BYTES", "max_media_bytes",
          "Largest attachment downloaded (declared size and bytes read).",
          "Matrix max media bytes", type="int", default=104857600, minimum=1, advanced=True),
    *_common("matrix", "MATRIX", "Matrix"),
    # -- Telegram -------------------------------------------------------------------------
    _pfield("telegram", "TELEGRAM_BOT_TOKEN", "token",
            "Bot API token from @BotFather. Setting it enables Telegram.", "Telegram bot token",
            type="secret", url="https://t.me/BotFather", enables=True),
    _pvar("telegram", "TELEGRAM_BASE_URL", "base_url", "Bot API base URL.",
          "Telegram Bot API base URL", type="url", default="https://api.telegram.org",
          advanced=True, ours=True),
    _pfield("telegram", "TELEGRAM_REPLY_TO_MODE", "reply_to_mode",
            "Which chunks of a reply thread onto the user's message.",
            "Reply-to mode (off/first/all)", type="enum", choices=("off", "first", "all"),
            default="first", advanced=True),
    _pvar("telegram", "TELEGRAM_REQUIRE_MENTION", "require_mention",
          "In groups, answer only when mentioned.", "Require mention (true/false)",
          type="bool", advanced=True),
    _pvar("telegram", "TELEGRAM_GROUP_ALLOWED_USERS", "group_allowed_users",
          "User ids allowed in groups (comma separated).", "Telegram group allowed users",
          type="list", advanced=True),
    _pvar("telegram", "TELEGRAM_GROUP_ALLOWED_CHATS", "group_allowed_chats",
          "Group chat ids whose members are all allowed (comma separated; * = all).",
          "Telegram group allowed chats", type="list", advanced=True),
    _pvar("telegram", "TELEGRAM_ALLOW_BOTS", "allow_bots",
          "Messages from other bots: none, mentions (only when they mention us) or all.",
          "Allow bots (none/mentions/all)", type="enum", choices=("none", "mentions", "all"),
          default="none", advanced=True),
    *_common("telegram", "TELEGRAM", "Telegram"),
    # -- Email (email-xmpp.md 1.1) --------------------------------------------------------
    _pvar("email", "EMAIL_ADDRESS", "address",
          "The bot's mail address: the IMAP and SMTP login and the From of replies. Setting "
          "it enables email (with EMAIL_PASSWORD, EMAIL_IMAP_HOST and EMAIL_SMTP_HOST).",
          "Email address", enables=True),
    _pvar("email", "EMAIL_PASSWORD", "password", "Password of EMAIL_ADDRESS (IMAP and SMTP).",
          "Email password", type="secret"),
    _pvar("email", "EMAIL_IMAP_HOST", "imap_host", "IMAP server host name.", "IMAP host"),
    _pvar("email", "EMAIL_IMAP_PORT", "imap_port", "IMAP port; always implicit TLS (IMAPS).",
          "IMAP port", type="int", default=993, minimum=1, maximum=65535),
    _pvar("email", "EMAIL_SMTP_HOST", "smtp_host", "SMTP submission host name.", "SMTP host"),
    _pvar("email", "EMAIL_SMTP_PORT", "smtp_port",
          "SMTP submission port: 465 is implicit TLS, any other port requires STARTTLS.",
          "SMTP port", type="int", default=587, minimum=1, maximum=65535),
    _pvar("email", "EMAIL_POLL_INTERVAL", "poll_interval",
          "Seconds between inbox checks when the IMAP server does not offer IDLE.",
          "Email poll interval (seconds)", type="int", default=15, minimum=1),
    _pvar("email", "EMAIL_CA_FILE", "ca_file",
          "PEM file of the CA that signed the IMAP and SMTP servers' certificates (a private "
          "CA); without it the system's trust store is used. Certificates are always "
          "verified.", "Email CA file", type="path", ours=True, advanced=True),
    _pvar("email", "EMAIL_TRUST_FROM_HEADER", "trust_from_header",
          "Trust the From header without a passing Authentication-Results (dmarc, aligned "
          "spf or dkim); the check applies only while an allowlist is set.",
          "Trust From header (true/false)", type="bool", default=False, advanced=True),
    _pvar("email", "EMAIL_AUTHSERV_ID", "authserv_id",
          "authserv-id of the Authentication-Results header to trust (your receiving "
          "server's); unset: the first such header is trusted, with a warning at start.",
          "Email authserv-id", advanced=True),
    _pvar("email", "EMAIL_SESSION_PER_THREAD", "session_per_thread",
          "One session per mail thread (the root Message-ID) instead of one per sender.",
          "Email session per thread (true/false)", type="bool", default=False, ours=True,
          advanced=True),
    _pfield("email", "EMAIL_ALLOWED_USERS", "allowed_users",
            "Comma separated sender addresses allowed to talk to the agent.",
            "Email allowed senders (comma separated)", type="list"),
    _pfield("email", "EMAIL_ALLOW_ALL_USERS", "allow_all_users",
            "Answer every sender (no allowlist).", "Allow all email senders (true/false)",
            type="bool", default=False, advanced=True),
    _pfield("email", "EMAIL_HOME_ADDRESS", "home_channel",
            "Address for proactive messages (cron deliveries, restart notices).",
            "Email home address", advanced=True),
    _pvar("email", "EMAIL_HOME_ADDRESS_NAME", "home_channel_name",
          "Display name of the email home address.", "Email home address name",
          default="Home", advanced=True),
    # -- Discord (discord-slack.md 1.2) -----------------------------------------------------
    _pfield("discord", "DISCORD_BOT_TOKEN", "token",
            "Bot token from the Discord developer portal. Setting it enables Discord.",
            "Discord bot token", type="secret",
            url="https://discord.com/developers/applications", enables=True),
    _pvar("discord", "DISCORD_API_BASE", "api_base",
          "REST base URL. The gateway URL always comes from GET {base}/gateway/bot, so this "
          "one variable points the whole platform elsewhere (a proxy, a test server).",
          "Discord REST API base URL", type="url", default="https://discord.com/api/v10",
          advanced=True, ours=True),
    _pvar("discord", "DISCORD_ALLOWED_ROLES", "allowed_roles",
          "Role ids whose members may talk to the agent (checked in the message's own "
          "guild; turns on the GUILD_MEMBERS intent).", "Discord allowed roles",
          type="list", advanced=True),
    _pvar("discord", "DISCORD_ALLOWED_CHANNELS", "allowed_channels",
          "Only these channels (ids or names; * = all). With no user or role allowlist they "
          "also authorize guild traffic.", "Discord allowed channels", type="list",
          advanced=True),
    _pvar("discord", "DISCORD_IGNORED_CHANNELS", "ignored_channels",
          "Never answer in these channels (beats allowed channels).",
          "Discord ignored channels", type="list", advanced=True),
    _pvar("discord", "DISCORD_FREE_RESPONSE_CHANNELS", "free_response_channels",
          "Channels where no mention is needed (and no auto-thread is opened).",
          "Discord free-response channels", type="list", advanced=True),
    _pvar("discord", "DISCORD_REQUIRE_MENTION", "require_mention",
          "In guild channels, answer only when mentioned.", "Require mention (true/false)",
          type="bool", default=True, advanced=True),
    _pvar("discord", "DISCORD_THREAD_REQUIRE_MENTION", "thread_require_mention",
          "Also require a mention inside threads the bot takes part in.",
          "Require mention in threads (true/false)", type="bool", default=False,
          advanced=True),
    _pvar("discord", "DISCORD_IGNORE_NO_MENTION", "ignore_no_mention",
          "Drop guild messages that mention other users but not the bot.",
          "Ignore messages mentioning others (true/false)", type="bool", default=True,
          advanced=True),
    _pvar("discord", "DISCORD_ALLOW_BOTS", "allow_bots",
          "Messages from other bots: none, mentions (only when they mention us) or all.",
          "Allow bots (none/mentions/all)", type="enum", choices=("none", "mentions", "all"),
          default="none", advanced=True),
    _pvar("discord", "DISCORD_AUTO_THREAD", "auto_thread",
          "Open a thread for each channel message the bot answers.",
          "Auto-thread (true/false)", type="bool", default=True, advanced=True),
    _pvar("discord", "DISCORD_NO_THREAD_CHANNELS", "no_thread_channels",
          "Channels answered inline, without a thread.", "Discord no-thread channels",
          type="list", advanced=True),
    _pvar("discord", "DISCORD_REACTIONS", "reactions",
          "React with eyes while working, then a check mark or a cross.",
          "Reactions (true/false)", type="bool", default=True, advanced=True),
    _pvar("discord", "DISCORD_REPLY_TO_MODE", "reply_to_mode",
          "Which chunks of a reply carry a reply reference to the user's message.",
          "Reply-to mode (off/first/all)", type="enum", choices=("off", "first", "all"),
          default="first", advanced=True),
    _pvar("discord", "DISCORD_COMMAND_SYNC_POLICY", "command_sync_policy",
          "Slash command registration: safe (compare, then create or patch only what "
          "differs), bulk (one overwrite when anything differs) or off.",
          "Command sync policy (safe/bulk/off)", type="enum", choices=("safe", "bulk", "off"),
          default="safe", advanced=True),
    _pvar("discord", "DISCORD_HIDE_SLASH_COMMANDS", "hide_slash_commands",
          "Register the slash commands for administrators only (default_member_permissions "
          "0).", "Hide slash commands (true/false)", type="bool", default=False,
          advanced=True),
    *_common("discord", "DISCORD", "Discord"),
    # -- Slack (discord-slack.md 1.3) ----------------------------------------------------
    _pfield("slack", "SLACK_BOT_TOKEN", "token",
            "Bot token (xoxb-...). With SLACK_APP_TOKEN it enables Slack (Socket Mode).",
            "Slack bot token", type="secret", url="https://api.slack.com/apps", enables=True),
    _pvar("slack", "SLACK_APP_TOKEN", "app_token",
          "App-level token (xapp-..., scope connections:write) for Socket Mode.",
          "Slack app token", type="secret"),
    _pvar("slack", "SLACK_API_BASE", "api_base",
          "Web API base URL; the Socket Mode URL comes from its apps.connections.open, so "
          "this one variable points the whole platform elsewhere.", "Slack Web API base URL",
          type="url", default="https://slack.com/api/", advanced=True, ours=True),
    _pvar("slack", "SLACK_REQUIRE_MENTION", "require_mention",
          "In channels and group DMs, answer only when mentioned (or in a thread we are in).",
          "Require mention (true/false)", type="bool", default=True),
    _pvar("slack", "SLACK_STRICT_MENTION", "strict_mention",
          "Every message must mention the bot, also inside threads.",
          "Strict mention (true/false)", type="bool", default=False, advanced=True),
    _pvar("slack", "SLACK_FREE_RESPONSE_CHANNELS", "free_response_channels",
          "Channel ids answered without a mention (comma separated; * = all).",
          "Slack free-response channels", type="list", advanced=True),
    _pvar("slack", "SLACK_ALLOWED_CHANNELS", "allowed_channels",
          "Only these channel ids (comma separated); 1:1 DMs are never filtered.",
          "Slack allowed channels", type="list", advanced=True),
    _pvar("slack", "SLACK_MENTION_PATTERNS", "mention_patterns",
          "Regular expressions that count as a mention (JSON list, or comma/newline "
          "separated; case-insensitive).", "Slack mention patterns", advanced=True),
    _pvar("slack", "SLACK_ALLOW_BOTS", "allow_bots",
          "Messages from other bots: none, mentions (only when they mention us) or all.",
          "Allow bots (none/mentions/all)", type="enum", choices=("none", "mentions", "all"),
          default="none", advanced=True),
    _pvar("slack", "SLACK_REACTIONS", "reactions",
          "React with eyes while working, then white_check_mark or x (needs reactions:write).",
          "Slack reactions (true/false)", type="bool", default=True, advanced=True),
    _pfield("slack", "SLACK_REPLY_TO_MODE", "reply_to_mode",
            "off: answer top-level channel messages in the channel, not in a new thread; "
            "first/all: in a thread (a thread reply is always answered in its thread).",
            "Reply-to mode (off/first/all)", type="enum", choices=("off", "first", "all"),
            default="first", advanced=True),
    *_common("slack", "SLACK", "Slack"),
    # -- API server (proxy.md 2.1, 4) -----------------------------------------------------
    _var("API_SERVER_ENABLED",
         "Enable the OpenAI-compatible API server (for Open WebUI, LobeChat and similar).",
         "Enable API server (true/false)", type="bool", platform="api_server",
         enables=True, advanced=True),
    _pvar("api_server", "API_SERVER_KEY", "key",
          "Bearer token clients must send; required (at least 16 characters), even on "
          "loopback.", "API server auth key", type="secret", enables=True, advanced=True),
    _pvar("api_server", "API_SERVER_PORT", "port", "Port to listen on.", "API server port",
          type="int", default=8642, minimum=0, maximum=65535, advanced=True),
    _pvar("api_server", "API_SERVER_HOST", "host",
          "Interface to listen on; the key is still required on loopback.", "API server host",
          default="127.0.0.1", advanced=True),
    _pvar("api_server", "API_SERVER_MODEL_NAME", "model_name",
          "Model name advertised on /v1/models.", "API server model name",
          default="hermes-agent", advanced=True),
    _pvar("api_server", "API_SERVER_CORS_ORIGINS", "cors_origins",
          "Browser origins allowed to call the API (comma separated; * = any).",
          "API server CORS origins", type="list", advanced=True),
]

ENV_VARS: dict[str, EnvVar] = {v.name: v for v in _ENV_VAR_LIST}

_PLATFORM_FIELDS = "platforms.<name>"

_YAML_KEY_LIST: list[ConfigKey] = [
    # gateway:
    ConfigKey("gateway.proxy_connect_timeout", "Seconds to wait for the API server's TCP "
              "connection.", "float", 10.0, minimum=0, ours=True),
    ConfigKey("gateway.proxy_idle_timeout", "Seconds of silence from the API server before a "
              "turn fails (the server sends keepalives every 30 s).", "float", 1800.0,
              minimum=0, ours=True),
    ConfigKey("gateway.proxy_max_event_bytes", "Largest single SSE event accepted from the API "
              "server.", "int", 16 * 1024 * 1024, minimum=1, ours=True),
    ConfigKey("gateway.relay_max_message_bytes", "Largest relay WebSocket message accepted.",
              "int", 16 * 1024 * 1024, minimum=1, ours=True),
    ConfigKey("gateway.relay_request_timeout", "Seconds to wait for a relay outbound_result.",
              "float", 30.0, minimum=0, ours=True),
    ConfigKey("gateway.scale_to_zero.idle_timeout_minutes", "Minutes without inbound, "
              "running turns or background work before a scale-to-zero gateway goes dormant.",
              "float", 5.0, minimum=1),
    ConfigKey("gateway.shutdown_timeout", "Seconds each service gets to stop on shutdown.",
              "float", 4.0, minimum=0, ours=True),
    ConfigKey("gateway.ops.trusted_proxies", "IP addresses of reverse proxies whose "
              "X-Forwarded-For is believed by the ops listener.", "list", [], ours=True),
    ConfigKey("gateway.ops.required_platforms", "Platforms whose state decides /readyz "
              "(the others are reported only).", "list", [], ours=True),
    ConfigKey("gateway.api_server.max_concurrent_runs", "Concurrent API server runs "
              "(0 = unlimited).", "int", 10, minimum=0),
    # sessions (top level, or under gateway:)
    ConfigKey("session_reset.mode", "When sessions reset by themselves.", "enum", "none",
              choices=("none", "idle", "daily", "both")),
    ConfigKey("session_reset.notify", "Tell the user when a session was reset.", "bool", True),
    ConfigKey("session_reset.notify_exclude_platforms", "Platforms never told about resets.",
              "list", ["api_server", "webhook"]),
    ConfigKey("reset_by_platform", "session_reset overrides by platform, e.g. {telegram: "
              "{mode: idle, idle_minutes: 240}}; keys left out come from session_reset. "
              "Wins over reset_by_type.", "mapping"),
    ConfigKey("reset_by_type", "session_reset overrides by chat type (dm, group, channel, "
              "thread), e.g. {group: {mode: daily, at_hour: 6}}.", "mapping"),
    ConfigKey("group_sessions_per_user", "In groups, one session per user (not per chat).",
              "bool", True),
    ConfigKey("thread_sessions_per_user", "In threads, one session per user.", "bool", False),
    ConfigKey("unauthorized_dm_behavior", "What a direct message from an unauthorized sender "
              "gets: pair (a one-time pairing code the operator approves with "
              "'hermes-gateway pairing approve') or ignore. Unset: pair unless the platform "
              "has an allowlist or dm_policy says otherwise (hermes 0.19.0's order). Also "
              "per platform (platforms.<name>.unauthorized_dm_behavior).", "enum", None,
              choices=("pair", "ignore")),
    # streaming (top level, or under gateway:)
    ConfigKey("streaming.enabled", "Stream replies by editing a message as text arrives.",
              "bool", False),
    ConfigKey("streaming.transport", "How to stream.", "enum", "auto",
              choices=("auto", "edit", "draft", "off")),
    ConfigKey("streaming.mode", "Alias of transport that also turns streaming on.", "enum",
              None, choices=("auto", "edit", "draft", "off")),
    ConfigKey("streaming.edit_interval", "Seconds between edits.", "float", 0.8, minimum=0),
    ConfigKey("streaming.buffer_threshold", "Characters to collect before an edit.", "int", 24,
              minimum=0),
    ConfigKey("streaming.cursor", "Shown at the end of a message still being written.", "str",
              " \u2589"),
    ConfigKey("streaming.fresh_final_after_seconds", "Send the final reply as a new message "
              "when streaming took longer than this (0 = never).", "float", 0.0, minimum=0),
    # display
    ConfigKey("display.busy_input_mode", "A message arriving during a turn: interrupt it; "
              "queue it for its own turn; steer (noted and folded into the next turn, since a "
              "running remote turn cannot be changed); or collect (bursts, and everything sent "
              "during a turn, joined into one turn).", "enum", "interrupt",
              choices=("interrupt", "queue", "steer", "collect")),
    ConfigKey("display.busy_queue_cap", "Most messages waiting per session while it is busy.",
              "int", 20, minimum=1, ours=True),
    ConfigKey("display.busy_queue_drop", "What a full queue does with one more message: drop "
              "the oldest waiting (old), refuse the new one (new), or fold the oldest into one "
              "\"messages you missed\" turn (summarize).", "enum", "old",
              choices=("old", "new", "summarize"), ours=True),
    ConfigKey("display.collect_debounce", "collect mode: seconds of quiet after a message "
              "before the collected burst runs as one turn.", "float", 1.5, minimum=0,
              ours=True),
    ConfigKey("display.tool_progress", "Show tool progress lines. off/false: no; any other "
              "value (true, all, new, verbose): yes.", "flag", False),
    ConfigKey("display.typing_interval", "Seconds between typing notifications.", "float", 2.0,
              minimum=0.1, ours=True),
    ConfigKey("display.typing_delay", "Seconds a turn runs before the first typing "
              "notification; a turn answered sooner shows none. 0: at once.", "float", 0.5,
              minimum=0, ours=True),
    ConfigKey("display.busy_ack_interval", "Least seconds between two \"still working\" "
              "acknowledgements in one chat.", "float", 30.0, minimum=0, ours=True),
    # adapter tuning (ours)
    ConfigKey("platforms.irc.extra.max_message_length", "Longest PRIVMSG text in UTF-8 bytes "
              "before splitting.", "int", 450, minimum=1, maximum=510),
    ConfigKey("platforms.irc.extra.send_burst", "Lines sent at once before pacing starts.",
              "int", 4, minimum=1, ours=True),
    ConfigKey("platforms.irc.extra.send_interval", "Seconds between paced lines.", "float", 0.3,
              minimum=0, ours=True),
    ConfigKey("platforms.matrix.extra.sync_timeout_ms", "Long-poll timeout of /sync.", "int",
              30000, minimum=0, ours=True),
    ConfigKey("platforms.matrix.extra.state_dir", "Where the sync token and joined rooms are "
              "kept (relative paths are under $HERMES_HOME).", "path", "$HERMES_HOME/matrix",
              ours=True),
    ConfigKey("platforms.email.extra.require_authenticated_sender", "Check "
              "Authentication-Results before answering (while an allowlist is set); "
              "EMAIL_TRUST_FROM_HEADER turns it off too.", "bool", True),
    ConfigKey("platforms.email.extra.idle", "Wait for mail with IMAP IDLE when the server "
              "offers it (false: always poll).", "bool", True, ours=True),
    ConfigKey("platforms.email.extra.smtp_implicit_tls", "Implicit TLS on the SMTP port even "
              "when it is not 465.", "bool", False, ours=True),
    ConfigKey("platforms.email.extra.state_dir", "Where the inbox cursor (UIDVALIDITY, last "
              "UID) is kept (relative paths are under $HERMES_HOME).", "path",
              "$HERMES_HOME/email", ours=True),
    ConfigKey("platforms.discord.extra.slash_commands", "Register the slash commands "
              "(/ask, /stop, /new, /status) at all.", "bool", True),
    ConfigKey("platforms.telegram.extra.drop_pending_updates", "Skip updates that arrived "
              "while the daemon was down.", "bool", False, ours=True),
    ConfigKey("platforms.slack.extra.reply_in_thread", "Answer top-level channel messages "
              "in a thread with a session per thread (false: in the channel, one session per "
              "user).", "bool", True),
    ConfigKey("platforms.slack.extra.reply_broadcast", "Also show the first chunk of a "
              "thread reply in the channel.", "bool", False),
    ConfigKey("platforms.slack.extra.dm_top_level_threads_as_sessions", "Every top-level DM "
              "starts its own thread and session (false: one session per DM).", "bool", True),
    ConfigKey("platforms.slack.extra.typing_status_text", "The AI-app status line shown "
              "while a turn runs.", "str", "is thinking..."),
    ConfigKey("platforms.slack.extra.native_streaming", "Stream with chat.startStream / "
              "appendStream / stopStream where the workspace has them (else chat.update).",
              "bool", True, ours=True),
    ConfigKey("platforms.slack.extra.socket_connections", "Socket Mode connections to hold "
              "(Slack spreads deliveries over them).", "int", 1, minimum=1, maximum=10,
              ours=True),
    # every platform block (platforms.<name>, gateway.platforms.<name>)
    ConfigKey(f"{_PLATFORM_FIELDS}.enabled", "Turn the platform on or off; false beats any "
              "environment variable.", "bool", False),
    ConfigKey(f"{_PLATFORM_FIELDS}.token", "Platform token.", "secret", password=True),
    ConfigKey(f"{_PLATFORM_FIELDS}.api_key", "Platform API key.", "secret", password=True),
    ConfigKey(f"{_PLATFORM_FIELDS}.home_channel", "Home chat id (or a mapping with chat_id).",
              "str"),
    ConfigKey(f"{_PLATFORM_FIELDS}.reply_to_mode", "Which reply chunks thread onto the user's "
              "message.", "enum", "first", choices=("off", "first", "all")),
    ConfigKey(f"{_PLATFORM_FIELDS}.typing_indicator", "Send typing notifications.", "bool",
              True),
    ConfigKey(f"{_PLATFORM_FIELDS}.allowed_users", "User ids allowed on this platform.", "list",
              ours=True),
    ConfigKey(f"{_PLATFORM_FIELDS}.allow_all_users", "Allow every user of this platform.",
              "bool", False, ours=True),
    # access control, per platform (also in a top-level shortcut block: telegram: {...})
    ConfigKey(f"{_PLATFORM_FIELDS}.extra.unauthorized_dm_behavior", "This platform's answer "
              "to a direct message from an unauthorized sender (wins over the global key).",
              "enum", None, choices=("pair", "ignore")),
    ConfigKey(f"{_PLATFORM_FIELDS}.extra.dm_policy", "Direct messages from unknown senders: "
              "pairing gives them a pairing code; allowlist and disabled ignore them.", "enum",
              None, choices=("open", "allowlist", "disabled", "pairing")),
    ConfigKey(f"{_PLATFORM_FIELDS}.extra.allow_admin_from", "Admins in direct messages: they "
              "run every command. Listing one turns command gating on for DMs.", "list"),
    ConfigKey(f"{_PLATFORM_FIELDS}.extra.user_allowed_commands", "Commands other DM users may "
              "run once gating is on (besides /help and /whoami); empty: the group list.",
              "list"),
    ConfigKey(f"{_PLATFORM_FIELDS}.extra.group_allow_admin_from", "Admins in groups, channels "
              "and threads. Listing one turns command gating on there.", "list"),
    ConfigKey(f"{_PLATFORM_FIELDS}.extra.group_user_allowed_commands", "Commands other group "
              "users may run once gating is on (besides /help and /whoami).", "list"),
    ConfigKey(f"{_PLATFORM_FIELDS}.extra", "Platform-specific keys (see each platform's "
              "variables above; other keys are passed to the adapter unchanged).", "mapping"),
]

YAML_KEYS: dict[str, ConfigKey] = {k.path: k for k in _YAML_KEY_LIST}

#: Keys of a top-level shortcut block (C{irc:}, C{matrix:}, ...) copied into that platform's
#: C{extra} (platforms.md 3.2).  They are also accepted inside C{platforms.<name>}.
SHORTCUT_KEYS = frozenset({
    "unauthorized_dm_behavior", "notice_delivery", "reply_prefix", "reply_in_thread",
    "cron_continuable_surface", "require_mention", "free_response_channels",
    "mention_patterns", "exclusive_bot_mentions", "dm_policy", "allow_from",
    "allow_admin_from", "user_allowed_commands", "group_policy", "group_allow_from",
    "group_allow_admin_from", "group_user_allowed_commands", "channel_prompts",
    "gateway_restart_notification", "typing_indicator", "typing_status_text",
    "channel_overrides", "send_read_receipts",
})
SHORTCUT_KEYS_BY_PLATFORM = {
    "telegram": frozenset({"allowed_chats", "group_allowed_chats", "allowed_topics",
                           "observe_unmentioned_group_messages"}),
    "matrix": frozenset({"allowed_rooms", "free_response_rooms"}),
    "discord": frozenset({"allowed_channels", "ignored_channels", "thread_require_mention",
                          "auto_thread", "no_thread_channels", "reactions", "reply_to_mode",
                          "slash_commands"}),
    "slack": frozenset({"allowed_channels", "strict_mention", "allow_bots", "reactions",
                        "reply_broadcast", "dm_top_level_threads_as_sessions", "reply_to_mode",
                        "native_streaming", "socket_connections"}),
    "api_server": frozenset({"port", "host", "key", "cors_origins", "model_name"}),
}

#: Platforms this daemon implements, by config name (their adapters: L{hermes_twisted.platforms}).
SUPPORTED_PLATFORMS = frozenset({"irc", "matrix", "telegram", "discord", "slack", "email",
                                 "api_server", "relay", "xmpp"})

#: Platforms Hermes 0.19.0 knows and this daemon does not implement, with the variable that
#: would turn each on in Hermes.  The relay can front them.
UNSUPPORTED_PLATFORMS: dict[str, tuple[str, ...]] = {
    "whatsapp": ("WHATSAPP_ENABLED",),
    "whatsapp_cloud": (),
    "signal": ("SIGNAL_HTTP_URL",),
    "mattermost": ("MATTERMOST_TOKEN",),
    "homeassistant": ("HASS_TOKEN",),
    "sms": ("TWILIO_ACCOUNT_SID",),
    "dingtalk": ("DINGTALK_CLIENT_ID",),
    "webhook": ("WEBHOOK_ENABLED",),
    "msgraph_webhook": (),
    "feishu": ("FEISHU_APP_ID",),
    "wecom": ("WECOM_BOT_ID",),
    "wecom_callback": ("WECOM_CALLBACK_CORP_ID",),
    "weixin": ("WEIXIN_TOKEN",),
    "bluebubbles": ("BLUEBUBBLES_SERVER_URL",),
    "qqbot": ("QQ_APP_ID",),
    "yuanbao": (),
    "ntfy": ("NTFY_TOPIC",),
    "simplex": ("SIMPLEX_WS_URL",),
    "line": ("LINE_CHANNEL_ACCESS_TOKEN",),
    "teams": ("TEAMS_CLIENT_ID",),
    "google_chat": ("GOOGLE_CHAT_SERVICE_ACCOUNT_JSON",),
    "photon": ("PHOTON_PROJECT_ID",),
    "raft": ("RAFT_PROFILE",),
}


def platform_vars(platform: str) -> list[EnvVar]:
    return [v for v in ENV_VARS.values() if v.platform == platform]


# -- reference documentation ----------------------------------------------------------------

_INTRO = """\
# Configuration reference

<!-- Generated by `python -m hermes_twisted.config.envvars > docs/configuration.md`; do not edit.
     tests/test_envvars.py fails when this file and the registry disagree. -->

hermes-twisted reads the same environment variables and `config.yaml` keys as
`hermes gateway` 0.19.0 in proxy/relay mode, plus a few of its own (marked *ours*).

## Where settings come from

1. The process environment.
2. `$HERMES_HOME/.env` (`KEY=VALUE` lines, `#` comments, optional `export `, optional single
   or double quotes). It never overrides a variable already set in the environment.
3. The YAML file: `--config FILE`, else `$HERMES_HOME/config.yaml` when it exists. Without
   either, the daemon starts from environment variables alone.
4. Defaults.

An environment variable wins over its YAML key. A value made only of whitespace counts as
unset. `HERMES_HOME` defaults to `~/.hermes`.

Shared settings (`session_reset`, `streaming`, `group_sessions_per_user`,
`thread_sessions_per_user`, `unauthorized_dm_behavior`) may be written at the top level or
under `gateway:`; the top level wins. Platform blocks may be written under `platforms:` or
`gateway.platforms:` (merged; `platforms:` wins). Top-level shortcut blocks (`irc:`,
`matrix:`, `telegram:`, ...) copy these keys into that platform's `extra`:
{shortcut}.

A platform is turned on by its enabling variable (marked *enables*) or by
`platforms.<name>.enabled: true`; `enabled: false` in YAML beats the environment.

Problems are reported before the daemon starts, naming the key, for example
`platforms.irc.extra.port: expected an integer, got 'abc'`. Unknown keys inside known blocks
are logged and ignored; unknown top-level keys (Hermes's agent settings) are ignored.
Booleans accept `1/true/yes/on` and `0/false/no/off` (any case). Lists accept a YAML list or
a comma separated string.

Supported platforms: `irc`, `matrix`, `telegram`, `discord`, `slack`, `email`, `api_server`, `relay`,
`xmpp`. Platforms Hermes knows but this daemon does not implement are rejected with a pointer to the
relay (`GATEWAY_RELAY_URL` plus `GATEWAY_RELAY_PLATFORMS`), unless the relay fronts them or
the block says `enabled: false`.

The relay: a block for a platform the relay fronts (`slack:`, `platforms.discord`, ...)
is copied to `platforms.relay.extra.<platform>`, merged with what is written there, for the
relay's relevance policy; top-level `require_mention` and `free_response_channels` become
`platforms.relay.extra.require_mention` / `free_response_channels` (relay.md 2.4). The dial
URL is derived from the configured one: `https` becomes `wss`, `http` becomes `ws`, and
`/relay` is added to the path (`wss://h/base?x=1` dials `wss://h/base/relay?x=1`).
For each platform the relay fronts, Hermes's `<PLATFORM>_ALLOW_BOTS` (`mentions` or `all`:
the relevance policy lets other bots through), `<PLATFORM>_REACTIONS` (the eyes reaction
while a turn runs) and `<PLATFORM>_AUTO_THREAD` are read from the environment, e.g.
`DISCORD_ALLOW_BOTS` when `GATEWAY_RELAY_PLATFORMS` lists `discord`.

The API server also accepts `port`, `host`, `key`, `cors_origins` and `model_name` directly
in its block (`platforms.api_server.port` or `gateway.api_server.port`), as Hermes does.
"""

_GROUPS = [
    ("Daemon", lambda v: v.name in ("HERMES_HOME", "HERMES_GATEWAY_DB", "GATEWAY_DATABASE_URL",
                                    "GATEWAY_INSTANCE_ID")
                     or v.name.startswith("GATEWAY_FLEET_")),
    ("Proxy mode (the remote Hermes API server)",
     lambda v: v.name.startswith(("GATEWAY_PROXY_", "HERMES_PROXY_"))),
    ("Relay", lambda v: v.name.startswith("GATEWAY_RELAY_") or v.name == "HERMES_SCALE_TO_ZERO"),
    ("Operations", lambda v: v.name.startswith("GATEWAY_OPS_")),
    ("Media", lambda v: v.name.startswith("GATEWAY_MEDIA_")),
    ("Access and sessions",
     lambda v: v.name.startswith(("GATEWAY_ALLOW", "SESSION_"))),
    ("IRC", lambda v: v.platform == "irc"),
    ("Matrix", lambda v: v.platform == "matrix"),
    ("Telegram", lambda v: v.platform == "telegram"),
    ("Email", lambda v: v.platform == "email"),
    ("Discord", lambda v: v.platform == "discord"),
    ("Slack", lambda v: v.platform == "slack"),
    ("API server", lambda v: v.platform == "api_server"),
    ("XMPP", lambda v: v.platform == "xmpp"),
]
#: Anything no group above claims still gets documented.
_OTHER = "Other"


def _fmt_default(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, (list, tuple)):
        return "`" + ",".join(value) + "`"
    return f"`{value!r}`" if isinstance(value, str) and value.strip() != value else f"`{value}`"


def _fmt_type(kind: str, choices: tuple[str, ...], minimum: Any, maximum: Any) -> str:
    if kind == "enum":
        return " \\| ".join(choices)
    text = kind
    if minimum is not None and maximum is not None:
        text += f" {minimum:g}..{maximum:g}"
    elif minimum is not None:
        text += f" >= {minimum:g}"
    return text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_reference() -> str:
    """The Markdown text of C{docs/configuration.md}."""
    out = [_INTRO.format(shortcut=", ".join(f"`{k}`" for k in sorted(SHORTCUT_KEYS)))]
    out.append("\n## Environment variables\n")
    placed = {v.name for v in ENV_VARS.values() for _, belongs in _GROUPS if belongs(v)}
    groups = list(_GROUPS)
    if len(placed) < len(ENV_VARS):
        groups.append((_OTHER, lambda v: v.name not in placed))
    for title, belongs in groups:
        out.append(f"\n### {title}\n\n")
        out.append("| Variable | config.yaml key | Type | Default | Description |\n")
        out.append("|---|---|---|---|---|\n")
        for v in ENV_VARS.values():
            if not belongs(v):
                continue
            notes = []
            if v.password:
                notes.append("secret")
            if v.enables:
                notes.append("enables")
            if v.ours:
                notes.append("ours")
            name = f"`{v.name}`" + (f" ({', '.join(notes)})" if notes else "")
            key = f"`{v.yaml_key}`" if v.yaml_key else "(none)"
            kind = _fmt_type(v.type, v.choices, v.minimum, v.maximum)
            out.append(f"| {name} | {key} | {kind} | {_fmt_default(v.default)} | "
                       f"{_cell(v.description)} |\n")
    out.append("\n## config.yaml keys without an environment variable\n\n")
    out.append("`<name>` is any supported platform.\n\n")
    out.append("| Key | Type | Default | Description |\n|---|---|---|---|\n")
    for k in YAML_KEYS.values():
        name = f"`{k.path}`" + (" (ours)" if k.ours else "")
        kind = _fmt_type(k.type, k.choices, k.minimum, k.maximum)
        out.append(f"| {name} | {kind} | {_fmt_default(k.default)} | {_cell(k.description)} |\n")
    out.append("\n## Shortcut keys specific to one platform\n\n")
    for platform, keys in sorted(SHORTCUT_KEYS_BY_PLATFORM.items()):
        out.append(f"- `{platform}:` also copies {', '.join(f'`{k}`' for k in sorted(keys))}\n")
    out.append("\n## Hermes platforms not supported by this daemon\n\n")
    out.append("Front them through the relay. Their Hermes variables are ignored with a "
               "warning:\n\n")
    for platform, names in UNSUPPORTED_PLATFORMS.items():
        suffix = f" ({', '.join(f'`{n}`' for n in names)})" if names else ""
        out.append(f"- `{platform}`{suffix}\n")
    return "".join(out)


if __name__ == "__main__":
    sys.stdout.write(render_reference())
