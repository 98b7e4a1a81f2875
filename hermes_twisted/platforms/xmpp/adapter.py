# -*- test-case-name: tests.test_xmpp -*-
"""
The XMPP platform: one client stream kept alive by a C{ClientService} (email-xmpp.md §4-§5).

1:1 chats are keyed by the sender's bare JID and answered at the full JID the message came
from; MUC rooms are joined without history and rejoined after every new session, a kick or a
room shutdown.  Replies stream as XEP-0308 corrections of one message, typing is XEP-0085
C{<composing/>}, inbound messages are deduplicated by their XEP-0359 stanza id, and XEP-0198
stream management resumes a dropped stream so that nothing sent meanwhile is lost or
answered twice.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from twisted.application.internet import ClientService
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.ssl import Certificate, optionsForClientTLS, trustRootFromCertificates
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.words.protocols.jabber import error, sasl, xmlstream
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish

from hermes_twisted.config.settings import GatewayConfig, PlatformSettings
from hermes_twisted.model import MessageEvent, Platform, SendResult, SessionSource
from hermes_twisted.net.reconnect import SessionBackoff
from hermes_twisted.platforms.base import PlatformAdapter, is_allowed
from hermes_twisted.platforms.kit.stopping import stop_or_abort
from hermes_twisted.platforms.xmpp import stanzas
from hermes_twisted.platforms.xmpp.stream import (
    NS_SM,
    HermesXmlStream,
    StreamManagement,
    XMPPStreamFactory,
)

#: Bound of stopService: after this the connection is aborted instead of closed.
STOP_TIMEOUT = 5.0
#: Seconds from TCP connect to a bound (or resumed) session before the attempt is dropped.
LOGIN_TIMEOUT = 30.0
#: Seconds between keep-alives (an XEP-0198 <r/>, else an XEP-0199 ping); silence for
#: IDLE_LIMIT means a dead link.
KEEPALIVE_INTERVAL = 60.0
IDLE_LIMIT = 150.0
#: Seconds before rejoining a room we were removed from (kick, shutdown).
REJOIN_DELAY = 5.0
#: XEP-0410: errors to a self-ping that still prove we are in the room.
STILL_JOINED = ("service-unavailable", "feature-not-implemented")
#: The fixed resource: a random one would defeat addressing the bot (§4.1).
RESOURCE = "hermes"
#: Longest body in UTF-8 bytes; XML escaping can grow it fivefold, and servers cap stanzas
#: at 64-256 KiB (§4.6).
MAX_BODY_BYTES = 10000
_MEMORY = 2048  # sent message ids, seen stanza ids and peers' corrections remembered
#: Seconds a 1:1 peer has to answer our disco#info before its message is handed on anyway
#: (and answered without corrections).
DISCO_TIMEOUT = 5.0


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    return [str(v).strip() for v in value if str(v).strip()]


def _as_bool(value: Any, default: bool) -> bool:
    if value is None or value == "":
        return default
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class _Bounded(OrderedDict):
    def remember(self, key: str, value: Any = True) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > _MEMORY:
            self.popitem(last=False)


@dataclass
class Room:
    """One configured MUC room and what we know of it on the current stream."""

    jid: str
    nick: str
    joined: bool = False
    #: nick -> real bare JID (non-anonymous rooms) or None
    occupants: dict[str, str | None] = field(default_factory=dict)
    rejoin: Any = None
    conflicts: int = 0


class XMPPAdapter(PlatformAdapter):
    """
    The XMPP platform.  Settings (C{PlatformSettings.extra}, typed by the config loader):
    C{jid}, C{password}, C{host} and C{port} (default: the JID's domain, 5222; 5223 with
    C{direct_tls}), C{direct_tls} (False: STARTTLS, required), C{ca_file}, C{rooms} (comma
    list of room JIDs), C{nick} (default: the JID's local part), C{require_mention} (True).
    """

    log = Logger()
    platform = Platform.XMPP
    max_message_length = MAX_BODY_BYTES
    supports_edit = True

    def __init__(self, settings: PlatformSettings, *, reactor: Any,
                 gateway_config: GatewayConfig | None = None) -> None:
        super().__init__(settings, reactor=reactor, gateway_config=gateway_config)
        extra = settings.extra
        self.password: str = str(extra.get("password") or "")
        self.direct_tls = _as_bool(extra.get("direct_tls"), False)
        self.require_mention = _as_bool(extra.get("require_mention"), True)
        self.ca_file: str | None = str(extra["ca_file"]) if extra.get("ca_file") else None
        self.jid: JID | None = stanzas.parse_jid(str(extra.get("jid") or "").strip())
        self.host = str(extra.get("host") or (self.jid.host if self.jid else "")).strip()
        self.port = int(extra.get("port") or (5223 if self.direct_tls else 5222))
        local = self.jid.user if self.jid is not None else None
        self.nick = str(extra.get("nick") or local or "hermes").strip()
        self.rooms: dict[str, Room] = {}
        for room in _as_list(extra.get("rooms")):
            room_jid = stanzas.parse_jid(room)
            if room_jid is not None and room_jid.user:
                # "room@service/nick" is accepted too: the resource is the nick there.
                self.rooms[room_jid.userhost()] = Room(room_jid.userhost(),
                                                       room_jid.resource or self.nick)
        self.backoff = SessionBackoff(reactor)
        self.sm = StreamManagement()
        self._xs: HermesXmlStream | None = None  # set once the session is bound/resumed
        self._connection: HermesXmlStream | None = None
        self._peers: dict[str, str] = {}  # bare JID -> full JID last heard from
        self._sent = _Bounded()  # our message id -> (to, type, chat_id)
        self._seen = _Bounded()  # dedupe keys of handled inbound messages
        self._corrections = _Bounded()  # full JID -> its client shows XEP-0308 corrections
        self._disco_waiting: dict[str, list[Deferred]] = {}  # full JID -> held messages
        self._typing: set[str] = set()
        #: The server has taken our available presence (RFC 6121 §4.2.2 reflects it to us):
        #: from then on a message to our bare JID reaches us instead of bouncing.
        self.available = False
        self._keepalive: LoopingCall | None = None
        self._login_timer: Any = None
        self._stopping = False
        self._last_problem: str | None = None
        # XEP-0082 stamps often have whole seconds only: a message held within the second
        # we started must not look older than our start.
        self._started_at = datetime.fromtimestamp(int(reactor.seconds()), timezone.utc)
        self._connector: ClientService | None = None
        self._problem = self._config_problem()
        if self._problem is None:
            assert self.jid is not None
            bound = JID(tuple=(self.jid.user, self.jid.host, self.jid.resource or RESOURCE))
            factory = XMPPStreamFactory(self, bound, self.password, tls=self._tls_options,
                                        direct_tls=self.direct_tls, sm=self.sm)
            self._connector = ClientService(self.build_endpoint(), factory,
                                            retryPolicy=self.backoff, clock=reactor)
            self._connector.setName(f"{self.name}.connection")
            self._connector.setServiceParent(self)

    def _config_problem(self) -> str | None:
        if self.jid is None or not self.jid.user:
            return "XMPP_JID is not set or not a JID (user@domain)"
        if not self.password:
            return "XMPP_PASSWORD is not set"
        try:
            self._tls_options = self._client_tls()
        except Exception as e:
            return f"XMPP_CA_FILE {self.ca_file!r} is unusable: {e}"
        return None

    def _client_tls(self) -> Any:
        """TLS options verifying the JID's domain, against XMPP_CA_FILE when set."""
        assert self.jid is not None
        if not self.ca_file:
            return optionsForClientTLS(self.jid.host)
        pem = Path(self.ca_file).expanduser().read_bytes()
        blocks = [b"-----BEGIN CERTIFICATE-----" + part
                  for part in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]]
        if not blocks:
            raise ValueError("no PEM certificate in it")
        roots = trustRootFromCertificates([Certificate.loadPEM(b) for b in blocks])
        return optionsForClientTLS(self.jid.host, trustRoot=roots)

    def build_endpoint(self) -> Any:
        """TCP to C{host:port}, wrapped in TLS at once for direct TLS (XEP-0368)."""
        endpoint = HostnameEndpoint(self.reactor, self.host, self.port)
        if self.direct_tls:
            endpoint = wrapClientTLS(self._tls_options, endpoint)
        return endpoint

    @staticmethod
    def len_fn(text: str) -> int:
        return len(text.encode("utf-8"))

    @property
    def own_bare(self) -> str:
        return self.jid.userhost() if self.jid is not None else ""

    # -- service ------------------------------------------------------------------------

    def fleet_identity(self) -> str | None:
        """The bare JID: two resources of it would both receive (and answer) traffic."""
        return self.jid.userhost().lower() if self.jid is not None else None

    def startService(self) -> None:
        self._stopping = False
        super().startService()
        if self._problem is not None:
            self.log.error("XMPP platform disabled: {problem}", problem=self._problem)
            return
        self.log.info("XMPP connecting to {host}:{port} as {jid} ({tls})", host=self.host,
                      port=self.port, jid=self.own_bare,
                      tls="direct TLS" if self.direct_tls else "STARTTLS")
        assert self._connector is not None
        self._connector.whenConnected(failAfterFailures=1).addErrback(self._first_attempt_failed)

    def _first_attempt_failed(self, failure: Failure) -> None:
        if failure.check(CancelledError) or self._stopping:
            return
        self._last_problem = failure.getErrorMessage()
        self.log.warn("XMPP server {host}:{port} unreachable ({error}); retrying with backoff",
                      host=self.host, port=self.port, error=self._last_problem)

    def stopService(self) -> Deferred:
        """
        Leave (unavailable presence, stream close), then close the connection and stop
        reconnecting.  Fires with None once the connection is gone; one that does not close
        within L{STOP_TIMEOUT} seconds is aborted.  Never fails.
        """
        self._stopping = True
        for room in self.rooms.values():
            self._cancel_rejoin(room)
        xs = self._xs
        if xs is not None and xs.transport is not None:
            try:
                xs.send(stanzas.presence(kind="unavailable"))
                xs.sendFooter()
            except Exception:
                self.log.failure("while closing the XMPP stream")
        self.sm.forget()  # a closed stream ends the session: nothing to resume
        return stop_or_abort(super().stopService(), self.reactor, STOP_TIMEOUT,
                             self._abort_connection)

    def _abort_connection(self) -> None:
        xs = self._connection
        if xs is not None and xs.transport is not None:
            self.log.warn("XMPP connection did not close within {timeout}s; aborting",
                          timeout=STOP_TIMEOUT)
            xs.transport.abortConnection()

    @property
    def status(self) -> str:
        if self._problem is not None:
            return f"disabled: {self._problem}"
        if not self.running:
            return "stopped"
        if self._xs is not None:
            return "connected"
        if self._last_problem:
            return f"reconnecting ({self._last_problem})"
        return "connecting"

    @property
    def connected_stream(self) -> HermesXmlStream | None:
        return self._xs

    # -- stream callbacks (from XMPPStreamFactory; they must not raise) -------------------

    def _stream_connected(self, xs: HermesXmlStream) -> None:
        self._connection = xs
        self._cancel_login_timer()
        self._login_timer = self.reactor.callLater(LOGIN_TIMEOUT, self._login_timed_out, xs)
        xs.addObserver("/message", self._guarded(self._on_message))
        xs.addObserver("/presence", self._guarded(self._on_presence))
        xs.addObserver("/iq[@type='get']", self._guarded(self._on_iq_request))
        xs.addObserver("/iq[@type='set']", self._guarded(self._on_iq_request))

    def _guarded(self, handler: Any) -> Any:
        def observer(element: domish.Element) -> None:
            try:
                handler(element)
            except Exception:
                self.log.failure("while handling an XMPP {name}", name=element.name)
        return observer

    def _login_timed_out(self, xs: HermesXmlStream) -> None:
        self._login_timer = None
        self.log.warn("XMPP login to {host} did not finish within {timeout}s; reconnecting",
                      host=self.host, timeout=LOGIN_TIMEOUT)
        if xs.transport is not None:
            xs.transport.abortConnection()

    def _cancel_login_timer(self) -> None:
        timer, self._login_timer = self._login_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _stream_ready(self, xs: HermesXmlStream, resumed: bool) -> None:
        self._cancel_login_timer()
        if self._stopping:
            return
        self._xs = xs
        self._last_problem = None
        self.backoff.connection_opened()
        xmlstream.upgradeWithIQResponseTracker(xs)
        self._keepalive = LoopingCall(self._keep_alive, xs)
        self._keepalive.clock = self.reactor
        self._keepalive.start(KEEPALIVE_INTERVAL, now=False)
        if resumed:
            self.log.info("XMPP stream resumed as {jid} ({pending} stanza(s) resent)",
                          jid=xs.authenticator.jid.full(), pending=len(self.sm.unacked))
            for room in self.rooms.values():
                if not room.joined:  # removed before the drop; its rejoin was cancelled
                    self._schedule_rejoin(room)
            return
        self.log.info("XMPP logged in as {jid}", jid=xs.authenticator.jid.full())
        self._typing.clear()
        self.available = False  # a new session: until our presence comes back
        if (NS_SM, "sm") in xs.features:
            enable = domish.Element((NS_SM, "enable"))
            enable["resume"] = "true"
            xs.addOnetimeObserver(f"/enabled[@xmlns='{NS_SM}']", self._sm_enabled)
            xs.addOnetimeObserver(f"/failed[@xmlns='{NS_SM}']", self._sm_refused)
            self.sm.enabling()
            xs.send(enable)
        else:
            self.sm.forget()
        xs.send(stanzas.presence())
        for room in self.rooms.values():
            room.joined = False
            room.occupants.clear()
            self._join(room)

    def _sm_enabled(self, element: domish.Element) -> None:
        resumable = element.getAttribute("resume") in ("true", "1")
        self.sm.enabled(element.getAttribute("id") if resumable else None)
        self.log.info("XMPP stream management on (resumable: {resumable})", resumable=resumable)

    def _sm_refused(self, element: domish.Element) -> None:
        self.sm.forget()
        self.log.warn("XMPP server refused stream management")

    def _stream_failed(self, xs: HermesXmlStream, reason: Failure) -> None:
        self._cancel_login_timer()
        if reason.check(ConnectionLost, ConnectionDone):
            return  # the link dropped mid-login; _stream_lost reports it
        if reason.check(sasl.SASLError):
            problem = f"authentication failed ({reason.value})"
        else:
            problem = f"login failed ({reason.getErrorMessage() or reason.type.__name__})"
        self._last_problem = problem
        self.log.error("XMPP {problem} at {host}:{port}; retrying with backoff",
                       problem=problem, host=self.host, port=self.port)
        if xs.transport is not None:
            xs.transport.loseConnection()

    def _stream_lost(self, xs: HermesXmlStream, reason: Failure) -> None:
        self._cancel_login_timer()
        if self._connection is xs:
            self._connection = None
        if self._xs is not xs:
            # The attempt never reached a session: TLS refused, login failed or timed out.
            if not self._stopping:
                self._last_problem = self._last_problem or reason.getErrorMessage()
                self.log.warn("XMPP connection to {host} ended before login ({reason})",
                              host=self.host, reason=reason.getErrorMessage())
            return
        self._xs = None
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        self._keepalive = None
        for room in self.rooms.values():
            # Still joined if the session resumes; a new session rejoins (_stream_ready).
            self._cancel_rejoin(room)
        self.backoff.connection_lost()
        if self._stopping:
            self.log.info("XMPP connection closed")
            return
        self._last_problem = reason.getErrorMessage()
        self.log.warn("XMPP connection to {host} lost ({reason}); reconnecting "
                      "(resumable: {resumable})", host=self.host, reason=self._last_problem,
                      resumable=self.sm.resume_id is not None)

    def _keep_alive(self, xs: HermesXmlStream) -> None:
        try:
            silent = self.reactor.seconds() - xs.last_heard
            if silent >= IDLE_LIMIT:
                self.log.warn("XMPP server silent for {silent:.0f}s; reconnecting",
                              silent=silent)
                xs.transport.abortConnection()
            elif self.sm.counting:
                xs.request_ack()
            else:
                ping = xmlstream.IQ(xs, "get")
                ping.addElement((stanzas.NS_PING, "ping"))
                ping.send(to=xs.authenticator.jid.host).addErrback(lambda _: None)
            for room in self.rooms.values():
                if room.joined:
                    self._self_ping(xs, room)
        except Exception:
            self.log.failure("while keeping the XMPP stream alive")

    def _self_ping(self, xs: HermesXmlStream, room: Room) -> None:
        # XEP-0410: a room can drop us silently (a restart of the MUC service, a netsplit);
        # pinging our own occupant tells whether we are still in it (§4.1, §7).
        ping = xmlstream.IQ(xs, "get")
        ping.addElement((stanzas.NS_PING, "ping"))
        nick = room.nick

        def answered(failure: Failure) -> None:
            condition = getattr(failure.value, "condition", None)
            if failure.check(error.StanzaError) and condition in STILL_JOINED:
                return  # the ping reached our occupant: still joined
            if not failure.check(error.StanzaError) or xs is not self._xs or not room.joined:
                return  # the stream went away; a new session rejoins anyway
            if room.nick == nick:
                self.log.warn("XMPP self-ping to {room} failed ({condition}); rejoining",
                              room=room.jid, condition=condition)
                room.joined = False
                self._join(room)

        ping.send(to=f"{room.jid}/{nick}").addErrback(answered)

    # -- rooms ----------------------------------------------------------------------------

    def _join(self, room: Room) -> None:
        xs = self._xs
        room.rejoin = None
        if xs is None or self._stopping:
            return
        xs.send(stanzas.presence(f"{room.jid}/{room.nick}", muc_join=True))

    def _cancel_rejoin(self, room: Room) -> None:
        call, room.rejoin = room.rejoin, None
        if call is not None and call.active():
            call.cancel()

    def _schedule_rejoin(self, room: Room) -> None:
        if room.rejoin is None and not self._stopping:
            room.rejoin = self.reactor.callLater(REJOIN_DELAY, self._join, room)

    def _on_presence(self, element: domish.Element) -> None:
        sender = stanzas.parse_jid(element.getAttribute("from"))
        if sender is None:
            return
        kind = element.getAttribute("type")
        room = self.rooms.get(sender.userhost())
        xs = self._connection
        if xs is not None and sender.full() == xs.authenticator.jid.full():
            self.available = kind is None
            return
        if room is None:
            if kind == "subscribe":
                self._answer_subscription(sender)
            return
        codes, item = stanzas.muc_status(element)
        nick = sender.resource or ""
        if kind == "error":
            if stanzas.stanza_error_condition(element) == "conflict" and room.conflicts < 5:
                room.conflicts += 1
                room.nick = f"{room.nick}_"
                self.log.warn("XMPP nick taken in {room}; joining as {nick}", room=room.jid,
                              nick=room.nick)
                self._join(room)
            else:
                self.log.warn("XMPP could not join {room}: {condition}", room=room.jid,
                              condition=stanzas.stanza_error_condition(element))
            return
        own = 110 in codes or nick == room.nick
        if own:
            if kind == "unavailable":
                room.joined = False
                room.occupants.clear()
                self.log.warn("XMPP removed from {room} (status {codes}); rejoining",
                              room=room.jid, codes=sorted(codes))
                self._schedule_rejoin(room)
            else:
                if not room.joined:
                    self.log.info("XMPP joined {room} as {nick}", room=room.jid, nick=nick)
                room.joined = True
                room.nick = nick or room.nick
                if 201 in codes:
                    self._configure_instant_room(room)
            return
        if kind == "unavailable":
            room.occupants.pop(nick, None)
        else:
            real = stanzas.parse_jid(item.getAttribute("jid")) if item is not None else None
            room.occupants[nick] = real.userhost() if real is not None else None

    def _configure_instant_room(self, room: Room) -> None:
        # A new room stays locked until configured (§4.4): accept the defaults.
        xs = self._xs
        if xs is None:
            return
        iq = xmlstream.IQ(xs, "set")
        iq.addElement((stanzas.NS_MUC_OWNER, "query")).addElement(
            (stanzas.NS_DATA, "x"))["type"] = "submit"
        iq.send(to=room.jid).addErrback(self._iq_failed, f"configuring {room.jid}")

    def _iq_failed(self, failure: Failure, what: str) -> None:
        self.log.warn("XMPP {what} failed: {error}", what=what, error=failure.getErrorMessage())

    def _answer_subscription(self, sender: JID) -> None:
        xs = self._xs
        if xs is None:
            return
        bare = sender.userhost()
        if self.settings.allow_all_users or is_allowed(bare, self.settings.allowed_users):
            xs.send(stanzas.presence(bare, kind="subscribed"))
            xs.send(stanzas.presence(bare, kind="subscribe"))
        else:
            xs.send(stanzas.presence(bare, kind="unsubscribed"))

    # -- IQ requests ----------------------------------------------------------------------

    def _on_iq_request(self, element: domish.Element) -> None:
        xs = self._connection
        if xs is None or getattr(element, "handled", False):
            return
        element.handled = True
        payload = next(iter(element.elements()), None)
        uri = payload.uri if payload is not None else None
        if uri == stanzas.NS_PING or (uri == stanzas.NS_ROSTER
                                      and element.getAttribute("type") == "set"):
            xs.send(xmlstream.toResponse(element, "result"))
        elif uri == stanzas.NS_DISCO_INFO and element.getAttribute("type") == "get":
            response = xmlstream.toResponse(element, "result")
            stanzas.disco_info(response.addElement((stanzas.NS_DISCO_INFO, "query")))
            xs.send(response)
        else:
            response = xmlstream.toResponse(element, "error")
            error = response.addElement("error")
            error["type"] = "cancel"
            error.addElement((stanzas.NS_STANZAS, "service-unavailable"))
            xs.send(response)

    # -- inbound messages -----------------------------------------------------------------

    def _on_message(self, element: domish.Element) -> None:
        kind = element.getAttribute("type") or "normal"
        sender = stanzas.parse_jid(element.getAttribute("from"))
        if sender is None or kind in ("error", "headline"):
            if kind == "error":
                self.log.warn("XMPP message error from {sender}: {condition}",
                              sender=element.getAttribute("from"),
                              condition=stanzas.stanza_error_condition(element))
            return
        bare = sender.userhost()
        room = self.rooms.get(bare) if kind == "groupchat" else None
        trusted = {self.own_bare} | ({bare} if room is not None else set())
        msg = stanzas.read_message(element, trusted)
        if msg is None or msg.body is None or not msg.body.strip():
            return  # chat states, markers, receipts
        if kind == "groupchat":
            if room is None or not sender.resource or msg.has_subject:
                return
            if msg.delayed is not None and not self._held_by_our_server(msg):
                return  # room history
            if sender.resource == room.nick or (msg.origin_id and msg.origin_id in self._sent):
                return  # our own message, reflected
            text: str | None = msg.body.strip()
            if self.require_mention:
                text = stanzas.addressed(room.nick, msg.body)
                if not text:
                    return
            user_id = room.occupants.get(sender.resource) or sender.full()
            chat_id, chat_type, user_name = room.jid, "group", sender.resource
        else:
            if bare == self.own_bare:
                return  # another resource of ours (we enable no carbons)
            if (msg.delayed is not None and msg.delayed < self._started_at
                    and not self._on_resumed_stream()):
                self.log.info("XMPP: message from {sender} stamped {stamp}, before the start, "
                              "ignored (offline storage)", sender=sender.full(),
                              stamp=msg.delayed.isoformat())
                return
            text = msg.body.strip()
            if bare in self.rooms:  # a private message through a room
                user_id = chat_id = sender.full()
                user_name = sender.resource or bare
            else:
                self._peers[bare] = sender.full()
                user_id = chat_id = bare
                user_name = sender.user or bare
            chat_type = "dm"
        if msg.stanza_id:
            dedupe = f"{msg.stanza_id_by}:{msg.stanza_id}"
        elif msg.message_id:
            dedupe = f"{sender.full()}:{msg.message_id}"
        else:
            dedupe = None
        if dedupe is not None:
            if dedupe in self._seen:
                self.log.info("XMPP: redelivered message {key} ignored", key=dedupe)
                return
            self._seen.remember(dedupe)
        message_id = msg.stanza_id or msg.message_id or uuid.uuid4().hex
        event = MessageEvent(
            text=text,
            source=SessionSource(platform=Platform.XMPP, chat_id=chat_id, chat_name=chat_id,
                                 chat_type=chat_type, user_id=user_id, user_name=user_name,
                                 message_id=message_id),
            message_id=message_id,
            raw_message={"from": sender.full(), "type": kind, "body": msg.body},
            metadata={"dedupe_key": f"xmpp:{dedupe}"} if dedupe else {},
        )
        # A 1:1 reply streams by corrections only to a client that shows them; the run
        # decides how to deliver as it starts, so the message waits for the peer's answer.
        known = self._corrections_known(sender.full()) if kind != "groupchat" else None
        if known is None:
            admitted = self.deliver_inbound(event)
        else:
            admitted = known.addCallback(lambda _: self.deliver_inbound(event))
        admitted.addErrback(self._delivery_failed, message_id)

    # -- XEP-0308 support of 1:1 peers (XEP-0030) --------------------------------------------

    def _corrections_known(self, full_jid: str) -> Deferred:
        """
        Fires with None once we know whether C{full_jid}'s client shows corrections: at once
        when cached, else after its disco#info answer (or its error, or L{DISCO_TIMEOUT}).
        Never fails.  Messages from one peer are released in their order of arrival.
        """
        if full_jid in self._corrections:
            self._corrections.move_to_end(full_jid)
            return succeed(None)
        waiter: Deferred = Deferred()
        waiting = self._disco_waiting.get(full_jid)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        xs = self._xs
        if xs is None:
            return succeed(None)  # not logged in: nothing to ask with, no correction
        self._disco_waiting[full_jid] = [waiter]
        iq = xmlstream.IQ(xs, "get")
        iq.addElement((stanzas.NS_DISCO_INFO, "query"))
        iq.timeout = DISCO_TIMEOUT
        asked = iq.send(to=full_jid)
        asked.addCallbacks(self._disco_answered, self._disco_failed,
                           callbackArgs=(full_jid,), errbackArgs=(full_jid,))
        asked.addBoth(self._release_waiting, full_jid)
        return waiter

    def _disco_answered(self, result: domish.Element, full_jid: str) -> None:
        query = stanzas.child(result, stanzas.NS_DISCO_INFO, "query")
        features = set() if query is None else {
            feature.getAttribute("var")
            for feature in query.elements(stanzas.NS_DISCO_INFO, "feature")}
        shows = stanzas.NS_CORRECT in features
        self._corrections.remember(full_jid, shows)
        self.log.info("XMPP: {jid} {does} show message corrections", jid=full_jid,
                      does="does" if shows else "does not")

    def _disco_failed(self, failure: Failure, full_jid: str) -> None:
        if failure.check(error.StanzaError, xmlstream.TimeoutError):
            # A client that does not answer disco#info is not one to stream corrections to.
            self._corrections.remember(full_jid, False)
            self.log.info("XMPP: {jid} did not answer disco#info ({error}); answering it "
                          "without corrections", jid=full_jid,
                          error=failure.getErrorMessage() or failure.type.__name__)
        # The stream went away: ask again on the next message.

    def _release_waiting(self, result: Any, full_jid: str) -> None:
        if isinstance(result, Failure):  # a bug above; the messages go on regardless
            self.log.failure("XMPP: while reading {jid}'s disco#info", result, jid=full_jid)
        for waiter in self._disco_waiting.pop(full_jid, []):
            waiter.callback(None)

    def can_edit(self, chat_id: str) -> bool:
        """Rooms: yes.  A 1:1 chat: when the full JID last heard from showed XEP-0308."""
        kind, to, _ = self._route(chat_id)
        if kind == "groupchat":
            return True
        return bool(self._corrections.get(to, False))

    def _on_resumed_stream(self) -> bool:
        # A resumed XEP-0198 session gets no offline storage: what arrives on it with a
        # <delay/> is what the server held for this session while the link was down, and
        # the stamp (the server's clock, often whole seconds) says nothing about our start.
        xs = self._connection
        return xs is not None and xs.resumed

    def _held_by_our_server(self, msg: stanzas.Inbound) -> bool:
        # Room history is stamped by the room (XEP-0045 §7.2.15); a stanza our own server
        # queued for a hibernating session (XEP-0198) is stamped by our account or domain.
        assert self.jid is not None
        return (self._on_resumed_stream()
                and msg.delayed_by in (self.own_bare, self.jid.host))

    def _delivery_failed(self, failure: Failure, message_id: str) -> None:
        if failure.check(CancelledError):
            return
        self.log.failure("while handing XMPP message {message_id} to the gateway", failure,
                         message_id=message_id)

    # -- outbound contract ----------------------------------------------------------------

    def _route(self, chat_id: str) -> tuple[str, str, Room | None]:
        """(message type, address, room) for a chat id."""
        room = self.rooms.get(chat_id)
        if room is not None:
            return "groupchat", chat_id, room
        return "chat", self._peers.get(chat_id, chat_id), None

    def _unusable(self, chat_id: str) -> SendResult | None:
        if stanzas.parse_jid(chat_id or "") is None:
            return SendResult.failed(f"invalid XMPP address {chat_id!r}", kind="bad_format")
        if self._xs is None:
            self.log.warn("XMPP: cannot send to {chat_id}: not connected ({status})",
                          chat_id=chat_id, status=self.status)
            return SendResult.failed("not connected", kind="transient", retryable=True)
        room = self.rooms.get(chat_id)
        if room is not None and not room.joined:
            return SendResult.failed(f"not in room {chat_id}", kind="transient", retryable=True)
        return None

    def _write(self, stanza: domish.Element) -> SendResult | None:
        xs = self._xs
        assert xs is not None
        try:
            xs.send(stanza)
            if self.sm.counting:
                xs.request_ack()
        except Exception as e:
            self.log.failure("while sending an XMPP message")
            return SendResult.failed(str(e) or type(e).__name__, kind="unknown")
        return None

    def send(self, chat_id: str, content: str, reply_to: str | None = None,
             metadata: dict[str, Any] | None = None) -> Deferred:
        """
        Send one message to a bare JID (answered at the full JID last heard from) or a joined
        room.  Fires with a L{SendResult} once the stanza is written (message_id: its id, the
        one corrections refer to); with C{success=False} when not connected or not in the
        room (retryable) or for an invalid address.  Never fails; there is nothing to cancel.
        """
        problem = self._unusable(chat_id)
        if problem is not None:
            return succeed(problem)
        kind, to, _ = self._route(chat_id)
        if self.len_fn(content or "") > self.max_message_length:
            return succeed(SendResult.failed("message too long for XMPP", kind="too_long"))
        stanza_id = uuid.uuid4().hex
        failed = self._write(stanzas.message(to, kind, stanza_id, content or "",
                                             chat_state="active" if kind == "chat" else None))
        if failed is not None:
            return succeed(failed)
        self._typing.discard(chat_id)
        self._sent.remember(stanza_id, (to, kind))
        return succeed(SendResult(True, message_id=stanza_id))

    def edit_message(self, chat_id: str, message_id: str, content: str,
                     finalize: bool = False) -> Deferred:
        """
        Correct a message we sent (XEP-0308): a new stanza carrying the whole new text and
        C{<replace id=message_id/>}, always the original's id, to the same address.  Fires
        with a L{SendResult}; never fails.
        """
        problem = self._unusable(chat_id)
        if problem is not None:
            return succeed(problem)
        original = self._sent.get(message_id)
        if original is None:
            return succeed(SendResult.failed(f"unknown message {message_id!r}",
                                             kind="bad_format"))
        if self.len_fn(content or "") > self.max_message_length:
            return succeed(SendResult.failed("message too long for XMPP", kind="too_long"))
        to, kind = original
        stanza_id = uuid.uuid4().hex
        failed = self._write(stanzas.message(to, kind, stanza_id, content or "",
                                             replaces=message_id,
                                             chat_state="active" if kind == "chat" else None))
        if failed is not None:
            return succeed(failed)
        self._sent.remember(stanza_id, None)  # its reflection is ours too, not editable
        self._sent.move_to_end(message_id)
        return succeed(SendResult(True, message_id=message_id))

    def send_typing(self, chat_id: str, metadata: dict[str, Any] | None = None) -> Deferred:
        """
        C{<composing/>} once per turn (chat states are sticky, §4.6).  Fires with None;
        never fails.
        """
        if chat_id in self._typing or self._unusable(chat_id) is not None:
            return succeed(None)
        kind, to, _ = self._route(chat_id)
        if self._write(stanzas.message(to, kind, uuid.uuid4().hex,
                                       chat_state="composing")) is None:
            self._typing.add(chat_id)
        return succeed(None)

    def stop_typing(self, chat_id: str) -> Deferred:
        """C{<active/>} when we said C{<composing/>} and sent nothing since.  Fires with None."""
        if chat_id not in self._typing:
            return succeed(None)
        self._typing.discard(chat_id)
        if self._unusable(chat_id) is None:
            kind, to, _ = self._route(chat_id)
            self._write(stanzas.message(to, kind, uuid.uuid4().hex, chat_state="active"))
        return succeed(None)

    def get_chat_info(self, chat_id: str) -> Deferred:
        """Fires with C{{"name": chat_id, "type": "group" | "dm"}}; never fails."""
        return succeed({"name": chat_id, "type": "group" if chat_id in self.rooms else "dm"})
