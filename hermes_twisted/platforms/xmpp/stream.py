# -*- test-case-name: tests.test_xmpp -*-
"""
One XMPP client stream on C{twisted.words.protocols.jabber} (email-xmpp.md §5.1), with
XEP-0198 stream management added.

C{XMPPAuthenticator} runs version check, STARTTLS (required), SASL (what Twisted offers:
DIGEST-MD5, PLAIN; no SCRAM), bind and session.  For direct TLS the connection is already
encrypted, so the STARTTLS step is made optional.  When the previous stream left a
resumable XEP-0198 session, bind and session are replaced by L{ResumeOrBind}: it sends
C{<resume/>}, and on C{<failed/>} (or no stream management offered) binds afresh.

L{StreamManagement} is the state that outlives a connection: the resume id, the count of
stanzas we handled (C{h}) and the stanzas we sent that the server has not acknowledged.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Protocol

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.words.protocols.jabber import client, xmlstream
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish

NS_SM = "urn:xmpp:sm:3"
_STANZAS = ("message", "presence", "iq")
_MOD = 2 ** 32


class StreamManagement:
    """
    XEP-0198 counters and the unacknowledged outbound queue (§4.6).  The server counts what
    we send from our C{<enable/>} (C{counting}) and what it sends from its C{<enabled/>}
    (C{counting_in}); C{inbound} is our C{h}, C{acked} the server's last C{h}.
    """

    def __init__(self) -> None:
        self.resume_id: str | None = None
        self.counting = False
        self.counting_in = False
        self.inbound = 0
        self.acked = 0
        self.unacked: list[domish.Element] = []

    def enabling(self) -> None:
        """We sent C{<enable/>}: the server counts our stanzas from here."""
        self.counting, self.acked, self.unacked = True, 0, []

    def enabled(self, resume_id: str | None) -> None:
        self.resume_id = resume_id
        self.counting_in, self.inbound = True, 0

    def handled(self) -> None:
        self.inbound = (self.inbound + 1) % _MOD

    def sent(self, stanza: domish.Element) -> None:
        if self.counting:
            self.unacked.append(stanza)

    def ack(self, h: int) -> None:
        done = (h - self.acked) % _MOD
        if done > len(self.unacked):
            done = len(self.unacked)  # a confused server; never go negative
        del self.unacked[:done]
        self.acked = h % _MOD

    def take_unacked(self) -> list[domish.Element]:
        pending, self.unacked = self.unacked, []
        return pending

    def forget(self) -> None:
        """The session is gone (resume failed, or a clean stop): start over next time."""
        self.resume_id = None
        self.counting = self.counting_in = False
        self.inbound = self.acked = 0


class StreamOwner(Protocol):
    """What a stream needs of its owner (the L{hermes_twisted.platforms.xmpp.adapter})."""

    reactor: Any

    def _stream_connected(self, xs: "HermesXmlStream") -> None: ...

    def _stream_ready(self, xs: "HermesXmlStream", resumed: bool) -> None: ...

    def _stream_failed(self, xs: "HermesXmlStream", reason: Failure) -> None: ...

    def _stream_lost(self, xs: "HermesXmlStream", reason: Failure) -> None: ...


class HermesXmlStream(xmlstream.XmlStream):
    """
    An XMPP stream that keeps L{StreamManagement}'s counts: it answers C{<r/>}, takes
    C{<a/>}, counts every stanza it dispatched and queues every stanza it sent while
    counting.  Observers run inside C{dispatch}, whose errors Twisted logs; ours catch
    their own.
    """

    log = Logger()

    def __init__(self, authenticator: xmlstream.ConnectAuthenticator,
                 sm: StreamManagement, clock: Any) -> None:
        super().__init__(authenticator)
        self.sm = sm
        self.clock = clock
        #: Whether this stream resumed the previous XEP-0198 session (no new bind).
        self.resumed = False
        self.last_heard = clock.seconds()

    def _callLater(self, *args: Any, **kwargs: Any) -> Any:
        return self.clock.callLater(*args, **kwargs)  # IQ timeouts on the injected clock

    def dataReceived(self, data: bytes) -> None:
        self.last_heard = self.clock.seconds()
        super().dataReceived(data)

    def onElement(self, element: domish.Element) -> None:
        if element.uri == NS_SM:
            if element.name == "r":
                self.send_ack()
                return
            if element.name == "a":
                try:
                    self.sm.ack(int(element.getAttribute("h", "0")))
                except ValueError:
                    self.log.warn("XMPP: ignoring <a/> with h={h!r}", h=element.getAttribute("h"))
                return
        super().onElement(element)
        if self.sm.counting_in and element.name in _STANZAS and element.uri == self.namespace:
            self.sm.handled()

    def send(self, obj: Any) -> None:
        if (domish.IElement.providedBy(obj) and obj.name in _STANZAS
                and obj.uri in (None, self.namespace)):
            self.sm.sent(obj)
        super().send(obj)

    def send_ack(self) -> None:
        a = domish.Element((NS_SM, "a"))
        a["h"] = str(self.sm.inbound)
        super().send(a)

    def request_ack(self) -> None:
        super().send(domish.Element((NS_SM, "r")))


class ResumeOrBind(xmlstream.BaseFeatureInitiatingInitializer):
    """
    Resume the previous XEP-0198 session in place of bind; when the server refuses
    (C{<failed/>}) or offers no stream management, bind a new session instead.  Fires with
    None either way; C{resumed} says which.
    """

    feature = (NS_SM, "sm")

    def __init__(self, xs: HermesXmlStream) -> None:
        super().__init__(xs, required=False)
        self.resumed = False

    def initialize(self) -> Any:
        if self.feature in self.xmlstream.features and self.xmlstream.sm.resume_id:
            return self.start()
        return self._bind()

    def start(self) -> Deferred:
        """
        Send C{<resume/>}.  Fires with None once resumed or bound afresh; fails with
        C{ConnectionLost} when the stream ends first.  Cancelling stops waiting for the
        server's answer.
        """
        xs = self.xmlstream

        def stop_waiting(_: Any = None) -> None:
            xs.removeObserver(f"/resumed[@xmlns='{NS_SM}']", resumed)
            xs.removeObserver(f"/failed[@xmlns='{NS_SM}']", failed)
            xs.removeObserver(xmlstream.STREAM_END_EVENT, ended)

        result: Deferred = Deferred(stop_waiting)
        resume = domish.Element((NS_SM, "resume"))
        resume["previd"] = xs.sm.resume_id
        resume["h"] = str(xs.sm.inbound)

        def ended(reason: Any) -> None:
            stop_waiting()
            result.errback(ConnectionLost("the stream ended before <resumed/>"))

        def resumed(element: domish.Element) -> None:
            stop_waiting()
            try:
                xs.sm.ack(int(element.getAttribute("h", "0")))
            except ValueError:
                pass
            self.resumed = True
            xs.resumed = True
            xs.sm.counting = xs.sm.counting_in = True
            for stanza in xs.sm.take_unacked():
                xs.send(stanza)  # §4.6: what the server never acknowledged goes again
            result.callback(None)

        def failed(element: domish.Element) -> None:
            stop_waiting()
            lost = sum(1 for s in xs.sm.unacked if s.name == "message")
            if lost:
                xs.log.warn("XMPP session could not be resumed; {count} message(s) we sent "
                            "may not have been delivered", count=lost)
            xs.sm.forget()
            self._bind().chainDeferred(result)

        xs.addOnetimeObserver(f"/resumed[@xmlns='{NS_SM}']", resumed)
        xs.addOnetimeObserver(f"/failed[@xmlns='{NS_SM}']", failed)
        xs.addOnetimeObserver(xmlstream.STREAM_END_EVENT, ended)
        xs.send(resume)
        return result

    def _bind(self) -> Deferred:
        xs = self.xmlstream
        d: Deferred = Deferred()
        d.callback(None)
        d.addCallback(lambda _: client.BindInitializer(xs, required=True).initialize())
        d.addCallback(lambda _: client.SessionInitializer(xs, required=False).initialize())
        return d


class XMPPStreamFactory(protocol.Factory):
    """
    Builds one L{HermesXmlStream} per connection for a C{ClientService}, with the
    initializers this connection needs and the owner's callbacks wired in.
    """

    noisy = False

    def __init__(self, owner: StreamOwner, jid: JID, password: str, *, tls: Any,
                 direct_tls: bool, sm: StreamManagement) -> None:
        self.owner = owner
        self.jid = jid
        self.password = password
        self.tls = tls
        self.direct_tls = direct_tls
        self.sm = sm

    def buildProtocol(self, addr: Any) -> HermesXmlStream:
        auth = client.XMPPAuthenticator(JID(self.jid.full()), self.password,
                                        configurationForTLS=self.tls)
        xs = HermesXmlStream(auth, self.sm, self.owner.reactor)
        xs.factory = self
        for init in xs.initializers:
            if isinstance(init, xmlstream.TLSInitiatingInitializer) and self.direct_tls:
                init.required = False  # already TLS; no <starttls/> is offered
        if self.sm.resume_id:
            xs.initializers = [i for i in xs.initializers
                               if not isinstance(i, (client.BindInitializer,
                                                     client.SessionInitializer))]
            xs.initializers.append(ResumeOrBind(xs))
        # Nothing is counted until <enable/>/<enabled/> or <resumed/>.
        self.sm.counting = self.sm.counting_in = False
        xs.addObserver(xmlstream.STREAM_CONNECTED_EVENT, self._connected)
        xs.addObserver(xmlstream.STREAM_AUTHD_EVENT, self._authd)
        xs.addObserver(xmlstream.INIT_FAILED_EVENT, partial(self._init_failed, xs))
        xs.addObserver(xmlstream.STREAM_END_EVENT, partial(self._lost, xs))
        return xs

    def _connected(self, xs: HermesXmlStream) -> None:
        try:
            self.owner._stream_connected(xs)
        except Exception:
            xs.log.failure("while starting an XMPP stream")

    def _authd(self, xs: HermesXmlStream) -> None:
        try:
            self.owner._stream_ready(xs, xs.resumed)
        except Exception:
            xs.log.failure("while finishing the XMPP login")

    def _init_failed(self, xs: HermesXmlStream, reason: Failure) -> None:
        try:
            self.owner._stream_failed(xs, reason)
        except Exception:
            xs.log.failure("while handling a failed XMPP login")

    def _lost(self, xs: HermesXmlStream, reason: Failure) -> None:
        try:
            self.owner._stream_lost(xs, reason)
        except Exception:
            xs.log.failure("while handling a lost XMPP stream")
