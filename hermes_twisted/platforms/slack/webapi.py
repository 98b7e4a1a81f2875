# -*- test-case-name: tests.test_slack_webapi -*-
"""
Slack's Web API over treq: C{POST <api_base><method>} with C{Authorization: Bearer <token>}.

Writes (C{chat.*}, C{reactions.*}, C{assistant.*}) go as JSON, reads as form data, as
Slack asks.  An answer is C{{"ok": true, ...}} or C{{"ok": false, "error": ...}} (HTTP 200),
except a rate limit (HTTP 429 + C{Retry-After}).  Every call first waits what
L{MethodLimits} says (a 429 hold, then the method's tier); a 429 holds the method for
C{Retry-After} and the call is tried again if the wait fits in C{max_wait}, else it fails
with L{SlackAPIError} C{ratelimited} carrying C{retry_after}.  Tokens never reach a log.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from hermes_twisted.net.body import BodyTooLarge, read_body
from hermes_twisted.platforms.slack.ratelimit import MethodLimits

DEFAULT_API_BASE = "https://slack.com/api/"
MAX_BODY = 8 * 1024 * 1024
#: Slack's default when a 429 carries no usable Retry-After (slack_sdk uses the same).
DEFAULT_RETRY_AFTER = 30.0
_FORM_METHODS = frozenset({"apps.connections.open", "auth.test", "conversations.info",
                           "users.info", "conversations.replies", "files.info"})


class SlackAPIError(Exception):
    """An C{ok: false} answer, a 429, or an answer that is not Slack's JSON."""

    def __init__(self, method: str, error: str, *, status: int = 200,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{method}: {error}")
        self.method = method
        self.error = error
        self.status = status
        self.retry_after = retry_after

    @property
    def kind(self) -> str:
        """The L{hermes_twisted.model.SendResult} C{error_kind} of this error."""
        if self.error == "ratelimited" or self.status == 429:
            return "rate_limited"
        if self.error in ("msg_too_long",):
            return "too_long"
        if self.error in ("channel_not_found", "message_not_found", "thread_not_found"):
            return "not_found"
        if self.error in ("not_in_channel", "is_archived", "restricted_action",
                          "missing_scope", "not_authed", "invalid_auth", "account_inactive",
                          "token_revoked", "cant_update_message", "edit_window_closed"):
            return "forbidden"
        if self.status >= 500 or self.error in ("internal_error", "fatal_error",
                                                "service_unavailable", "request_timeout"):
            return "transient"
        return "unknown"


def retry_after_of(response: Any) -> float:
    values = response.headers.getRawHeaders(b"retry-after") or []
    try:
        return max(0.0, float(values[0]))
    except (IndexError, ValueError):
        return DEFAULT_RETRY_AFTER


class SlackWebAPI:
    """
    The Web API as one token sees it.  C{http} is a treq C{HTTPClient} (or C{StubTreq});
    C{clock} paces the calls.
    """

    def __init__(self, http: Any, token: str, *, clock: Any,
                 api_base: str = DEFAULT_API_BASE, max_wait: float = 30.0) -> None:
        self.http = http
        self.token = token
        self.clock = clock
        self.api_base = api_base if api_base.endswith("/") else api_base + "/"
        self.max_wait = max_wait
        self.limits = MethodLimits(clock)

    def call(self, method: str, params: dict[str, Any] | None = None, *,
             max_wait: float | None = None) -> Deferred:
        """
        Call C{method}.  Fires with Slack's answer (a dict with C{ok: true}); fails with
        L{SlackAPIError} (C{ok: false}; or C{ratelimited} with C{retry_after} when waiting
        would exceed C{max_wait}), or the transport's error.  Cancelling abandons a pacing
        wait or aborts the request, closing its connection.
        """
        wait = self.max_wait if max_wait is None else max_wait
        return Deferred.fromCoroutine(self._call(method, dict(params or {}), wait))

    async def _call(self, method: str, params: dict[str, Any], max_wait: float) -> Any:
        while True:
            delay = self.limits.delay(method, params)
            if delay > 0:
                held = self.limits.held_for(method, params)
                if delay > max_wait:
                    raise SlackAPIError(method, "ratelimited", status=429,
                                        retry_after=held or delay)
                await deferLater(self.clock, delay, lambda: None)
            response = await self._post(method, params)
            if response.code == 429:
                retry_after = retry_after_of(response)
                await self._discard(response)
                self.limits.hold(method, params, retry_after)
                if retry_after > max_wait:
                    raise SlackAPIError(method, "ratelimited", status=429,
                                        retry_after=retry_after)
                continue
            return await self._answer(method, response)

    def _post(self, method: str, params: dict[str, Any]) -> Deferred:
        headers = {b"Authorization": [f"Bearer {self.token}".encode()]}
        url = self.api_base + method
        if method in _FORM_METHODS:
            return self.http.post(url, data={k: str(v) for k, v in params.items()},
                                  headers=headers, unbuffered=True)
        headers[b"Content-Type"] = [b"application/json; charset=utf-8"]
        return self.http.post(url, data=json.dumps(params).encode(), headers=headers,
                              unbuffered=True)

    @staticmethod
    async def _discard(response: Any) -> None:
        try:
            await read_body(response, MAX_BODY)
        except BodyTooLarge:
            pass

    async def _answer(self, method: str, response: Any) -> Any:
        try:
            body = await read_body(response, MAX_BODY)
        except BodyTooLarge:
            raise SlackAPIError(method, "response_too_large", status=response.code)
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise SlackAPIError(method, f"http_{response.code}_not_json", status=response.code)
        if payload.get("ok") is True:
            return payload
        raise SlackAPIError(method, str(payload.get("error") or "unknown_error"),
                            status=response.code)
