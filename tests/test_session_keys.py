"""
Session keys must match hermes-agent 0.19.0 byte for byte: the relay connector and existing
transcripts depend on them.  Vectors: relay.md §5.1 and platforms.md §2.1.
"""

import pytest

from hermes_twisted.model import Platform, SessionSource
from hermes_twisted.sessions.keys import build_session_key, is_shared_multi_user_session

S = SessionSource
P = Platform

VECTORS = [
    # relay.md §5.1 live vectors
    (S(P.DISCORD, "chanA", chat_type="group", user_id="userX", scope_id="guild1"),
     "agent:main:discord:group:chanA:userX"),
    (S(P.DISCORD, "chanA", chat_type="group", user_id="userX", scope_id="guild2"),
     "agent:main:discord:group:chanA:userX"),
    (S(P.DISCORD, "th1", chat_type="thread", thread_id="th1", user_id="userX"),
     "agent:main:discord:thread:th1:th1"),
    (S(P.DISCORD, "dm1", chat_type="dm", user_id="userX"), "agent:main:discord:dm:dm1"),
    (S(P.TELEGRAM, "-100", chat_type="forum", thread_id="77", user_id="9"),
     "agent:main:telegram:forum:-100:77"),
    (S(P.TELEGRAM, "5", chat_type="dm", profile="coder"), "agent:coder:telegram:dm:5"),
    (S(P.SLACK, "C1", chat_type="channel", user_id="U1", user_id_alt="ALT"),
     "agent:main:slack:channel:C1:ALT"),
    (S.from_dict({"platform": "weird", "chat_id": "c", "chat_type": "group"}),
     "agent:main:relay:group:c"),
    (S.from_dict({}), "agent:main:relay:dm"),
    # platforms.md §2.1 examples
    (S(P.IRC, "#hermes", chat_type="group", user_id="alice"), "agent:main:irc:group:#hermes:alice"),
    (S(P.IRC, "alice", chat_type="dm", user_id="alice"), "agent:main:irc:dm:alice"),
    (S(P.EMAIL, "alice@example.com", user_id="alice@example.com"),
     "agent:main:email:dm:alice@example.com"),
    (S(P.NTFY, "topic1"), "agent:main:ntfy:dm:topic1"),
    (S(P.SLACK, "C9", chat_type="group", thread_id="1700.1", user_id="U1"),
     "agent:main:slack:group:C9:1700.1"),
    # dm fallbacks: no chat id -> user_id_alt/user_id, then thread, then bare
    (S(P.SIGNAL, "", user_id="u", user_id_alt="uuid"), "agent:main:signal:dm:uuid"),
    (S(P.SIGNAL, "", user_id="u"), "agent:main:signal:dm:u"),
    (S(P.SIGNAL, "", thread_id="t"), "agent:main:signal:dm:t"),
    (S(P.TELEGRAM, "5", thread_id="3"), "agent:main:telegram:dm:5:3"),
    # the default profile keeps the main namespace
    (S(P.TELEGRAM, "5", profile="default"), "agent:main:telegram:dm:5"),
]


@pytest.mark.parametrize("source,key", VECTORS, ids=[k for _, k in VECTORS])
def test_hermes_vectors(source, key):
    assert build_session_key(source) == key


def test_group_sessions_shared_when_not_per_user():
    src = S(P.IRC, "#hermes", chat_type="group", user_id="alice")
    assert build_session_key(src, group_sessions_per_user=False) == "agent:main:irc:group:#hermes"
    assert is_shared_multi_user_session(src, group_sessions_per_user=False)
    assert not is_shared_multi_user_session(src)


def test_thread_sessions_per_user_isolates_threads():
    src = S(P.DISCORD, "th1", chat_type="thread", thread_id="th1", user_id="userX")
    assert (build_session_key(src, thread_sessions_per_user=True)
            == "agent:main:discord:thread:th1:th1:userX")
    assert not is_shared_multi_user_session(src, thread_sessions_per_user=True)
    assert is_shared_multi_user_session(src)


def test_group_without_user_has_no_participant_part():
    src = S(P.MATRIX, "!room:hs", chat_type="group")
    assert build_session_key(src) == "agent:main:matrix:group:!room:hs"


def test_dm_never_shared():
    assert not is_shared_multi_user_session(S(P.TELEGRAM, "5"), group_sessions_per_user=False)
