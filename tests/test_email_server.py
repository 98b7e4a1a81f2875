"""
The email adapter against a real mail system (L{tests.servers.dovecot}: Dovecot IMAP + LMTP,
aiosmtpd submission relaying into it), all on 127.0.0.1 with a self-signed certificate.

Inbound mail is put into the bot's inbox over LMTP (what an MTA does) or submitted by "alice"
through the submission port; the bot's replies are read from alice's inbox with imaplib.
"""

from __future__ import annotations

from email import message_from_bytes, policy
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from hermes_twisted.config.settings import GatewayConfig, PlatformSettings
from hermes_twisted.platforms.email.adapter import EmailAdapter
from tests.relay_support import RecordingSink, eventually
from tests.servers import dovecot

pytestmark = pytest.mark.integration

WAIT = 15.0


def mail(sender: str, to: str, subject: str, body: str = "hello", **headers: str) -> bytes:
    lines = [f"From: Alice <{sender}>", f"To: {to}", f"Subject: {subject}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n" + body + "\r\n").encode()


class Bot:
    """An adapter for a fresh bot mailbox, with its sink and its state directory."""

    def __init__(self, system: Any, tmp_path: Any, *, ca: bool = True, **extra: Any) -> None:
        self.system = system
        self.user = system.new_user("bot")
        self.home = tmp_path
        self.extra = {"address": self.user.address, "password": self.user.password,
                      "imap_host": "127.0.0.1", "imap_port": system.imaps_port,
                      "smtp_host": "127.0.0.1", "smtp_port": system.submission_port,
                      "poll_interval": 3600, **extra}
        if ca:
            self.extra["ca_file"] = str(system.ca_file)
        self.sink = RecordingSink()
        self.adapter: EmailAdapter | None = None

    def start(self) -> EmailAdapter:
        settings = PlatformSettings(name="email", enabled=True, allow_all_users=True,
                                    extra=self.extra)
        config = GatewayConfig(hermes_home=str(self.home), db_path=str(self.home / "db"))
        self.adapter = EmailAdapter(settings, reactor=reactor, gateway_config=config)
        self.adapter.attach(self.sink)
        self.adapter.startService()
        return self.adapter

    async def connected(self) -> None:
        await eventually(lambda: self.adapter.status.startswith("connected"), WAIT,
                         f"the bot to connect (status {self.adapter.status})")

    async def stop(self) -> None:
        if self.adapter is not None and self.adapter.running:
            await self.adapter.stopService()

    async def deliver(self, message: bytes, sender: str = "alice@localhost") -> None:
        await deferToThread(self.system.deliver, sender, self.user.address, message)

    async def inbox(self, user: Any = None) -> list[tuple[int, set[str], bytes]]:
        return await deferToThread(self.system.fetch_all, user or self.user)


@pytest.fixture
def bots(mail_system, tmp_path):
    made: list[Bot] = []

    def make(**kw: Any) -> Bot:
        bot = Bot(mail_system, tmp_path / f"home{len(made)}", **kw)
        made.append(bot)
        return bot

    yield make
    for bot in made:
        if bot.adapter is not None and bot.adapter.running:
            pytest_twisted.blockon(bot.adapter.stopService())


@pytest_twisted.ensureDeferred
async def test_round_trip_marks_seen_only_after_admission_and_threads_the_reply(
        mail_system, bots):
    bot = bots()
    alice = mail_system.new_user("alice")
    bot.start()
    await bot.connected()
    held: Deferred = Deferred()
    bot.sink.admit = lambda event: held
    message = mail(alice.address, bot.user.address, "Plans for Friday", "Shall we meet?",
                   Message_ID="<m2@alice.example>", In_Reply_To="<m1@alice.example>",
                   References="<m0@alice.example> <m1@alice.example>")
    await deferToThread(mail_system.submit, alice, [bot.user.address], message)
    # IDLE pushes the mail: poll_interval is an hour, so only IDLE can have found it.
    await eventually(lambda: bot.sink.events, WAIT, "the inbound mail")
    event = bot.sink.events[0]
    assert event.text == "[Subject: Plans for Friday]\n\nShall we meet?"
    assert (event.source.platform.value, event.source.chat_id, event.source.user_id,
            event.source.chat_type) == ("email", alice.address, alice.address, "dm")
    assert event.message_id == "<m2@alice.example>"
    assert event.metadata["dedupe_key"].startswith(f"email:{bot.user.address}:")
    # Fetched with BODY.PEEK[]: not \Seen while the gateway has not admitted it.
    [(uid, flags, _)] = await bot.inbox()
    assert "\\Seen" not in flags
    held.callback(None)
    await eventually(lambda: bot.adapter.cursor.last_uid == uid, WAIT, "the cursor")
    [(_, flags, _)] = await bot.inbox()
    assert "\\Seen" in flags

    result = await bot.adapter.send(event.source.chat_id, "Friday at noon works.",
                                    reply_to=event.message_id)
    assert result.success, result.error
    replies = await eventually_inbox(bot, alice)
    reply = message_from_bytes(replies[0][2], policy=policy.default)
    assert reply["Subject"] == "Re: Plans for Friday"
    assert reply["In-Reply-To"] == "<m2@alice.example>"
    assert reply["References"].split() == ["<m0@alice.example>", "<m1@alice.example>",
                                           "<m2@alice.example>"]
    assert reply["Auto-Submitted"] == "auto-replied"
    assert reply["Message-ID"] == result.message_id
    assert reply["From"] == bot.user.address
    assert reply.get_content().strip() == "Friday at noon works."
    assert len(bot.sink.events) == 1


async def eventually_inbox(bot: Bot, user: Any) -> list[Any]:
    box: list[Any] = []

    async def fetch() -> None:
        box[:] = await bot.inbox(user)

    for _ in range(int(WAIT / 0.2)):
        await fetch()
        if box:
            return box
        await deferLater_(0.2)
    raise AssertionError(f"nothing arrived for {user.address}")


def deferLater_(seconds: float) -> Deferred:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_mail_waiting_after_a_restart_is_answered_exactly_once(bots):
    bot = bots()
    await bot.deliver(mail("old@localhost", bot.user.address, "history"))
    bot.start()
    await bot.connected()
    first_cursor = bot.adapter.cursor
    await bot.stop()
    assert bot.sink.events == []  # the first start does not answer the inbox's history

    await bot.deliver(mail("alice@localhost", bot.user.address, "while you were down 1"))
    await bot.deliver(mail("alice@localhost", bot.user.address, "while you were down 2"))
    bot.start()
    await bot.connected()
    await eventually(lambda: len(bot.sink.events) >= 2, WAIT, "the waiting mail")
    await eventually(lambda: bot.adapter.cursor.last_uid == first_cursor.last_uid + 2, WAIT,
                     "the cursor past both")
    await bot.stop()
    assert [e.text.split("\n")[0] for e in bot.sink.events] == [
        "[Subject: while you were down 1]", "[Subject: while you were down 2]"]
    keys = [e.metadata["dedupe_key"] for e in bot.sink.events]
    assert len(set(keys)) == 2

    bot.start()  # a third start: nothing new, nothing answered again
    await bot.connected()
    await bot.deliver(mail("alice@localhost", bot.user.address, "after"))
    await eventually(lambda: len(bot.sink.events) == 3, WAIT, "the next mail")
    await bot.stop()
    assert bot.sink.events[2].text.startswith("[Subject: after]")


@pytest_twisted.ensureDeferred
async def test_automated_mail_is_never_answered_but_is_marked_handled(bots):
    bot = bots()
    bot.start()
    await bot.connected()
    await bot.deliver(mail("alice@localhost", bot.user.address, "Out of office",
                           Auto_Submitted="auto-replied"))
    await bot.deliver(mail("list@localhost", bot.user.address, "digest",
                           List_Id="<team.lists.localhost>"))
    await bot.deliver(mail("mailer@localhost", bot.user.address, "Undelivered"), sender="")
    await bot.deliver(mail("alice@localhost", bot.user.address, "a real question"))
    await eventually(lambda: bot.sink.events, WAIT, "the real mail")
    await eventually(lambda: bot.adapter.cursor.last_uid >= 4, WAIT, "the cursor")
    assert [e.text for e in bot.sink.events] == ["[Subject: a real question]\n\nhello"]
    flags = [f for _, f, _ in await bot.inbox()]
    assert all("\\Seen" in f for f in flags), flags


@pytest_twisted.ensureDeferred
async def test_polling_when_idle_is_not_used(bots):
    bot = bots(poll_interval=0.2, idle=False)
    bot.start()
    await bot.connected()
    assert bot.adapter.status == "connected (polling)"
    await bot.deliver(mail("alice@localhost", bot.user.address, "polled"))
    await eventually(lambda: bot.sink.events, WAIT, "the polled mail")


@pytest_twisted.ensureDeferred
async def test_self_signed_certificate_is_refused_without_ca_file(bots, mail_system):
    bot = bots(ca=False)
    bot.start()
    await eventually(lambda: "certificate" in bot.adapter.status.lower(), WAIT,
                     "a certificate error")
    await bot.deliver(mail("alice@localhost", bot.user.address, "unseen"))
    result = await bot.adapter.send("alice@localhost", "hello")
    assert not result.success
    assert "certificate" in result.error.lower(), result.error
    assert bot.sink.events == []
    await bot.stop()


@pytest_twisted.ensureDeferred
async def test_reply_over_implicit_tls(bots, mail_system):
    bot = bots(smtp_port=mail_system.smtps_port, smtp_implicit_tls=True)
    alice = mail_system.new_user("alice")
    bot.start()
    await bot.connected()
    result = await bot.adapter.send(alice.address, "over 465")
    assert result.success, result.error
    [(_, _, raw)] = await eventually_inbox(bot, alice)
    reply = message_from_bytes(raw, policy=policy.default)
    assert reply["Subject"] == "Re: Hermes Agent"
    assert reply["Auto-Submitted"] == "auto-replied"
    assert reply["In-Reply-To"] is None


@pytest_twisted.ensureDeferred
async def test_implicit_tls_refuses_a_self_signed_certificate_without_ca_file(bots,
                                                                              mail_system):
    bot = bots(ca=False, smtp_port=mail_system.smtps_port, smtp_implicit_tls=True)
    bot.start()
    result = await bot.adapter.send("alice@localhost", "hello")
    assert not result.success
    assert "certificate" in result.error.lower(), result.error


@pytest_twisted.ensureDeferred
async def test_a_mail_becomes_one_threaded_reply_through_the_gateway(mail_system, bots):
    """
    The whole path: a mail is a turn in the real Gateway (SQLite store, proxy upstream
    streaming over SSE), and the answer is exactly one mail, even with streaming on, because
    email does not edit.
    """
    from twisted.web.server import Site

    from hermes_twisted.config.settings import ResetPolicy, StreamingSettings, UpstreamSettings
    from hermes_twisted.dispatch.gateway import Gateway
    from hermes_twisted.sessions.sqlite import SQLiteSessionStore
    from hermes_twisted.upstream.proxy import ProxyUpstream
    from tests.test_gateway_e2e import Completions

    resource = Completions()
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    bot = bots()
    alice = mail_system.new_user("alice")
    config = GatewayConfig(hermes_home=str(bot.home), db_path=str(bot.home / "gw.db"),
                           allow_all_users=True, streaming=StreamingSettings(enabled=True),
                           upstream=UpstreamSettings(
                               proxy_url=f"http://127.0.0.1:{port.getHost().port}"))
    bot.home.mkdir(parents=True, exist_ok=True)
    store = SQLiteSessionStore(config.db_path, reactor=reactor,
                               reset_policy_for=lambda source: ResetPolicy())
    await store.open()
    upstream = ProxyUpstream(config.upstream, reactor=reactor)
    upstream.startService()
    gateway = Gateway(config, store=store, upstream=upstream, clock=reactor)
    adapter = EmailAdapter(PlatformSettings(name="email", enabled=True, extra=bot.extra),
                           reactor=reactor, gateway_config=config)
    bot.adapter = adapter
    gateway.add_adapter(adapter)
    gateway.startService()
    adapter.startService()
    try:
        await bot.connected()
        message = mail(alice.address, bot.user.address, "Question", "hi",
                       Message_ID="<q1@alice.example>")
        await deferToThread(mail_system.submit, alice, [bot.user.address], message)
        [(_, _, raw)] = await eventually_inbox(bot, alice)
        reply = message_from_bytes(raw, policy=policy.default)
        assert reply.get_content().strip() == "Hello there."
        assert (reply["Subject"], reply["In-Reply-To"], reply["References"]) == (
            "Re: Question", "<q1@alice.example>", "<q1@alice.example>")
        assert resource.requests == ["[Subject: Question]\n\nhi"]
        await deferLater_(0.5)
        assert len(await bot.inbox(alice)) == 1  # one mail per turn, no streamed partials
        [(_, flags, _)] = await bot.inbox()
        assert "\\Seen" in flags
    finally:
        await adapter.stopService()
        await gateway.stopService()
        await upstream.stopService()
        await store.close()
        await port.stopListening()


# -- the fixture's Dovecot 2.4 dialect, as text ---------------------------------------------------
# The machines these tests run on here are Debian 12 (Dovecot 2.3): the 2.4 branch of the
# fixture cannot be started, so what can be checked without the binary is checked here.


@pytest.mark.parametrize("reported, written", [
    ("2.4.1", "2.4.1"), ("2.4.1-4", "2.4.1"), ("2.4.0", "2.4.0"), ("2.4.2", "2.4.1"),
])
def test_dovecot_24_config_names_a_version_the_binary_accepts(tmp_path, reported, written):
    text = dovecot.dovecot_config(reported, tmp_path, 1143, 1993, 1024)
    lines = text.splitlines()
    # 2.4 refuses a file whose first setting is not dovecot_config_version.
    assert lines[0] == f"dovecot_config_version = {written}"
    assert lines[1] == f"dovecot_storage_version = {written}"


def test_dovecot_24_config_uses_no_23_setting(tmp_path):
    text = dovecot.dovecot_config("2.4.1", tmp_path, 1143, 1993, 1024)
    for old in ("mail_location", "disable_plaintext_auth", "ssl_cert =", "ssl_key =",
                "protocol lmtp", "  driver =", "  args =", "%d", "%n"):
        assert old not in text, old
    for new in ("auth_allow_cleartext = yes", f"ssl_server_cert_file = {tmp_path}/cert.pem",
                "mail_driver = maildir", "%{user | domain}/%{user | username}",
                f"passwd_file_path = {tmp_path}/users", "namespace inbox {",
                "port = 1143", "port = 1993", "port = 1024"):
        assert new in text, new
    assert text.count("{") - text.count("%{") == text.count("}") - text.count("%{")


def test_dovecot_23_config_is_the_debian_12_dialect(tmp_path):
    text = dovecot.dovecot_config("2.3.19.1", tmp_path, 1143, 1993, 1024)
    assert "dovecot_config_version" not in text
    assert f"mail_location = maildir:{tmp_path}/mail/%d/%n/Maildir" in text
