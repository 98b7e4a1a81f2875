"""
Sessions: which conversation a message belongs to, and the durable store of sessions,
transcripts and the inbox.

  interface.py  the store contract (L{SessionStore}) and its entry shapes
  keys.py       Hermes session keys from a message's source
  sqlite.py     the SQLite store (WAL, synchronous=FULL)
  writer.py     its one writer thread with group commit
  schema.py     the versioned schema and the pre-flight check
  reset.py      reset policies (idle, daily)
  ids.py        session ids

May import: L{hermes_twisted.model}, L{hermes_twisted.config.settings} and itself.
"""
