# -*- test-case-name: tests.test_gateway -*-
"""
The body of one turn: session → history → upstream → delivery → transcript → callbacks.

It runs as one coroutine (one Deferred held by the L{RunHandle}).  Cancelling that Deferred
throws C{CancelledError} in at whatever it awaits, which for the upstream call closes the
connection.  Nothing here swallows C{CancelledError}, and every side effect asks
C{handle.is_current()} right before it happens.

The user row of a turn is written together with the assistant row once the answer is
complete and the turn still current, and committed *before* the final send or edit that
shows the answer: a reply the user saw survives SIGKILL.  With a fleet store that fenced
write is also the last check that the turn owns the session.  The platform id of a reply
sent only after the commit is recorded by a separate, non-critical update.  A stopped,
reset or stale turn writes neither row and sends nothing: stopped while its rows commit,
it takes them back and does not send.  A turn interrupted by
a newer message (busy mode C{interrupt}) writes nothing either, but its question is carried
by its successor: sent as history in the successor's request, and written, just before the
successor's own rows, once the successor completes.  So what the user asked is never lost,
and nothing is written twice or for a turn that did not end with an answer.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from hermes_twisted.dispatch.dispatcher import Dispatcher
from hermes_twisted.dispatch.runs import RunHandle
from hermes_twisted.dispatch.typing_loop import TypingLoop
from hermes_twisted.fleet.fencing import StaleWrite
from hermes_twisted.sessions.reset import policy_for, reset_notice
from hermes_twisted.upstream import TurnRequest
from hermes_twisted.upstream.media import (
    prepare_media,
    transcript_text,
    user_notice,
    with_notes,
)

log = Logger()

ERROR_NOTICE = "⚠️ Sorry, something went wrong while handling your message. Please try again."


def thread_metadata(event: Any) -> dict[str, Any] | None:
    thread_id = event.source.thread_id
    return {"thread_id": thread_id} if thread_id else None


def build_context_prompt(event: Any) -> str:
    """A small session-context block for the agent (hermes' build_session_context_prompt)."""
    source = event.source
    lines = ["## Current Session Context",
             f"**Source:** {source.platform.value.replace('_', ' ').title()} "
             f"({source.description})"]
    if source.user_name or source.user_id:
        who = source.user_name or source.user_id
        if source.user_name and source.user_id:
            who = f"{source.user_name} (id {source.user_id})"
        lines.append(f"**User:** {who}")
    if source.chat_topic:
        lines.append(f"**Channel topic:** {source.chat_topic}")
    return "\n".join(lines)


def tool_progress_text(event: dict[str, Any]) -> str | None:
    """The notice for a tool start (C{status: running}); None for anything else."""
    if event.get("status") != "running" or not event.get("tool"):
        return None
    text = f"{event.get('emoji') or '⚙️'} {event['tool']}"
    if event.get("label"):
        text += f": {event['label']}"
    return text


class RunSink:
    """The L{TurnSink} of one run: forwards only while the run is current."""

    # is_current is the handle's own bound method: the upstream asks it once per delta, so
    # no forwarding call in between.
    __slots__ = ("_gateway", "_handle", "is_current")

    def __init__(self, gateway: Dispatcher, handle: RunHandle) -> None:
        self._gateway = gateway
        self._handle = handle
        self.is_current: Callable[[], bool] = handle.is_current

    def on_delta(self, text: str) -> None:
        consumer = self._handle.consumer
        if not self._handle.is_current():
            self._gateway.observer.stale_output_dropped("delta")
        elif consumer is not None and consumer.wants_deltas:
            # A reply delivered whole at the end (the default) has no use for deltas.
            consumer.on_delta(text)

    def on_tool_progress(self, event: dict[str, Any]) -> None:
        if not self._gateway.config.display.tool_progress:
            return
        text = tool_progress_text(event)
        if text and not self._handle.is_current():
            self._gateway.observer.stale_output_dropped("progress")
        elif text:
            self._gateway.reply(self._handle.adapter, self._handle.event, text)


async def execute_turn(gw: Dispatcher, handle: RunHandle) -> None:
    """
    Run C{handle}'s turn to the end.  Fails only with CancelledError; any other error is
    logged and, if the run is still current, the user gets a short notice.
    """
    # One coroutine, not two: its frame lives as long as the turn, once per open stream.
    try:
        event, adapter, key = handle.event, handle.adapter, handle.session_key
        is_current = handle.is_current  # one bound method for the typing loop and consumer
        settings = getattr(adapter, "settings", None)
        if settings is None or settings.typing_indicator:
            handle.typing = TypingLoop(adapter, handle.chat_id, clock=gw.clock,
                                       interval=getattr(adapter, "typing_interval", None)
                                       or gw.config.display.typing_interval,
                                       delay=gw.config.display.typing_delay,
                                       metadata=thread_metadata(event),
                                       is_current=is_current)
            handle.typing.start()

        if gw.fleet is not None:
            # The session lease, with a fresh generation that fences every earlier holder;
            # this waits while another instance runs the session's turn.
            handle.fence = await gw.fleet.begin_turn(key, handle.dedupe_key)
            if handle.fence is None:
                log.info("Not running {key}: another instance took its message over", key=key)
                handle.outcome = "stale"
                return
            if not handle.is_current():
                return
        # The transcript read goes down right behind the session's touch, so both usually
        # share one commit of the store thread instead of waiting for two in a row.
        entry_d = gw.store.get_or_create(key, event.source)
        history_d = _read_ahead(gw.store, key)
        try:
            entry = await entry_d
        except BaseException:
            _drop(history_d)
            raise
        handle.session_id = entry.session_id
        if entry.was_auto_reset and handle.is_current():
            notice = reset_notice(policy_for(gw.config, event.source), entry.auto_reset_reason,
                                  event.source.platform.value)
            if notice:
                gw.reply(adapter, event, notice)
        if history_d is None or history_d[0] != entry.session_id:
            _drop(history_d)  # the session rotated under us: read the one we got
            history = await gw.store.load_transcript(entry.session_id)
        else:
            history = await history_d[1]
        # Not kept in this frame for the length of the stream: the fired reads hold results.
        del entry_d, history_d
        if not handle.is_current():
            return
        carried = [{"role": "user", "content": e.text} for e in handle.carried if e.text]
        images, notes, refused = (await prepare_media(event.media, gw.config.media_max_bytes)
                                  if event.media else ([], [], []))
        if not handle.is_current():
            return
        notice = user_notice(refused)
        if notice:
            gw.reply(adapter, event, notice)
        request = TurnRequest(message=with_notes(event.text, notes),
                              session_id=entry.session_id, session_key=key,
                              context_prompt=build_context_prompt(event),
                              history=list(history) + carried, images=images)
        # This frame lives as long as the turn: it does not keep the history too (the
        # upstream keeps what it still needs of the request).
        del history, carried, images
        handle.consumer = gw.consumer_factory(
            adapter, handle.chat_id, clock=gw.clock, settings=gw.config.streaming,
            is_current=is_current, reply_to=event.message_id,
            metadata=thread_metadata(event))
        handle.phase = "running"
        running = gw.upstream.run_turn(request, RunSink(gw, handle))
        del request
        result = await running

        if not handle.is_current():
            return _discard_stale(gw, handle, "final")
        # Typing stops before the final send, so "is typing…" never trails the answer.
        if handle.typing is not None:
            handle.typing.stop()
        final = (result or {}).get("final_response") or ""
        # The answer is complete: what is left is delivering it and bookkeeping.  A message
        # arriving from now on waits silently instead of "interrupting" an answer the user is
        # already seeing (over the relay the reply is visible before its send result returns).
        handle.phase = "finishing"
        consumer = handle.consumer
        # The streamed part settles first, so the final send or edit below goes out in the
        # same reactor step as the commit's result is seen: nothing shows the whole answer
        # before the transcript holds it, and a /stop in between stops the send.
        await consumer.settle()
        known_ids = consumer.message_ids
        if final:
            # The rows commit before the answer is shown, so a reply the user saw survives
            # SIGKILL.  With a fleet store this fenced write is also the last check that
            # the turn still owns the session: refused, nothing is written or sent.
            if not await _commit_rows(gw, handle, entry.session_id, final, known_ids):
                return _discard_stale(gw, handle, "final")
            if not handle.is_current():
                # Stopped while the rows were committing: the answer is not shown, so
                # its exchange is taken back.
                _take_back(gw, handle, entry.session_id)
                return _discard_stale(gw, handle, "final")
        elif handle.fence is not None and not await gw.fleet.confirm(key, handle.fence):
            return _discard_stale(gw, handle, "final")
        # The consumer decides what the chat still needs: nothing when the streamed text already
        # is the answer (response_previewed), an edit, or a send; also for an empty answer.
        report = await consumer.finish(final)
        delivered = handle.delivered = bool(report.delivered)
        if not delivered:
            log.info("Reply for {key} was not delivered: {error}", key=key, error=report.error)
        elif final and not known_ids and report.message_ids:
            # Known only now, from the send's result: a separate, non-critical update queued
            # behind the rows (the store's writer keeps order), not waited for.
            gw.store.set_message_id(entry.session_id, final, report.message_ids[0]).addErrback(
                _transcript_failed, key)
        if delivered and handle.is_current():
            # Fired by the gateway once the lane is released, so a slow callback never holds up
            # the user's next message.
            handle.after_delivery = gw.callbacks.pop(key, handle.generation)
    except CancelledError:
        raise
    except Exception:
        log.failure("Turn failed for {key} (generation {gen})", key=handle.session_key,
                    gen=handle.generation)
        handle.outcome = "error"
        if handle.is_current():
            gw.reply(handle.adapter, handle.event, ERROR_NOTICE)


def _discard_stale(gw: Dispatcher, handle: RunHandle, kind: str) -> None:
    log.info("Discarding stale result for {key}: generation {gen} is no longer current",
             key=handle.session_key, gen=handle.fence or handle.generation)
    handle.outcome = "stale"
    gw.observer.stale_output_dropped(kind)


def _transcript_rows(gw: Dispatcher, handle: RunHandle, session_id: str, final: str,
                     message_ids: tuple[str, ...]) -> list[tuple[str, str, str, float, str | None]]:
    """The turn's rows: carried questions, the question, the answer (session id, role,
    content, timestamp, platform message id)."""
    event, at = handle.event, gw.clock.seconds()
    rows = [(session_id, "user", e.text, at, e.message_id) for e in handle.carried if e.text]
    rows.append((session_id, "user", transcript_text(event.text, event.media), at,
                 event.message_id))
    rows.append((session_id, "assistant", final, at, message_ids[0] if message_ids else None))
    return rows


async def _commit_rows(gw: Dispatcher, handle: RunHandle, session_id: str, final: str,
                       message_ids: tuple[str, ...]) -> bool:
    """
    Commit the turn's transcript rows; False when the fleet fenced the write off (the turn
    no longer owns the session: nothing was written, and nothing may be sent).  A failed
    write is logged, never turned into an error reply: the answer is still delivered.

    Cancelling (a /stop while the rows commit) does not withdraw the write, which may
    already be on the store thread: the rows are taken back once it settled, so a stopped
    turn leaves nothing while an earlier exchange is never taken back in its place.
    """
    rows = _transcript_rows(gw, handle, session_id, final, message_ids)
    if handle.fence is not None:
        write = gw.fleet.append_rows(handle.session_key, handle.fence, rows)
    else:
        # Every row is issued at once, so they share one commit of the store thread; the
        # writer commits in order, so the last row's firing means all of them are settled.
        for sid, role, content, _at, mid in rows:
            write = gw.store.append(sid, role, content, platform_message_id=mid)
            write.addErrback(_transcript_failed, handle.session_key)
    _complete_inbound(gw, handle)
    settled: Deferred = Deferred(lambda _: None)  # cancelled: only this wait is dropped
    write.addBoth(_settle_into, settled)
    try:
        await settled
    except StaleWrite:
        return False
    except CancelledError:
        # Refused or failed: nothing to take back.
        write.addCallbacks(lambda _: _take_back(gw, handle, session_id), lambda _: None)
        raise
    except Exception:
        log.failure("Transcript write failed for {key}", key=handle.session_key)
    return True


def _complete_inbound(gw: Dispatcher, handle: RunHandle) -> None:
    """
    Mark the turn's admitted messages handled together with its rows (queued right behind
    them, so usually in the same commit), before the answer is shown: after a SIGKILL the
    inbox must not replay a message whose answer the user already has.  The gateway then
    has nothing left to complete when the run ends.
    """
    inbox = gw.fleet if gw.fleet is not None else gw.store
    for inbound in (handle, *handle.folded):
        if inbound.dedupe_key:
            inbox.complete_inbound(inbound.dedupe_key).addErrback(
                _inbox_failed, inbound.dedupe_key)
            inbound.dedupe_key = None


def _inbox_failed(failure: Any, dedupe_key: str) -> None:
    log.failure("complete_inbound({k}) failed", failure, k=dedupe_key)


def _take_back(gw: Dispatcher, handle: RunHandle, session_id: str) -> None:
    gw.store.undo_last_exchange(session_id).addErrback(_transcript_failed, handle.session_key)


def _settle_into(result: Any, waiter: Deferred) -> Any:
    """Hand C{result} on to C{waiter}, which owns it from then on; after the waiter was
    cancelled, the result stays on the chain for what the canceller added."""
    if waiter.called:
        return result
    if isinstance(result, Failure):
        waiter.errback(result)
    else:
        waiter.callback(result)
    return None


def _read_ahead(store: Any, key: str) -> tuple[str, Deferred] | None:
    """The transcript read of the session C{get_or_create} just made current (the store's
    cache already shows it), or None when the store cannot tell without I/O."""
    cached = store.peek(key)
    if cached is None:
        return None
    return cached.session_id, store.load_transcript(cached.session_id)


def _drop(read: tuple[str, Deferred] | None) -> None:
    """Withdraw a read-ahead nobody will wait for; its failure, if any, is nobody's."""
    if read is not None:
        read[1].addErrback(lambda _: None)
        read[1].cancel()


def _transcript_failed(failure: Any, key: str) -> Any:
    if failure.check(CancelledError):
        return failure
    log.failure("Transcript write failed for {key}", failure, key=key)
    return None
