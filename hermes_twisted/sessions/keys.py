# -*- test-case-name: tests.test_session_keys -*-
"""
Session routing keys, built exactly as hermes-agent 0.19.0's C{build_session_key} builds them.

A key names a conversation lane and survives resets; the session *id* (a transcript) rotates.
C{scope_id} is deliberately not part of the key, as in 0.19.0 (relay.md §11.1).
"""

from __future__ import annotations

from hermes_twisted.model import SessionSource


def namespace(source: SessionSource) -> str:
    if source.profile and source.profile != "default":
        return f"agent:{source.profile}"
    return "agent:main"


def build_session_key(
    source: SessionSource,
    group_sessions_per_user: bool = True,
    thread_sessions_per_user: bool = False,
) -> str:
    parts = [namespace(source), source.platform.value]
    participant = source.user_id_alt or source.user_id
    if source.chat_type == "dm":
        parts.append("dm")
        if source.chat_id:
            parts.append(source.chat_id)
        elif participant:
            parts.append(participant)
        if source.thread_id:
            parts.append(source.thread_id)
        return ":".join(parts)

    parts.append(source.chat_type)
    if source.chat_id:
        parts.append(source.chat_id)
    if source.thread_id:
        parts.append(source.thread_id)
        isolate = thread_sessions_per_user
    else:
        isolate = group_sessions_per_user
    if isolate and participant:
        parts.append(participant)
    return ":".join(parts)


def is_shared_multi_user_session(
    source: SessionSource,
    group_sessions_per_user: bool = True,
    thread_sessions_per_user: bool = False,
) -> bool:
    """True when several users talk into one session (the key has no participant part)."""
    if source.chat_type == "dm":
        return False
    if source.thread_id:
        return not thread_sessions_per_user
    return not group_sessions_per_user
