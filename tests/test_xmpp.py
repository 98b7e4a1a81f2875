"""
The XMPP adapter without a server: stanzas fed to a stream on a C{StringTransport} and a
C{MemoryReactorClock}.  Mentions, trusted stanza ids and dedupe, room reflections and
history, rejoin after a kick, XEP-0198 counting and acks, IQ answers, corrections, the login
timeout, and the config checks.  The real-server tests are in L{tests.test_xmpp_integration}.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.words.protocols.jabber import xmlstream
from twisted.words.protocols.jabber.jid import JID
from twisted.words.xish import domish

from hermes_twisted.config.errors import ConfigError
from hermes_twisted.config.settings import PlatformSettings, StreamingSettings
from hermes_twisted.delivery.consumer import StreamConsumer
from hermes_twisted.platforms.xmpp import adapter as xmpp_adapter
from hermes_twisted.platforms.xmpp import stanzas
from hermes_twisted.platforms.xmpp.adapter import XMPPAdapter
from hermes_twisted.platforms.xmpp.stream import NS_SM, StreamManagement, XMPPStreamFactory
from tests.relay_support import RecordingSink

ROOM = "lobby@muc.example.org"


def parse(xml: str) -> domish.Element:
    found: list[domish.Element] = []
    stream = domish.elementStream()
    stream.DocumentStartEvent = lambda root: None
    stream.ElementEvent = found.append
    stream.DocumentEndEvent = lambda: None
    stream.parse(b"<stream xmlns='jabber:client'>" + xml.encode("utf-8"))
    assert len(found) == 1, found
    return found[0]


class Bot:
    """An adapter whose stream is a StringTransport, logged in by hand."""

    def __init__(self, now: float = 0.0, **extra: Any) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(now)
        settings = PlatformSettings(name="xmpp", enabled=True, extra={
            "jid": "hermes@example.org", "password": "pw", "rooms": ROOM, **extra})
        self.adapter = XMPPAdapter(settings, reactor=self.clock)
        # Alice's phone is known to show corrections, so her messages are handed on at once;
        # the disco#info exchange itself has tests of its own.
        self.adapter._corrections.remember("alice@example.org/phone", True)
        self.sink = RecordingSink()
        self.adapter.attach(self.sink)
        self.factory = XMPPStreamFactory(self.adapter, JID("hermes@example.org/hermes"), "pw",
                                         tls=None, direct_tls=False, sm=self.adapter.sm)
        self.xs: Any = None
        self.transport = StringTransport()

    def connect(self, features: tuple = ((NS_SM, "sm"),)) -> None:
        self.xs = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.xs.makeConnection(self.transport)
        self.xs.features = {f: domish.Element(f) for f in features}

    def login(self, **kw: Any) -> None:
        self.connect(**kw)
        self.xs.dispatch(self.xs, xmlstream.STREAM_AUTHD_EVENT)

    def feed(self, xml: str) -> None:
        self.xs.onElement(parse(xml))

    def written(self) -> str:
        out = self.transport.value().decode("utf-8")
        self.transport.clear()
        return out

    def drop(self) -> None:
        self.xs.connectionLost(Failure(ConnectionDone()))

    def joined(self) -> None:
        self.feed(f"<presence from='{ROOM}/hermes'><x xmlns='{stanzas.NS_MUC_USER}'>"
                  "<item affiliation='owner' role='moderator'/><status code='110'/></x>"
                  "</presence>")


def chat(body: str, *, sender: str = "alice@example.org/phone", stanza_id: str | None = "s1",
         by: str = "hermes@example.org", extra: str = "") -> str:
    sid = (f"<stanza-id xmlns='{stanzas.NS_SID}' id='{stanza_id}' by='{by}'/>"
           if stanza_id else "")
    return (f"<message type='chat' from='{sender}' to='hermes@example.org/hermes' id='m-{body}'>"
            f"<body>{body}</body>{sid}{extra}</message>")


def groupchat(body: str, nick: str = "alice", extra: str = "", stanza_id: str = "g1") -> str:
    return (f"<message type='groupchat' from='{ROOM}/{nick}' id='x-{body}'><body>{body}</body>"
            f"<stanza-id xmlns='{stanzas.NS_SID}' id='{stanza_id}' by='{ROOM}'/>{extra}"
            "</message>")


# -- stanzas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("body, expected", [
    ("hermes: hi", "hi"), ("Hermes, hi there", "hi there"), ("@hermes: hi", "hi"),
    ("thanks @HERMES!", "thanks @HERMES!"), ("hermesbot: hi", None), ("hi all", None),
    ("mail@hermes.org", None), ("hermes:", ""),
])
def test_mentions(body, expected):
    assert stanzas.addressed("hermes", body) == expected


def test_a_stanza_id_counts_only_when_stamped_by_a_trusted_entity():
    forged = parse(chat("hi", by="alice@example.org"))
    assert stanzas.read_message(forged, {"hermes@example.org"}).stanza_id is None
    stamped = parse(chat("hi"))
    assert stanzas.read_message(stamped, {"hermes@example.org"}).stanza_id == "s1"


def test_correction_refers_to_the_original_and_has_its_own_id():
    msg = stanzas.message("a@b/c", "chat", "new-id", "text", replaces="orig",
                          chat_state="active")
    xml = msg.toXml()
    assert "id='new-id'" in xml and f"<replace xmlns='{stanzas.NS_CORRECT}' id='orig'/>" in xml
    assert f"<origin-id xmlns='{stanzas.NS_SID}' id='new-id'/>" in xml


def test_stream_management_acks_count_modulo_2_32():
    sm = StreamManagement()
    sm.enabling()
    sm.acked = 2 ** 32 - 1
    for i in range(3):
        sm.sent(domish.Element((None, f"m{i}")))
    sm.ack(1)  # wrapped: two of the three acknowledged
    assert [e.name for e in sm.unacked] == ["m2"]


# -- inbound ----------------------------------------------------------------------------------


def test_one_to_one_message_becomes_an_event_and_a_redelivery_is_dropped():
    bot = Bot()
    bot.login()
    bot.feed(chat("hello"))
    bot.feed(chat("hello"))  # the same stanza id again (a resend after resume)
    [event] = bot.sink.events
    source = event.source
    assert (source.chat_id, source.user_id, source.chat_type, event.text) == (
        "alice@example.org", "alice@example.org", "dm", "hello")
    assert event.metadata["dedupe_key"] == "xmpp:hermes@example.org:s1"
    bot.drop()


def test_body_less_error_and_self_messages_are_ignored():
    bot = Bot()
    bot.login()
    bot.feed(f"<message type='chat' from='alice@example.org/p'><composing "
             f"xmlns='{stanzas.NS_CHATSTATES}'/></message>")
    bot.feed("<message type='error' from='alice@example.org/p'><body>x</body></message>")
    bot.feed(chat("me", sender="hermes@example.org/laptop"))
    assert bot.sink.events == []
    bot.drop()


def test_room_messages_need_a_mention_and_skip_history_and_reflections():
    bot = Bot()
    bot.login()
    bot.joined()
    bot.feed(groupchat("hermes: old question", stanza_id="h1",
                       extra=f"<delay xmlns='{stanzas.NS_DELAY}' stamp='2020-01-01T00:00:00Z'/>"))
    bot.feed(groupchat("hermes: my own words", nick="hermes", stanza_id="r1"))
    bot.feed(groupchat("no mention here", stanza_id="n1"))
    bot.feed(groupchat("hermes: what time is it?", stanza_id="q1"))
    [event] = bot.sink.events
    assert (event.text, event.source.chat_id, event.source.chat_type) == (
        "what time is it?", ROOM, "group")
    assert event.metadata["dedupe_key"] == f"xmpp:{ROOM}:q1"
    bot.drop()


def test_room_without_require_mention_answers_everything():
    bot = Bot(require_mention="false")
    bot.login()
    bot.joined()
    bot.feed(groupchat("no mention here"))
    assert bot.sink.texts() == ["no mention here"]
    bot.drop()


# -- rooms -----------------------------------------------------------------------------------


def test_joins_rooms_without_history_and_rejoins_after_a_kick():
    bot = Bot()
    bot.login()
    out = bot.written()
    assert f"to='{ROOM}/hermes'" in out and "maxstanzas='0'" in out
    bot.joined()
    assert bot.adapter.rooms[ROOM].joined
    bot.feed(f"<presence type='unavailable' from='{ROOM}/hermes'><x "
             f"xmlns='{stanzas.NS_MUC_USER}'><item role='none'/><status code='307'/>"
             "<status code='110'/></x></presence>")
    assert not bot.adapter.rooms[ROOM].joined
    bot.clock.advance(xmpp_adapter.REJOIN_DELAY)
    assert f"to='{ROOM}/hermes'" in bot.written()
    bot.drop()
    assert bot.clock.getDelayedCalls() == []


@pytest.mark.parametrize("condition, rejoins", [
    ("not-acceptable", True), ("item-not-found", True),
    ("service-unavailable", False), ("feature-not-implemented", False), (None, False),
])
def test_self_ping_rejoins_a_room_that_dropped_us_silently(condition, rejoins):
    bot = Bot()
    bot.login(features=())
    bot.joined()
    bot.written()
    bot.clock.advance(xmpp_adapter.KEEPALIVE_INTERVAL)
    out = bot.written()
    ping_id = out.split(f"to='{ROOM}/hermes'", 1)[0].rsplit("id='", 1)[1].split("'", 1)[0]
    assert f"<ping xmlns='{stanzas.NS_PING}'/>" in out
    if condition is None:
        bot.feed(f"<iq type='result' id='{ping_id}' from='{ROOM}/hermes'/>")
    else:
        bot.feed(f"<iq type='error' id='{ping_id}' from='{ROOM}/hermes'><error type='cancel'>"
                 f"<{condition} xmlns='{stanzas.NS_STANZAS}'/></error></iq>")
    assert ("maxstanzas='0'" in bot.written()) is rejoins
    bot.drop()
    assert bot.clock.getDelayedCalls() == []


def test_a_taken_nick_is_retried_with_a_suffix():
    bot = Bot()
    bot.login()
    bot.written()
    bot.feed(f"<presence type='error' from='{ROOM}/hermes'><error type='cancel'><conflict "
             f"xmlns='{stanzas.NS_STANZAS}'/></error></presence>")
    assert f"to='{ROOM}/hermes_'" in bot.written()
    bot.drop()


# -- stream management -------------------------------------------------------------------------


def test_h_counts_only_stanzas_after_enabled():
    # Regression: stanzas that arrived between our <enable/> and the server's <enabled/>
    # were counted, and Prosody closed the stream ("acknowledged more than sent").
    bot = Bot()
    bot.login()
    assert f"<enable xmlns='{NS_SM}' resume='true'/>" in bot.written()
    bot.feed("<iq type='result' id='early' from='example.org'/>")
    bot.feed(f"<enabled xmlns='{NS_SM}' id='sess-1' resume='true'/>")
    bot.feed(chat("one"))
    bot.feed(f"<r xmlns='{NS_SM}'/>")
    assert f"<a xmlns='{NS_SM}' h='1'/>" in bot.written()
    assert bot.adapter.sm.resume_id == "sess-1"
    bot.drop()


def test_unacknowledged_stanzas_are_resent_on_resume():
    bot = Bot()
    bot.login()
    bot.joined()
    bot.feed(f"<enabled xmlns='{NS_SM}' id='sess-1' resume='true'/>")
    bot.feed(chat("hi"))
    bot.adapter.send("alice@example.org", "answer")
    bot.written()
    bot.drop()
    assert not bot.adapter.send(ROOM, "while away").result.success
    # The next connection resumes instead of binding, then resends "answer".
    bot.connect()
    init = bot.xs.initializers[-1]
    d = init.initialize()
    assert f"<resume xmlns='{NS_SM}' previd='sess-1' h='1'/>" in bot.written()
    bot.feed(f"<resumed xmlns='{NS_SM}' previd='sess-1' h='0'/>")
    assert d.called and bot.xs.resumed
    assert "<body>answer</body>" in bot.written()
    bot.xs.dispatch(bot.xs, xmlstream.STREAM_AUTHD_EVENT)
    # The resumed session is still in its rooms: no rejoin, and sends to them work.
    assert f"to='{ROOM}/hermes'" not in bot.written()
    assert bot.adapter.send(ROOM, "back").result.success
    bot.drop()


#: 2027-01-15T08:00:00Z and a bit: the daemon starts in the middle of a second.
START = 1_800_000_000.6


def delayed(stamp: str, by: str) -> str:
    return f"<delay xmlns='{stanzas.NS_DELAY}' from='{by}' stamp='{stamp}'/>"


def resumed_bot(now: float = START) -> Bot:
    """A bot whose link dropped after one handled stanza, reconnected and resuming."""
    bot = Bot(now=now)
    bot.login()
    bot.joined()
    bot.feed(f"<enabled xmlns='{NS_SM}' id='sess-1' resume='true'/>")
    bot.feed(chat("before", stanza_id="s0"))
    bot.drop()
    bot.connect()
    bot.xs.initializers = [bot.xs.initializers[-1]]  # TLS and SASL done: resume
    bot.xs.dataReceived(b"<stream:stream xmlns='jabber:client' "
                        b"xmlns:stream='http://etherx.jabber.org/streams' from='example.org' "
                        b"id='s2' version='1.0'><stream:features>"
                        b"<sm xmlns='urn:xmpp:sm:3'/></stream:features>")
    assert f"<resume xmlns='{NS_SM}' previd='sess-1' h='1'/>" in bot.written()
    return bot


def test_a_message_held_during_the_drop_is_answered_after_the_resume():
    # Regression (the resume flake): Prosody resends what it queued for the hibernating
    # session with a <delay/> stamped in whole seconds.  A message held within the second
    # the daemon started was taken for offline storage from before the start and dropped,
    # although the resume succeeded and acknowledged it.  It arrives in the same read as
    # <resumed/>, as it does from Prosody.
    bot = resumed_bot()
    bot.xs.dataReceived(
        f"<resumed xmlns='{NS_SM}' previd='sess-1' h='0'/>".encode()
        + chat("while away", stanza_id="s1",
               extra=delayed("2027-01-15T08:00:00Z", "hermes@example.org")).encode()
        + f"<r xmlns='{NS_SM}'/>".encode())
    assert bot.xs.resumed and bot.adapter.connected_stream is bot.xs
    assert bot.sink.texts() == ["before", "while away"]
    assert f"<a xmlns='{NS_SM}' h='2'/>" in bot.written()
    bot.drop()


def test_held_messages_count_on_a_resumed_stream_whatever_the_server_clock_says():
    # Our clock ahead of the server's: the stamps of held stanzas are "before" our start.
    bot = resumed_bot(now=START + 5)
    bot.feed(f"<resumed xmlns='{NS_SM}' previd='sess-1' h='0'/>")
    bot.feed(chat("held", stanza_id="s1",
                  extra=delayed("2027-01-15T08:00:00Z", "hermes@example.org")))
    # A room message our server held for the session is live; room history is not.
    bot.feed(groupchat("hermes: held in the room", stanza_id="g1",
                       extra=delayed("2027-01-15T08:00:00Z", "hermes@example.org")))
    bot.feed(groupchat("hermes: history", stanza_id="g2",
                       extra=delayed("2027-01-15T08:00:00Z", ROOM)))
    assert bot.sink.texts() == ["before", "held", "held in the room"]
    bot.drop()


def test_offline_storage_from_before_the_start_is_not_answered_on_a_new_session():
    bot = Bot(now=START)
    bot.login()
    bot.feed(chat("old", stanza_id="s1", extra=delayed("2027-01-15T07:59:59Z", "example.org")))
    bot.feed(chat("same second", stanza_id="s2",
                  extra=delayed("2027-01-15T08:00:00Z", "example.org")))
    assert bot.sink.texts() == ["same second"]
    bot.drop()


def test_a_resume_cut_short_by_the_link_fails_the_login_quietly():
    bot = Bot()
    bot.login()
    bot.feed(f"<enabled xmlns='{NS_SM}' id='sess-1' resume='true'/>")
    bot.drop()
    bot.connect()
    d = bot.xs.initializers[-1].initialize()
    bot.drop()
    assert d.called
    d.addErrback(lambda f: f.trap(ConnectionLost))
    assert bot.adapter.sm.resume_id == "sess-1"  # still worth trying next time


def test_a_failed_resume_binds_a_new_session():
    bot = Bot()
    bot.login()
    bot.feed(f"<enabled xmlns='{NS_SM}' id='sess-1' resume='true'/>")
    bot.drop()
    bot.connect(features=((NS_SM, "sm"), ("urn:ietf:params:xml:ns:xmpp-bind", "bind")))
    d = bot.xs.initializers[-1].initialize()
    bot.written()
    bot.feed(f"<failed xmlns='{NS_SM}'/>")
    assert "urn:ietf:params:xml:ns:xmpp-bind" in bot.written()
    assert bot.adapter.sm.resume_id is None
    bot.drop()  # the bind request was never answered
    assert d.called
    d.addErrback(lambda f: f.trap(ConnectionLost))


# -- XEP-0308 support of 1:1 peers ---------------------------------------------------------------


def disco_request(written: str, to: str) -> str:
    """The id of the disco#info request to C{to} in C{written}."""
    found = re.search(rf"<iq [^>]*to='{re.escape(to)}'[^>]*>"
                      rf"<query xmlns='{re.escape(stanzas.NS_DISCO_INFO)}'/></iq>", written)
    assert found is not None, written
    return re.search(r"id='([^']+)'", found.group(0)).group(1)


def disco_result(iq_id: str, sender: str, *features: str) -> str:
    listed = "".join(f"<feature var='{f}'/>" for f in features)
    return (f"<iq type='result' id='{iq_id}' from='{sender}' to='hermes@example.org/hermes'>"
            f"<query xmlns='{stanzas.NS_DISCO_INFO}'>{listed}</query></iq>")


def stream_reply(bot: Bot, chat_id: str) -> None:
    """A streamed reply "Hello there, world" delivered by the real consumer."""
    consumer = StreamConsumer(bot.adapter, chat_id, clock=bot.clock, is_current=lambda: True,
                              settings=StreamingSettings(enabled=True, edit_interval=1.0,
                                                         buffer_threshold=1))
    consumer.on_delta("Hello there, ")
    bot.clock.advance(1.0)
    consumer.on_delta("world")
    bot.clock.advance(1.0)
    done = consumer.finish("Hello there, world")
    bot.clock.advance(1.0)
    assert done.called


def test_a_new_peer_is_asked_about_corrections_before_its_messages_go_on():
    bot = Bot()
    bot.login()
    bot.written()
    bob = "bob@example.org/laptop"
    bot.feed(chat("one", sender=bob, stanza_id="b1"))
    bot.feed(chat("two", sender=bob, stanza_id="b2"))
    written = bot.written()
    iq_id = disco_request(written, bob)
    assert written.count(stanzas.NS_DISCO_INFO) == 1  # asked once for both
    assert bot.sink.events == []  # held until the answer: the run asks can_edit at its start
    bot.feed(disco_result(iq_id, bob, stanzas.NS_CHATSTATES, stanzas.NS_CORRECT))
    assert bot.sink.texts() == ["one", "two"]  # in their order
    assert bot.adapter.can_edit("bob@example.org")
    bot.feed(chat("three", sender=bob, stanza_id="b3"))
    assert stanzas.NS_DISCO_INFO not in bot.written()  # cached per full JID
    assert bot.sink.texts() == ["one", "two", "three"]
    stream_reply(bot, "bob@example.org")
    bodies = re.findall(r"<body>([^<]*)</body>", bot.written())
    assert bodies[-1] == "Hello there, world" and len(bodies) > 1
    bot.drop()


@pytest.mark.parametrize("answer", ["no-feature", "error", "silence"])
def test_a_peer_without_corrections_gets_one_final_message(answer):
    bot = Bot()
    bot.login()
    bot.written()
    carol = "carol@example.org/old-client"
    bot.feed(chat("hi", sender=carol, stanza_id="c1"))
    iq_id = disco_request(bot.written(), carol)
    if answer == "no-feature":
        bot.feed(disco_result(iq_id, carol, stanzas.NS_DISCO_INFO))
    elif answer == "error":
        bot.feed(f"<iq type='error' id='{iq_id}' from='{carol}'><error type='cancel'>"
                 f"<service-unavailable xmlns='{stanzas.NS_STANZAS}'/></error></iq>")
    else:
        bot.clock.advance(xmpp_adapter.DISCO_TIMEOUT)
    assert bot.sink.texts() == ["hi"]
    assert bot.adapter._corrections[carol] is False  # asked once, remembered
    assert not bot.adapter.can_edit("carol@example.org")
    stream_reply(bot, "carol@example.org")
    written = bot.written()
    assert re.findall(r"<body>([^<]*)</body>", written) == ["Hello there, world"]
    assert stanzas.NS_CORRECT not in written
    bot.drop()


def test_a_dropped_link_releases_held_messages_and_asks_again_later():
    bot = Bot()
    bot.login()
    bot.written()
    dave = "dave@example.org/pc"
    bot.feed(chat("hi", sender=dave, stanza_id="d1"))
    bot.drop()
    assert bot.sink.texts() == ["hi"]  # not held forever
    assert not bot.adapter.can_edit("dave@example.org")
    assert dave not in bot.adapter._corrections  # unknown, not "no"
    assert bot.clock.getDelayedCalls() == []  # the disco timeout went with the stream


def test_available_once_the_server_reflects_our_presence():
    # The integration tests wait for this before a user writes: until then a message to
    # the bot's bare JID bounces.
    bot = Bot()
    bot.login()
    assert not bot.adapter.available
    bot.feed("<presence from='hermes@example.org/laptop'/>")  # another resource of ours
    assert not bot.adapter.available
    bot.feed("<presence from='hermes@example.org/hermes'/>")
    assert bot.adapter.available
    bot.drop()
    bot.login()  # a new session (not resumed) announces itself again
    assert not bot.adapter.available
    bot.drop()


def test_rooms_always_stream_by_corrections():
    assert Bot().adapter.can_edit(ROOM)


# -- IQs, outbound, timers -----------------------------------------------------------------------


def test_pings_and_disco_are_answered_and_anything_else_refused():
    bot = Bot()
    bot.login()
    bot.written()
    bot.feed(f"<iq type='get' id='p1' from='example.org'><ping xmlns='{stanzas.NS_PING}'/></iq>")
    assert "id='p1'" in (out := bot.written()) and "type='result'" in out
    bot.feed(f"<iq type='get' id='d1' from='alice@example.org/p'><query "
             f"xmlns='{stanzas.NS_DISCO_INFO}'/></iq>")
    assert stanzas.NS_CORRECT in bot.written()
    bot.feed("<iq type='get' id='v1' from='alice@example.org/p'><query "
             "xmlns='jabber:iq:version'/></iq>")
    assert "service-unavailable" in bot.written()
    bot.drop()


def test_replies_go_to_the_full_jid_and_corrections_to_the_same_place():
    bot = Bot()
    bot.login()
    bot.feed(chat("hello"))
    bot.written()
    sent = bot.adapter.send("alice@example.org", "partial").result
    assert sent.success
    assert "to='alice@example.org/phone'" in bot.written()
    edited = bot.adapter.edit_message("alice@example.org", sent.message_id, "whole").result
    assert edited.success and edited.message_id == sent.message_id
    out = bot.written()
    assert "to='alice@example.org/phone'" in out and f"id='{sent.message_id}'/>" in out
    unknown = bot.adapter.edit_message("alice@example.org", "nope", "x").result
    assert not unknown.success and unknown.error
    bot.drop()


def test_typing_is_sticky_and_cleared_by_stop_typing():
    bot = Bot()
    bot.login()
    bot.written()
    bot.adapter.send_typing("alice@example.org")
    bot.adapter.send_typing("alice@example.org")
    assert bot.written().count("<composing") == 1
    bot.adapter.stop_typing("alice@example.org")
    assert "<active" in bot.written()
    bot.drop()


def test_sends_fail_as_results_when_not_connected():
    bot = Bot()
    result = bot.adapter.send("alice@example.org", "x").result
    assert not result.success and result.retryable
    assert not bot.adapter.send("not a jid@@", "x").result.success


def test_a_login_that_never_finishes_is_aborted():
    bot = Bot()
    bot.connect()
    bot.clock.advance(xmpp_adapter.LOGIN_TIMEOUT)
    assert bot.transport.disconnecting or getattr(bot.transport, "aborted", False) or \
        bot.transport.disconnected
    bot.drop()
    assert bot.clock.getDelayedCalls() == []


# -- configuration ---------------------------------------------------------------------------------


def load(env: dict[str, str]) -> Any:
    from tests.test_envvars import build_config

    return build_config({}, env)


def test_config_requires_a_jid_and_a_password():
    with pytest.raises(ConfigError) as e:
        load({"XMPP_JID": "not-a-jid", "XMPP_PASSWORD": "pw"})
    assert "XMPP_JID" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load({"XMPP_JID": "bot@example.org"})
    assert "XMPP_PASSWORD" in str(e.value)
    config = load({"XMPP_JID": "bot@example.org", "XMPP_PASSWORD": "pw",
                   "XMPP_ROOMS": "a@muc.example.org, b@muc.example.org"})
    extra = config.platforms["xmpp"].extra
    assert extra["rooms"] == ("a@muc.example.org", "b@muc.example.org") or \
        list(extra["rooms"]) == ["a@muc.example.org", "b@muc.example.org"]
    assert extra["require_mention"] is True and extra["direct_tls"] is False


@pytest.mark.parametrize("direct_tls", [False, True])
def test_tls_comes_before_sasl_either_way(direct_tls):
    bot = Bot()
    factory = XMPPStreamFactory(bot.adapter, JID("hermes@example.org/hermes"), "pw", tls=None,
                                direct_tls=direct_tls, sm=StreamManagement())
    xs = factory.buildProtocol(None)
    kinds = [type(i).__name__ for i in xs.initializers]
    assert kinds.index("TLSInitiatingInitializer") < kinds.index("SASLInitiatingInitializer")
    tls = xs.initializers[kinds.index("TLSInitiatingInitializer")]
    # STARTTLS is required on a plain connection; a direct-TLS connection is TLS already.
    assert tls.wanted and tls.required is (not direct_tls)
    assert bot.adapter.build_endpoint().__class__.__name__ == "HostnameEndpoint"
    assert XMPPAdapter(PlatformSettings(name="xmpp", enabled=True, extra={
        "jid": "h@example.org", "password": "pw", "direct_tls": True}),
        reactor=bot.clock).port == 5223
