# -*- test-case-name: tests.test_discord_rest -*-
"""
Discord's REST API over treq (base C{DISCORD_API_BASE}, default
C{https://discord.com/api/v10}), every call queued behind its rate-limit bucket
(L{hermes_twisted.platforms.discord.ratelimit}).

A 429 waits C{retry_after} and tries again (up to C{max_wait} in total, else it fails with
C{retry_after} so a streaming edit can skip a beat instead of waiting); a 5xx on an idempotent
call (or a message create, which carries a C{nonce} Discord enforces) is tried up to three
times.  401, 403 and 404 are never retried: Discord counts them against the invalid-request
budget.  The token is never logged.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from hermes_twisted.net.body import BodyTooLarge, read_body
from hermes_twisted.net.cancellation import was_cancelled
from hermes_twisted.platforms.discord.ratelimit import RateLimiter

DEFAULT_API_BASE = "https://discord.com/api/v10"
USER_AGENT = "DiscordBot (https://github.com/hermes-twisted/hermes-twisted, 0.1.0)"
MAX_BODY = 8 * 1024 * 1024
SERVER_ERRORS = frozenset({500, 502, 503, 504, 524})


class DiscordHTTPError(Exception):
    """A non-2xx answer (C{status} 0 when no answer came, e.g. a timeout)."""

    def __init__(self, status: int, message: str, code: int = 0,
                 retry_after: float | None = None, body: Any = None) -> None:
        super().__init__(f"{status} {message}" + (f" (code {code})" if code else ""))
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after
        self.body = body

    @property
    def kind(self) -> str:
        """The L{SendResult.error_kind} of this error."""
        if self.status == 429:
            return "rate_limited"
        if self.code == 50035 and "2000 or fewer" in json.dumps(self.body or ""):
            return "too_long"
        if self.status in (401, 403):
            return "forbidden"
        if self.status == 404:
            return "not_found"
        if self.status == 0 or self.status >= 500:
            return "transient"
        return "unknown"


def _headers(response: Any) -> dict[str, str]:
    out = {}
    for name, values in response.headers.getAllRawHeaders():
        out[name.decode("latin-1").lower()] = values[-1].decode("latin-1")
    return out


class DiscordREST:
    """
    The REST client of one bot token.  C{http} is a C{treq.HTTPClient} (C{StubTreq} in
    tests); the adapter owns its pool.
    """

    log = Logger()

    def __init__(self, base_url: str, token: str, *, clock: Any, http: Any = None,
                 timeout: float = 20.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.clock = clock
        self.http = http
        self.timeout = timeout
        self.limiter = RateLimiter(clock)
        self.calls = 0

    def request(self, method: str, route: str, *, major: str = "", json_body: Any = None,
                query: dict[str, Any] | None = None, max_wait: float = 60.0,
                **params: str) -> Deferred:
        """
        Call C{method} C{route} (a path template such as C{/channels/{channel_id}/messages},
        filled from C{params}).  Fires with the decoded JSON body (None for 204); fails with
        L{DiscordHTTPError}.  Cancelling stops waiting for the bucket or aborts the request
        (closing its connection).
        """
        return Deferred.fromCoroutine(self._request(method, route, major, json_body, query,
                                                    max_wait, params))

    async def _request(self, method: str, route: str, major: str, json_body: Any,
                       query: dict[str, Any] | None, max_wait: float,
                       params: dict[str, str]) -> Any:
        path = route.format(**params)
        route_key = f"{method} {route}"
        webhook = route.startswith(("/webhooks/", "/interactions/"))
        limit = self.limiter.limit(route_key, major)
        waited = 0.0
        failures = 0
        while True:
            await limit.lock.acquire()
            try:
                await self.limiter.wait_turn(limit, exempt_global=webhook)
                response, body = await self._once(method, path, json_body, query, webhook)
                headers = _headers(response)
                self.limiter.update(route_key, major, limit, headers)
                if response.code == 429:
                    retry_after = self.limiter.rate_limited(limit, headers, body)
                    self.log.info("discord: 429 on {method} {route}; waiting {retry_after}s",
                                  method=method, route=route, retry_after=retry_after)
                    if waited + retry_after > max_wait:
                        raise DiscordHTTPError(429, "rate limited", retry_after=retry_after,
                                               body=body)
                    waited += retry_after
                    continue  # the bucket (or global) now holds the next try back
            finally:
                limit.lock.release()
            if 200 <= response.code < 300:
                return body
            error = self._error(response.code, body)
            if response.code in (401, 403):
                self.limiter.count_invalid()
            retryable = response.code in SERVER_ERRORS and (
                method in ("GET", "PUT", "PATCH", "DELETE")
                or (isinstance(json_body, dict) and json_body.get("enforce_nonce")))
            if not retryable or failures >= 2:
                raise error
            failures += 1
            await deferLater(self.clock, 1.0 + 2 * (failures - 1), lambda: None)

    async def _once(self, method: str, path: str, json_body: Any,
                    query: dict[str, Any] | None, webhook: bool) -> tuple[Any, Any]:
        if self.http is None:
            raise DiscordHTTPError(0, "not running")
        headers = {"User-Agent": [USER_AGENT]}
        if not webhook:
            headers["Authorization"] = [f"Bot {self.token}"]
        kwargs: dict[str, Any] = {"headers": headers, "unbuffered": True}
        if json_body is not None:
            kwargs["json"] = json_body
        if query:
            kwargs["params"] = {k: str(v) for k, v in query.items()}
        self.calls += 1
        d = self.http.request(method, self.base_url + path, **kwargs)
        d.addTimeout(self.timeout, self.clock)
        try:
            response = await d
            read = read_body(response, MAX_BODY)
            read.addTimeout(self.timeout, self.clock)
            raw = await read
        except CancelledError:
            raise
        except BodyTooLarge:
            raise DiscordHTTPError(0, "response body too large") from None
        except Exception as e:
            if was_cancelled(e):
                # A cancel arrives wrapped (ResponseNeverReceived): it stays a cancel.
                raise CancelledError() from None
            text = str(e).replace(self.token, "<token>") if self.token else str(e)
            raise DiscordHTTPError(0, f"{type(e).__name__}: {text}") from None
        body = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
        return response, body

    @staticmethod
    def _error(status: int, body: Any) -> DiscordHTTPError:
        if isinstance(body, dict):
            code = body.get("code") if isinstance(body.get("code"), int) else 0
            return DiscordHTTPError(status, str(body.get("message") or "error"), code,
                                    body=body)
        return DiscordHTTPError(status, f"HTTP {status}", body=body)
