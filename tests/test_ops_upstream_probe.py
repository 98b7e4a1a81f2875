"""The background upstream probe: GET /health against a real local server, and a refusal."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor

from hermes_twisted.ops.upstream_probe import UpstreamProbe
from tests.fakes.upstream import FakeHermesAPI, Script
from tests.servers.irc import free_port


@pytest_twisted.ensureDeferred
async def test_a_healthy_upstream_is_recorded_ok():
    fake = FakeHermesAPI(reactor, Script(deltas=["x"]))
    url = fake.listen()
    seen: list[str] = []
    probe = UpstreamProbe(url, reactor=reactor, record=seen.append)
    probe.startService()
    try:
        assert await probe.probe_once() == "ok" and seen == ["ok"]
    finally:
        await probe.stopService()
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_a_refused_upstream_is_a_connect_error_and_stop_leaves_nothing():
    seen: list[str] = []
    probe = UpstreamProbe(f"http://127.0.0.1:{free_port()}", reactor=reactor,
                          record=seen.append)
    probe.startService()
    assert await probe.probe_once() == "connect_error" and seen == ["connect_error"]
    await probe.stopService()  # cancels the scheduled probe (the conftest checks timers)
