# -*- test-case-name: tests.test_config -*-
"""
The shapes of the validated, frozen configuration.  C{config.py} builds them from YAML and
the environment; everything else only reads them.  Defaults here are hermes-agent 0.19.0's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping


def _frozen(d: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class StreamingSettings:
    enabled: bool = False
    transport: str = "auto"  # auto | edit | draft | off
    edit_interval: float = 0.8
    buffer_threshold: int = 24
    cursor: str = " \u2589"
    fresh_final_after_seconds: float = 0.0

    @property
    def active(self) -> bool:
        return self.enabled and self.transport != "off"


@dataclass(frozen=True)
class ResetPolicy:
    mode: str = "none"  # none | idle | daily | both
    at_hour: int = 4
    idle_minutes: int = 1440
    notify: bool = True
    notify_exclude_platforms: tuple[str, ...] = ("api_server", "webhook")


@dataclass(frozen=True)
class DisplaySettings:
    busy_input_mode: str = "interrupt"  # interrupt | queue | steer | collect
    tool_progress: bool = False
    typing_interval: float = 2.0
    #: A turn answered sooner than this never shows "typing…" (one request fewer per turn).
    typing_delay: float = 0.5
    busy_ack_interval: float = 30.0
    busy_queue_cap: int = 20  # messages waiting per session, at most
    busy_queue_drop: str = "old"  # old | new | summarize
    collect_debounce: float = 1.5  # seconds of quiet that close a burst (collect mode)


@dataclass(frozen=True)
class UpstreamSettings:
    """The remote Hermes API server (proxy mode)."""

    proxy_url: str | None = None
    proxy_key: str | None = None
    model: str = "hermes-agent"
    connect_timeout: float = 10.0
    idle_read_timeout: float = 1800.0
    max_event_bytes: int = 16 * 1024 * 1024
    max_persistent_per_host: int = 1024


@dataclass(frozen=True)
class RelaySettings:
    url: str | None = None  # the normalized ws(s)://.../relay dial URL; None = relay off
    base_url: str | None = None  # as configured, stripped of trailing slashes
    gateway_id: str | None = None
    secret: str | None = None
    delivery_key: str | None = None
    platforms: tuple[str, ...] = ()
    bot_ids: Mapping[str, Mapping[str, str]] = field(default_factory=_frozen)
    max_message_bytes: int = 16 * 1024 * 1024
    request_timeout: float = 30.0
    endpoint: str | None = None
    route_keys: tuple[str, ...] = ()
    instance_id: str | None = None
    wake_url: str | None = None
    # OAuth2 client-credentials IdP for provision/enroll (GATEWAY_RELAY_IDP_*, gateway.idp.*)
    idp_token_url: str | None = None
    idp_client_id: str | None = None
    idp_client_secret: str | None = None
    idp_scope: str | None = None
    enroll_token: str | None = None  # GATEWAY_RELAY_ENROLL_TOKEN
    identity_token: str | None = None  # GATEWAY_RELAY_IDENTITY_TOKEN (ours)
    # Scale-to-zero (relay.md 3.9): HERMES_SCALE_TO_ZERO, gateway.scale_to_zero.*
    scale_to_zero: bool = False
    idle_timeout_minutes: float = 5.0
    # Per fronted platform, Hermes's {PLATFORM}_ALLOW_BOTS / _REACTIONS / _AUTO_THREAD as set
    # in the environment: {"discord": {"allow_bots": "mentions", "reactions": "false"}}.
    platform_env: Mapping[str, Mapping[str, str]] = field(default_factory=_frozen)

    @property
    def enabled(self) -> bool:
        return bool(self.url)


@dataclass(frozen=True)
class FleetSettings:
    """
    Session leases and fencing of a fleet sharing one PostgreSQL store (docs/fleet.md).
    Every duration is in seconds; lease expiry is timed by the database server's clock.
    """

    #: How long a session lease lasts without renewal (gateway.fleet.lease_ttl).
    lease_ttl: float = 15.0
    #: How often an owner renews its leases and inbox claims (gateway.fleet.lease_renew).
    lease_renew: float = 5.0
    #: An owner that has not renewed for this long stops acting on its own
    #: (gateway.fleet.self_fence_after); below lease_ttl, so it stops before a takeover.
    self_fence_after: float = 10.0
    #: How often running sessions' generations are re-read, for lost notifications
    #: (gateway.fleet.safety_poll).
    safety_poll: float = 2.0
    #: How long an inbox claim lasts without renewal (gateway.fleet.claim_ttl).
    claim_ttl: float = 30.0
    #: How long a single-owner platform's identity lease lasts without renewal
    #: (gateway.fleet.identity_lease_ttl); renewal and self-fencing derive from it.
    identity_lease_ttl: float = 15.0


@dataclass(frozen=True)
class OpsSettings:
    """The ops listener: probes, metrics and the status page (docs/operations.md)."""

    #: A Twisted server endpoint string; "none" turns the listener off.
    listen: str = "tcp:9469:interface=127.0.0.1"
    #: Bearer token that unlocks details and /metrics for non-loopback callers.
    token: str | None = None
    #: Peers whose X-Forwarded-For is believed (IP addresses).
    trusted_proxies: tuple[str, ...] = ()
    #: Platforms whose state decides readiness (default: none).
    required_platforms: tuple[str, ...] = ()
    #: Heap diagnostics on /debug/heap: off, counts or tracemalloc (ops/heap.py).
    debug_heap: str = "off"

    @property
    def enabled(self) -> bool:
        return self.listen.strip().lower() not in ("", "none", "off")


@dataclass(frozen=True)
class PlatformSettings:
    """
    One platform's block.  Platform-specific keys live in C{extra} with typed values
    (env strings are converted by the loader); adapters apply their own defaults.
    """

    name: str
    enabled: bool = False
    token: str | None = None
    api_key: str | None = None
    reply_to_mode: str = "first"
    typing_indicator: bool = True
    allowed_users: tuple[str, ...] = ()
    allow_all_users: bool = False
    home_channel: str | None = None
    extra: Mapping[str, Any] = field(default_factory=_frozen)


@dataclass(frozen=True)
class GatewayConfig:
    hermes_home: str
    db_path: str
    #: PostgreSQL store URL (GATEWAY_DATABASE_URL); None: the SQLite file at db_path.
    database_url: str | None = None
    #: This process's name in a fleet (GATEWAY_INSTANCE_ID; default host name and pid).
    instance_id: str = ""
    #: Leases and fencing when several processes share the PostgreSQL store.
    fleet: FleetSettings = field(default_factory=FleetSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    relay: RelaySettings = field(default_factory=RelaySettings)
    platforms: Mapping[str, PlatformSettings] = field(default_factory=_frozen)
    streaming: StreamingSettings = field(default_factory=StreamingSettings)
    session_reset: ResetPolicy = field(default_factory=ResetPolicy)
    #: Overrides of C{session_reset} by platform name, then by chat type (dm, group, ...).
    reset_by_platform: Mapping[str, ResetPolicy] = field(default_factory=_frozen)
    reset_by_type: Mapping[str, ResetPolicy] = field(default_factory=_frozen)
    display: DisplaySettings = field(default_factory=DisplaySettings)
    ops: OpsSettings = field(default_factory=OpsSettings)
    group_sessions_per_user: bool = True
    thread_sessions_per_user: bool = False
    allowed_users: tuple[str, ...] = ()  # GATEWAY_ALLOWED_USERS
    allow_all_users: bool = False  # GATEWAY_ALLOW_ALL_USERS
    unauthorized_dm_behavior: str | None = None  # pair | ignore; None: decided per platform
    max_concurrent_runs: int = 10  # gateway.api_server.max_concurrent_runs
    shutdown_timeout: float = 4.0
    #: Largest user image passed upstream (GATEWAY_MEDIA_MAX_BYTES, gateway.media.max_bytes).
    media_max_bytes: int = 10 * 1024 * 1024

    def enabled_platforms(self) -> list[PlatformSettings]:
        return [p for p in self.platforms.values() if p.enabled]
