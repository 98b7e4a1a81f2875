"""
The email platform without a server: parsing, automated-mail detection, the sender gate,
reply threading headers, the IDLE command on a StringTransport with a Clock, the cursor
file, and the configuration.  (The real-server tests are L{tests.test_email_server}.)
"""

from __future__ import annotations

from email import message_from_bytes, policy

import pytest
from twisted.internet.defer import CancelledError, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from hermes_twisted.config.errors import ConfigError
from hermes_twisted.config.loader import load_config
from hermes_twisted.config.settings import GatewayConfig, PlatformSettings
from hermes_twisted.platforms.email.adapter import EmailAdapter
from hermes_twisted.platforms.email.cursor import Cursor, load_cursor, save_cursor
from hermes_twisted.platforms.email.imap import IDLE_RENEW_SECONDS, MailboxClient
from hermes_twisted.platforms.email.message import (
    ThreadContext,
    build_reply,
    parse_mail,
    reply_subject,
    sender_authenticated,
)


def raw(*headers: str, body: str = "hi there", content_type: str = "text/plain") -> bytes:
    lines = ["From: Alice Example <Alice@Example.org>", "To: bot@example.net",
             f"Content-Type: {content_type}; charset=utf-8", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n" + body + "\r\n").encode()


# -- parsing ------------------------------------------------------------------------------------


def test_parse_plain_mail_with_threading_headers():
    mail = parse_mail(raw("Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=", "Message-ID: <m3@ex.org>",
                          "In-Reply-To: <m2@ex.org>",
                          "References: <m1@ex.org>\r\n <m2@ex.org>"))
    assert (mail.sender, mail.sender_name, mail.subject) == ("alice@example.org",
                                                           "Alice Example", "Grüße")
    assert (mail.message_id, mail.in_reply_to, mail.references) == (
        "<m3@ex.org>", "<m2@ex.org>", ("<m1@ex.org>", "<m2@ex.org>"))
    assert mail.thread_root == "<m1@ex.org>"
    assert mail.body == "hi there"
    assert mail.automated is None


def test_html_only_mail_becomes_readable_text():
    body = ("<html><head><style>p{}</style></head><body><p>Hello&nbsp;<b>bot</b></p>"
            "<div>line two<br>line three</div><script>x()</script></body></html>")
    mail = parse_mail(raw("Subject: s", body=body, content_type="text/html"))
    assert mail.body == "Hello bot\n\nline two\nline three"


def test_attachments_are_listed():
    message = (b"From: a@example.org\r\nSubject: file\r\nMIME-Version: 1.0\r\n"
               b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n"
               b"Content-Type: text/plain\r\n\r\nsee attached\r\n--XX\r\n"
               b"Content-Type: image/png\r\nContent-Disposition: attachment; filename=a.png\r\n"
               b"Content-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n--XX--\r\n")
    mail = parse_mail(message)
    assert mail.body == "see attached"
    assert [(a.filename, a.content_type, a.size) for a in mail.attachments] == [
        ("a.png", "image/png", 8)]


@pytest.mark.parametrize("header", [
    "Auto-Submitted: auto-replied", "Auto-Submitted: auto-generated", "Precedence: bulk",
    "Precedence: list", "Precedence: junk", "X-Auto-Response-Suppress: All",
    "List-Id: <team.lists.example.org>", "List-Unsubscribe: <mailto:u@example.org>",
    "Return-Path: <>",
])
def test_automated_mail_is_recognised(header):
    assert parse_mail(raw(header)).automated


def test_delivery_reports_and_robot_senders_are_automated():
    report = raw(content_type='multipart/report; report-type=delivery-status; boundary="b"',
                 body="--b--")
    assert "multipart/report" in parse_mail(report).automated
    robot = raw().replace(b"Alice@Example.org", b"no-reply@example.org")
    assert parse_mail(robot).automated


@pytest.mark.parametrize("header", ["Auto-Submitted: no", "Precedence: first-class",
                                    "Return-Path: <alice@example.org>"])
def test_person_mail_is_not_automated(header):
    assert parse_mail(raw(header)).automated is None


# -- the sender gate ----------------------------------------------------------------------------


@pytest.mark.parametrize("results, expected", [
    ("mx.example.net; dmarc=pass header.from=example.org", True),
    ("mx.example.net; spf=pass smtp.mailfrom=bounce@mail.example.org", True),
    ("mx.example.net; spf=pass smtp.mailfrom=evil@attacker.example", False),
    ("mx.example.net; dkim=pass (good signature) header.d=example.org", True),
    ("mx.example.net; dkim=fail header.d=example.org; dmarc=fail", False),
    ("mx.example.net; none", False),
])
def test_authentication_results_gate(results, expected):
    mail = parse_mail(raw(f"Authentication-Results: {results}"))
    assert sender_authenticated(mail) is expected


def test_gate_trusts_only_the_pinned_authserv_id():
    mail = parse_mail(raw("Authentication-Results: forged.example; dmarc=pass",
                          "Authentication-Results: mx.example.net; dmarc=fail"))
    assert sender_authenticated(mail) is True  # no id pinned: the first header
    assert sender_authenticated(mail, "mx.example.net") is False
    assert sender_authenticated(parse_mail(raw()), None) is False


# -- the reply ----------------------------------------------------------------------------------


def test_reply_threads_onto_the_answered_mail():
    context = ThreadContext("Plans", "<m2@ex.org>", ("<m1@ex.org>", "<m2@ex.org>"))
    mid, data = build_reply(sender="bot@example.net", recipient="alice@example.org",
                            text="Sure.\nSee you.", context=context, now=0)
    assert b"\r\n" in data and b"\n\n" not in data.replace(b"\r\n", b"")
    reply = message_from_bytes(data, policy=policy.default)
    assert reply["Message-ID"] == mid and mid.startswith("<hermes-")
    assert mid.endswith("@example.net>")
    assert reply["Subject"] == "Re: Plans"
    assert reply["In-Reply-To"] == "<m2@ex.org>"
    assert reply["References"].split() == ["<m1@ex.org>", "<m2@ex.org>"]
    assert reply["Auto-Submitted"] == "auto-replied"
    assert reply.get_content().replace("\r\n", "\n") == "Sure.\nSee you.\n"


def test_reply_subject_is_prefixed_once_case_insensitively():
    assert reply_subject("RE: hello") == "RE: hello"
    assert reply_subject("re:hello") == "re:hello"
    assert reply_subject("Regarding x") == "Re: Regarding x"
    assert reply_subject("") == "Re: Hermes Agent"
    assert reply_subject("two\r\n lines") == "Re: two lines"


def test_a_new_mail_has_no_threading_headers():
    _, data = build_reply(sender="bot@example.net", recipient="a@example.org", text="hi",
                          context=None)
    reply = message_from_bytes(data, policy=policy.default)
    assert reply["In-Reply-To"] is None and reply["References"] is None
    assert reply["Subject"] == "Re: Hermes Agent"


# -- IDLE ---------------------------------------------------------------------------------------


def idle_client() -> tuple[MailboxClient, StringTransport, Clock]:
    clock = Clock()
    client = MailboxClient(None, clock)
    transport = StringTransport()
    client.makeConnection(transport)
    client.dataReceived(b"* OK [CAPABILITY IMAP4rev1 IDLE] ready\r\n")
    client.state = "auth"
    return client, transport, clock


def written(transport: StringTransport) -> list[bytes]:
    lines = transport.value().split(b"\r\n")
    transport.clear()
    return [line for line in lines if line]


def test_idle_ends_with_done_when_mail_arrives():
    client, transport, clock = idle_client()
    d = client.idle(60)
    [command] = written(transport)
    tag = command.split()[0]
    assert command.split()[1] == b"IDLE"
    client.dataReceived(b"+ idling\r\n")
    assert written(transport) == []
    client.dataReceived(b"* 4 EXISTS\r\n")
    assert written(transport) == [b"DONE"]
    assert not d.called
    client.dataReceived(tag + b" OK IDLE terminated\r\n")
    assert d.result is True
    assert clock.getDelayedCalls() == []


def test_idle_is_renewed_before_the_server_gives_up():
    assert IDLE_RENEW_SECONDS < 29 * 60  # RFC 2177
    client, transport, clock = idle_client()
    d = client.idle()
    tag = written(transport)[0].split()[0]
    client.dataReceived(b"+ idling\r\n")
    clock.advance(IDLE_RENEW_SECONDS - 1)
    assert written(transport) == []
    clock.advance(1)
    assert written(transport) == [b"DONE"]
    client.dataReceived(tag + b" OK done\r\n")
    assert d.result is False


def test_mail_reported_before_the_continuation_still_ends_idle():
    client, transport, clock = idle_client()
    d = client.idle(60)
    tag = written(transport)[0].split()[0]
    client.dataReceived(b"* 9 EXISTS\r\n")
    assert written(transport) == []  # DONE only after the server said "+"
    client.dataReceived(b"+ idling\r\n")
    assert written(transport) == [b"DONE"]
    client.dataReceived(tag + b" OK idle done\r\n")
    assert d.result is True


def test_cancelling_idle_sends_done_and_keeps_the_connection_usable():
    client, transport, clock = idle_client()
    d = client.idle(60)
    tag = written(transport)[0].split()[0]
    client.dataReceived(b"+ idling\r\n")
    d.cancel()
    assert written(transport) == [b"DONE"]
    failures = []
    d.addErrback(failures.append)
    assert failures[0].check(CancelledError)
    client.dataReceived(tag + b" OK idle done\r\n")
    assert clock.getDelayedCalls() == []
    noop = client.noop()
    assert written(transport)[0].split()[1] == b"NOOP"
    assert not noop.called


# -- cursor and config --------------------------------------------------------------------------


def test_cursor_round_trip_and_corruption(tmp_path):
    path = str(tmp_path / "email" / "bot@example.net.json")
    assert load_cursor(path) is None
    save_cursor(path, Cursor(42, 7))
    assert load_cursor(path) == Cursor(42, 7)
    (tmp_path / "email" / "bot@example.net.json").write_text("[1]")
    with pytest.raises(ValueError):
        load_cursor(path)


def test_email_needs_its_password_and_hosts(tmp_path):
    env = {"HERMES_HOME": str(tmp_path), "EMAIL_ADDRESS": "bot@example.net"}
    with pytest.raises(ConfigError) as e:
        load_config(None, env)
    assert "EMAIL_PASSWORD" in str(e.value)
    full = {**env, "EMAIL_PASSWORD": "pw", "EMAIL_IMAP_HOST": "imap.example.net",
            "EMAIL_SMTP_HOST": "smtp.example.net", "EMAIL_ALLOWED_USERS": "a@example.org",
            "EMAIL_CA_FILE": "ca.pem"}
    config = load_config(None, full)
    email = config.platforms["email"]
    assert email.enabled and email.allowed_users == ("a@example.org",)
    assert (email.extra["imap_port"], email.extra["smtp_port"],
            email.extra["poll_interval"]) == (993, 587, 15)
    assert email.extra["ca_file"] == str(tmp_path / "ca.pem")


# -- what the adapter answers -------------------------------------------------------------------


def adapter(**extra) -> EmailAdapter:
    settings = PlatformSettings(name="email", enabled=True,
                                allowed_users=extra.pop("allowed", ("alice@example.org",)),
                                extra={"address": "bot@example.net", **extra})
    made = EmailAdapter(settings, reactor=Clock(),
                        gateway_config=GatewayConfig(hermes_home="/nonexistent", db_path=""))
    made._cursor = Cursor(5, 0)
    return made


def test_own_and_plus_addressed_mail_is_not_answered():
    bot = adapter(trust_from_header=True)
    own = raw().replace(b"Alice@Example.org", b"bot+tag@example.net")
    assert bot._to_event(parse_mail(own), 1) is None
    assert bot._to_event(parse_mail(raw()), 2) is not None


def test_unauthenticated_sender_is_dropped_while_an_allowlist_is_set():
    bot = adapter()
    assert bot._to_event(parse_mail(raw()), 1) is None
    passed = raw("Authentication-Results: mx.example.net; dmarc=pass")
    event = bot._to_event(parse_mail(passed), 2)
    assert event is not None and event.metadata["dedupe_key"] == "email:bot@example.net:5:2"
    assert adapter(trust_from_header=True)._to_event(parse_mail(raw()), 1) is not None
    assert adapter(allowed=())._to_event(parse_mail(raw()), 1) is not None


def test_turn_text_and_session_per_thread():
    bot = adapter(trust_from_header=True, session_per_thread=True)
    event = bot._to_event(parse_mail(raw("Subject: Re: plans", "Message-ID: <m2@ex.org>",
                                         "References: <m1@ex.org>", body="")), 1)
    assert event.text == "(empty email)"  # a reply's subject is not repeated
    assert event.source.thread_id == "<m1@ex.org>"
    assert bot._context_for("alice@example.org", "<m2@ex.org>", {}).subject == "Re: plans"
    per_sender = adapter(trust_from_header=True)._to_event(parse_mail(raw("Subject: Hi")), 1)
    assert per_sender.source.thread_id is None and per_sender.text == "[Subject: Hi]\n\nhi there"


def test_an_unusable_ca_file_disables_email_and_fails_sends(tmp_path):
    settings = PlatformSettings(name="email", enabled=True, allow_all_users=True, extra={
        "address": "bot@example.net", "password": "pw", "imap_host": "imap.example.net",
        "smtp_host": "smtp.example.net", "ca_file": str(tmp_path / "missing.pem")})
    clock = Clock()
    bot = EmailAdapter(settings, reactor=clock, clock=clock,
                       gateway_config=GatewayConfig(hermes_home=str(tmp_path), db_path=""),
                       run_in_thread=lambda fn, *args: maybeDeferred(fn, *args))
    bot.startService()
    try:
        assert bot.status.startswith("disabled: EMAIL_CA_FILE"), bot.status
        result = bot.send("alice@example.org", "hello").result
        assert not result.success and "EMAIL_CA_FILE" in result.error
        assert bot.connections == 0
    finally:
        bot.stopService()
    assert clock.getDelayedCalls() == []


def test_attachments_go_to_the_media_pipeline_with_their_bytes():
    """An emailed image reaches the agent as an image part; other files as a note."""
    import base64

    from twisted.internet.defer import ensureDeferred

    from hermes_twisted.upstream.media import prepare_media

    png = b"\x89PNG\r\n\x1a\n" + bytes(range(40))
    message = (b"From: Alice <Alice@Example.org>\r\nTo: bot@example.net\r\nSubject: pics\r\n"
               b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
               b"--XX\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--XX\r\n"
               b"Content-Type: image/png\r\nContent-Disposition: attachment; filename=a.png\r\n"
               b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(png) +
               b"\r\n--XX\r\nContent-Type: application/pdf\r\n"
               b"Content-Disposition: attachment; filename=r.pdf\r\n"
               b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n--XX--\r\n")
    event = adapter(trust_from_header=True)._to_event(parse_mail(message), 1)
    assert "Attachment" not in event.text
    assert [(p.kind, p.mime_type, p.file_name, p.size) for p in event.media] == [
        ("image", "image/png", "a.png", len(png)), ("file", "application/pdf", "r.pdf", 5)]
    images, notes = [], []
    ensureDeferred(prepare_media(event.media)).addCallback(
        lambda result: (images.extend(result[0]), notes.extend(result[1])))
    assert images == ["data:image/png;base64," + base64.b64encode(png).decode()]
    assert notes == ["[The user attached a file: r.pdf (application/pdf, 5 bytes)]"]
