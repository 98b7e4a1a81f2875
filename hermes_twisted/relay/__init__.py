"""
The relay platform (relay.md): the gateway dials out to a connector over a WebSocket and fronts
the platforms the connector holds credentials for.

  auth.py         bearer tokens (and the retired delivery signature); the only crypto here
  wire.py         NDJSON framing, the gateway's frames, inbound event mapping
  descriptor.py   the connector's CapabilityDescriptor
  passthrough.py  passthrough_forward decoding, Discord interactions as messages
  protocol.py     the autobahn client protocol and factory
  client.py       RelayClient: ClientService supervision, requests, handshake, 4401, idle,
                  provisioning before the first dial
  adapter.py      RelayAdapter: the platform adapter the gateway sees (interaction replies,
                  reactions, media, auto-threads, per-chat limits)
  http.py         the connector's HTTP requests: redirect rule, blocking and treq senders
  identity.py     the caller-identity token (client credentials, ambient, static)
  enroll.py       hermes-gateway enroll (writes $HERMES_HOME/.env)
  provision.py    boot-time self-provisioning (credentials in memory)
  policy.py       the relevance policy declared to the connector
  dormancy.py     the scale-to-zero watcher
  media.py        images linked in a reply, for send_media
  stub.py         a stub connector for tests, development and the benchmark
  stub_http.py    the stub connector's HTTP endpoints (enroll, provision, policy, IdP, wake)
  load.py         the load driver the stub runs for the benchmark (it knows the stub only
                  through a small protocol, so the two do not import each other)

The relay is a platform: it may import what a platform package may (see
L{hermes_twisted.platforms}), and never L{hermes_twisted.dispatch}.
"""
