"""
The platform kit: what several platforms share, written once.

  inflight.py   the calls a platform has in flight, cancelled together when it stops
  stopping.py   a clean close of a held connection, aborted after a bound (IRC, XMPP)
  polling.py    the long-poll loop with a cursor (Telegram getUpdates, Matrix /sync, IMAP)
  websocket.py  autobahn under a ClientService: endpoints, timers, redacted logs (relay, Slack,
                Discord)

The reconnect policy for held connections (relay, IRC) is L{hermes_twisted.net.reconnect};
splitting and text rules are L{hermes_twisted.delivery}.  A helper joins the kit only when
it removes duplication that exists, not for a platform that does not exist yet.

May import: L{hermes_twisted.model}, L{hermes_twisted.config.settings}, L{hermes_twisted.net}
and the contract L{hermes_twisted.platforms.base}.
"""
