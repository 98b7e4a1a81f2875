# -*- test-case-name: tests.test_tap -*-
"""
C{twistd hermes-gateway}: command-line options and the service tree.

Everything that can be wrong with the configuration is found in L{Options.postOptions}, before
twistd daemonizes, and reported as a usage error naming the key.  L{makeService} only wires:
it does no I/O; connections start in C{startService}.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from typing import Any

from twisted.logger import Logger
from twisted.python import usage

from hermes_twisted import __version__

log = Logger(namespace="hermes_twisted.tap")


class Options(usage.Options):
    synopsis = "[--config FILE] [--hermes-home DIR] [--print-config]"
    longdesc = (
        "Connects chat platforms (IRC, Matrix, Telegram, an OpenAI-compatible API, and a "
        "WebSocket relay to a hosted connector) to a remote Hermes agent API server. "
        "Without --config, $HERMES_HOME/config.yaml is read when it exists; $HERMES_HOME/.env "
        "is always read (never overriding the environment). Environment variables win over "
        "YAML. See docs/configuration.md for every key."
    )
    optParameters = [
        ["config", "c", None,
         "YAML configuration file (default: $HERMES_HOME/config.yaml when it exists)."],
        ["hermes-home", None, None,
         "Hermes home directory holding config.yaml, .env and gateway.db "
         "(default: $HERMES_HOME, else ~/.hermes)."],
    ]
    optFlags = [
        ["print-config", None,
         "Print the effective configuration as YAML, secrets redacted, and exit."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.gateway_config: Any = None

    def opt_version(self) -> None:
        """Print the hermes-twisted version and exit."""
        sys.stdout.write(f"hermes-twisted {__version__}\n")
        sys.exit(0)

    def postOptions(self) -> None:
        from hermes_twisted.config.loader import ConfigError, load_config, redacted_yaml
        from hermes_twisted.sessions.interface import StoreError

        environ = dict(os.environ)
        if self["hermes-home"]:
            environ["HERMES_HOME"] = self["hermes-home"]
        if self["config"] and not os.path.isfile(self["config"]):
            raise usage.UsageError(f"--config: no such file: {self['config']}")
        try:
            config = load_config(self["config"], environ)
        except ConfigError as e:
            raise usage.UsageError(f"configuration error: {e}")
        if self["print-config"]:
            sys.stdout.write(redacted_yaml(config))
            sys.stdout.flush()
            sys.exit(0)
        try:
            ensure_home(config)
            check_store(config)
        except OSError as e:
            raise usage.UsageError(f"cannot create {config.hermes_home}: {e.strerror}")
        except StoreError as e:
            raise usage.UsageError(f"session store: {e}")
        try:
            check_platforms(config)
        except ConfigError as e:
            raise usage.UsageError(f"configuration error: {e}")
        self.gateway_config = config


def ensure_home(config: Any) -> None:
    """
    Create C{$HERMES_HOME} (mode 0700) on first start, as hermes does; a database directory
    elsewhere that does not exist stays an error for the operator to fix.
    """
    home = os.path.abspath(config.hermes_home)
    if not os.path.exists(home) and os.path.dirname(os.path.abspath(config.db_path)) == home:
        os.makedirs(home, mode=0o700)


def check_store(config: Any) -> None:
    """
    The pre-flight check of the configured session store: the SQLite file, or the PostgreSQL
    server (reachable, not of a newer schema).  Raises L{StoreError}; a missing driver for
    PostgreSQL is a L{usage.UsageError} naming the extra to install.
    """
    if config.database_url:
        try:
            from hermes_twisted.sessions.postgres import check_postgres
        except ImportError:
            raise usage.UsageError(
                "GATEWAY_DATABASE_URL needs psycopg 3: pip install 'hermes-twisted[postgresql]'"
            ) from None
        check_postgres(config.database_url)
    else:
        from hermes_twisted.sessions.sqlite import check_database

        check_database(config.db_path)


def check_platforms(config: Any) -> None:
    """
    The pre-flight checks of the enabled platforms that need an answer from their server (a
    blocking request each, before the reactor runs): today Matrix's whoami, when encryption
    needs the access token's device.  Raises L{ConfigError} naming the key; a server that
    does not answer is a warning on stderr, and the platform checks again when it connects.
    """
    for settings in config.enabled_platforms():
        if settings.name == "matrix":
            from hermes_twisted.platforms.matrix.preflight import check_matrix

            check_matrix(settings)


def make_store(config: Any, reactor: Any) -> Any:
    """The configured session store (not yet open), applying the configured reset policies."""
    from hermes_twisted.sessions.reset import policy_for as policy_of

    policy_for = partial(policy_of, config)
    if config.database_url:
        from hermes_twisted.sessions.postgres import PostgresSessionStore

        return PostgresSessionStore(config.database_url, instance_id=config.instance_id,
                                    reactor=reactor, reset_policy_for=policy_for)
    from hermes_twisted.sessions.sqlite import SQLiteSessionStore

    return SQLiteSessionStore(config.db_path, reactor=reactor, reset_policy_for=policy_for)


def make_fleet(config: Any, store: Any, reactor: Any) -> Any:
    """
    With a PostgreSQL store, this process's L{FleetMember} (with its LISTEN connection as a
    child service); None with the embedded SQLite store, which runs alone.
    """
    if not config.database_url:
        return None
    from hermes_twisted.fleet.bus import FleetBus
    from hermes_twisted.fleet.member import FleetMember

    member = FleetMember(store, config.fleet, instance_id=config.instance_id, clock=reactor)
    FleetBus(config.database_url, reactor=reactor, on_message=member.on_message,
             on_connected=member.on_bus_connected,
             application_name=f"hermes-bus {config.instance_id}").setServiceParent(member)
    return member


def makeService(options: Options, reactor: Any = None):
    """Build the service tree from validated options; no I/O happens here."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    return build_service(options.gateway_config, reactor)


def build_service(config: Any, reactor: Any):
    """
    The service tree, in start order (stop order is the reverse): the ops listener, the
    session store, the upstream client, the platforms, the gateway, then the lifecycle
    marker, so that on shutdown the probes say "stopping" first, the gateway cancels its runs
    next, the store closes after them and the ops listener goes last.
    """
    from hermes_twisted.dispatch.gateway import Gateway
    from hermes_twisted.dispatch.pairing import PairingGate
    from hermes_twisted.ops.heap import HeapProbe
    from hermes_twisted.ops.metrics import GatewayMetrics, ThreadPoolCollector
    from hermes_twisted.ops.probes import OpsState
    from hermes_twisted.ops.sdnotify import Notifier
    from hermes_twisted.ops.sends import measure_sends
    from hermes_twisted.ops.service import LifecycleMarker, OpsService
    from hermes_twisted.ops.trim import MallocTrimmer
    from hermes_twisted.ops.upstream import MeteredUpstream
    from hermes_twisted.ops.upstream_probe import UpstreamProbe
    from hermes_twisted.pairing.store import PairingStore
    from hermes_twisted.platforms import adapter_class
    from hermes_twisted.service import GatewayService
    from hermes_twisted.sessions.store import StoreService
    from hermes_twisted.upstream.proxy import ProxyUpstream

    top = GatewayService(clock=reactor, child_stop_timeout=config.shutdown_timeout,
                         summary=describe(config), tune_gc=True)
    store = make_store(config, reactor)
    metrics = GatewayMetrics(reactor)
    metrics.registry.register(ThreadPoolCollector(reactor))
    notifier = Notifier()
    ops = OpsState(clock=reactor, metrics=metrics, adapters=[], store=store,
                   upstream_url=config.upstream.proxy_url,
                   required=config.ops.required_platforms)
    # First child: probes answer during start-up, and it is the last to stop.
    OpsService(ops, reactor=reactor, listen=config.ops.listen if config.ops.enabled else None,
               token=config.ops.token, trusted_proxies=config.ops.trusted_proxies,
               notifier=notifier,
               heap=HeapProbe(config.ops.debug_heap, reactor=reactor)).setServiceParent(top)
    MallocTrimmer(clock=reactor, observe=metrics.malloc_trim.observe).setServiceParent(top)
    if config.upstream.proxy_url:
        UpstreamProbe(config.upstream.proxy_url, reactor=reactor,
                      record=ops.upstream_outcome).setServiceParent(top)
    store_service = StoreService(store)
    store_service.setName("sessions")
    store_service.setServiceParent(top)
    fleet = make_fleet(config, store, reactor)
    if fleet is not None:
        fleet.observer = metrics
        # After the store: it stops (releasing its leases) before the store closes.
        fleet.setServiceParent(top)
    upstream = ProxyUpstream(config.upstream, reactor=reactor)
    upstream.setServiceParent(top)
    leases = None
    if config.database_url:
        from hermes_twisted.fleet.identity import IdentityLeaseStore

        # Before the platforms: stopped after them, so their gates can still release.
        leases = IdentityLeaseStore(config.database_url, config.instance_id, reactor=reactor)
        leases.setServiceParent(top)
    gateway = Gateway(config, store=store,
                      upstream=MeteredUpstream(upstream, metrics, reactor, ops.upstream_outcome),
                      clock=reactor, observer=metrics, fleet=fleet,
                      pairing=PairingGate(PairingStore(config.hermes_home), reactor=reactor))
    ops.gateway = gateway
    for settings in config.enabled_platforms():
        adapter = adapter_class(settings.name)(settings, reactor=reactor, gateway_config=config)
        gateway.add_adapter(adapter)
        ops.adapters.append(adapter)
        metrics.watch_platform(adapter)
        measure_sends(adapter, metrics, reactor)
        if hasattr(adapter, "health_detail"):  # the API server
            adapter.health_detail = ops.health_detailed
            adapter.response_observer = metrics.api_response
        identity = adapter.fleet_identity() if leases is not None else None
        if identity is None:
            adapter.setServiceParent(top)
        else:
            from hermes_twisted.fleet.identity import IdentityGate, LeaseTiming

            # A single-owner platform in a fleet: connected only while this instance holds
            # its identity lease; dormant (standby) otherwise.
            gate = IdentityGate(adapter, leases, identity=identity, clock=reactor,
                                timing=LeaseTiming(config.fleet.identity_lease_ttl))
            metrics.watch_identity(settings.name, gate.holding)
            gate.setServiceParent(top)
    gateway.setServiceParent(top)
    # Last child: started means everything started; stopping it is the first step of shutdown.
    LifecycleMarker(ops, notifier).setServiceParent(top)
    return top


def describe(config: Any) -> str:
    """One operator-facing line: version, upstream (no credentials), platforms, store."""
    from urllib.parse import urlsplit

    upstream = config.upstream.proxy_url
    if upstream:
        parts = urlsplit(upstream)
        upstream = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    platforms = ", ".join(p.name for p in config.enabled_platforms()) or "none"
    if config.database_url:
        from hermes_twisted.config.redaction import url_without_password

        store = f"{url_without_password(config.database_url)} as {config.instance_id}"
    else:
        store = config.db_path
    return (f"version {__version__}; upstream {upstream or 'NOT CONFIGURED'}; "
            f"platforms {platforms}; store {store}")
