"""
Sessions: which conversation a message belongs to, and the durable store of sessions,
transcripts and the inbox.

  interface.py  the store contract (L{SessionStore}) and its entry shapes
  keys.py       Hermes session keys from a message's source
  store.py      the store's logic on a database, shared by both stores
  sqlite.py     the embedded SQLite store (WAL, synchronous=FULL), the default
  postgres.py   the PostgreSQL store (GATEWAY_DATABASE_URL), psycopg 3
  writer.py     one writer thread per store with group commit
  schema.py     the SQLite schema, its migrations and the pre-flight check
  migrate.py    C{hermes-gateway migrate-store}: SQLite into PostgreSQL
  reset.py      reset policies (idle, daily)
  ids.py        session ids

May import: L{hermes_twisted.model}, L{hermes_twisted.config.settings} and itself.
"""
