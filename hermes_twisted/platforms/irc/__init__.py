"""
IRC: one connection through C{twisted.words} (miniircd and ngircd in the tests).

  adapter.py   L{IRCAdapter}: the service, addressing, sessions, sends
  protocol.py  one connection: registration, NickServ, liveness, callbacks that never raise
  pacer.py     the line pacer (flood protection)
  text.py      IRC case folding, formatting and message splitting
"""
