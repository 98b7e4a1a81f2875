# -*- test-case-name: tests.test_matrix -*-
"""
Matrix over the client-server API with treq, end-to-end encrypted where a room is (the
engine is L{hermes_twisted.platforms.matrix.crypto}).

Inbound is a C{/sync} long-poll.  The C{since} token is saved only after every event of a
batch was admitted by the gateway, so a restart never loses an event; each event also carries
its C{event_id} as the gateway's dedupe key, so the narrow window between admission and saving
the token cannot replay a message either.  The first start skips the room history.

Outbound: C{m.text} (or C{m.notice}) with an HTML C{formatted_body}, streaming edits as
C{m.replace}, typing notifications, and C{M_LIMIT_EXCEEDED} handled with the server's
C{retry_after_ms}.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import treq.client
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    ensureDeferred,
    succeed,
)
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from hermes_twisted.model import MessageEvent, Platform, SendResult, SessionSource
from hermes_twisted.net.body import read_body
from hermes_twisted.net.cancellation import raise_if_cancelled
from hermes_twisted.net.pool import make_pool
from hermes_twisted.net.reconnect import exponential_delay
from hermes_twisted.platforms.base import PlatformAdapter, PlatformState, error_code_of, is_allowed
from hermes_twisted.platforms.kit.inflight import InFlight
from hermes_twisted.platforms.kit.polling import poll_forever
from hermes_twisted.platforms.matrix.format import has_markup, markdown_to_html
from hermes_twisted.platforms.matrix.media import (
    IMAGE_LINK,
    MediaError,
    check_public_url,
    download_path,
    media_message,
)

if TYPE_CHECKING:
    from hermes_twisted.platforms.matrix.crypto import MatrixCrypto

SYNC_TIMEOUT_MS = 30_000
HOLD_UNDECRYPTABLE_S = 300.0  # how long an event waits for its room key before the notice
MAX_HELD_EVENTS = 1000
MAX_REPLY_IMAGES = 4  # images linked in one reply that are sent as images
UNDECRYPTABLE_NOTICE = ("I couldn't decrypt your message. Please check that your client "
                        "shares its encryption keys with my device, then send it again.")
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # a large initial sync is big, but not unbounded
SYNC_FILTER = json.dumps({
    "room": {"timeline": {"limit": 100}, "state": {"lazy_load_members": True},
             "ephemeral": {"types": []}, "account_data": {"types": []}},
    "presence": {"types": []}, "account_data": {"types": []},
}, separators=(",", ":"))


#: An env var name at the start of a fatal message: the setting that cannot work.
_SETTING_NAME = re.compile(r"MATRIX_[A-Z0-9_]+")


class MatrixError(Exception):
    def __init__(self, code: int, body: dict[str, Any]) -> None:
        self.code, self.body = code, body
        self.errcode = body.get("errcode", "") if isinstance(body, dict) else ""
        super().__init__(f"HTTP {code} {self.errcode}: {body.get('error', '') if isinstance(body, dict) else ''}")


class MatrixFatal(Exception):
    """The homeserver refused our credentials: retrying cannot help, an operator must act."""


class MatrixAdapter(PlatformAdapter):
    log = Logger()

    platform = Platform.MATRIX
    supports_edit = True
    supports_code_blocks = True
    typed_command_prefix = "!"

    def __init__(self, settings, *, reactor, gateway_config=None, clock=None, http=None,
                 run_in_thread=deferToThread) -> None:
        super().__init__(settings, reactor=reactor, gateway_config=gateway_config)
        extra = settings.extra
        self.clock = clock or reactor
        self.homeserver = str(extra.get("homeserver") or "").rstrip("/")
        self.access_token = str(extra.get("access_token") or settings.token or "") or None
        self.user_id = str(extra.get("user_id") or "") or None
        self._password = extra.get("password")
        self._configured_token = self.access_token is not None
        self._login_user = self.user_id
        self.device_id = extra.get("device_id") or None
        self.max_message_length = int(extra.get("max_message_length") or 16000)
        self.max_media_bytes = int(extra.get("max_media_bytes") or 100 * 1024 * 1024)
        self.allowed_rooms = tuple(extra.get("allowed_rooms") or ())
        self.require_mention = bool(extra.get("require_mention", False))
        self.free_response_rooms = tuple(extra.get("free_response_rooms") or ())
        self.auto_join = bool(extra.get("auto_join", True))
        self.auto_thread = bool(extra.get("auto_thread", False))
        self.dm_auto_thread = bool(extra.get("dm_auto_thread", False))
        self.sync_timeout_ms = int(extra.get("sync_timeout_ms") or SYNC_TIMEOUT_MS)
        home = gateway_config.hermes_home if gateway_config else "."
        self._state_dir = str(extra.get("state_dir") or os.path.join(home, "matrix"))
        self._http = http
        self._pool: HTTPConnectionPool | None = None
        self._run_in_thread = run_in_thread
        self._loop: Deferred | None = None
        self._members: dict[str, int] = {}
        self._txn = 0
        self._state = "stopped"
        self._stopping = False
        self._http_calls = InFlight()
        self._since: str | None = None
        self._restored_since: str | None = None
        self._io_pending: set[Deferred] = set()
        self.e2ee_mode = e2ee_mode(extra)
        self.e2ee_trust = str(extra.get("e2ee_trust") or "tofu")
        self._store_key = extra.get("store_key") or None
        self._recovery_key = extra.get("recovery_key") or None
        self.hold_seconds = float(extra.get("undecryptable_wait_s") or HOLD_UNDECRYPTABLE_S)
        self.crypto: MatrixCrypto | None = None
        self._held: dict[tuple[str, str], list[tuple[float, dict[str, Any]]]] = {}
        self._recheck_held = False
        self._noticed: dict[str, float] = {}
        self._unencrypted_warned: set[str] = set()
        self._turn_replies: dict[str, dict[str, Any]] = {}
        self._image_sends: set[Deferred] = set()
        self._allow_private_media = bool(extra.get("allow_private_media_urls", False))
        self._ready = False
        self._ready_waiters: list[Deferred] = []

    # -- service ------------------------------------------------------------------------------

    def fleet_identity(self) -> str | None:
        """
        The account on its homeserver (with the device when configured): two /sync loops
        would both receive every event, and the E2EE state is single-writer per device.
        """
        who = self._login_user or ("token-sha256:" + hashlib.sha256(
            (self.access_token or "").encode()).hexdigest())
        return f"{self.homeserver}:{who}:{self.device_id or ''}"

    def resume_cursor(self) -> dict[str, Any] | None:
        return None if self._since is None else {"next_batch": self._since}

    def restore_cursor(self, cursor: dict[str, Any]) -> None:
        since = cursor.get("next_batch")
        if isinstance(since, str) and since:
            self._restored_since = since

    def _resume_from(self, saved: str | None) -> str | None:
        # The fleet's token (the last holder's) wins over this host's file, which is only as
        # new as this host's last turn as holder.
        return self._restored_since or saved

    def startService(self) -> None:
        super().startService()
        if self._http is None:
            self._pool = make_pool(self.reactor, max_per_host=4)
            self._http = treq.client.HTTPClient(Agent(self.reactor, pool=self._pool,
                                                      connectTimeout=10))
        self._state = "connecting"
        self.report_state(PlatformState.CONNECTING)
        self._stopping = False
        self._loop = ensureDeferred(self._run())
        self._loop.addErrback(self._loop_ended)

    def _loop_ended(self, failure: Any) -> None:
        if failure.check(CancelledError):
            return
        self._state = f"disabled: {failure.getErrorMessage()}"
        if failure.check(MatrixFatal):
            # A setting that cannot work names itself ("MATRIX_DEVICE_ID: ..."); anything
            # else fatal is the homeserver refusing our credentials.
            message = failure.getErrorMessage()
            key, sep, _ = message.partition(": ")
            if sep and _SETTING_NAME.fullmatch(key):
                # The detail starts with the key, so /status and the log name it.
                self.report_state(PlatformState.DISABLED, reason="invalid_config",
                                  detail=message)
            else:
                self.report_state(PlatformState.DISABLED, reason="auth_failed", detail=message)
        else:
            self.report_state(PlatformState.FAILED, error_code=error_code_of(failure))
        if failure.check(MatrixFatal):
            self.log.error("Matrix disabled: {reason}", reason=failure.getErrorMessage())
        else:
            self.log.failure("Matrix sync loop ended", failure)

    def stopService(self) -> Deferred:
        """
        Cancel the long-poll and every in-flight call (closing their connections), wait for a
        state-file write still running in its thread, then close the pool.  Fires when done.
        """
        super().stopService()
        self._stopping = True
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.cancel()
        self._http_calls.cancel_all()
        self._ready = False
        for waiter in list(self._ready_waiters):
            waiter.cancel()
        for send in list(self._image_sends):
            send.cancel()
        self._state = "stopped"
        d = DeferredList(list(self._io_pending))
        crypto, self.crypto = self.crypto, None
        if crypto is not None:
            d.addCallback(lambda _: crypto.store.close())
        if self._pool is not None:
            d.addCallback(lambda _: self._pool.closeCachedConnections())
        return d.addCallback(lambda _: None)

    # -- HTTP -------------------------------------------------------------------------------

    async def _call(self, method: str, path: str, body: Any = None,
                    query: dict[str, str] | None = None, timeout: float = 60.0,
                    auth: bool = True) -> dict[str, Any]:
        """One CS API call.  Returns the JSON body; raises L{MatrixError} on a non-2xx status."""
        headers = {"Authorization": [f"Bearer {self.access_token}"]} if auth else {}
        kwargs: dict[str, Any] = {"headers": headers, "params": query}
        if body is not None:
            kwargs["json"] = body
        if self._stopping:
            raise CancelledError("the Matrix adapter is stopping")
        d = self._http.request(method, self.homeserver + "/_matrix/client/v3" + path,
                               **kwargs)
        d.addTimeout(timeout, self.clock)
        try:
            response = await self._http_calls.track(d)
            raw = read_body(response, max_bytes=MAX_RESPONSE_BYTES)
            raw.addTimeout(timeout, self.clock)
            data = await self._http_calls.track(raw)
        except Exception as e:
            raise_if_cancelled(e)
            raise
        try:
            parsed = json.loads(data) if data else {}
        except ValueError:
            parsed = {"error": data[:200].decode("utf-8", "replace")}
        if not 200 <= response.code < 300:
            raise MatrixError(response.code, parsed if isinstance(parsed, dict) else {})
        return parsed if isinstance(parsed, dict) else {}

    def _sleep(self, seconds: float) -> Deferred:
        return deferLater(self.clock, seconds, lambda: None)

    # -- the sync loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        self._ready = False
        await self._login()
        await self._start_crypto()
        self._ready = True
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        await poll_forever(self._sync, self._deliver, self._sync_failed, clock=self.clock)

    async def _sync(self) -> dict[str, Any]:
        query = {"timeout": str(self.sync_timeout_ms if self._since else 0),
                 "filter": SYNC_FILTER}
        if self._since:
            query["since"] = self._since
        return await self._call("GET", "/sync", query=query,
                                timeout=self.sync_timeout_ms / 1000 + 30)

    async def _start_crypto(self) -> None:
        if self.e2ee_mode == "off":
            self.log.info("Matrix encryption is off (device {device_id})",
                          device_id=self.device_id)
            return
        if not self.device_id:
            raise MatrixFatal("MATRIX_DEVICE_ID: encryption needs this device's id, and the "
                              "homeserver did not report one for the access token; set "
                              "MATRIX_DEVICE_ID to the token's device")
        try:
            from hermes_twisted.platforms.matrix.crypto import CryptoError, MatrixCrypto
            from hermes_twisted.platforms.matrix.cryptostore import (
                CryptoStore,
                StoreLocked,
                store_directory,
            )
        except ImportError as e:
            if self.e2ee_mode == "required":
                raise MatrixFatal(f"MATRIX_E2EE_MODE=required but the crypto library is "
                                  f"missing ({e}); install vodozemac") from None
            self.log.warn("Matrix encryption unavailable ({error}); continuing without it",
                          error=str(e))
            return
        store = CryptoStore(store_directory(self._state_dir, self.user_id, self.device_id),
                            secret=self._store_key, run_in_thread=self._run_in_thread)
        from hermes_twisted.platforms.matrix.backup import (
            KeyBackup,
            RecoveryKeyError,
            decode_recovery_key,
        )
        try:
            backup = KeyBackup(self._recovery_key, self._call) if self._recovery_key else None
            recovery = decode_recovery_key(self._recovery_key) if self._recovery_key else None
        except RecoveryKeyError as e:
            raise MatrixFatal(f"MATRIX_RECOVERY_KEY: {e}") from None
        crypto = MatrixCrypto(user_id=self.user_id, device_id=self.device_id, store=store,
                              call=self._call, clock=self.clock, trust=self.e2ee_trust,
                              allowed=lambda user: is_allowed(user, self._allowlist()),
                              backup=backup, recovery_key=recovery)
        try:
            await crypto.start()
        except RecoveryKeyError as e:
            await store.close()
            raise MatrixFatal(f"MATRIX_RECOVERY_KEY: {e}") from None
        except (CryptoError, StoreLocked) as e:
            await store.close()
            raise MatrixFatal(str(e)) from None
        except BaseException:
            await store.close()
            raise
        self._adopt_crypto(crypto)
        self.log.info("Matrix encryption is {mode}: device {device_id} (cross-signing: "
                      "{signed}), {keys} room keys held, {waiting} events waiting for a room "
                      "key", mode=self.e2ee_mode, device_id=self.device_id,
                      signed=crypto.cross_signing.state if crypto.cross_signing else "off",
                      keys=crypto.room_key_count,
                      waiting=sum(len(events) for events in self._held.values()))

    def _adopt_crypto(self, crypto: MatrixCrypto) -> None:
        """Use C{crypto}, and take back the events its store held for a missing room key."""
        self.crypto = crypto
        self._recheck_held = True
        self._held = {}
        for row in crypto.held_events():
            self._held.setdefault((row["room_id"], row["session_id"]), []).append(
                (row["held_at"], row["event"]))

    async def _deliver(self, batch: dict[str, Any]) -> None:
        self._state = "connected"
        self.report_state(PlatformState.CONNECTED)
        arrived: set[tuple[str, str]] = set()
        if self.crypto is not None:
            arrived = await self.crypto.receive_sync(batch)
            await self.crypto.flush()  # keys first: the server will not resend them
        await self._handle_batch(batch, replay=self._since is None)
        if self.crypto is not None:
            if self._recheck_held:
                # Keys that came just before a restart cut the retry short.
                self._recheck_held = False
                arrived |= {ref for ref in self._held if self.crypto.has_room_key(*ref)}
            arrived |= await self.crypto.recover(set(self._held))
            await self._retry_held(arrived)
            await self._request_held_keys()
            await self.crypto.cancel_requests(arrived)
            await self.crypto.upload_backup()
            await self._expire_held()
            await self.crypto.flush()
        self._since = batch.get("next_batch") or self._since
        await self._save_since(self._since)

    def _sync_failed(self, error: Exception, failures: int) -> float:
        if isinstance(error, MatrixError):
            if error.code in (401, 403) and error.errcode in ("M_UNKNOWN_TOKEN", "M_FORBIDDEN"):
                raise MatrixFatal(f"the homeserver rejected the access token ({error.errcode})")
            delay = retry_after(error) or exponential_delay(failures, maximum=60)
            described = str(error)
            code = f"http_{error.code}"
        else:
            delay = exponential_delay(failures, maximum=60)
            self._state = "connecting"
            described = repr(error)
            code = error_code_of(error)
        self.report_state(PlatformState.RECONNECTING, attempt=failures, retry_in=delay,
                          error_code=code)
        self.log.warn("Matrix sync failed ({error}); retrying in {delay:.1f}s",
                      error=described, delay=delay)
        return delay

    async def _login(self) -> None:
        """
        Authenticate, keeping one device for the life of C{$HERMES_HOME}: a password login
        stores its access token and device id in the state file, and the next start reuses
        them (or, when the token was revoked, logs in again I{as the same device}), so a
        restart never registers a new device.  With a configured token the token's device
        wins over C{MATRIX_DEVICE_ID} (a mismatch is logged).
        """
        while True:
            try:
                if self._configured_token:
                    who = await self._call("GET", "/account/whoami")
                    self.user_id = who["user_id"]
                    token_device = who.get("device_id")
                    if token_device and self.device_id and token_device != self.device_id:
                        self.log.warn("MATRIX_DEVICE_ID {configured} differs from the access "
                                      "token's device {device}; using the token's device",
                                      configured=self.device_id, device=token_device)
                    self.device_id = token_device or self.device_id
                    self._since = self._resume_from((await self._load_state()).get("since"))
                else:
                    saved = await self._load_state()
                    self._since = self._resume_from(saved.get("since"))
                    await self._password_login(saved)
                self.log.info("Matrix logged in as {user_id} (device {device_id})",
                              user_id=self.user_id, device_id=self.device_id)
                return
            except CancelledError:
                raise
            except MatrixError as e:
                if e.code in (401, 403):
                    raise MatrixFatal(f"login refused ({e.errcode or e.code})")
                self.log.warn("Matrix login failed ({error}); retrying", error=str(e))
            except Exception as e:
                self.log.warn("Matrix homeserver unreachable ({error}); retrying",
                              error=repr(e))
            await self._sleep(5.0)

    async def _password_login(self, saved: dict[str, Any]) -> None:
        same_account = (saved.get("homeserver") == self.homeserver
                        and saved.get("login_user") == self._login_user)
        if same_account and saved.get("device_id"):
            if not self.device_id:
                self.device_id = saved["device_id"]
            elif self.device_id != saved["device_id"]:
                self.log.warn("MATRIX_DEVICE_ID {configured} replaces the stored device "
                              "{device}", configured=self.device_id, device=saved["device_id"])
                same_account = False
        if same_account and saved.get("access_token"):
            self.access_token = saved["access_token"]
            try:
                who = await self._call("GET", "/account/whoami")
                if who.get("device_id") in (None, self.device_id):
                    self.user_id = who["user_id"]
                    return
            except MatrixError as e:
                if e.code not in (401, 403):
                    raise
                self.log.info("Matrix: the stored access token was revoked; logging in "
                              "again as device {device}", device=self.device_id)
            self.access_token = None
        body = {"type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": self._login_user},
                "password": self._password,
                "initial_device_display_name": "hermes-twisted"}
        if self.device_id:
            body["device_id"] = self.device_id
        reply = await self._call("POST", "/login", body, auth=False)
        self.access_token = reply["access_token"]
        self.device_id = reply.get("device_id") or self.device_id
        self.user_id = reply.get("user_id", self.user_id)
        await self._save_state()

    def _state_path(self) -> str:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", self._login_user or self.user_id or "bot")
        return os.path.join(self._state_dir, f"{name}.json")

    async def _load_state(self) -> dict[str, Any]:
        """The state file's content (sync token, and the device of a password login)."""
        path = self._state_path()

        def load() -> dict[str, Any]:
            try:
                with open(path) as f:
                    data = json.load(f)
                return data if isinstance(data, dict) else {}
            except FileNotFoundError:
                return {}
            except (OSError, ValueError) as e:
                self.log.warn("Matrix state {path} unreadable ({error}); starting fresh",
                              path=path, error=repr(e))
                return {}

        return await self._io(load)

    async def _save_since(self, since: str | None) -> None:
        self._since = since
        await self._save_state()

    async def _save_state(self) -> None:
        path = self._state_path()
        state: dict[str, Any] = {"since": self._since}
        if not self._configured_token and self.access_token:
            # A password login's device, kept so the next start is the same device.
            state.update(homeserver=self.homeserver, login_user=self._login_user,
                         user_id=self.user_id, device_id=self.device_id,
                         access_token=self.access_token)

        def save() -> None:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            # mkstemp creates the file 0600: it may hold the access token
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

        await self._io(save)

    def _io(self, fn: Any) -> Deferred:
        """
        Run blocking file work in a thread.  The returned Deferred may be cancelled (the loop
        moves on), but the thread cannot be: stopService waits for it through C{_io_pending}.
        """
        inner = self._run_in_thread(fn)
        self._io_pending.add(inner)
        outer: Deferred = Deferred()

        def settle(result: Any) -> None:
            self._io_pending.discard(inner)
            if not outer.called:
                outer.callback(result) if not isinstance(result, Failure) else outer.errback(result)
            elif isinstance(result, Failure):
                self.log.failure("Matrix state write failed after stop", result)

        inner.addBoth(settle)
        return outer

    async def _handle_batch(self, batch: dict[str, Any], replay: bool) -> None:
        rooms = batch.get("rooms") if isinstance(batch.get("rooms"), dict) else {}
        for room_id, room in (rooms.get("invite") or {}).items():
            try:
                await self._maybe_join(room_id, room)
            except CancelledError:
                raise
            except Exception:
                self.log.failure("Matrix: could not handle the invite to {room}", room=room_id)
        for room_id, room in (rooms.get("join") or {}).items():
            if not isinstance(room, dict):
                continue
            summary = room.get("summary") or {}
            if isinstance(summary.get("m.joined_member_count"), int):
                self._members[room_id] = summary["m.joined_member_count"]
            if replay:
                continue  # the first start does not answer the room history
            for raw in (room.get("timeline") or {}).get("events") or []:
                raw = await self._decrypted(room_id, raw)
                if raw is None:
                    continue
                try:
                    event = self._to_event(room_id, raw)
                except Exception:
                    self.log.failure("Matrix: skipping a malformed event in {room}",
                                     room=room_id)
                    continue
                if event is not None:
                    await self.deliver_inbound(event)

    async def _decrypted(self, room_id: str, raw: Any, held_at: float | None = None
                         ) -> dict[str, Any] | None:
        """
        The event to hand on: decrypted when it was encrypted, None when it cannot be (yet:
        then it is held until its room key arrives, keeping C{held_at} when it was held
        before) or when C{required} mode refuses an unencrypted room.
        """
        if not isinstance(raw, dict) or raw.get("sender") == self.user_id:
            return raw
        if raw.get("type") != "m.room.encrypted":
            if (raw.get("type") == "m.room.message" and self.crypto is not None
                    and self.crypto.is_encrypted(room_id)):
                # Encrypted stays encrypted: a plaintext message in an encrypted room is
                # not from a client of that room (the server could have made it up).
                self.log.warn("Matrix: ignoring an unencrypted message in encrypted room "
                              "{room}", room=room_id)
                return None
            if (self.e2ee_mode == "required" and raw.get("type") == "m.room.message"
                    and not (self.crypto and self.crypto.is_encrypted(room_id))):
                if room_id not in self._unencrypted_warned:
                    self._unencrypted_warned.add(room_id)
                    self.log.warn("Matrix: not answering in unencrypted room {room} "
                                  "(MATRIX_E2EE_MODE=required)", room=room_id)
                return None
            return raw
        if self.crypto is None:
            return None
        from hermes_twisted.platforms.matrix.crypto import DecryptionFailed, MissingRoomKey
        try:
            return await self.crypto.decrypt_room_event(room_id, raw)
        except MissingRoomKey as e:
            self._hold(room_id, e.session_id, raw, held_at)
        except DecryptionFailed as e:
            self.log.warn("Matrix: cannot decrypt {event} in {room}: {error}",
                          event=raw.get("event_id"), room=room_id, error=str(e))
        return None

    def _hold(self, room_id: str, session_id: str, raw: dict[str, Any],
              held_at: float | None = None) -> None:
        """
        Keep C{raw} until its room key arrives: in memory and in the crypto store (written
        with the batch's other crypto changes, before its sync token), at most
        L{MAX_HELD_EVENTS}, the oldest session's events dropped first.
        """
        if any(held.get("event_id") == raw.get("event_id")
               for _, held in self._held.get((room_id, session_id), ())):
            return  # redelivered while held
        if sum(len(v) for v in self._held.values()) >= MAX_HELD_EVENTS:
            oldest = min(self._held, key=lambda ref: self._held[ref][0][0])
            for _, dropped in self._held.pop(oldest):
                self.crypto.forget_held(dropped)
            self.log.warn("Matrix: too many events waiting for room keys; dropped those of "
                          "session {session} in {room}", session=oldest[1], room=oldest[0])
        # A retry that still lacks the key (index too low) keeps its age, so it expires.
        now = self.clock.seconds() if held_at is None else held_at
        self._held.setdefault((room_id, session_id), []).append((now, raw))
        self.crypto.remember_held(room_id, session_id, now, raw)
        self.log.info("Matrix: holding {event} in {room} until its room key arrives",
                      event=raw.get("event_id"), room=room_id)

    async def _request_held_keys(self) -> None:
        """Ask the sender's devices for the keys of held events (once per session)."""
        for (room_id, _), events in list(self._held.items()):
            try:
                await self.crypto.request_key(room_id, events[0][1])
            except CancelledError:
                raise
            except Exception as e:
                self.log.warn("Matrix: could not request a room key: {error}", error=repr(e))

    async def _retry_held(self, arrived: set[tuple[str, str]]) -> None:
        for ref in arrived:
            for held_at, raw in self._held.pop(ref, []):
                self.crypto.forget_held(raw)
                event = None
                decrypted = await self._decrypted(ref[0], raw, held_at)
                if decrypted is not None:
                    event = self._to_event(ref[0], decrypted)
                if event is not None:
                    await self.deliver_inbound(event)

    async def _expire_held(self) -> None:
        """Events whose key never came (or was withheld) get one notice per room and window."""
        now = self.clock.seconds()
        for ref in list(self._held):
            first = self._held[ref][0][0]
            withheld = self.crypto.withheld_code(*ref)
            if withheld is None and now - first < self.hold_seconds:
                continue
            events = self._held.pop(ref)
            for _, raw in events:
                self.crypto.forget_held(raw)
            room_id = ref[0]
            self.log.warn("Matrix: gave up on {count} undecryptable event(s) in {room} "
                          "({why})", count=len(events), room=room_id,
                          why=f"withheld: {withheld}" if withheld else "no room key")
            if now - self._noticed.get(room_id, -1e18) >= self.hold_seconds:
                self._noticed[room_id] = now
                await self.send(room_id, UNDECRYPTABLE_NOTICE, metadata={"notice": True})

    async def _maybe_join(self, room_id: str, room: dict[str, Any]) -> None:
        inviter = None
        for ev in (room.get("invite_state") or {}).get("events") or []:
            if (isinstance(ev, dict) and ev.get("type") == "m.room.member"
                    and ev.get("state_key") == self.user_id):
                inviter = ev.get("sender")
        allowed = self._room_allowed(room_id) and (
            self.settings.allow_all_users
            or (self.gateway_config is not None and self.gateway_config.allow_all_users)
            or is_allowed(inviter, self._allowlist()) or room_id in self.allowed_rooms)
        if not (self.auto_join and allowed):
            self.log.info("Matrix: ignoring invite to {room} from {inviter}", room=room_id,
                          inviter=inviter)
            return
        await self._call("POST", f"/join/{quote(room_id, safe='')}", {})
        self.log.info("Matrix: joined {room} (invited by {inviter})", room=room_id,
                      inviter=inviter)

    def _allowlist(self) -> tuple[str, ...]:
        extra = self.gateway_config.allowed_users if self.gateway_config else ()
        return tuple(self.settings.allowed_users) + tuple(extra)

    def _room_allowed(self, room_id: str) -> bool:
        return not self.allowed_rooms or room_id in self.allowed_rooms

    def _to_event(self, room_id: str, raw: Any) -> MessageEvent | None:
        if not isinstance(raw, dict) or raw.get("type") != "m.room.message":
            return None
        sender, content = raw.get("sender"), raw.get("content")
        if sender == self.user_id or not isinstance(content, dict) or not self._room_allowed(room_id):
            return None
        relates = content.get("m.relates_to") if isinstance(content.get("m.relates_to"), dict) else {}
        if relates.get("rel_type") == "m.replace":
            return None  # an edit of an older message, not a new turn
        msgtype, body = content.get("msgtype"), content.get("body")
        media = media_message(content, self.max_media_bytes, self._fetcher)
        if media is not None:
            body, message_type, part = media
        elif msgtype not in ("m.text", "m.emote") or not isinstance(body, str):
            return None  # notices come from bots
        is_dm = self._members.get(room_id, 0) == 2
        if not is_dm and self.require_mention and room_id not in self.free_response_rooms:
            body = self._strip_mention(body)
            if body is None:
                return None
        text = f"* {sender} {body}" if msgtype == "m.emote" else body
        thread_id = relates.get("event_id") if relates.get("rel_type") == "m.thread" else None
        if thread_id is None and (self.dm_auto_thread if is_dm else self.auto_thread):
            # 0.19.0's auto-thread: a top-level message roots a thread for the answer (and so
            # a session of its own, by the session-key rules for threads).
            thread_id = raw.get("event_id")
        source = SessionSource(Platform.MATRIX, room_id, chat_type="dm" if is_dm else "group",
                               user_id=sender, user_name=sender.split(":")[0].lstrip("@"),
                               thread_id=thread_id, message_id=raw.get("event_id"))
        event = MessageEvent(text=text, source=source, message_id=raw.get("event_id"),
                             raw_message=raw,
                             metadata={"dedupe_key": f"matrix:{raw.get('event_id')}"})
        if media is not None:
            # Enough to find the attachment again after a restart: the event (its key stays
            # in the crypto store), never the file's own key.
            part.ref = {"room_id": room_id, "event_id": raw.get("event_id")}
            event.message_type, event.media = message_type, [part]
            event.media_types = [part.mime_type]
        return event

    def media_fetcher(self, ref: dict[str, Any]) -> Any:
        """
        The fetcher of an attachment replayed after a restart: it waits until the adapter
        has logged in (and opened its crypto store), fetches the event again, decrypts it
        when it was encrypted, and downloads the file as the first time.
        """
        room_id, event_id = ref.get("room_id"), ref.get("event_id")
        if not (isinstance(room_id, str) and isinstance(event_id, str)):
            return None

        def fetch(cap: int) -> Deferred:
            return ensureDeferred(self._fetch_again(room_id, event_id, cap))
        return fetch

    def _when_ready(self) -> Deferred:
        """Fires once logged in and the crypto started; cancelling stops waiting."""
        if self._ready:
            return succeed(None)
        waiter: Deferred = Deferred(lambda d: self._ready_waiters.remove(d))
        self._ready_waiters.append(waiter)
        return waiter

    async def _fetch_again(self, room_id: str, event_id: str, cap: int) -> bytes:
        await self._when_ready()
        raw = await self._call("GET", f"/rooms/{quote(room_id, safe='')}/event/"
                                      f"{quote(event_id, safe='')}")
        if raw.get("type") == "m.room.encrypted":
            if self.crypto is None:
                raise MediaError("the attachment is encrypted and encryption is off")
            raw = await self.crypto.decrypt_room_event(room_id, raw)
        content = raw.get("content") if isinstance(raw.get("content"), dict) else {}
        media = media_message(content, self.max_media_bytes, self._fetcher)
        if media is None:
            raise MediaError("the event no longer carries an attachment")
        return await media[2].fetch(cap)

    def _fetcher(self, mxc: Any, encrypted: dict[str, Any] | None, max_bytes: int) -> Any:
        """C{fetch(cap)} for one attachment: download it, then decrypt it in a thread."""
        def fetch(cap: int) -> Deferred:
            return ensureDeferred(self._download(mxc, encrypted, min(cap, max_bytes)))
        return fetch

    async def _download(self, mxc: Any, encrypted: dict[str, Any] | None, cap: int) -> bytes:
        url = self.homeserver + download_path(mxc)
        d = self._http.request("GET", url,
                               headers={"Authorization": [f"Bearer {self.access_token}"]})
        d.addTimeout(60, self.clock)
        try:
            response = await self._http_calls.track(d)
            raw = read_body(response, max_bytes=cap)
            raw.addTimeout(120, self.clock)
            data = await self._http_calls.track(raw)
        except Exception as e:
            raise_if_cancelled(e)
            raise
        if response.code != 200:
            raise MediaError(f"the media download answered HTTP {response.code}")
        if encrypted is not None:
            from hermes_twisted.platforms.matrix.attachments import decrypt_attachment
            data = await self._run_in_thread(decrypt_attachment, data, encrypted)
        return data

    def _strip_mention(self, body: str) -> str | None:
        local = (self.user_id or "").split(":")[0].lstrip("@")
        for name in filter(None, (self.user_id, local)):
            m = re.match(rf"^\s*@?{re.escape(name)}[:,]?\s+", body, re.I)
            if m:
                return body[m.end():]
            if name.lower() in body.lower():
                return body
        return None

    # -- outbound -----------------------------------------------------------------------------

    def _next_txn(self) -> str:
        self._txn += 1
        return f"hermes{int(self.clock.seconds() * 1000)}.{self._txn}"

    @staticmethod
    def _content(text: str, notice: bool = False) -> dict[str, Any]:
        content: dict[str, Any] = {"msgtype": "m.notice" if notice else "m.text", "body": text}
        if has_markup(text):
            content["format"] = "org.matrix.custom.html"
            content["formatted_body"] = markdown_to_html(text)
        return content

    def send(self, chat_id: str, content: str, reply_to: str | None = None,
             metadata: dict[str, Any] | None = None) -> Deferred:
        """Send C{content} to room C{chat_id}.  Fires with a L{SendResult}; never fails."""
        metadata = metadata or {}
        if not self.running:
            return succeed(SendResult.failed("Matrix is not running", kind="transient",
                                             retryable=True))
        body = self._content(content, notice=bool(metadata.get("notice")))
        thread_id = metadata.get("thread_id")
        if thread_id:
            body["m.relates_to"] = {"rel_type": "m.thread", "event_id": thread_id,
                                    "is_falling_back": True,
                                    "m.in_reply_to": {"event_id": reply_to or thread_id}}
        elif reply_to:
            body["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
        d = self._put_message(chat_id, body, wait_on_limit=True)
        if not metadata.get("notice"):
            d.addCallback(self._remember_reply, chat_id, content, thread_id)
        return d

    def _remember_reply(self, result: SendResult, chat_id: str, text: str,
                        thread_id: str | None) -> SendResult:
        if result.success and result.message_id:
            turn = self._turn_replies.setdefault(chat_id, {"thread_id": thread_id, "texts": {}})
            turn["texts"][result.message_id] = text
        return result

    def on_turn_finished(self, chat_id: str, session_key: str, delivered: bool) -> None:
        """Images the agent linked in its reply (C{![alt](https://...)}) follow as images."""
        turn = self._turn_replies.pop(chat_id, None)
        if not delivered or turn is None or not self.running:
            return
        links: dict[str, str] = {}
        for text in turn["texts"].values():
            for alt, url in IMAGE_LINK.findall(text):
                links.setdefault(url, alt)
        for url, alt in list(links.items())[:MAX_REPLY_IMAGES]:
            d = ensureDeferred(self._send_image(chat_id, url, alt, turn["thread_id"]))
            self._image_sends.add(d)
            d.addBoth(self._image_sent, d, url)

    def _image_sent(self, result: Any, d: Deferred, url: str) -> None:
        self._image_sends.discard(d)
        if isinstance(result, Failure) and not result.check(CancelledError):
            self.log.warn("Matrix: could not send the image {url}: {error}", url=url,
                          error=result.getErrorMessage())

    async def _send_image(self, room_id: str, url: str, alt: str,
                          thread_id: str | None) -> None:
        """
        Download C{url} (http(s), public hosts only, capped), upload it (encrypted in an
        encrypted room, as C{application/octet-stream} so the server learns nothing) and send
        it as C{m.image}.  Fails with L{MediaError} for a refused URL or a non-image.
        """
        check_public_url(url, allow_private=self._allow_private_media)
        d = self._http.request("GET", url)
        d.addTimeout(60, self.clock)
        try:
            response = await self._http_calls.track(d)
            raw = read_body(response, max_bytes=self.max_media_bytes)
            raw.addTimeout(120, self.clock)
            data = await self._http_calls.track(raw)
        except Exception as e:
            raise_if_cancelled(e)
            raise
        mime = (response.headers.getRawHeaders(b"content-type") or [b""])[0].decode(
            "latin-1").split(";")[0].strip().lower()
        if response.code != 200 or not mime.startswith("image/"):
            raise MediaError(f"HTTP {response.code}, {mime or 'no content type'}")
        name = url.rsplit("/", 1)[-1].split("?")[0] or "image"
        content: dict[str, Any] = {"msgtype": "m.image", "body": alt or name,
                                   "info": {"mimetype": mime, "size": len(data)}}
        if self.crypto is not None and self.crypto.is_encrypted(room_id):
            from hermes_twisted.platforms.matrix.attachments import encrypt_attachment
            ciphertext, file = await self._run_in_thread(encrypt_attachment, data)
            file["url"] = await self._upload(ciphertext, "application/octet-stream", None)
            content["file"] = file
        else:
            content["url"] = await self._upload(data, mime, name)
        if thread_id:
            content["m.relates_to"] = {"rel_type": "m.thread", "event_id": thread_id,
                                       "is_falling_back": True,
                                       "m.in_reply_to": {"event_id": thread_id}}
        result = await self._put_message(room_id, content, wait_on_limit=True)
        if not result.success:
            raise MediaError(result.error or "send failed")

    async def _upload(self, data: bytes, mime: str, name: str | None) -> str:
        """Upload to the media repository.  Returns the C{mxc://} URI."""
        query = {"filename": name} if name else None
        d = self._http.request("POST", self.homeserver + "/_matrix/media/v3/upload",
                               data=data, params=query,
                               headers={"Authorization": [f"Bearer {self.access_token}"],
                                        "Content-Type": [mime]})
        d.addTimeout(120, self.clock)
        try:
            response = await self._http_calls.track(d)
            body = await self._http_calls.track(read_body(response, max_bytes=64 * 1024))
        except Exception as e:
            raise_if_cancelled(e)
            raise
        reply = json.loads(body or b"{}")
        if response.code != 200 or not isinstance(reply.get("content_uri"), str):
            raise MediaError(f"upload failed: HTTP {response.code}")
        return reply["content_uri"]

    def edit_message(self, chat_id: str, message_id: str, content: str,
                     finalize: bool = False) -> Deferred:
        """Replace a sent message (C{m.replace}).  Fires with a L{SendResult}; never fails."""
        if not self.running:
            return succeed(SendResult.failed("Matrix is not running", kind="transient",
                                             retryable=True))
        new = self._content(content)
        body = dict(new, body="* " + content,
                    **({"formatted_body": "* " + new["formatted_body"]}
                       if "formatted_body" in new else {}))
        body["m.new_content"] = new
        body["m.relates_to"] = {"rel_type": "m.replace", "event_id": message_id}
        turn = self._turn_replies.get(chat_id)
        if turn is not None and message_id in turn["texts"]:
            turn["texts"][message_id] = content
        return self._put_message(chat_id, body, wait_on_limit=False)

    def _put_message(self, room_id: str, body: dict[str, Any], wait_on_limit: bool) -> Deferred:
        async def put() -> SendResult:
            delay = 0.0
            for attempt in (1, 2):
                kind, payload = "m.room.message", body
                try:
                    if delay:
                        # Tracked like a call, so a stop ends the wait at once.
                        await self._http_calls.track(self._sleep(delay))
                    if self.crypto is not None and self.crypto.is_encrypted(room_id):
                        kind = "m.room.encrypted"
                        payload = await self.crypto.encrypt(room_id, "m.room.message", body)
                    path = f"/rooms/{quote(room_id, safe='')}/send/{kind}/{self._next_txn()}"
                    reply = await self._call("PUT", path, payload)
                    return SendResult(True, message_id=reply.get("event_id"), raw_response=reply)
                except CancelledError:
                    if self._stopping:
                        return SendResult.failed("the Matrix adapter is stopping",
                                                 kind="transient", retryable=True)
                    raise
                except MatrixError as e:
                    wait = retry_after(e)
                    if e.errcode == "M_LIMIT_EXCEEDED" or e.code == 429:
                        if wait_on_limit and attempt == 1 and (wait or 1) <= 10:
                            delay = wait or 1.0
                            continue
                        return SendResult.failed(str(e), kind="rate_limited", retryable=True,
                                                 retry_after=wait)
                    self.log.warn("Matrix send to {room} failed: {error}", room=room_id,
                                  error=str(e))
                    kind = {403: "forbidden", 404: "not_found"}.get(e.code, "unknown")
                    return SendResult.failed(str(e), kind=kind)
                except Exception as e:
                    self.log.warn("Matrix send to {room} failed: {error}", room=room_id,
                                  error=repr(e))
                    return SendResult.failed(repr(e), kind="transient", retryable=True)
            return SendResult.failed("rate limited", kind="rate_limited", retryable=True)

        return ensureDeferred(put())

    def send_typing(self, chat_id: str, metadata: dict[str, Any] | None = None) -> Deferred:
        return self._typing(chat_id, True)

    def stop_typing(self, chat_id: str) -> Deferred:
        return self._typing(chat_id, False)

    def _typing(self, room_id: str, on: bool) -> Deferred:
        if not self.user_id or not self.access_token or not self.running:
            return succeed(None)
        body = {"typing": on, "timeout": 30000} if on else {"typing": False}
        d = ensureDeferred(self._call(
            "PUT", f"/rooms/{quote(room_id, safe='')}/typing/{quote(self.user_id, safe='')}",
            body, timeout=10))
        d.addCallback(lambda _: None)

        def failed(f: Any) -> Any:
            if f.check(CancelledError) and not self._stopping:
                return f
            self.log.debug("Matrix typing for {room} failed: {error}", room=room_id,
                           error=f.getErrorMessage())

        return d.addErrback(failed)

    def get_chat_info(self, chat_id: str) -> Deferred:
        async def info() -> dict[str, Any]:
            kind = "dm" if self._members.get(chat_id, 0) == 2 else "group"
            try:
                state = await self._call(
                    "GET", f"/rooms/{quote(chat_id, safe='')}/state/m.room.name", timeout=10)
                return {"name": state.get("name") or chat_id, "type": kind}
            except CancelledError:
                if self._stopping:
                    return {"name": chat_id, "type": kind}
                raise
            except Exception:
                return {"name": chat_id, "type": kind}

        return ensureDeferred(info())


def e2ee_mode(extra: dict[str, Any]) -> str:
    """
    0.19.0's rules: C{MATRIX_E2EE_MODE} wins over the legacy C{MATRIX_ENCRYPTION} switch;
    required/require/true/1/yes/on mean C{required}, optional/prefer/preferred mean
    C{optional}, anything else C{off}.
    """
    mode = extra.get("e2ee_mode")
    if mode in (None, ""):
        return "required" if extra.get("encryption") in (True, "true", "1", "yes") else "off"
    mode = str(mode).strip().lower()
    if mode in ("required", "require", "true", "1", "yes", "on"):
        return "required"
    if mode in ("optional", "prefer", "preferred"):
        return "optional"
    return "off"


def retry_after(error: MatrixError) -> float | None:
    ms = error.body.get("retry_after_ms") if isinstance(error.body, dict) else None
    return ms / 1000.0 if isinstance(ms, (int, float)) and ms >= 0 else None
