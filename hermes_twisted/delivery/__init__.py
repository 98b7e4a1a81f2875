"""
Delivery: how a streamed answer becomes chat messages on one adapter.

  consumer.py    L{StreamConsumer}: deltas in, sends and edits out, the final answer
  messages.py    the layout of a streamed reply over one or more messages
  pacing.py      the edit pacer (interval, flood backoff)
  text.py        text rules of a streamed reply (when to open a message, silence markers)
  channel.py     L{ReplyChannel}: one send or edit with its retries
  splitting.py   message splitting and truncation that keeps code fences whole

Adapters are known only through the contract (their C{send}/C{edit_message} and capability
attributes).  May import: L{hermes_twisted.model}, L{hermes_twisted.config.settings},
L{hermes_twisted.net} and L{hermes_twisted.platforms.base}; never the dispatcher or a
concrete platform.  Platforms may import the splitting and text rules from here.
"""
