"""
The API server: an OpenAI-compatible HTTP front door (the official C{openai} client in the tests).

  adapter.py   L{APIServerAdapter}: the site, chat completions, SSE streaming
  http.py      request parsing, error bodies, session ids
"""
