"""
XMPP: one client stream through C{twisted.words.protocols.jabber} (Prosody in the tests).

  adapter.py   L{XMPPAdapter}: the service, 1:1 and MUC chats, rooms, sends and corrections
  stream.py    one stream: TLS, SASL, bind, XEP-0198 stream management and resumption
  stanzas.py   message and presence stanzas in and out, mentions, disco and caps
"""
