"""Slack, native: Socket Mode over autobahn, the Web API over treq (see adapter.py)."""
