"""
The relay platform (relay.md): the gateway dials out to a connector over a WebSocket and fronts
the platforms the connector holds credentials for.

  auth.py         bearer tokens (and the retired delivery signature); the only crypto here
  wire.py         NDJSON framing, the gateway's frames, inbound event mapping
  descriptor.py   the connector's CapabilityDescriptor
  passthrough.py  passthrough_forward decoding, Discord interactions as messages
  protocol.py     the autobahn client protocol and factory
  client.py       RelayClient: ClientService supervision, requests, handshake, 4401, idle
  adapter.py      RelayAdapter: the platform adapter the gateway sees
  stub.py         a stub connector for tests, development and the benchmark
  load.py         the load driver the stub runs for the benchmark (it knows the stub only
                  through a small protocol, so the two do not import each other)

The relay is a platform: it may import what a platform package may (see
L{hermes_twisted.platforms}), and never L{hermes_twisted.dispatch}.
"""
