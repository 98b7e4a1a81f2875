"""
Boot-time self-provisioning and the relevance policy (relay.md 2.3(b), 2.4) against the stub
connector's HTTP endpoints over real TCP, and the policy projection itself.
"""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import reactor

from hermes_twisted.relay.http import HttpResponse
from hermes_twisted.relay.policy import relevance_policy
from hermes_twisted.relay.provision import ProvisionFailed, provision_answer
from hermes_twisted.relay.stub import StubConnector
from tests.relay_support import eventually, relay_pair

HOST_ID = f"gw-{socket.gethostname().strip() or 'hermes'}"


def identity(stub):
    return stub.http.accept_identity("tenant-1")


def provisioned(**relay):
    """relay_pair kwargs for a gateway with no credentials and a static identity token."""
    relay.setdefault("identity_token", identity)
    return dict(secrets={}, gateway_id=None, secret=None, **relay)


async def handshaked(adapter):
    await eventually(lambda: adapter.client.handshaked, what="the handshake")


@pytest_twisted.ensureDeferred
async def test_provisions_each_platform_in_order_and_connects_with_memory_only_credentials(
        tmp_path):
    async with relay_pair(**provisioned(platforms=("discord", "telegram"),
                                        route_keys=("guild-1",))) as (stub, adapter, _):
        await handshaked(adapter)
        calls = stub.http.requests_to("/relay/provision")
        assert [c.json() for c in calls] == [
            {"gatewayId": HOST_ID, "platform": "discord", "botId": "",
             "gatewayEndpoint": "", "routeKeys": ["guild-1"]},
            {"gatewayId": HOST_ID, "platform": "telegram", "botId": "",
             "gatewayEndpoint": "", "routeKeys": ["guild-1"]},
        ]
        token = calls[0].headers["authorization"]
        assert token.startswith("Bearer idt-") and calls[1].headers["authorization"] == token
        assert calls[0].headers["content-type"] == "application/json"
        assert calls[0].headers["accept"] == "application/json"
        record = stub.http.gateways[HOST_ID]
        assert set(record.routes) == {"discord", "telegram"}
        # The WebSocket is authenticated with the provisioned secret, held in memory only.
        assert stub.open[0].gateway_id == HOST_ID
        assert adapter.client.secret == record.secret
        assert adapter.relay_settings.secret is None
        assert adapter.client.delivery_key == record.delivery_key


@pytest_twisted.ensureDeferred
async def test_instance_id_and_wake_url_are_forwarded_and_a_configured_id_is_used():
    async with relay_pair(**provisioned(platforms=("slack",), instance_id="inst-1",
                                        wake_url=lambda s: s.http_url + "/wake")) \
            as (stub, adapter, _):
        await handshaked(adapter)
        [call] = stub.http.requests_to("/relay/provision")
        assert call.json()["instanceId"] == "inst-1"
        assert call.json()["wakeUrl"] == stub.http_url + "/wake"
    async with relay_pair(**provisioned(platforms=("slack",))) as (stub, adapter, _):
        await handshaked(adapter)
        body = stub.http.requests_to("/relay/provision")[0].json()
        assert "instanceId" not in body and "wakeUrl" not in body
    async with relay_pair(secrets={}, gateway_id="gw-mine", secret=None,
                          identity_token=identity) as (stub, adapter, _):
        await handshaked(adapter)
        assert stub.http.requests_to("/relay/provision")[0].json()["gatewayId"] == "gw-mine"
        assert stub.http.requests_to("/relay/provision")[0].json()["platform"] == "relay"


@pytest_twisted.ensureDeferred
async def test_one_platform_failing_does_not_stop_the_others():
    def configure(stub):
        stub.http.provision_status["discord"] = 500

    async with relay_pair(configure=configure,
                          **provisioned(platforms=("discord", "telegram"))) \
            as (stub, adapter, _):
        await handshaked(adapter)
        assert set(stub.http.gateways[HOST_ID].routes) == {"telegram"}
        assert len(stub.http.requests_to("/relay/provision")) == 2


@pytest_twisted.ensureDeferred
async def test_a_replay_without_a_secret_never_blanks_the_first_platforms_credentials():
    def configure(stub):
        stub.http.withhold_replays = True  # the second call is a replay: secretIssued false

    async with relay_pair(configure=configure,
                          **provisioned(platforms=("discord", "telegram"))) \
            as (stub, adapter, _):
        await handshaked(adapter)
        assert adapter.client.secret == stub.http.gateways[HOST_ID].secret


@pytest_twisted.ensureDeferred
async def test_only_replays_stamp_nothing_and_the_gateway_keeps_trying():
    def configure(stub):
        stub.http.withhold_replays = True
        stub.http._issue(HOST_ID, "tenant-1")  # provisioned by an earlier boot

    async with relay_pair(configure=configure,
                          **provisioned(platforms=("discord",))) as (stub, adapter, _):
        await eventually(lambda: adapter.client._provision_retry is not None,
                         what="a scheduled retry")
        assert adapter.status == "provisioning"
        assert adapter.client.secret is None and stub.connections == 0


@pytest_twisted.ensureDeferred
async def test_the_bearer_is_not_sent_to_another_origin_on_a_redirect():
    other = StubConnector(reactor, secrets={})
    await other.listen()
    try:
        def configure(stub):
            stub.http.redirects["/relay/provision"] = other.http_url + "/relay/provision"

        async with relay_pair(configure=configure, **provisioned()) as (stub, adapter, _):
            await eventually(lambda: other.http.requests_to("/relay/provision"),
                             what="the redirected request")
            [followed] = other.http.requests_to("/relay/provision")
            assert "authorization" not in followed.headers
            assert followed.json()["platform"] == "relay"  # 307 keeps the method and body
            assert adapter.client.secret is None
    finally:
        await other.stop()


@pytest_twisted.ensureDeferred
async def test_identity_from_client_credentials_and_from_an_ambient_endpoint():
    def configure(stub):
        stub.http.idp_clients["cid"] = "csec"

    async with relay_pair(configure=configure, **provisioned(
            identity_token=None, idp_token_url=lambda s: s.http_url + "/idp/token",
            idp_client_id="cid", idp_client_secret="csec")) as (stub, adapter, _):
        await handshaked(adapter)
        [grant] = stub.http.requests_to("/idp/token")
        assert grant.headers["content-type"] == "application/x-www-form-urlencoded"
    async with relay_pair(**provisioned(
            identity_token=None, idp_token_url=lambda s: s.http_url + "/idp/ambient")) \
            as (stub, adapter, _):
        await handshaked(adapter)
        assert stub.http.requests_to("/idp/ambient")[0].method == "GET"


@pytest_twisted.ensureDeferred
async def test_partial_idp_credentials_are_a_clear_error():
    async with relay_pair(**provisioned(identity_token=None, idp_token_url="http://idp/t",
                                        idp_client_id="cid")) as (stub, adapter, _):
        assert adapter.status.startswith("disabled: relay_credentials_missing")
        assert "GATEWAY_RELAY_IDP_CLIENT_SECRET missing" in adapter.status
        assert stub.http.requests == []


@pytest_twisted.ensureDeferred
async def test_a_pinned_secret_is_never_provisioned_over():
    async with relay_pair(identity_token=identity) as (stub, adapter, _):
        await handshaked(adapter)
        assert stub.http.requests_to("/relay/provision") == []


# -- the relevance policy -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_policy_is_declared_per_platform_with_the_upgrade_token():
    extra = {"telegram": {"require_mention": True, "free_response_channels": "c1, c2,"},
             "slack": {"require_mention": False}}
    async with relay_pair(platforms=("discord", "telegram", "slack"), extra=extra,
                          platform_env={"telegram": {"allow_bots": "mentions"},
                                        "discord": {"allow_bots": "all"}}) \
            as (stub, adapter, _):
        await eventually(lambda: adapter.policy_outcome, what="the policy declaration")
        assert adapter.policy_outcome == {"discord": True, "telegram": True}
        assert stub.http.policies == {
            ("gw-test", "discord"): {"platform": "discord", "requireAddress": False,
                                     "freeResponseScopes": [], "allowOtherBots": False},
            ("gw-test", "telegram"): {"platform": "telegram", "requireAddress": True,
                                      "freeResponseScopes": ["c1", "c2"],
                                      "allowOtherBots": True},
        }


@pytest_twisted.ensureDeferred
async def test_a_refused_policy_is_logged_and_the_old_one_stands():
    def configure(stub):
        stub.http.policy_status = 503
        stub.http.policies[("gw-test", "discord")] = {"old": True}

    async with relay_pair(configure=configure, platforms=("discord",)) as (stub, adapter, _):
        await eventually(lambda: adapter.policy_outcome, what="the policy declaration")
        assert adapter.policy_outcome == {"discord": False}
        assert stub.http.policies == {("gw-test", "discord"): {"old": True}}


@pytest_twisted.ensureDeferred
async def test_policy_after_provisioning_uses_the_provisioned_secret():
    async with relay_pair(**provisioned(platforms=("discord",))) as (stub, adapter, _):
        await eventually(lambda: adapter.policy_outcome, what="the policy declaration")
        assert adapter.policy_outcome == {"discord": True}
        assert (HOST_ID, "discord") in stub.http.policies


@pytest.mark.parametrize("platform, extra, allow_bots, expected", [
    ("relay", {"require_mention": True}, None, None),
    ("telegram", {}, None, None),
    ("telegram", {"telegram": {"require_mention": False}}, "none", None),
    ("telegram", {"require_mention": True, "free_response_channels": ["a", " b ", ""]}, None,
     {"requireAddress": True, "freeResponseScopes": ["a", "b"], "allowOtherBots": False}),
    # The platform's block wins over the top level, key by key.
    ("telegram", {"require_mention": True, "telegram": {"require_mention": False},
                  "free_response_channels": "x"}, None,
     {"requireAddress": False, "freeResponseScopes": ["x"], "allowOtherBots": False}),
    ("slack", {"slack": {"require_mention": "false"}}, "ALL",
     {"requireAddress": False, "freeResponseScopes": [], "allowOtherBots": True}),
    ("slack", {"slack": {"free_response_channels": [123]}}, None,
     {"requireAddress": False, "freeResponseScopes": ["123"], "allowOtherBots": False}),
    ("discord", {}, "all",
     {"requireAddress": False, "freeResponseScopes": [], "allowOtherBots": False}),
])
def test_policy_projection(platform, extra, allow_bots, expected):
    policy = relevance_policy(platform, extra, allow_bots)
    if expected is None:
        assert policy is None
    else:
        assert policy == {"platform": platform, **expected}


@pytest.mark.parametrize("status, body, ok", [
    (200, b'{"secret": "s", "gatewayId": "g"}', True),
    (200, b'{"secretIssued": false, "tenant": "t"}', True),
    (200, b'{"tenant": "t"}', False),
    (200, b'{"secret": ""}', False),
    (200, b"nope", False),
    (401, b'{"error": "unauthorized"}', False),
])
def test_provision_answers(status, body, ok):
    if ok:
        assert isinstance(provision_answer(HttpResponse(status, body)), dict)
    else:
        with pytest.raises(ProvisionFailed):
            provision_answer(HttpResponse(status, body))
