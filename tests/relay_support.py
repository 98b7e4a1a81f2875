"""
Shared pieces of the relay tests: a recording gateway sink, a bounded real-reactor wait, and
an async context manager that runs the real RelayAdapter against the stub connector.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater

from hermes_twisted.config.settings import GatewayConfig, PlatformSettings, RelaySettings
from hermes_twisted.relay.adapter import RelayAdapter
from hermes_twisted.relay.stub import StubConnector


class RecordingSink:
    """A gateway stand-in: records admitted events and remote interrupts."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.interrupts: list[tuple[str, str | None]] = []
        self.running: set[str] = set()
        self.admit: Callable[[Any], Deferred] | None = None
        self.on_event: Callable[[Any, Any], None] | None = None

    def handle_message(self, adapter: Any, event: Any) -> Deferred:
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(adapter, event)
        if self.admit is not None:
            return self.admit(event)
        return succeed(None)

    def interrupt_session(self, adapter: Any, session_key: str, chat_id: str | None = None,
                          reason: str = "Stop requested") -> bool:
        self.interrupts.append((session_key, chat_id))
        return session_key in self.running

    def texts(self) -> list[str]:
        return [e.text for e in self.events]


async def eventually(predicate: Callable[[], Any], timeout: float = 5.0,
                     what: str = "condition") -> Any:
    """Poll C{predicate} on the real reactor until truthy; AssertionError after C{timeout}."""
    from twisted.internet import reactor

    waited = 0.0
    while True:
        value = predicate()
        if value:
            return value
        if waited >= timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


def relay_config(url: str, **relay: Any) -> GatewayConfig:
    relay.setdefault("gateway_id", "gw-test")
    relay.setdefault("secret", "s3cret")
    return GatewayConfig(hermes_home="/nonexistent", db_path=":memory:",
                         relay=RelaySettings(url=url, **relay))


@contextlib.asynccontextmanager
async def relay_pair(*, secrets: dict[str, list[str]] | None = None, start: bool = True,
                     configure: Callable[[StubConnector], None] | None = None,
                     extra: dict[str, Any] | None = None, **relay: Any):
    """Yields C{(stub, adapter, sink)}; everything is stopped and closed on exit."""
    from twisted.internet import reactor

    stub = StubConnector(reactor, secrets=secrets if secrets is not None
                         else {"gw-test": ["s3cret"]})
    if configure is not None:
        configure(stub)
    await stub.listen()
    relay = {k: (v(stub) if callable(v) else v) for k, v in relay.items()}
    adapter = RelayAdapter(PlatformSettings(name="relay", enabled=True, extra=extra or {}),
                           reactor=reactor, gateway_config=relay_config(stub.url, **relay),
                           rand=lambda: 0.5)
    sink = RecordingSink()
    adapter.attach(sink)
    try:
        if start:
            adapter.startService()
        yield stub, adapter, sink
    finally:
        if adapter.running:
            await adapter.stopService()
        await stub.stop()
