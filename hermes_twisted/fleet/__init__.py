"""
The fleet: several gateway processes sharing one PostgreSQL store (docs/fleet.md,
scale-out.md §6-§9).  Active only with C{GATEWAY_DATABASE_URL}; the embedded SQLite store
runs without any of it.

  leases.py   session leases timed by the database clock: acquire (with a generation
              bump), renew, release
  fencing.py  generations as fencing tokens: the fleet-wide bump of /stop and /new, and
              transcript writes that only a current owner can make
  inbox.py    the fleet-wide inbox: deduped on (platform, dedupe_key), claimed with expiry
              and SKIP LOCKED
  bus.py      the LISTEN connection, driven by the reactor, reconnected with backoff
  member.py   this process as a fleet member: its running sessions, renewal, self-fencing,
              the safety poll, and the turn-start / stop calls the gateway makes
  identity.py identity leases: one instance connects a single-owner platform (IRC, Matrix
              client, Telegram polling, email, XMPP, Discord gateway); the others stand by
              (platform state C{dormant}) and take over when the lease lapses, resuming
              from the cursor saved in the lease row

The SQL runs on the session store's own thread and connection (L{StoreWriter.submit}), so a
fenced write commits in order with the store's other writes and the reactor never waits.
Identity leases have a connection of their own (renewals must not queue behind a batch).

May import: L{hermes_twisted.model}, L{hermes_twisted.config}, L{hermes_twisted.sessions},
the adapter contract (L{hermes_twisted.platforms.base}: identity leases start and stop
adapters) and itself.
"""
