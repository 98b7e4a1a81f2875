"""
Discord, native: the Gateway (v10) over autobahn and the REST API over treq.

  adapter.py     L{DiscordAdapter}: the platform contract, when it answers, threads, typing
  gateway.py     the Gateway session as a state machine: hello, identify, resume, heartbeats
  connection.py  the supervised WebSocket (C{ClientService} + C{SessionBackoff}) and its
                 autobahn protocol; fatal close codes stop it for good
  ratelimit.py   per-route rate-limit buckets (C{X-RateLimit-*}, 429 bodies, global limit)
  rest.py        REST calls through treq, queued per bucket
  wire.py        Gateway payloads in (messages, interactions), intents
  policy.py      when the bot answers (DMs, mentions, channels, bots, allowlists)
  text.py        Discord's text rules: mentions, thread names, 2000 code points
  commands.py    slash commands: the definitions, the idempotent sync, interaction replies

May import what a platform room may (see L{hermes_twisted.platforms}).
"""
