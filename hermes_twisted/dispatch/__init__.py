"""
The dispatcher: what happens between an admitted message and a delivered answer.

  gateway.py      L{Gateway}: admission, lanes, busy policy, the service that owns the runs
  lanes.py        the per-session-key state (running handle, queue, holds)
  runs.py         L{RunHandle}, generations, post-delivery callbacks
  turn.py         the body of one turn: session, history, upstream, delivery, transcript
  dispatcher.py   the narrow face of the gateway that commands and turns are written against
  commands.py     the commands the gateway answers itself
  authz.py        who may talk to the agent
  gating.py       who may run which slash command (admins, user lists), /whoami
  pairing.py      pairing in a running daemon (approved senders, codes for unknown ones)
  busy.py         what waits while a session is busy, and what the next turn takes
  interrupts.py   interrupt reasons and L{RunInterrupted}
  inbound.py      the stored inbox payload of an admitted event
  typing_loop.py  the typing indicator of a running turn

May import: L{hermes_twisted.model}, L{hermes_twisted.config.settings}, L{hermes_twisted.net},
L{hermes_twisted.sessions}, L{hermes_twisted.upstream}, L{hermes_twisted.delivery},
L{hermes_twisted.pairing} and the adapter contract L{hermes_twisted.platforms.base}; never a concrete platform or the relay.
"""
