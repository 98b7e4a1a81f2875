"""Scale-to-zero (relay.md 3.9): the watcher's rules, and a dormancy and wake over real TCP."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from hermes_twisted.config.settings import GatewayConfig, PlatformSettings, RelaySettings
from hermes_twisted.relay.adapter import RelayAdapter
from hermes_twisted.relay.dormancy import (
    COOLDOWN,
    POLL_INTERVAL,
    ScaleToZeroWatcher,
    watcher_wanted,
)
from hermes_twisted.relay.stub import StubConnector
from hermes_twisted.relay.wire import inbound_event
from tests.relay_support import eventually, relay_pair
from tests.test_relay_client import PendingEndpoint


@pytest.mark.parametrize("relay, enabled, why", [
    (RelaySettings(), ["relay"], "HERMES_SCALE_TO_ZERO is off"),
    (RelaySettings(scale_to_zero=True), ["relay"], "no GATEWAY_RELAY_WAKE_URL"),
    (RelaySettings(scale_to_zero=True, wake_url="http://w"), ["relay", "telegram"],
     "other messaging platforms are enabled (telegram)"),
    (RelaySettings(scale_to_zero=True, wake_url="http://w"), ["relay", "api_server"], None),
    (RelaySettings(scale_to_zero=True, wake_url="http://w"), [], None),
])
def test_when_the_watcher_is_armed(relay, enabled, why):
    got = watcher_wanted(relay, enabled)
    assert got == why if why is None else why in got


class World:
    def __init__(self) -> None:
        self.clock = Clock()
        self.busy = False
        self.connected = True
        self.last = 0.0
        self.calls: list[Deferred] = []
        self.watcher = ScaleToZeroWatcher(
            self.go_dormant, idle_since=lambda: self.last, busy=lambda: self.busy,
            connected=lambda: self.connected, clock=self.clock, idle_minutes=5)

    def go_dormant(self) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append(d)
        return d


def test_goes_dormant_only_when_idle_connected_and_not_busy():
    w = World()
    w.watcher.startService()
    w.clock.advance(POLL_INTERVAL * 9)  # 4.5 minutes: not yet
    assert w.calls == []
    w.busy = True
    w.clock.advance(POLL_INTERVAL * 2)
    assert w.calls == []
    w.busy, w.connected = False, False
    w.clock.advance(POLL_INTERVAL)
    assert w.calls == []
    w.connected = True
    w.last = w.clock.seconds() - 10  # an inbound 10 s ago
    w.clock.advance(POLL_INTERVAL)
    assert w.calls == []
    w.clock.advance(5 * 60)
    assert len(w.calls) == 1
    w.calls[0].callback(True)
    assert w.watcher.dormancies == 1
    w.watcher.stopService()
    assert w.clock.getDelayedCalls() == []


def test_a_missed_ack_keeps_the_connection_and_the_cooldown_holds():
    w = World()
    w.last = -3600
    w.watcher.startService()
    w.clock.advance(POLL_INTERVAL)
    assert len(w.calls) == 1
    w.calls[0].callback(False)  # no going_idle_ack: still connected
    assert w.watcher.dormancies == 0
    w.clock.advance(POLL_INTERVAL)  # 30 s later: inside the cooldown
    assert len(w.calls) == 1
    w.clock.advance(COOLDOWN - POLL_INTERVAL)
    assert len(w.calls) == 2
    w.watcher.stopService()  # cancels the attempt in flight
    assert w.calls[1].called


def adapter_for(relay: RelaySettings, platforms: dict[str, Any]) -> RelayAdapter:
    config = GatewayConfig(hermes_home="/x", db_path=":memory:", relay=relay,
                           platforms=platforms)
    return RelayAdapter(PlatformSettings(name="relay", enabled=True), reactor=Clock(),
                        gateway_config=config, endpoint=PendingEndpoint(),
                        http_sender=lambda r: succeed(None))


def test_the_adapter_arms_the_watcher_only_when_relay_only():
    relay = RelaySettings(url="ws://c/relay", gateway_id="g", secret="s", scale_to_zero=True,
                          wake_url="http://w", idle_timeout_minutes=7)
    only = adapter_for(relay, {"relay": PlatformSettings(name="relay", enabled=True)})
    assert only.watcher is not None and only.watcher.idle_seconds == 420
    assert only.getServiceNamed("relay.scale-to-zero") is only.watcher
    mixed = adapter_for(relay, {"relay": PlatformSettings(name="relay", enabled=True),
                                "irc": PlatformSettings(name="irc", enabled=True)})
    assert mixed.watcher is None


@pytest_twisted.ensureDeferred
async def test_dormant_wake_and_buffered_replay_over_tcp():
    clock = Clock()
    clock.advance(reactor.seconds())
    # The wake URL belongs to the machine's orchestrator, which stays up while we sleep.
    orchestrator = StubConnector(reactor)
    await orchestrator.listen()
    try:
        await dormant_wake_and_replay(clock, orchestrator)
    finally:
        await orchestrator.stop()


async def dormant_wake_and_replay(clock: Clock, orchestrator: StubConnector) -> None:
    async with relay_pair(secrets={}, gateway_id=None, secret=None, start=False,
                          identity_token=lambda s: s.http.accept_identity(),
                          scale_to_zero=True, wake_url=orchestrator.http_url + "/wake",
                          idle_timeout_minutes=0.1) as (stub, adapter, sink):
        adapter.watcher.clock = clock
        adapter.startService()
        await eventually(lambda: adapter.status == "connected", what="the handshake")
        await eventually(lambda: not adapter._busy(), what="boot work to finish")
        clock.advance(POLL_INTERVAL)
        await eventually(lambda: stub.going_idle == 1, what="going_idle")
        await eventually(lambda: adapter.watcher.dormancies == 1, what="dormancy")
        # The socket closed without the closing flag: the client redials by itself, which is
        # when a suspended machine's connector replays; here the stub buffers until then.
        await stub.stop_listening()
        await eventually(lambda: not stub.open, what="the close")
        stub.buffer_inbound(inbound_event("while asleep", "c1"), "buf-1")
        await eventually(lambda: orchestrator.http.wake_pokes == 1, what="the wake poke")
        await stub.listen(stub.port)
        await eventually(lambda: sink.events, timeout=10, what="the replay")
        assert [e.text for e in sink.events] == ["while asleep"]
        assert sink.events[0].metadata["dedupe_key"] == "relay:buf-1"
        await eventually(lambda: stub.acks == ["buf-1"], what="the ack")
        assert adapter.status == "connected" and not adapter.client.dormant
        # Within the cooldown it does not go dormant again.
        clock.advance(POLL_INTERVAL)
        assert stub.going_idle == 1
