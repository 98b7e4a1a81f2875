"""
Telegram: the Bot API over treq (a fake Bot API with the real limits in the tests).

  adapter.py   L{TelegramAdapter}: the service, the getUpdates loop, sends and edits
  botapi.py    one Bot API call and its error shapes
  updates.py   an update as a L{MessageEvent}: addressing, mentions, authorization hints
  format.py    MarkdownV2 and its escaping
"""
