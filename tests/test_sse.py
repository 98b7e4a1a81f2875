"""
The incremental SSE decoder against the WHATWG rules, fixed cases first, then property tests
comparing any re-chunking against a one-shot decode and against a slow, literal reading of
the spec written separately below.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hermes_twisted.upstream.sse import SSEDecoder, SSEEvent, SSEEventTooLarge


def decode_all(chunks, **kw) -> tuple[list[SSEEvent], SSEDecoder]:
    decoder = SSEDecoder(**kw)
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.finish())
    return events, decoder


def reference_decode(stream: bytes) -> list[SSEEvent]:
    """The spec's algorithm, line by line on decoded text (plus our dispatch-at-EOF)."""
    text = stream.decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = re.split(r"\r\n|\r|\n", text)
    events, data, event_type, last_id = [], "", "", ""
    for line in lines + [""]:
        if line == "":
            if data:
                events.append(SSEEvent(data[:-1] if data.endswith("\n") else data,
                                       event_type or "message", last_id))
            data, event_type = "", ""
            continue
        if line.startswith(":"):
            continue
        if ":" in line:
            name, value = line.split(":", 1)
            if value.startswith(" "):
                value = value[1:]
        else:
            name, value = line, ""
        if name == "data":
            data += value + "\n"
        elif name == "event":
            event_type = value
        elif name == "id" and "\0" not in value:
            last_id = value
    return events


def test_openai_style_stream():
    stream = (b'data: {"choices":[{"delta":{"content":"Hello"}}]}\n\n'
              b'data: {"choices":[{"delta":{"content":" world"}}]}\n\n'
              b"data: [DONE]\n\n")
    events, _ = decode_all([stream])
    assert [e.data for e in events] == [
        '{"choices":[{"delta":{"content":"Hello"}}]}',
        '{"choices":[{"delta":{"content":" world"}}]}',
        "[DONE]",
    ]
    assert all(e.event == "message" for e in events)


def test_every_byte_boundary_gives_the_same_events():
    stream = "event: hermes.tool.progress\r\ndata: {\"x\": \"é€😀\"}\r\n\r\ndata: b\n\n".encode()
    whole, _ = decode_all([stream])
    for cut in range(len(stream) + 1):
        assert decode_all([stream[:cut], stream[cut:]])[0] == whole, cut
    assert decode_all([stream[i:i + 1] for i in range(len(stream))])[0] == whole
    assert whole[0] == SSEEvent('{"x": "é€😀"}', "hermes.tool.progress", "")


def test_utf8_split_inside_a_character_is_intact():
    payload = "data: 日本\n\n".encode()
    first, second = payload[:8], payload[8:]  # cuts the second character in half
    events, _ = decode_all([first, second])
    assert events == [SSEEvent("日本")]


def test_cr_at_end_of_one_chunk_and_lf_at_start_of_next_is_one_line_end():
    events, _ = decode_all([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"])
    assert events == [SSEEvent("a\nb")]


def test_lone_cr_and_lf_line_ends():
    events, _ = decode_all([b"data: a\rdata: b\n\rdata: c\r\r"])
    assert events == [SSEEvent("a\nb"), SSEEvent("c")]


def test_data_with_and_without_space_strips_only_one_space():
    events, _ = decode_all([b"data:x\n\ndata:  two\n\ndata\n\ndata:\n\n"])
    assert [e.data for e in events] == ["x", " two", "", ""]


def test_multiline_data_is_joined_with_newline():
    events, _ = decode_all([b"data: one\ndata: two\ndata:\ndata: four\n\n"])
    assert events == [SSEEvent("one\ntwo\n\nfour")]


def test_comments_are_counted_and_not_dispatched():
    events, decoder = decode_all([b": keepalive\n\n:\n: x\ndata: y\n\n"])
    assert events == [SSEEvent("y")]
    assert decoder.comments == 3


def test_event_type_resets_after_dispatch_and_on_empty_event():
    events, _ = decode_all([b"event: a\n\ndata: 1\n\nevent: b\ndata: 2\n\ndata: 3\n\n"])
    assert [(e.event, e.data) for e in events] == [("message", "1"), ("b", "2"), ("message", "3")]


def test_id_persists_and_id_with_nul_is_ignored():
    events, decoder = decode_all([b"id: 7\ndata: a\n\nid: bad\x00\ndata: b\n\nid\ndata: c\n\n"])
    assert [e.id for e in events] == ["7", "7", ""]
    assert decoder.last_event_id == ""


def test_retry_is_recorded_only_when_all_digits():
    _, decoder = decode_all([b"retry: 1500\n\nretry: 15x\n\nretry:\n\n"])
    assert decoder.retry == 1500


def test_unknown_fields_are_ignored():
    events, _ = decode_all([b"foo: bar\ndata: x\nDATA: no\n\n"])
    assert events == [SSEEvent("x")]


def test_finish_dispatches_a_final_event_without_blank_line():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: b") == [SSEEvent("a")]
    assert decoder.finish() == [SSEEvent("b")]
    decoder = SSEDecoder()
    assert decoder.feed(b"data: c\n") == []
    assert decoder.finish() == [SSEEvent("c")]


def test_leading_bom_is_dropped_even_when_split():
    events, _ = decode_all([b"\xef", b"\xbb", b"\xbfdata: x\n\n"])
    assert events == [SSEEvent("x")]
    # Only a leading BOM: one later in the stream is data.
    events, _ = decode_all([b"data: \xef\xbb\xbfx\n\n"])
    assert events == [SSEEvent("\ufeffx")]


def test_invalid_utf8_is_replaced_not_raised():
    events, _ = decode_all([b"data: a\xffb\n\n"])
    assert events == [SSEEvent("a\ufffdb")]


def test_event_over_the_cap_raises_with_the_events_before_it():
    decoder = SSEDecoder(max_event_bytes=64)
    with pytest.raises(SSEEventTooLarge) as info:
        decoder.feed(b"data: ok\n\n" + b"data: " + b"x" * 20 + b"\n" * 1 + (b"data: " + b"y" * 20 + b"\n") * 4)
    assert info.value.events == [SSEEvent("ok")]
    assert "64 bytes" in str(info.value)


def test_unterminated_line_trips_the_cap_across_many_chunks():
    decoder = SSEDecoder(max_event_bytes=1000)
    decoder.feed(b"data: ")
    with pytest.raises(SSEEventTooLarge):
        for _ in range(200):
            decoder.feed(b"x" * 10)


def test_unterminated_line_trips_the_cap_within_one_chunk_too():
    with pytest.raises(SSEEventTooLarge):
        SSEDecoder(max_event_bytes=100).feed(b"data: ok\n\nevent: " + b"e" * 200)


def test_events_just_under_the_cap_pass():
    body = b"x" * 90
    events, _ = decode_all([b"data: " + body + b"\n\n"] * 3, max_event_bytes=100)
    assert [e.data for e in events] == ["x" * 90] * 3


# --- properties -------------------------------------------------------------------------

_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
    max_size=12,
)
_line = st.one_of(
    st.builds(lambda v: "data:" + v, _text),
    st.builds(lambda v: "data: " + v, _text),
    st.just("data"),
    st.builds(lambda v: "event: " + v, _text),
    st.builds(lambda v: "id: " + v, _text),
    st.builds(lambda v: ":" + v, _text),
    st.builds(lambda v: "retry: " + v, st.sampled_from(["10", "x", ""])),
    st.just(""),
    _text,
)
_ending = st.sampled_from(["\n", "\r", "\r\n"])


@st.composite
def streams(draw, endings=_ending):
    lines = draw(st.lists(st.tuples(_line, endings), max_size=30))
    bom = "\ufeff" if draw(st.booleans()) else ""
    text = bom + "".join(line + end for line, end in lines)
    if draw(st.booleans()):  # sometimes leave the last line unterminated
        text += draw(_line)
    return text.encode("utf-8")


@st.composite
def rechunked(draw):
    stream = draw(streams())
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    chunks, last = [], 0
    for cut in cuts:
        chunks.append(stream[last:cut])
        last = cut
    chunks.append(stream[last:])
    return stream, chunks


@settings(max_examples=400, deadline=None)
@given(rechunked())
def test_any_rechunking_yields_the_same_events(case):
    stream, chunks = case
    whole, _ = decode_all([stream])
    assert decode_all(chunks)[0] == whole
    assert whole == reference_decode(stream)


@settings(max_examples=200, deadline=None)
@given(streams(endings=st.just("\r\n")), st.data())
def test_mixed_line_endings_match_the_reference(stream, data):
    # Re-write each CRLF as any of the three endings: events must not depend on which.
    pieces = stream.split(b"\r\n")
    ends = data.draw(st.lists(st.sampled_from([b"\n", b"\r", b"\r\n"]),
                              min_size=len(pieces) - 1, max_size=len(pieces) - 1))
    mixed = pieces[0] + b"".join(end + piece for end, piece in zip(ends, pieces[1:], strict=True))
    assert decode_all([mixed])[0] == reference_decode(mixed)
    if mixed.count(b"\r\n") == ends.count(b"\r\n"):
        # No CR and LF of different line ends became adjacent: the lines are unchanged.
        assert decode_all([mixed])[0] == decode_all([stream])[0]
    size = data.draw(st.integers(1, 7))
    assert decode_all([mixed[i:i + size] for i in range(0, len(mixed), size)])[0] == \
        reference_decode(mixed)


def test_a_flood_of_empty_data_lines_trips_the_cap():
    decoder = SSEDecoder(max_event_bytes=100)
    with pytest.raises(SSEEventTooLarge):
        decoder.feed(b"data\n" * 30)
    with pytest.raises(SSEEventTooLarge):
        SSEDecoder(max_event_bytes=100).feed(b"data:\n" * 30)
