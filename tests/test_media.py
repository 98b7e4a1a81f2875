"""The platform-neutral media pipeline: image parts upstream, notes for the rest."""

import base64

import pytest
import pytest_twisted
from twisted.internet.defer import fail, succeed

from hermes_twisted.model import MediaPart
from hermes_twisted.platforms.matrix.media import MediaError, download_path, media_message
from hermes_twisted.upstream import TurnRequest
from hermes_twisted.upstream.media import prepare_media, transcript_text, with_notes
from hermes_twisted.upstream.proxy import build_messages


@pytest_twisted.ensureDeferred
async def test_images_become_data_urls_and_everything_else_a_note():
    asked = []

    def fetch(cap):
        asked.append(cap)
        return succeed(b"GIF89a")

    parts = [MediaPart("image", "image/png", "a.png", 3, data=b"png"),
             MediaPart("image", "image/gif", "b.gif", None, fetch=fetch),
             MediaPart("file", "application/pdf", "c.pdf", 2048),
             MediaPart("image", "image/png", "big.png", 50, data=b"x" * 50),
             MediaPart("image", "image/png", "gone.png", None,
                       fetch=lambda cap: fail(RuntimeError("404")))]
    images, notes = await prepare_media(parts, max_image_bytes=10)
    assert images == ["data:image/png;base64," + base64.b64encode(b"png").decode(),
                      "data:image/gif;base64," + base64.b64encode(b"GIF89a").decode()]
    assert asked == [10]
    assert notes == ["[The user attached a file: c.pdf (application/pdf, 2.0 KB)]",
                     "[The user sent an image, big.png (image/png, 50 bytes), larger than the "
                     "10 bytes limit; it was not attached]",
                     "[The user sent an image, gone.png (image/png, unknown size), that could "
                     "not be downloaded]"]
    assert with_notes("look", notes[:1]) == "look\n" + notes[0]
    assert transcript_text("look", parts[:1]) == "look [image: a.png]"
    assert transcript_text("", parts[:1]) == "[image: a.png]"


def test_the_user_message_carries_image_url_parts():
    plain = build_messages(TurnRequest(message="hi", session_id="s", session_key="k"))
    assert plain[-1] == {"role": "user", "content": "hi"}
    with_image = build_messages(TurnRequest(message="what is this?", session_id="s",
                                            session_key="k", images=["data:image/png;base64,AA"]))
    assert with_image[-1] == {"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}


def test_matrix_media_messages_and_mxc_validation():
    assert download_path("mxc://example.org/abc_DEF-1") == \
        "/_matrix/client/v1/media/download/example.org/abc_DEF-1"
    for bad in ("https://example.org/x", "mxc://example.org/../x", "mxc://ex/a/b", None):
        with pytest.raises(MediaError):
            download_path(bad)
    made = []
    caption, kind, part = media_message(
        {"msgtype": "m.image", "body": "cat.png", "url": "mxc://hs/a",
         "info": {"mimetype": "image/png", "size": 10}}, 100,
        lambda mxc, encrypted, cap: made.append((mxc, encrypted, cap)) or "fetch")
    assert (caption, kind.value, part.kind, part.file_name, part.fetch) == \
        ("", "photo", "image", "cat.png", "fetch")
    assert made == [("mxc://hs/a", None, 100)]
    caption, _, part = media_message(
        {"msgtype": "m.file", "body": "see this", "filename": "r.pdf",
         "file": {"url": "mxc://hs/b"}, "info": {"size": 500}}, 100, lambda *a: "fetch")
    assert caption == "see this" and part.kind == "file" and part.fetch != "fetch"
    assert media_message({"msgtype": "m.text", "body": "x"}, 100, None) is None


def test_reply_image_urls_must_be_public_http():
    from hermes_twisted.platforms.matrix.media import IMAGE_LINK, check_public_url

    check_public_url("https://example.org/cat.png")
    for bad in ("ftp://example.org/x.png", "http://localhost/x.png", "http://127.0.0.1/x",
                "http://10.1.2.3/x", "http://[::1]/x", "http://169.254.169.254/latest",
                "file:///etc/passwd"):
        with pytest.raises(MediaError):
            check_public_url(bad)
    check_public_url("http://127.0.0.1/x", allow_private=True)
    assert IMAGE_LINK.findall("see ![a cat](https://x.org/c.png) and [a link](https://y)") == \
        [("a cat", "https://x.org/c.png")]
