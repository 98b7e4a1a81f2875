"""
The ops service in-process on the real reactor: it listens on any endpoint string (TCP,
UNIX), serves /metrics from a worker thread, survives a port it cannot bind, and stops
without leftovers.  And the ops settings: bad input is a usage error naming the key.
"""

from __future__ import annotations

import json
import socket

import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.logger import LogLevel, globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool

from hermes_twisted.config.errors import ConfigError
from hermes_twisted.config.loader import build_config
from hermes_twisted.ops.metrics import GatewayMetrics
from hermes_twisted.ops.probes import OpsState
from hermes_twisted.ops.sdnotify import Notifier
from hermes_twisted.ops.service import LifecycleMarker, OpsService


def make_service(listen: str | None) -> tuple[OpsService, OpsState]:
    ops = OpsState(clock=reactor, metrics=GatewayMetrics(reactor), adapters=[])
    ops.set_state("running")
    return OpsService(ops, reactor=reactor, listen=listen, notifier=Notifier({})), ops


async def listening(service: OpsService) -> None:
    from tests.relay_support import eventually

    await eventually(lambda: service.port is not None, what="the ops listener")


@pytest_twisted.ensureDeferred
async def test_metrics_are_served_over_tcp_and_the_service_stops_cleanly():
    service, ops = make_service("tcp:0:interface=127.0.0.1")
    service.startService()
    try:
        await listening(service)
        base = f"http://127.0.0.1:{service.address.port}"
        response = await treq.get(base + "/metrics", persistent=False)
        text = (await response.text()).splitlines()
        assert response.code == 200
        assert any(line.startswith("hermes_reactor_lag_seconds_bucket") for line in text)
        assert any(line.startswith("process_open_fds") for line in text)
        response = await treq.get(base + "/metrics", persistent=False,
                                  headers={"Accept": "application/openmetrics-text"})
        assert b"openmetrics" in response.headers.getRawHeaders(b"content-type")[0]
        assert (await response.text()).rstrip().endswith("# EOF")
        response = await treq.get(base + "/livez", persistent=False)
        assert json.loads(await response.text())["status"] == "ok"
    finally:
        await service.stopService()
    assert service.port is None


@pytest_twisted.ensureDeferred
async def test_a_unix_socket_listener_answers(tmp_path):
    path = tmp_path / "ops.sock"
    service, _ = make_service(f"unix:{path}")
    service.startService()
    try:
        await listening(service)
        class ToTheSocket:
            def endpointForURI(self, uri):
                return UNIXClientEndpoint(reactor, str(path))

        pool = HTTPConnectionPool(reactor, persistent=False)
        client = HTTPClient(Agent.usingEndpointFactory(reactor, ToTheSocket(), pool=pool))
        response = await client.get("http://localhost/status.json")
        body = json.loads(await response.content())
        assert response.code == 200 and body["state"] == "running"  # a UNIX peer is local
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_port_it_cannot_bind_is_logged_and_not_fatal(fail_on_logged_errors):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        service, _ = make_service(f"tcp:{port}:interface=127.0.0.1")
        seen = []
        observer = seen.append
        globalLogPublisher.addObserver(observer)
        try:
            service.startService()
            from tests.relay_support import eventually

            await eventually(lambda: any(e.get("log_level") == LogLevel.error for e in seen),
                             what="the bind error")
            assert service.running and service.port is None
        finally:
            globalLogPublisher.removeObserver(observer)
            await service.stopService()
    fail_on_logged_errors.clear()


def test_the_lifecycle_marker_says_ready_and_stopping():
    sent = []

    class Recorder(Notifier):
        def notify(self, message: str) -> bool:
            sent.append(message)
            return True

    ops = OpsState(clock=reactor, metrics=GatewayMetrics(reactor), adapters=[])
    marker = LifecycleMarker(ops, Recorder({}))
    assert ops.state == "starting"
    marker.startService()
    assert ops.state == "running" and sent == ["READY=1"]
    marker.stopService()
    assert ops.state == "stopping" and sent == ["READY=1", "STOPPING=1"]


def test_the_notifier_reads_systemd_environment():
    assert not Notifier({}).enabled and Notifier({}).watchdog_interval is None
    notifier = Notifier({"NOTIFY_SOCKET": "@hermes", "WATCHDOG_USEC": "30000000"})
    assert notifier.address == "\0hermes" and notifier.watchdog_interval == 15.0
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000",
                     "WATCHDOG_PID": "1"}).watchdog_interval is None


@pytest.mark.parametrize("document, env, key", [
    ({}, {"GATEWAY_OPS_LISTEN": "bogus:1"}, "GATEWAY_OPS_LISTEN"),
    ({"gateway": {"ops": {"listen": "tcp:notaport"}}}, {}, "gateway.ops.listen"),
    ({"gateway": {"ops": {"token": "short"}}}, {}, "gateway.ops.token"),
    ({"gateway": {"ops": {"required_platforms": ["irc"]}}}, {}, "gateway.ops.required_platforms"),
])
def test_bad_ops_settings_are_usage_errors_naming_the_key(document, env, key, tmp_path):
    with pytest.raises(ConfigError) as raised:
        build_config(document, {"HERMES_HOME": str(tmp_path), **env})
    assert key in str(raised.value)
    assert "short" not in str(raised.value) or key != "gateway.ops.token"


def test_ops_settings_have_their_defaults_and_accept_none(tmp_path):
    config = build_config({}, {"HERMES_HOME": str(tmp_path)})
    assert config.ops.listen == "tcp:9469:interface=127.0.0.1" and config.ops.enabled
    off = build_config({}, {"HERMES_HOME": str(tmp_path), "GATEWAY_OPS_LISTEN": "none"})
    assert not off.ops.enabled
