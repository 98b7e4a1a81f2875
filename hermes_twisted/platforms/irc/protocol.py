# -*- test-case-name: tests.test_irc -*-
"""
One IRC connection: C{IRCClient} with registration as 0.19.0 does it, NickServ, nick
collisions, liveness, robust line decoding, and callbacks that never raise.  It owns the
connection's L{LinePacer}; everything chat-level (addressing, sessions, sends) is the
adapter's.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet import protocol, task
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.words.protocols import irc

from hermes_twisted.platforms.irc.pacer import LinePacer
from hermes_twisted.platforms.irc.text import irc_lower

#: Seconds to wait for 001 after TCP/TLS connected (0.19.0: 30 s).
REGISTRATION_TIMEOUT = 30.0
#: Seconds to wait after IDENTIFY before joining, unless NickServ confirms sooner.
NICKSERV_GRACE = 2.0
#: Collisions tolerated while registering before the attempt is abandoned (and retried).
MAX_NICK_COLLISIONS = 30
#: Seconds between our keepalive PINGs; silence for IDLE_LIMIT means a dead (half-open) link.
HEARTBEAT_INTERVAL = 120.0
IDLE_LIMIT = 300.0
REALNAME = "Hermes Agent"
#: NickServ replies that mean IDENTIFY worked (Atheme, Anope, ...).
_NICKSERV_OK = ("you are now identified", "you are now logged in", "password accepted",
                "you are successfully identified", "now recognized")


class IRCConnectionOwner(Protocol):
    """
    What a connection needs of its owner (the L{hermes_twisted.platforms.irc.adapter.IRCAdapter}):
    its settings, and the callbacks through which it reports the connection's life.
    """

    reactor: Any
    server: str
    nickname: str
    server_password: str | None
    nickserv_password: str | None
    send_burst: int
    send_interval: float

    def channels_to_join(self) -> list[str]: ...

    def _connection_made(self, client: "HermesIRCClient") -> None: ...

    def _registered(self, client: "HermesIRCClient") -> None: ...

    def _connection_lost(self, client: "HermesIRCClient", reason: Failure) -> None: ...

    def _message_received(self, client: "HermesIRCClient", user: str, target: str, text: str,
                          *, action: bool) -> None: ...


class HermesIRCClient(irc.IRCClient):
    """
    One IRC connection.  Registration, PING/PONG and the heartbeat come from C{IRCClient};
    this class forwards messages to the adapter and keeps every callback from raising.
    """

    log = Logger()
    realname = REALNAME
    lineRate = None  # pacing is LinePacer's job, on the injected clock
    heartbeatInterval = HEARTBEAT_INTERVAL
    # 0.19.0 does not answer CTCP VERSION/FINGER/SOURCE; neither do we.
    versionName = versionNum = versionEnv = sourceURL = None

    def __init__(self, adapter: IRCConnectionOwner) -> None:
        self.adapter = adapter
        self.clock = adapter.reactor
        self.base_nick = adapter.nickname
        self.nickname = adapter.nickname
        self.username = adapter.nickname
        self.password = adapter.server_password
        self.registered = False
        self.channels_joined: set[str] = set()
        self._join_requested: set[str] = set()
        self.pacer: LinePacer | None = None
        self._collisions = 0
        self._registration_timer: Any = None
        self._join_timer: Any = None
        self._last_heard = self.clock.seconds()

    # -- connection lifecycle -----------------------------------------------------------

    def connectionMade(self) -> None:
        self.pacer = LinePacer(self.clock, self.transport.write, burst=self.adapter.send_burst,
                               interval=self.adapter.send_interval)
        self._registration_timer = self.clock.callLater(REGISTRATION_TIMEOUT,
                                                        self._registration_timed_out)
        self.adapter._connection_made(self)
        super().connectionMade()

    def register(self, nickname: str, hostname: str = "0", servername: str = "*") -> None:
        # 0.19.0 registers as "USER <nick> 0 * :Hermes Agent"; PASS goes first when set.
        if self.password:
            self.sendLine(f"PASS {self.password}")
        self.setNick(nickname)
        self.sendLine(f"USER {self.username} {hostname} {servername} :{self.realname}")

    def _registration_timed_out(self) -> None:
        self._registration_timer = None
        with self.log.failuresHandled("while abandoning an unregistered IRC connection"):
            self.log.warn("IRC server {server} sent no welcome within {timeout}s; reconnecting",
                          server=self.adapter.server, timeout=REGISTRATION_TIMEOUT)
            self.transport.abortConnection()

    def signedOn(self) -> None:
        with self.log.failuresHandled("while finishing IRC registration"):
            self._cancel_timer("_registration_timer")
            self.registered = True
            self.adapter._registered(self)
            if self.adapter.nickserv_password:
                self.msg("NickServ", f"IDENTIFY {self.adapter.nickserv_password}")
                self._join_timer = self.clock.callLater(NICKSERV_GRACE, self._join_channels)
            else:
                self._join_channels()

    def _join_channels(self) -> None:
        self._join_timer = None
        with self.log.failuresHandled("while joining IRC channels"):
            for channel in self.adapter.channels_to_join():
                self.join(channel)

    def join(self, channel: str, key: str | None = None) -> None:
        self._join_requested.add(irc_lower(channel))
        super().join(channel, key)

    def join_when_needed(self, channel: str) -> None:
        if irc_lower(channel) not in self._join_requested:
            self.join(channel)

    def joined(self, channel: str) -> None:
        self.channels_joined.add(irc_lower(channel))
        self.log.info("IRC joined {channel}", channel=channel)

    def left(self, channel: str) -> None:
        self.channels_joined.discard(irc_lower(channel))
        self._join_requested.discard(irc_lower(channel))

    def kickedFrom(self, channel: str, kicker: str, message: str) -> None:
        self.channels_joined.discard(irc_lower(channel))
        self._join_requested.discard(irc_lower(channel))
        self.log.warn("IRC: kicked from {channel} by {kicker}: {message}",
                      channel=channel, kicker=kicker, message=message)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        try:
            self._cancel_timer("_registration_timer")
            self._cancel_timer("_join_timer")
            if self.pacer is not None:
                self.pacer.close("connection lost")
            self.adapter._connection_lost(self, reason)
        except Exception:
            self.log.failure("while cleaning up a lost IRC connection")
        super().connectionLost(reason)

    def say_goodbye(self, message: str) -> None:
        """Drop unsent lines and send QUIT now (used by stopService)."""
        if self.pacer is not None:
            dropped = self.pacer.pending_lines
            self.pacer.close("gateway stopping")
            if dropped:
                self.log.warn("IRC: {count} reply lines unsent at shutdown", count=dropped)
        self.quit(message)

    def _cancel_timer(self, name: str) -> None:
        timer = getattr(self, name)
        setattr(self, name, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _createHeartbeat(self) -> task.LoopingCall:
        heartbeat = task.LoopingCall(self._sendHeartbeat)
        heartbeat.clock = self.clock
        return heartbeat

    def _sendHeartbeat(self) -> None:
        # IRCClient only PINGs; a half-open link (NAT timeout, suspended peer) would stay
        # "connected" for as long as TCP retransmits.  The server answers our PING, so
        # silence past IDLE_LIMIT means the link is dead.
        with self.log.failuresHandled("while checking IRC liveness"):
            silent = self.clock.seconds() - self._last_heard
            if silent >= IDLE_LIMIT:
                self.log.warn("IRC server {server} silent for {silent:.0f}s; reconnecting",
                              server=self.adapter.server, silent=silent)
                self.transport.abortConnection()
            else:
                super()._sendHeartbeat()

    # -- nick collisions ----------------------------------------------------------------

    def alterCollidedNick(self, nickname: str) -> str:
        # nick -> nick_ -> nick_1 -> nick_2 ... as 0.19.0 does.
        self._collisions += 1
        if self._collisions > MAX_NICK_COLLISIONS:
            self.log.error("IRC: nicknames {nick}_1..{nick}_{n} are all taken; reconnecting later",
                           nick=self.base_nick, n=MAX_NICK_COLLISIONS - 1)
            self.transport.loseConnection()
        if self._collisions == 1:
            return f"{self.base_nick}_"
        return f"{self.base_nick}_{self._collisions - 1}"

    def irc_ERR_ERRONEUSNICKNAME(self, prefix: str, params: list[str]) -> None:
        self.log.error("IRC server rejected the nickname {nick}: {text}",
                       nick=self._attemptedNick, text=params[-1] if params else "")
        if not self.registered:
            self.transport.loseConnection()

    def irc_ERR_PASSWDMISMATCH(self, prefix: str, params: list[str]) -> None:
        self.log.error("IRC server {server} rejected the server password", server=self.adapter.server)
        self.transport.loseConnection()

    def irc_ERROR(self, prefix: str, params: list[str]) -> None:
        self.log.warn("IRC server closing the link: {text}", text=params[-1] if params else "")

    # -- inbound ------------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        self._last_heard = self.clock.seconds()
        try:
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                text = line.decode("latin-1")  # legacy clients; never drop the connection
            prefix, command, params = irc.parsemsg(irc.lowDequote(text))
        except Exception:
            self.log.warn("IRC: skipping unparsable line {line!r}", line=line[:200])
            return
        command = irc.numeric_to_symbolic.get(command, command)
        self.handleCommand(command, prefix, params)

    def handleCommand(self, command: str, prefix: str, params: list[str]) -> None:
        method = getattr(self, f"irc_{command}", None)
        try:
            if method is not None:
                method(prefix, params)
            else:
                self.irc_unknown(prefix, command, params)
        except Exception:
            self.log.failure("while handling IRC {command} from {prefix}",
                             command=command, prefix=prefix)

    def irc_PRIVMSG(self, prefix: str, params: list[str]) -> None:
        if len(params) < 2:
            self.log.warn("IRC: PRIVMSG without text from {prefix}", prefix=prefix)
            return
        super().irc_PRIVMSG(prefix, params)

    def privmsg(self, user: str, channel: str, message: str) -> None:
        with self.log.failuresHandled("while handling an IRC message from {user}", user=user):
            self.adapter._message_received(self, user, channel, message, action=False)

    def action(self, user: str, channel: str, data: str) -> None:
        with self.log.failuresHandled("while handling an IRC action from {user}", user=user):
            self.adapter._message_received(self, user, channel, data or "", action=True)

    def ctcpQuery(self, user: str, channel: str, messages: list[tuple[str, Any]]) -> None:
        # Only ACTION is chat; every other CTCP (VERSION, DCC, ...) is ignored.
        for tag, data in messages:
            if tag == "ACTION":
                self.action(user, channel, data)
                return

    def ctcpReply(self, user: str, channel: str, messages: list[tuple[str, Any]]) -> None:
        pass

    def irc_NOTICE(self, prefix: str, params: list[str]) -> None:
        if len(params) < 2 or not params[-1]:
            return
        super().irc_NOTICE(prefix, params)

    def noticed(self, user: str, channel: str, message: str) -> None:
        # NickServ's confirmation lets us join before the grace period ends.
        if (self._join_timer is not None and irc_lower(user.split("!", 1)[0]) == "nickserv"
                and any(p in message.lower() for p in _NICKSERV_OK)):
            self._cancel_timer("_join_timer")
            self._join_channels()

    def irc_900(self, prefix: str, params: list[str]) -> None:  # RPL_LOGGEDIN (SASL/services)
        if self._join_timer is not None:
            self._cancel_timer("_join_timer")
            self._join_channels()

    def badMessage(self, line: str, excType: Any, excValue: Any, tb: Any) -> None:
        self.log.warn("IRC: skipping malformed line {line!r}", line=line[:200])

    # -- outbound -----------------------------------------------------------------------

    def send_lines(self, target: str, lines: list[str]) -> Deferred:
        """Queue one PRIVMSG per line; fires like L{LinePacer.submit}."""
        head = f"PRIVMSG {target} :".encode()
        assert self.pacer is not None
        return self.pacer.submit([head + line.encode("utf-8") + b"\r\n" for line in lines])


class IRCClientFactory(protocol.Factory):
    noisy = False  # ClientService reconnects; per-attempt start/stop lines are noise

    def __init__(self, adapter: IRCConnectionOwner) -> None:
        self.adapter = adapter

    def buildProtocol(self, addr: Any) -> HermesIRCClient:
        client = HermesIRCClient(self.adapter)
        client.factory = self
        return client
