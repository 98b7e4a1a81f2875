"""
Pairing: how an unknown direct-message sender is let in (platforms.md §4.4).

The gateway answers such a sender with a one-time code; the operator approves the code out
of band (C{hermes-gateway pairing approve <platform> <code>}, or hermes's own
C{hermes pairing approve}: both read and write the same files under C{$HERMES_HOME}); from
then on the sender is authorized, without a restart.

  store.py  L{PairingStore}: codes, limits, and the files in hermes's layout
  cli.py    the C{pairing} admin subcommand (list, approve, revoke)

A package of its own because two sides use it: the dispatcher (a running daemon, through a
thread) and the admin console script (no reactor at all).  It is blocking file code with no
Twisted in it.

May import: L{hermes_twisted.config} (errors, C{$HERMES_HOME}); nothing else of ours.
"""
