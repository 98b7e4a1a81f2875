# -*- test-case-name: tests.test_media -*-
"""
One pipeline for what users attach, whatever the platform: images become C{image_url}
content parts (C{data:} URLs) of the user message sent upstream, up to a size cap; anything
else, and an image over the cap, becomes a short text note (name, type, size) the agent can
read and mention.  Bytes never reach the transcript: it keeps L{MediaPart.placeholder}.
"""

from __future__ import annotations

import base64

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from hermes_twisted.model import MediaPart

MAX_IMAGE_BYTES = 10 * 1024 * 1024
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})

log = Logger()


def human_size(size: int | None) -> str:
    if size is None:
        return "unknown size"
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return f"{size} bytes"  # pragma: no cover


def describe(part: MediaPart) -> str:
    return f"{part.file_name or 'unnamed'} ({part.mime_type}, {human_size(part.size)})"


async def prepare_media(parts: list[MediaPart], max_image_bytes: int = MAX_IMAGE_BYTES
                        ) -> tuple[list[str], list[str]]:
    """
    Fires with C{(image data URLs, notes)} for C{parts}.  A fetch that fails or exceeds the
    cap becomes a note, never an error; cancelling cancels the fetch in progress.
    """
    images: list[str] = []
    notes: list[str] = []
    for part in parts:
        if part.kind != "image" or part.mime_type not in IMAGE_TYPES:
            notes.append(f"[The user attached a file: {describe(part)}]")
            continue
        if part.size is not None and part.size > max_image_bytes:
            notes.append(f"[The user sent an image, {describe(part)}, larger than the "
                         f"{human_size(max_image_bytes)} limit; it was not attached]")
            continue
        try:
            data = part.data if part.data is not None else await part.fetch(max_image_bytes)
        except CancelledError:
            raise
        except Exception as e:
            log.warn("Could not fetch the image {name}: {error}", name=part.file_name,
                     error=repr(e))
            notes.append(f"[The user sent an image, {describe(part)}, that could not be "
                         f"downloaded]")
            continue
        if len(data) > max_image_bytes:
            notes.append(f"[The user sent an image, {describe(part)}, larger than the "
                         f"{human_size(max_image_bytes)} limit; it was not attached]")
            continue
        images.append(f"data:{part.mime_type};base64,{base64.b64encode(data).decode('ascii')}")
    return images, notes


def with_notes(text: str, notes: list[str]) -> str:
    return "\n".join([text, *notes]) if text else "\n".join(notes)


def transcript_text(text: str, parts: list[MediaPart]) -> str:
    """The user's row in the transcript: the text plus a placeholder per attachment."""
    placeholders = [part.placeholder() for part in parts]
    return " ".join([text, *placeholders]) if text else " ".join(placeholders)


