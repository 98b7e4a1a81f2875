# -*- test-case-name: tests.test_telegram -*-
"""
One Bot API call over treq: POST JSON to C{<base>/bot<token>/<method>}, read the body with a
cap and a canceller that closes the connection, and turn C{{"ok": false}} into
L{TelegramAPIError}.  The token is part of every URL, so nothing here logs, and
L{describe} scrubs it from error text that might.
"""

from __future__ import annotations

import json
from typing import Any

from hermes_twisted.net.body import BodyTooLarge, read_body

#: Cap on a response body (a full getUpdates batch is far below it).
MAX_BODY = 32 * 1024 * 1024


class TelegramAPIError(Exception):
    """An C{{"ok": false}} answer (or a non-JSON one) from the Bot API."""

    def __init__(self, error_code: int, description: str,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{error_code} {description}")
        self.error_code = error_code
        self.description = description
        self.retry_after = retry_after

    @property
    def kind(self) -> str:
        """The L{SendResult.error_kind} of this error."""
        text = self.description.lower()
        if self.error_code == 429:
            return "rate_limited"
        if "can't parse entities" in text:
            return "bad_format"
        if "too long" in text:
            return "too_long"
        if self.error_code == 403:
            return "forbidden"
        if "not found" in text:
            return "not_found"
        if self.error_code >= 500 or self.error_code == 0:
            return "transient"
        return "unknown"


async def call(http: Any, base_url: str, token: str, method: str,
               params: dict[str, Any]) -> Any:
    """
    POST C{params} to C{method} through the treq client C{http}.  Returns the C{result}
    field; raises L{TelegramAPIError} for an C{ok: false} or non-JSON answer, or the
    transport's error.  Cancelling the awaiting Deferred closes the connection.
    """
    response = await http.post(f"{base_url}/bot{token}/{method}", json=params,
                               unbuffered=True)
    try:
        body = await read_body(response, MAX_BODY)
    except BodyTooLarge:
        raise TelegramAPIError(0, "response body too large")
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise TelegramAPIError(response.code, f"HTTP {response.code} with a non-JSON body")
    if payload.get("ok") is True:
        return payload.get("result")
    parameters = payload.get("parameters")
    retry_after = parameters.get("retry_after") if isinstance(parameters, dict) else None
    code = payload.get("error_code", response.code)
    raise TelegramAPIError(code if isinstance(code, int) else 0,
                           str(payload.get("description") or "unknown error"),
                           float(retry_after) if isinstance(retry_after, (int, float))
                           else None)


def describe(error: BaseException, token: str | None) -> str:
    """An error as a log-safe string: the token never appears in it."""
    text = str(error) or type(error).__name__
    return text.replace(token, "<token>") if token else text
