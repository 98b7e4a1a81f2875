"""
The fleet: several gateway processes sharing one PostgreSQL store (GATEWAY_DATABASE_URL),
coordinated through rows timed by the database clock, so that each platform identity has one
connection and a crashed instance is replaced without replay or stale output.

  identity.py   identity leases: one instance connects a single-owner platform (IRC,
                Matrix client, Telegram polling, email, XMPP, Discord gateway); the others
                stand by (platform state C{dormant}) and take over when the lease lapses

May import: L{hermes_twisted.model}, L{hermes_twisted.config}, L{hermes_twisted.sessions}
and the adapter contract (L{hermes_twisted.platforms.base}); the top (tap.py) wires it.
"""
