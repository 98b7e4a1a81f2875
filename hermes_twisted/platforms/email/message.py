# -*- test-case-name: tests.test_email_message -*-
"""
Mail in and out, as data: parsing an inbound mail (L{parse_mail}), deciding whether it was
sent by a machine (L{automated_reason}) and whether its sender is authenticated
(L{sender_authenticated}), and building our reply with correct threading headers
(L{build_reply}).

Pure functions over bytes and C{email.message.EmailMessage}; parsing a large mail is CPU
work, so the adapter runs L{parse_mail} in a thread.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from html.parser import HTMLParser

from hermes_twisted.model import MediaPart

#: Substrings of a sender address that mark automated mail (hermes-agent 0.19.0's list).
AUTOMATED_SENDERS = (
    "noreply", "no-reply", "no_reply", "donotreply", "do-not-reply", "mailer-daemon",
    "postmaster", "bounce", "notifications@", "automated@", "auto-confirm", "auto-reply",
    "automailer",
)
BULK_PRECEDENCE = frozenset({"bulk", "list", "junk"})
DEFAULT_SUBJECT = "Hermes Agent"
_REPLY_PREFIX = re.compile(r"^\s*re\s*:", re.I)
_MSGID = re.compile(r"<[^<>\s]+>")


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    size: int
    data: bytes = field(default=b"", repr=False)

    def media_part(self) -> MediaPart:
        """The attachment for the shared media pipeline (images go upstream as images)."""
        kind = "image" if self.content_type.startswith("image/") else "file"
        return MediaPart(kind, self.content_type, self.filename, self.size, data=self.data)


@dataclass(frozen=True)
class InboundMail:
    """What the adapter needs of one inbound mail."""

    sender: str  # the address, lower-cased
    sender_name: str
    subject: str
    message_id: str | None
    in_reply_to: str | None
    references: tuple[str, ...]
    body: str
    attachments: tuple[Attachment, ...]
    automated: str | None  # why it is machine-sent, or None
    message: EmailMessage

    @property
    def thread_root(self) -> str | None:
        """The first Message-ID of the thread (RFC 5322 References order), else our own."""
        if self.references:
            return self.references[0]
        return self.in_reply_to or self.message_id


@dataclass(frozen=True)
class ThreadContext:
    """Where a reply goes: the mail it answers and that mail's thread."""

    subject: str
    message_id: str | None
    references: tuple[str, ...] = ()

    @classmethod
    def of(cls, mail: InboundMail) -> "ThreadContext":
        return cls(mail.subject, mail.message_id, mail.references)


def _one_line(value: str | None) -> str:
    return " ".join(str(value or "").split())


def _msgids(value: str | None) -> tuple[str, ...]:
    return tuple(_MSGID.findall(str(value or "")))


def parse_mail(raw: bytes) -> InboundMail:
    """Parse one RFC 5322 message (never raises on malformed input; fields become empty)."""
    msg = message_from_bytes(raw, policy=policy.default)
    name, addr = parseaddr(str(msg.get("From", "")))
    addr = addr.strip().lower()
    message_id = next(iter(_msgids(msg.get("Message-ID"))), None)
    in_reply_to = next(iter(_msgids(msg.get("In-Reply-To"))), None)
    return InboundMail(
        sender=addr,
        sender_name=_one_line(name),
        subject=_one_line(msg.get("Subject")),
        message_id=message_id,
        in_reply_to=in_reply_to,
        references=_msgids(msg.get("References")),
        body=extract_text(msg),
        attachments=tuple(_attachments(msg)),
        automated=automated_reason(msg, addr),
        message=msg,
    )


def extract_text(msg: EmailMessage) -> str:
    """The text of the mail: its plain part, else its HTML part as text; '' when neither."""
    try:
        part = msg.get_body(preferencelist=("plain", "html"))
    except Exception:
        part = None
    if part is None:
        return ""
    try:
        content = part.get_content()
    except Exception:
        payload = part.get_payload(decode=True) or b""
        content = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    if not isinstance(content, str):
        return ""
    if part.get_content_subtype() == "html":
        content = html_to_text(content)
    return content.replace("\r\n", "\n").strip()


def _attachments(msg: EmailMessage) -> list[Attachment]:
    out = []
    try:
        parts = list(msg.iter_attachments())
    except Exception:
        return out
    for part in parts:
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        out.append(Attachment(part.get_filename() or "(unnamed)", part.get_content_type(),
                              len(data), data))
    return out


class _TextOfHTML(HTMLParser):
    BREAKS = frozenset({"br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6",
                        "blockquote", "pre", "table"})
    HIDDEN = frozenset({"script", "style", "head", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.HIDDEN:
            self.hidden += 1
        elif tag in self.BREAKS:
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag in self.BREAKS:
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.out.append(data)


def html_to_text(html: str) -> str:
    """Readable text of an HTML body: tags dropped, block elements become line breaks."""
    parser = _TextOfHTML()
    parser.feed(html)
    parser.close()
    lines = [" ".join(line.split()) for line in "".join(parser.out).splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def automated_reason(msg: EmailMessage, sender: str) -> str | None:
    """
    Why C{msg} was sent by a machine (and must never be answered), or None.  hermes-agent
    0.19.0's checks plus C{List-Id}, an empty C{Return-Path} and C{multipart/report}.
    """
    auto = str(msg.get("Auto-Submitted", "") or "").strip().lower()
    if auto and auto.split(";")[0].strip() != "no":
        return f"Auto-Submitted: {auto}"
    precedence = str(msg.get("Precedence", "") or "").strip().lower()
    if precedence in BULK_PRECEDENCE:
        return f"Precedence: {precedence}"
    for header in ("X-Auto-Response-Suppress", "List-Id", "List-Unsubscribe"):
        if msg.get(header) is not None:
            return f"{header} present"
    return_path = msg.get("Return-Path")
    if return_path is not None and parseaddr(str(return_path))[1].strip("<> ") == "":
        return "empty Return-Path (a bounce)"
    if msg.get_content_type() == "multipart/report":
        return "multipart/report (a delivery or disposition report)"
    for pattern in AUTOMATED_SENDERS:
        if pattern in sender:
            return f"sender address contains {pattern!r}"
    return None


def _domain(address: str | None) -> str:
    return str(address or "").rsplit("@", 1)[-1].strip().strip(">").lower()


def _aligned(a: str, b: str) -> bool:
    """Relaxed alignment: equal, or one a dot-suffix of the other."""
    return bool(a and b) and (a == b or a.endswith("." + b) or b.endswith("." + a))


def trusted_results_header(msg: EmailMessage, authserv_id: str | None) -> str | None:
    """
    The C{Authentication-Results} header to trust: the first whose authserv-id is
    C{authserv_id}, or (no id configured) the first one.
    """
    for header in msg.get_all("Authentication-Results") or ():
        text = str(header)
        server = text.split(";", 1)[0].strip().split()[0].lower() if text.strip() else ""
        if not authserv_id or server == authserv_id.strip().lower():
            return text
    return None


def sender_authenticated(mail: InboundMail, authserv_id: str | None = None) -> bool:
    """
    hermes-agent 0.19.0's anti-spoofing gate: the trusted C{Authentication-Results} shows
    C{dmarc=pass}, or C{spf=pass} with C{smtp.mailfrom} aligned to From, or C{dkim=pass} with
    C{header.d} aligned.
    """
    header = trusted_results_header(mail.message, authserv_id)
    if header is None:
        return False
    from_domain = _domain(mail.sender)
    for clause in re.sub(r"\([^)]*\)", " ", header).split(";")[1:]:
        tokens = clause.split()
        if not tokens:
            continue
        method, _, result = tokens[0].lower().partition("=")
        props = dict(t.split("=", 1) for t in tokens[1:] if "=" in t)
        props = {k.lower(): v for k, v in props.items()}
        if result != "pass":
            continue
        if method == "dmarc":
            return True
        if method == "spf" and _aligned(_domain(props.get("smtp.mailfrom")), from_domain):
            return True
        if method == "dkim" and _aligned(_domain(props.get("header.d")), from_domain):
            return True
    return False


def reply_subject(subject: str | None) -> str:
    subject = _one_line(subject) or DEFAULT_SUBJECT
    return subject if _REPLY_PREFIX.match(subject) else f"Re: {subject}"


def new_message_id(address: str) -> str:
    """C{<hermes-12hex@domain>} as hermes-agent 0.19.0 writes them."""
    domain = _domain(address) if "@" in address else "localhost"
    return f"<hermes-{secrets.token_hex(6)}@{domain or 'localhost'}>"


def build_reply(*, sender: str, recipient: str, text: str, context: ThreadContext | None,
                now: float | None = None, message_id: str | None = None) -> tuple[str, bytes]:
    """
    Our mail to C{recipient}: plain text, C{Auto-Submitted: auto-replied}, and when it
    answers a mail (C{context}) a C{Re:} subject, C{In-Reply-To} and the C{References}
    chain extended with the answered Message-ID.  Returns C{(Message-ID, CRLF bytes)}.
    """
    msg = EmailMessage()
    msg["From"] = Address(addr_spec=sender)
    msg["To"] = Address(addr_spec=recipient)
    msg["Subject"] = reply_subject(context.subject if context else None)
    msg["Date"] = formatdate(now, localtime=False)
    mid = message_id or new_message_id(sender)
    msg["Message-ID"] = mid
    if context is not None and context.message_id:
        chain = [r for r in context.references if r != context.message_id]
        msg["In-Reply-To"] = context.message_id
        msg["References"] = " ".join([*chain, context.message_id])
    msg["Auto-Submitted"] = "auto-replied"
    msg.set_content(text)
    return mid, msg.as_bytes(policy=policy.SMTP)
