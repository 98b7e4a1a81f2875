# -*- test-case-name: tests.test_media -*-
"""
One pipeline for what users attach, whatever the platform: images become C{image_url}
content parts (C{data:} URLs) of the user message sent upstream, up to a size cap; anything
else, and an image over the cap, becomes a short text note (name, type, size) the agent can
read and mention; the user is told once when an image was not passed on.  Bytes never
reach the transcript: it keeps L{MediaPart.placeholder}.
"""

from __future__ import annotations

import base64
from typing import NamedTuple

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from hermes_twisted.model import MediaPart
from hermes_twisted.net.body import BodyTooLarge

#: The default of C{GATEWAY_MEDIA_MAX_BYTES} (C{gateway.media.max_bytes}).
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


class PreparedMedia(NamedTuple):
    """What the pipeline made of a message's attachments."""

    #: C{data:} URLs of the images passed upstream as C{image_url} parts
    images: list[str]
    #: text notes for the agent (files, and images that were not attached)
    notes: list[str]
    #: short notices for the user (an image too large, or lost in a restart); one message
    #: at most per turn, see L{user_notice}
    refused: list[str]


async def prepare_media(parts: list[MediaPart], max_image_bytes: int = MAX_IMAGE_BYTES
                        ) -> PreparedMedia:
    """
    Fires with the L{PreparedMedia} of C{parts}.  A fetch that fails or exceeds the cap
    becomes a note, never an error; an image above the cap (declared, or found while reading
    it) is not downloaded further and is also listed in C{refused}, as is one that could not
    be fetched again after a restart.  Cancelling cancels the fetch in progress.
    """
    images: list[str] = []
    notes: list[str] = []
    refused: list[str] = []

    def too_large(part: MediaPart) -> None:
        notes.append(f"[The user sent an image, {describe(part)}, larger than the "
                     f"{human_size(max_image_bytes)} limit; it was not attached]")
        refused.append(f"{part.file_name or 'your image'} is larger than the "
                       f"{human_size(max_image_bytes)} limit")

    for part in parts:
        if part.kind != "image" or part.mime_type not in IMAGE_TYPES:
            notes.append(f"[The user attached a file: {describe(part)}]")
            continue
        if part.size is not None and part.size > max_image_bytes:
            too_large(part)
            continue
        if part.data is None and part.fetch is None:
            # Replayed after a restart by a platform that cannot fetch it again.
            notes.append(f"[The user sent an image, {describe(part)}, that was lost in a "
                         f"restart of the gateway; it was not attached]")
            refused.append(f"{part.file_name or 'your image'} was lost in a restart")
            continue
        try:
            data = part.data if part.data is not None else await part.fetch(max_image_bytes)
        except CancelledError:
            raise
        except BodyTooLarge:
            too_large(part)
            continue
        except Exception as e:
            log.warn("Could not fetch the image {name}: {error}", name=part.file_name,
                     error=repr(e))
            notes.append(f"[The user sent an image, {describe(part)}, that could not be "
                         f"downloaded]")
            continue
        if len(data) > max_image_bytes:
            too_large(part)
            continue
        images.append(f"data:{part.mime_type};base64,{base64.b64encode(data).decode('ascii')}")
    return PreparedMedia(images, notes, refused)


def user_notice(refused: list[str]) -> str | None:
    """The one short notice a user gets about images the agent did not see, or None."""
    if not refused:
        return None
    return ("I couldn't look at your image: " if len(refused) == 1 else
            "I couldn't look at your images: ") + "; ".join(refused) + "."


def with_notes(text: str, notes: list[str]) -> str:
    return "\n".join([text, *notes]) if text else "\n".join(notes)


def transcript_text(text: str, parts: list[MediaPart]) -> str:
    """The user's row in the transcript: the text plus a placeholder per attachment."""
    placeholders = [part.placeholder() for part in parts]
    return " ".join([text, *placeholders]) if text else " ".join(placeholders)


