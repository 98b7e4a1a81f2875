# -*- test-case-name: tests.test_ops_jsonlog -*-
"""
Flat JSON log lines for log shippers (journald, Loki, ...): one object per line.

    twistd -n --pidfile= --logger=hermes_twisted.ops.jsonlog.observer hermes-gateway

Each line has C{ts} (RFC 3339 UTC, ms), C{level} (debug, info, warn, error, critical),
C{logger} (the namespace), C{event} (the C{event} field when the code names one, else the
unrendered format: a stable key to group by), C{msg} (the rendered message) and the event's
named fields whose values are plain scalars.  A failure adds C{exc_type} and C{traceback}.

What never appears: fields whose name says secret (token, key, secret, password,
authorization, ...) and fields that carry message text (C{text}, C{content}, C{message},
C{body}, ...); they are left out of the line, and where the rendered C{msg} would show one,
it is rendered with that field replaced by C{<redacted>}.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from zope.interface import implementer

LEVELS = {LogLevel.debug: "debug", LogLevel.info: "info", LogLevel.warn: "warn",
          LogLevel.error: "error", LogLevel.critical: "critical"}

#: Field names (or name parts) that are never written.
SECRET_PARTS = ("token", "secret", "password", "passwd", "authorization", "api_key",
                "apikey", "cookie", "credential")
SECRET_NAMES = frozenset({"proxy_key", "delivery_key", "secret_key"})
TEXT_NAMES = frozenset({"text", "content", "message", "body", "prompt", "reply", "final",
                        "final_response", "delta", "messages", "line", "payload"})
REDACTED = "<redacted>"

_SCALARS = (str, int, float, bool, type(None))


def _hidden(name: str) -> bool:
    lower = name.lower()
    return (lower in SECRET_NAMES or lower in TEXT_NAMES
            or any(part in lower for part in SECRET_PARTS))


def _timestamp(seconds: float) -> str:
    whole = time.gmtime(seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", whole) + f".{int(seconds % 1 * 1000):03d}Z"


def flatten(event: dict[str, Any]) -> dict[str, Any]:
    """The flat JSON object of one C{twisted.logger} event."""
    safe = {k: (REDACTED if _hidden(k) else v) for k, v in event.items()
            if not k.startswith("log_")}
    rendered = dict(event)
    rendered.update({k: v for k, v in safe.items() if v == REDACTED})
    msg = formatEvent(rendered) if event.get("log_format") is not None else \
        str(event.get("log_text") or "")
    level = event.get("log_level")
    line: dict[str, Any] = {
        "ts": _timestamp(event.get("log_time") or time.time()),
        "level": LEVELS.get(level, "info"),
        "logger": event.get("log_namespace") or "-",
        "event": event.get("event") or event.get("log_format") or event.get("log_text") or "",
        "msg": msg,
    }
    for key, value in safe.items():
        if key in line or value == REDACTED or key == "event":
            continue
        if isinstance(value, _SCALARS):
            line[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        line["exc_type"] = getattr(getattr(failure, "type", None), "__name__", "?")
        try:
            line["traceback"] = failure.getTraceback()
        except Exception:
            line["traceback"] = None
    return line


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes one flat JSON object per event, per line, to C{out}."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            text = json.dumps(flatten(event), default=str, ensure_ascii=False)
        except Exception as e:  # never let logging break the caller
            text = json.dumps({"ts": _timestamp(time.time()), "level": "error",
                               "logger": "hermes_twisted.ops.jsonlog",
                               "event": "log_event_unserializable",
                               "msg": f"could not serialize a log event ({type(e).__name__})"})
        self._out.write(text + "\n")
        self._out.flush()


def observer(out: IO[str] | None = None,
             level: LogLevel = LogLevel.info) -> FilteringLogObserver:
    """
    The C{twistd --logger} factory: JSON lines on stdout (where systemd and container
    runtimes collect them), at C{info} and above.
    """
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    return FilteringLogObserver(JSONLinesObserver(out or sys.stdout), [predicate])
