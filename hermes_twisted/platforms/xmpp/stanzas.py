# -*- test-case-name: tests.test_xmpp -*-
"""
XMPP stanzas in and out (email-xmpp.md §4): namespaces, the inbound message read into a
plain L{Inbound}, outbound messages with XEP-0359 origin ids, XEP-0308 corrections and
XEP-0085 chat states, MUC join presence, mention detection, and the XEP-0115 caps hash of
what we implement.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime

from twisted.words.protocols.jabber.jid import JID, InvalidFormat
from twisted.words.xish import domish

NS_CLIENT = "jabber:client"
NS_MUC = "http://jabber.org/protocol/muc"
NS_MUC_USER = "http://jabber.org/protocol/muc#user"
NS_MUC_OWNER = "http://jabber.org/protocol/muc#owner"
NS_DATA = "jabber:x:data"
NS_CORRECT = "urn:xmpp:message-correct:0"
NS_CHATSTATES = "http://jabber.org/protocol/chatstates"
NS_SID = "urn:xmpp:sid:0"
NS_DELAY = "urn:xmpp:delay"
NS_OCCUPANT_ID = "urn:xmpp:occupant-id:0"
NS_PING = "urn:xmpp:ping"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
NS_CAPS = "http://jabber.org/protocol/caps"
NS_ROSTER = "jabber:iq:roster"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"

#: What we really implement, announced by disco#info and the caps hash (§4.2).
FEATURES = (NS_CHATSTATES, NS_DISCO_INFO, NS_CORRECT, NS_PING, NS_SID)
IDENTITY = ("client", "bot", "Hermes")
CAPS_NODE = "https://github.com/hermes-twisted"

_CHAT_STATES = ("active", "composing", "paused", "inactive", "gone")


def caps_ver() -> str:
    """The XEP-0115 verification string of L{IDENTITY} and L{FEATURES}."""
    category, kind, name = IDENTITY
    text = f"{category}/{kind}//{name}<" + "".join(f"{f}<" for f in sorted(FEATURES))
    return base64.b64encode(hashlib.sha1(text.encode("utf-8")).digest()).decode("ascii")


def parse_jid(text: str | None) -> JID | None:
    if not text:
        return None
    try:
        return JID(text)
    except (InvalidFormat, ValueError, TypeError):
        return None


def child(element: domish.Element, uri: str, name: str) -> domish.Element | None:
    for found in element.elements(uri, name):
        return found
    return None


@dataclass
class Inbound:
    """One message stanza, read.  C{sender} is the full JID (C{room/nick} in a MUC)."""

    kind: str  # "chat", "groupchat", "normal", "error", "headline"
    sender: JID
    body: str | None
    stanza_id: str | None  # XEP-0359 <stanza-id>, only when stamped by C{by}
    stanza_id_by: str | None
    message_id: str | None
    origin_id: str | None
    delayed: datetime | None
    delayed_by: str | None  # XEP-0203 C{from}: who held the stanza (a room, our server)
    has_subject: bool
    occupant_id: str | None


def read_message(element: domish.Element, trusted_by: set[str]) -> Inbound | None:
    """
    Read a C{<message/>}; None when it has no usable sender.  A C{<stanza-id/>} counts only
    when its C{by} is in C{trusted_by} (our bare JID, or the room it came from): anyone can
    put one in a message they send.
    """
    sender = parse_jid(element.getAttribute("from"))
    if sender is None:
        return None
    body_el = child(element, NS_CLIENT, "body")
    stanza_id = by = None
    for sid in element.elements(NS_SID, "stanza-id"):
        if sid.getAttribute("by") in trusted_by and sid.getAttribute("id"):
            stanza_id, by = sid["id"], sid["by"]
            break
    origin = child(element, NS_SID, "origin-id")
    delay = child(element, NS_DELAY, "delay")
    occupant = child(element, NS_OCCUPANT_ID, "occupant-id")
    return Inbound(
        kind=element.getAttribute("type") or "normal",
        sender=sender,
        body=str(body_el) if body_el is not None else None,
        stanza_id=stanza_id,
        stanza_id_by=by,
        message_id=element.getAttribute("id"),
        origin_id=origin.getAttribute("id") if origin is not None else None,
        delayed=_stamp(delay.getAttribute("stamp")) if delay is not None else None,
        delayed_by=delay.getAttribute("from") if delay is not None else None,
        has_subject=child(element, NS_CLIENT, "subject") is not None,
        occupant_id=occupant.getAttribute("id") if occupant is not None else None,
    )


def _stamp(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def message(to: str, kind: str, stanza_id: str, body: str | None = None, *,
            replaces: str | None = None, chat_state: str | None = None) -> domish.Element:
    """
    A C{<message/>} with C{id} and a matching XEP-0359 C{<origin-id/>}; with C{replaces} a
    XEP-0308 correction of the message whose id that is (always the original's, §4.5); with
    C{chat_state} a XEP-0085 state (C{composing}, C{active}, ...).
    """
    msg = domish.Element((NS_CLIENT, "message"))
    msg["to"] = to
    msg["type"] = kind
    msg["id"] = stanza_id
    if body is not None:
        msg.addElement("body", content=body)
        msg.addElement((NS_SID, "origin-id"))["id"] = stanza_id
    if replaces is not None:
        msg.addElement((NS_CORRECT, "replace"))["id"] = replaces
    if chat_state is not None:
        assert chat_state in _CHAT_STATES, chat_state
        msg.addElement((NS_CHATSTATES, chat_state))
    return msg


def presence(to: str | None = None, *, muc_join: bool = False,
             kind: str | None = None) -> domish.Element:
    """Our presence (with the caps hash), or a MUC join asking for no history (§4.4)."""
    pres = domish.Element((NS_CLIENT, "presence"))
    if to is not None:
        pres["to"] = to
    if kind is not None:
        pres["type"] = kind
    if muc_join:
        pres.addElement((NS_MUC, "x")).addElement("history")["maxstanzas"] = "0"
    if kind is None:
        caps = pres.addElement((NS_CAPS, "c"))
        caps["hash"], caps["node"], caps["ver"] = "sha-1", CAPS_NODE, caps_ver()
    return pres


def disco_info(query: domish.Element) -> None:
    """Fill a disco#info result C{<query/>} with L{IDENTITY} and L{FEATURES}."""
    category, kind, name = IDENTITY
    identity = query.addElement("identity")
    identity["category"], identity["type"], identity["name"] = category, kind, name
    for feature in FEATURES:
        query.addElement("feature")["var"] = feature


def muc_status(element: domish.Element) -> tuple[set[int], domish.Element | None]:
    """The C{muc#user} status codes of a presence, and its C{<item/>}."""
    x = child(element, NS_MUC_USER, "x")
    if x is None:
        return set(), None
    codes = set()
    for status in x.elements(NS_MUC_USER, "status"):
        try:
            codes.add(int(status.getAttribute("code", "")))
        except ValueError:
            pass
    return codes, child(x, NS_MUC_USER, "item")


def stanza_error_condition(element: domish.Element) -> str | None:
    error = child(element, NS_CLIENT, "error")
    if error is None:
        return None
    for condition in error.elements(NS_STANZAS):
        if condition.name != "text":
            return condition.name
    return None


def addressed(nick: str, body: str) -> str | None:
    """
    The text of C{body} when it mentions C{nick} (§4.4: starts with C{nick:} / C{nick,}, or
    contains C{@nick}, case-insensitively), with a leading address removed; else None.
    """
    if not nick:
        return None
    prefix = re.match(rf"\s*@?{re.escape(nick)}\s*[:,]\s*", body, re.IGNORECASE)
    if prefix:
        return body[prefix.end():].strip()
    if re.search(rf"(?<![\w@])@{re.escape(nick)}(?!\w)", body, re.IGNORECASE):
        return body.strip()
    return None
