"""
Network plumbing every other package shares, with no knowledge of chats or agents.

  body.py          a bounded, cancellable HTTP response body reader
  pool.py          the quiet HTTP connection pool and agent
  site.py          a web site that closes its connections when it stops
  reconnect.py     the reconnect policy (L{SessionBackoff}, exponential delays)
  cancellation.py  recognising a cancellation in all its wrapped forms

May import: nothing of ours (only Twisted and treq).
"""
