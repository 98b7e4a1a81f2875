"""The JSON log observer: flat lines with ts/level/logger/event/msg, no secret, no text."""

from __future__ import annotations

import io
import json

from twisted.logger import Logger

from hermes_twisted.ops.jsonlog import JSONLinesObserver, observer


def lines_of(emit) -> list[dict]:
    out = io.StringIO()
    log = Logger(namespace="hermes_twisted.test", observer=JSONLinesObserver(out))
    emit(log)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_line_is_one_flat_object_with_the_named_fields():
    [line] = lines_of(lambda log: log.info("Run for {key} took {seconds}s", key="k1",
                                           seconds=1.5, event="run_finished", gen=3))
    assert line["level"] == "info" and line["logger"] == "hermes_twisted.test"
    assert line["event"] == "run_finished" and line["msg"] == "Run for k1 took 1.5s"
    assert line["key"] == "k1" and line["seconds"] == 1.5 and line["gen"] == 3
    assert line["ts"].endswith("Z") and "T" in line["ts"]


def test_without_an_event_name_the_format_is_the_stable_key():
    [line] = lines_of(lambda log: log.warn("IRC lost {reason}", reason="timeout"))
    assert line["event"] == "IRC lost {reason}" and line["level"] == "warn"


def test_secrets_and_message_text_never_appear():
    [line] = lines_of(lambda log: log.info("Sending {text} with {token} to {chat}",
                                           text="my secret plan", token="tok-123456",
                                           api_key="k-999", chat="c1"))
    raw = json.dumps(line)
    assert "my secret plan" not in raw and "tok-123456" not in raw and "k-999" not in raw
    assert line["msg"] == "Sending <redacted> with <redacted> to c1"
    assert line["chat"] == "c1"


def test_a_failure_carries_its_type_and_traceback():
    def emit(log):
        try:
            raise ValueError("boom")
        except ValueError:
            log.failure("while testing")

    [line] = lines_of(emit)
    assert line["level"] == "critical" and line["exc_type"] == "ValueError"
    assert "Traceback" in line["traceback"]


def test_objects_that_are_not_scalars_are_left_out():
    [line] = lines_of(lambda log: log.info("x {obj}", obj=object(), n=2))
    assert "obj" not in line and line["n"] == 2 and line["msg"].startswith("x <object")


def test_the_twistd_factory_filters_below_info():
    out = io.StringIO()
    obs = observer(out)
    log = Logger(namespace="t", observer=obs)
    log.debug("hidden")
    log.info("shown")
    assert [json.loads(x)["msg"] for x in out.getvalue().splitlines()] == ["shown"]
