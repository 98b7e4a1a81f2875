"""Gateway authorization (platforms.md §4 level 2)."""

from __future__ import annotations

from hermes_twisted.config.settings import GatewayConfig, PlatformSettings
from hermes_twisted.dispatch.authz import is_authorized
from hermes_twisted.model import MessageEvent, Platform, SessionSource
from tests.fakes.gateway_kit import Kit


class Adapter:
    authorization_is_upstream = False

    def __init__(self, **settings):
        self.settings = PlatformSettings(name="irc", **settings)


def event(user_id="alice", internal=False, relay=False):
    source = SessionSource(platform=Platform.IRC, chat_id="#c", user_id=user_id,
                           delivered_via_upstream_relay=relay)
    return MessageEvent(text="hi", source=source, internal=internal)


def config(**kw):
    return GatewayConfig(hermes_home="/h", db_path=":memory:", **kw)


def test_default_is_deny():
    assert not is_authorized(config(), Adapter(), event())


def test_internal_and_relay_delivered_events_are_allowed():
    assert is_authorized(config(), Adapter(), event(internal=True, user_id=None))
    assert is_authorized(config(), Adapter(), event(relay=True, user_id=None))
    upstream = Adapter()
    upstream.authorization_is_upstream = True
    assert is_authorized(config(), upstream, event(user_id=None))


def test_missing_user_id_is_denied_even_with_allow_all():
    assert not is_authorized(config(allow_all_users=True), Adapter(allow_all_users=True),
                             event(user_id=None))


def test_platform_allow_all():
    assert is_authorized(config(), Adapter(allow_all_users=True), event())


def test_allowlists_are_a_union():
    assert is_authorized(config(), Adapter(allowed_users=("alice",)), event())
    assert is_authorized(config(allowed_users=("alice",)), Adapter(allowed_users=("bob",)),
                         event())
    assert not is_authorized(config(allowed_users=("carol",)), Adapter(allowed_users=("bob",)),
                             event())


def test_allowlist_wins_over_global_allow_all():
    # With an allowlist present, GATEWAY_ALLOW_ALL_USERS does not widen it (0.19.0 order).
    assert not is_authorized(config(allow_all_users=True), Adapter(allowed_users=("bob",)),
                             event())


def test_no_allowlist_needs_global_allow_all():
    assert is_authorized(config(allow_all_users=True), Adapter(), event())


def test_star_and_domain_forms():
    assert is_authorized(config(), Adapter(allowed_users=("*",)), event())
    assert is_authorized(config(), Adapter(allowed_users=("alice",)), event("alice@example.org"))
    assert not is_authorized(config(), Adapter(allowed_users=("ali",)), event("alice"))


def test_unauthorized_user_gets_nothing_and_is_logged_without_text():
    from twisted.logger import globalLogPublisher

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        kit = Kit(allow_all=False, allowed_users=("bob",))
        kit.gateway.handle_message(kit.adapter, kit.event("my secret plan", user_id="mallory"))
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert kit.adapter.sent == [] and kit.upstream.turns == []
    assert kit.adapter.typing == []
    denied = [e for e in seen if "Unauthorized" in e.get("log_format", "")]
    assert len(denied) == 1
    assert denied[0]["user_id"] == "mallory" and denied[0]["platform"] == "telegram"
    assert "my secret plan" not in repr(denied[0])


def test_adapter_authorized_senders_pass_without_an_allowlist():
    """Telegram group allowlists and admitted bots mark the source role_authorized (0.19.0
    steps 2, 3, 6); the gateway must honour it even though no user allowlist names them."""
    allowed = event(user_id="42")
    allowed.source.role_authorized = True
    assert is_authorized(config(), Adapter(), allowed)
    assert not is_authorized(config(), Adapter(), event(user_id="42"))
