# -*- test-case-name: tests.test_relay_contract -*-
"""
Images an agent links in its reply (Markdown C{![alt](url)} or HTML C{<img src>}), which the
relay sends as C{send_media} when the connector offers it, as 0.19.0's adapters do with
C{send_image}: the markup leaves the text and the image arrives as an attachment.
"""

from __future__ import annotations

import re

_IMAGE = re.compile(
    r"!\[(?P<alt>[^\]\n]*)\]\((?P<md>https?://[^)\s]+)\)"
    r"|<img\s[^>]*?src=[\"'](?P<html>https?://[^\"'\s]+)[\"'][^>]*>", re.IGNORECASE)


def extract_images(text: str) -> tuple[str, list[str]]:
    """
    C{(text without the image markup, image URLs in order of appearance, each once)}.  A
    Markdown image keeps its alt text in place; blank lines left behind are collapsed.
    """
    urls: list[str] = []

    def take(match: re.Match[str]) -> str:
        url = match.group("md") or match.group("html")
        if url not in urls:
            urls.append(url)
        return match.group("alt") or ""

    cleaned = _IMAGE.sub(take, text)
    if not urls:
        return text, []
    return re.sub(r"\n{3,}", "\n\n", cleaned).strip(), urls
