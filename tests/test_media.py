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
    images, notes, refused = await prepare_media(parts, max_image_bytes=10)
    assert images == ["data:image/png;base64," + base64.b64encode(b"png").decode(),
                      "data:image/gif;base64," + base64.b64encode(b"GIF89a").decode()]
    assert asked == [10]
    assert notes == ["[The user attached a file: c.pdf (application/pdf, 2.0 KB)]",
                     "[The user sent an image, big.png (image/png, 50 bytes), larger than the "
                     "10 bytes limit; it was not attached]",
                     "[The user sent an image, gone.png (image/png, unknown size), that could "
                     "not be downloaded]"]
    assert refused == ["big.png is larger than the 10 bytes limit"]
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


@pytest_twisted.ensureDeferred
async def test_an_image_found_too_large_while_reading_is_refused_with_one_notice():
    from hermes_twisted.net.body import BodyTooLarge
    from hermes_twisted.upstream.media import user_notice

    parts = [MediaPart("image", "image/png", "huge.png", None,
                       fetch=lambda cap: fail(BodyTooLarge())),
             MediaPart("image", "image/jpeg", "lost.jpg", 5)]  # replayed, no fetcher
    images, notes, refused = await prepare_media(parts, max_image_bytes=1000)
    assert images == []
    assert notes[0] == ("[The user sent an image, huge.png (image/png, unknown size), larger "
                        "than the 1000 bytes limit; it was not attached]")
    assert "lost in a restart" in notes[1]
    assert user_notice(refused) == ("I couldn't look at your images: huge.png is larger than "
                                    "the 1000 bytes limit; lost.jpg was lost in a restart.")
    assert user_notice([]) is None


def kit_with_cap(cap):
    import dataclasses

    from tests.fakes.gateway_kit import Kit

    kit = Kit()
    kit.gateway.config = dataclasses.replace(kit.config, media_max_bytes=cap)
    return kit


def test_the_cap_is_the_setting_and_the_user_is_told_once():
    kit = kit_with_cap(4)
    asked = []
    event = kit.event("look")
    event.media = [MediaPart("image", "image/png", "a.png", None,
                             fetch=lambda cap: asked.append(cap) or succeed(b"1234")),
                   MediaPart("image", "image/png", "b.png", 5, data=b"12345"),
                   MediaPart("image", "image/png", "c.png", None,
                             fetch=lambda cap: asked.append(cap) or succeed(b"x" * 9))]
    kit.gateway.handle_message(kit.adapter, event)
    request = kit.upstream.last.request
    assert asked == [4, 4]
    assert request.images == ["data:image/png;base64," + base64.b64encode(b"1234").decode()]
    assert request.message.count("larger than the 4 bytes limit") == 2
    assert kit.adapter.texts == ["I couldn't look at your images: b.png is larger than the "
                                 "4 bytes limit; c.png is larger than the 4 bytes limit."]
    kit.upstream.last.finish("ok")


def test_the_cap_setting_is_loaded(tmp_path):
    from hermes_twisted.config.loader import load_config

    assert load_config(None, {"HERMES_HOME": str(tmp_path)}).media_max_bytes == 10 * 1024 * 1024
    assert load_config(None, {"HERMES_HOME": str(tmp_path),
                              "GATEWAY_MEDIA_MAX_BYTES": "2048"}).media_max_bytes == 2048
    cfg = tmp_path / "c.yaml"
    cfg.write_text("gateway:\n  media:\n    max_bytes: 4096\n")
    assert load_config(str(cfg), {"HERMES_HOME": str(tmp_path)}).media_max_bytes == 4096


def test_a_replayed_event_keeps_its_attachments_by_reference():
    import json

    from hermes_twisted.dispatch.inbound import event_from_payload, payload_for
    from tests.fakes.gateway_kit import Kit

    kit = Kit()
    event = kit.event("what is this?")
    event.media = [MediaPart("image", "image/png", "cat.png", 3, data=b"SECRET-BYTES",
                             ref={"room_id": "!r", "event_id": "$e"}),
                   MediaPart("file", "application/pdf", "r.pdf", 7)]
    payload = json.loads(json.dumps(payload_for("telegram", event)))
    stored = json.dumps(payload)
    assert "SECRET" not in stored and base64.b64encode(b"SECRET-BYTES").decode() not in stored
    asked = []
    again = event_from_payload(payload, "k", lambda ref: asked.append(ref) or (
        lambda cap: succeed(b"png")))
    assert asked == [{"room_id": "!r", "event_id": "$e"}]
    assert [(p.kind, p.file_name, p.size, p.data) for p in again.media] == [
        ("image", "cat.png", 3, None), ("file", "r.pdf", 7, None)]
    assert again.media_types == ["image/png", "application/pdf"]
    # Replayed through the gateway: the adapter's fetcher gives the turn its image back.
    kit.adapter.media_fetcher = lambda ref: (lambda cap: succeed(b"png"))
    kit.store.inbound["k"] = payload
    kit.gateway.startService()
    assert kit.upstream.last.request.images == [
        "data:image/png;base64," + base64.b64encode(b"png").decode()]
    kit.upstream.last.finish("a cat")
    kit.gateway.stopService()


def test_a_replayed_image_the_platform_cannot_fetch_again_is_announced():
    from hermes_twisted.dispatch.inbound import payload_for
    from tests.fakes.gateway_kit import Kit

    kit = Kit()
    event = kit.event("")
    event.media = [MediaPart("image", "image/png", "cat.png", 3, data=b"png")]
    kit.store.inbound["k"] = payload_for("telegram", event)
    kit.gateway.startService()
    assert kit.upstream.last.request.images == []
    assert "lost in a restart" in kit.upstream.last.request.message
    assert kit.adapter.texts == ["I couldn't look at your image: cat.png was lost in a restart."]
    kit.upstream.last.finish("sorry")
    kit.gateway.stopService()
