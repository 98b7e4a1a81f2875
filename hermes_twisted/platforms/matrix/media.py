# -*- test-case-name: tests.test_matrix -*-
"""
Matrix media: C{mxc://} URIs, the authenticated download endpoint (Matrix 1.11; the legacy
one serves no new media on current Synapse), encrypted attachments on the way in, and the
image links of a reply that become uploaded images on the way out.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import quote, urlsplit

from hermes_twisted.model import MediaPart, MessageType

MXC = re.compile(r"^mxc://([A-Za-z0-9.:\[\]-]+)/([A-Za-z0-9_-]+)$")
#: C{![alt](https://...)} in an agent's reply
IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\((https?://[^\s)]+)\)")

KINDS = {"m.image": ("image", MessageType.PHOTO), "m.video": ("video", MessageType.VIDEO),
         "m.audio": ("audio", MessageType.AUDIO), "m.file": ("file", MessageType.DOCUMENT)}


class MediaError(Exception):
    """A media reference we refuse to fetch (not an C{mxc://} URI, or too large)."""


def check_public_url(url: str, allow_private: bool = False) -> None:
    """
    Refuse URLs the gateway must not fetch for the agent: other schemes, and hosts that name
    this machine or a private network by address or as C{localhost}.  (A public name that
    resolves to a private address is not caught here.)
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise MediaError(f"not an http(s) URL: {url!r}")
    if allow_private:
        return
    host = parts.hostname.lower()
    if host == "localhost" or host.endswith(".localhost"):
        raise MediaError("refusing to fetch from localhost")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return
    if not address.is_global:
        raise MediaError(f"refusing to fetch from the private address {host}")


def download_path(mxc: Any) -> str:
    """The path of C{mxc}'s authenticated download, below the homeserver's base URL."""
    match = MXC.match(mxc) if isinstance(mxc, str) else None
    if match is None:
        raise MediaError(f"not an mxc:// media URI: {mxc!r}")
    server, media_id = match.groups()
    return f"/_matrix/client/v1/media/download/{quote(server, safe='')}/{media_id}"


def media_message(content: dict[str, Any], max_bytes: int, fetch_factory: Any
                  ) -> tuple[str, MessageType, MediaPart] | None:
    """
    For an C{m.image}/C{m.video}/C{m.audio}/C{m.file} content: the caption (empty when
    C{body} is only the file name), the message type and a L{MediaPart} whose C{fetch}
    downloads (and decrypts) it.  None for other message types.
    """
    kind = KINDS.get(content.get("msgtype"))
    if kind is None:
        return None
    info = content.get("info") if isinstance(content.get("info"), dict) else {}
    encrypted = content.get("file") if isinstance(content.get("file"), dict) else None
    body = content.get("body") if isinstance(content.get("body"), str) else ""
    name = content.get("filename") if isinstance(content.get("filename"), str) else body
    caption = body if name and body and body != name else ""
    size = info.get("size") if isinstance(info.get("size"), int) else None
    mxc = (encrypted or {}).get("url") or content.get("url")
    part = MediaPart(kind=kind[0], mime_type=str(info.get("mimetype") or
                                                 "application/octet-stream"),
                     file_name=name or None, size=size)
    if size is not None and size > max_bytes:
        part.fetch = lambda cap: _refuse(f"the file is larger than {max_bytes} bytes")
    else:
        part.fetch = fetch_factory(mxc, encrypted, max_bytes)
    return caption, kind[1], part


def _refuse(reason: str) -> Any:
    from twisted.internet.defer import fail

    return fail(MediaError(reason))
