# -*- test-case-name: tests.test_commands -*-
"""
Slash commands the gateway answers itself (platforms.md §5, generations.md §3).

Parsing: C{/cmd args}, C{/cmd@botname args}, and C{!cmd} on adapters whose users type
commands with C{!} (Matrix, Slack).  A command name is I{resolvable} when hermes 0.19.0's
gateway knows it; the gateway handles C{/stop /new /reset /status /help /commands /start}.
Any other resolvable command is answered "can't run mid-turn" while a run is busy and goes
to the agent as text when idle; an unresolvable one (C{/shrug}, C{/etc/hosts}) is text.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from hermes_twisted.config.dotenv import set_dotenv_value
from hermes_twisted.config.envvars import ENV_VARS
from hermes_twisted.dispatch import gating, interrupts
from hermes_twisted.dispatch.dispatcher import Dispatcher
from hermes_twisted.model import MessageEvent

log = Logger()

STOPPED = "⚡ Stopped. You can continue this session."
STOPPED_BEFORE_START = ("⚡ Stopped. The agent hadn't started yet — you can continue this "
                        "session.")
NO_ACTIVE_TASK = "No active task to stop."
SESSION_RESET = "✨ Session reset! Starting fresh."
NEW_SESSION = "✨ New session started!"
NEW_TITLED = "✨ New session started: {title}"
UNDONE = ("↩️ Undone: your last message and its answer are no longer part of this "
          "conversation.\n> {preview}")
NOTHING_TO_UNDO = "Nothing to undo in this session."
RETRYING = "🔁 Retrying your last message:\n> {preview}"
NOTHING_TO_RETRY = "Nothing to retry in this session."
HOME_SET = ("🏠 This chat is now the home channel for {platform} ({name} in .env); it is used "
            "from the next start.")
STORE_FAILED = "⚠️ Could not {what}: {error}"
RESET_FAILED = "⚠️ Could not start a new session: {error}"
MID_TURN = ("⏳ Agent is running — `/{name}` can't run mid-turn. Wait for the current "
            "response or `/stop` first.")

#: Answered by the gateway itself, busy or not (none of them queues behind a run).
HANDLED = frozenset({"stop", "new", "reset", "status", "help", "commands", "start", "whoami",
                     "retry", "undo", "sethome", "set-home"})

#: Handled, but only while the session is idle ("can't run mid-turn" otherwise): each
#: rewrites the transcript or the configuration a running turn depends on.
IDLE_ONLY = frozenset({"retry", "undo", "sethome", "set-home"})

#: Put text in the session's queue (the gateway's lanes handle these, not L{CommandRouter}).
QUEUEING = frozenset({"queue", "q", "steer"})

#: Commands that read the session's cached routing entry: in a fleet another instance may
#: have changed it (a turn, /new), so the gateway re-reads it before running them.
READS_SESSION = frozenset({"new", "reset", "status", "retry", "undo"})

#: Every command name (and alias) the 0.19.0 gateway resolves (platforms.md §5).
RESOLVABLE = HANDLED | frozenset("""
    approve deny whoami retry undo title resume sessions branch fork compress compact rollback
    background bg btw queue q steer agents tasks goal subgoal moa topic sethome set-home model
    codex-runtime personality reasoning fast yolo footer voice verbose skills memory bundles
    learn suggestions blueprint curator kanban reload-mcp reload-skills usage insights topup
    profile version v debug restart update platform
""".split())

HELP = "\n".join([
    "📖 **Commands**",
    "/new [title] (or /reset) — start a fresh session",
    "/retry — run your last message again",
    "/undo — take back your last message and its answer",
    "/sethome — make this chat the platform's home channel",
    "/stop — interrupt the running reply (the session is kept)",
    "/status — session id, running task, upstream",
    "/whoami — who you are here, and which commands you may run",
    "/queue <text> — run it as the next turn, after the current one",
    "/steer <text> — a note that goes along with the next turn",
    "/help — this list",
    "Anything else is sent to the agent.",
])


def normalize(adapter: Any, event: MessageEvent) -> MessageEvent:
    """Rewrite C{!cmd} to C{/cmd} on adapters whose users type commands with C{!}."""
    prefix = getattr(adapter, "typed_command_prefix", "/")
    if prefix != "/" and event.text.startswith(prefix) and len(event.text) > len(prefix):
        return dataclasses.replace(event, text="/" + event.text[len(prefix):])
    return event


def parse(event: MessageEvent) -> tuple[str, str] | None:
    """C{(name, args)} of a resolvable command, or None when the text is for the agent."""
    name = event.get_command()
    if name is None or name not in RESOLVABLE:
        return None
    return name, event.get_command_args()


def public_url(url: str | None) -> str:
    """C{url} without user info, query or fragment: safe to show in /status."""
    if not url:
        return "(not configured)"
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _preview(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def age_text(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60}m"


class CommandRouter:
    """Runs the gateway's own commands; every reply goes through C{gateway.reply}."""

    def __init__(self, gateway: Dispatcher) -> None:
        self.gateway = gateway

    def dispatch(self, adapter: Any, event: MessageEvent, key: str, name: str,
                 args: str) -> Deferred:
        """Answer command C{name}.  Fires with None when done; never fails."""
        handler = getattr(self, "cmd_" + name.replace("-", ""), None)
        if name in IDLE_ONLY and self.gateway.is_busy(key):
            return self.gateway.reply(adapter, event, MID_TURN.format(name=name))
        if handler is None:
            if self.gateway.is_busy(key):
                return self.gateway.reply(adapter, event, MID_TURN.format(name=name))
            return succeed(None)  # the gateway runs it as agent text instead
        return handler(adapter, event, key, args)

    def cmd_start(self, adapter: Any, event: MessageEvent, key: str, args: str) -> Deferred:
        return succeed(None)  # Telegram's start ping: no reply

    def cmd_whoami(self, adapter: Any, event: MessageEvent, key: str, args: str) -> Deferred:
        return self.gateway.reply(adapter, event, gating.whoami_text(adapter, event.source))

    def cmd_help(self, adapter: Any, event: MessageEvent, key: str, args: str) -> Deferred:
        return self.gateway.reply(adapter, event, HELP)

    cmd_commands = cmd_help

    def cmd_stop(self, adapter: Any, event: MessageEvent, key: str, args: str) -> Deferred:
        # Everything up to cancel() is synchronous (generations.md §6): the old run is stale
        # and its typing stopped before our reply is sent, and cancelled right after.
        gw = self.gateway
        # First, so the bump reaches another instance's run as soon as possible.
        remote = gw.stop_fleetwide(key, "stop_command")
        handle = gw.interrupt_and_clear(key, interrupts.STOP, "stop_command")
        if handle is None and gw.fleet is not None:
            gw.stop_platform_typing(adapter, event.source.chat_id)

            def answer(bumped: Any) -> Deferred:
                elsewhere = bumped is not None and bumped.lease_live
                return gw.reply(adapter, event, STOPPED if elsewhere else NO_ACTIVE_TASK)

            return remote.addCallback(answer)
        if handle is None:
            gw.stop_platform_typing(adapter, event.source.chat_id)
            return gw.reply(adapter, event, NO_ACTIVE_TASK)
        text = STOPPED_BEFORE_START if handle.phase == "preparing" else STOPPED
        d = gw.reply(adapter, event, text)
        handle.cancel()
        gw.notify_interrupted(handle, interrupts.STOP)
        return d

    def cmd_new(self, adapter: Any, event: MessageEvent, key: str, args: str) -> Deferred:
        gw = self.gateway
        gw.stop_fleetwide(key, "new_command")
        handle = gw.interrupt_and_clear(key, interrupts.RESET, "new_command")
        gw.generations.bump(key, "session_reset")
        # New turns of this key wait until the store handed out the new session id, so a
        # follow-up never runs against the old transcript (generations.md §5 case 50).
        release = gw.hold_lane(key)
        if handle is not None:
            # Cancel now rather than after the reply: the reply waits for the store, and the
            # old upstream connection must not stay open meanwhile.  The reply cannot be lost
            # by this, since it is sent from this command's chain, not the run's.
            handle.cancel()
            gw.notify_interrupted(handle, interrupts.RESET)
        existed = gw.store.peek(key) is not None
        title = args.strip() or None
        d = gw.store.reset(key, event.source, title=title)

        def reset_done(entry: Any) -> Deferred:
            if title:
                text = NEW_TITLED.format(title=title)
            else:
                text = SESSION_RESET if existed else NEW_SESSION
            return gw.reply(adapter, event, f"{text}\nSession ID: `{entry.session_id}`")

        def reset_failed(failure: Any) -> Deferred:
            log.failure("Session reset failed for {key}", failure, key=key)
            return gw.reply(adapter, event, RESET_FAILED.format(error=failure.getErrorMessage()))

        d.addCallbacks(reset_done, reset_failed)
        d.addBoth(lambda result: (release(), result)[1])
        return d

    cmd_reset = cmd_new

    def _take_back(self, adapter: Any, event: MessageEvent, key: str, invalidation: str,
                   then: Any, nothing: str, what: str) -> Deferred:
        """
        Take back the last exchange of C{key}'s session, holding the lane meanwhile (a new
        message waits, so it never loads the transcript from before), then C{then(text)}.
        The generation is bumped first: whatever is left of an older run is stale.
        """
        gw = self.gateway
        entry = gw.store.peek(key)
        if entry is None:
            return gw.reply(adapter, event, nothing)
        gw.generations.bump(key, invalidation)
        release = gw.hold_lane(key)
        d = gw.store.undo_last_exchange(entry.session_id)

        def done(text: str | None) -> Any:
            return gw.reply(adapter, event, nothing) if text is None else then(text)

        def failed(failure: Any) -> Deferred:
            log.failure("{what} failed for {key}", failure, what=what, key=key)
            return gw.reply(adapter, event, STORE_FAILED.format(
                what=what, error=failure.getErrorMessage()))

        d.addCallbacks(done, failed)
        d.addBoth(lambda result: (release(), result)[1])
        return d

    def cmd_undo(self, adapter: Any, event: MessageEvent, key: str, args: str) -> Deferred:
        def undone(text: str) -> Deferred:
            return self.gateway.reply(adapter, event, UNDONE.format(preview=_preview(text)))

        return self._take_back(adapter, event, key, "undo_command", undone, NOTHING_TO_UNDO,
                               "undo")

    def cmd_retry(self, adapter: Any, event: MessageEvent, key: str, args: str) -> Deferred:
        gw = self.gateway

        def again(text: str) -> Deferred:
            d = gw.reply(adapter, event, RETRYING.format(preview=_preview(text)))
            # Queued before the hold is released, so it runs before anything sent meanwhile.
            metadata = {k: v for k, v in (event.metadata or {}).items() if k != "dedupe_key"}
            gw.run_next(adapter, dataclasses.replace(event, text=text, metadata=metadata), key)
            return d

        return self._take_back(adapter, event, key, "retry_command", again, NOTHING_TO_RETRY,
                               "retry")

    def cmd_sethome(self, adapter: Any, event: MessageEvent, key: str, args: str) -> Deferred:
        gw = self.gateway
        platform = event.source.platform.value
        name = next((v.name for v in ENV_VARS.values() if v.platform == platform
                     and v.yaml_key == f"platforms.{platform}.home_channel"),
                    f"{platform.upper()}_HOME_CHANNEL")
        d = gw.run_in_thread(set_dotenv_value, os.path.join(gw.config.hermes_home, ".env"),
                             name, event.source.chat_id)

        def done(_: Any) -> Deferred:
            log.info("Home channel of {platform} set to {chat} by {user}", platform=platform,
                     chat=event.source.chat_id, user=event.source.user_id)
            return gw.reply(adapter, event, HOME_SET.format(platform=platform, name=name))

        def failed(failure: Any) -> Deferred:
            log.failure("/sethome failed", failure)
            return gw.reply(adapter, event, STORE_FAILED.format(
                what="set the home channel", error=failure.getErrorMessage()))

        return d.addCallbacks(done, failed)

    def cmd_status(self, adapter: Any, event: MessageEvent, key: str, args: str) -> Deferred:
        gw = self.gateway
        entry = gw.store.peek(key)
        handle = gw.current_run(key)
        if handle is None:
            run = "idle"
        else:
            run = f"running for {age_text(gw.clock.seconds() - handle.started_at)} ({handle.phase})"
        lines = [
            "📊 **Session status**",
            f"Session ID: `{entry.session_id if entry else '(none yet)'}`",
            *([f"Title: {entry.title}"] if entry is not None and entry.title else []),
            f"Session key: `{key}`",
            f"Agent: {run}",
            f"Queued messages: {gw.queued(key)}",
            f"Upstream: {public_url(gw.config.upstream.proxy_url)}",
        ]
        name = getattr(getattr(adapter, "settings", None), "name", "?")
        try:
            state = adapter.status
        except Exception:
            state = "unknown"
        lines.append(f"Platform: {name} ({state})")
        # A platform that stopped for good (a Discord fatal close code) is seen from the others.
        others = [f"{n} ({s})" for n, s in sorted(gw.platform_states().items()) if n != name]
        if others:
            lines.append("Other platforms: " + ", ".join(others))
        return gw.reply(adapter, event, "\n".join(lines))
