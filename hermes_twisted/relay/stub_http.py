# -*- test-case-name: tests.test_relay_provisioning -*-
"""
The stub connector's HTTP side (relay.md 2.3, 2.4), served on the same port as its C{/relay}
WebSocket: C{/relay/enroll}, C{/relay/provision} and C{/relay/policy} with the connector's
validation, plus the neighbours a test needs: an OAuth2 token URL (C{/idp/token}), an ambient
token URL (C{/idp/ambient}) and a wake URL (C{/wake}, standing in for the machine's
orchestrator: it counts pokes).

Every request is recorded (C{http.requests}) with its headers, so tests can check what was
sent, including that no bearer followed a redirect to another origin.
"""

from __future__ import annotations

import json
import secrets as _secrets
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qs

from twisted.logger import Logger
from twisted.web.resource import Resource

from hermes_twisted.relay.auth import bearer_from_header

POLICY_KEYS = frozenset({"platform", "requireAddress", "freeResponseScopes", "allowOtherBots"})
PROVISION_REQUIRED = {"gatewayId": str, "platform": str, "botId": str, "gatewayEndpoint": str,
                      "routeKeys": list}
PROVISION_OPTIONAL = ("instanceId", "wakeUrl")


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body.decode("utf-8"))
        except ValueError:
            return None


@dataclass
class Gateway:
    """What the connector's secret record holds for one gateway id."""

    gateway_id: str
    tenant: str
    secret: str
    delivery_key: str
    routes: dict[str, dict[str, Any]] = field(default_factory=dict)
    instance_id: str | None = None
    wake_url: str | None = None


class ConnectorHttp:
    """The connector's HTTP state and knobs.  C{stub} is the L{StubConnector} it serves with."""

    log = Logger()

    def __init__(self, stub: Any) -> None:
        self.stub = stub
        # Caller-identity tokens the connector introspects, each to its tenant.
        self.identity_tokens: dict[str, str] = {}
        # Single-use enrollment tokens, each to its tenant.
        self.enrollment_tokens: dict[str, str] = {}
        self.gateways: dict[str, Gateway] = {}
        self.policies: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[Recorded] = []
        self.wake_pokes = 0
        # Knobs.
        self.policy_status = 200
        self.provision_status: dict[str, int] = {}  # platform -> forced status
        self.withhold_replays = False  # F-004: a replay answers secretIssued:false
        self.redirects: dict[str, str] = {}  # path -> Location answered with 307
        self.idp_clients: dict[str, str] = {}  # client_id -> client_secret
        self.idp_tenant = "tenant-1"
        self.ambient_body: bytes | None = None
        self.ambient_status = 200

    # -- helpers for tests --------------------------------------------------------------------

    def accept_identity(self, tenant: str = "tenant-1") -> str:
        """A fresh caller-identity token the connector will map to C{tenant}."""
        token = "idt-" + _secrets.token_urlsafe(24)
        self.identity_tokens[token] = tenant
        return token

    def mint_enrollment_token(self, tenant: str = "tenant-1") -> str:
        token = "enr-" + _secrets.token_urlsafe(12)
        self.enrollment_tokens[token] = tenant
        return token

    def requests_to(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]

    # -- the gateway's secret record ------------------------------------------------------------

    def _issue(self, gateway_id: str, tenant: str) -> Gateway:
        gateway = Gateway(gateway_id, tenant, "sec-" + _secrets.token_urlsafe(24),
                          "dk-" + _secrets.token_urlsafe(24))
        self.gateways[gateway_id] = gateway
        if self.stub.secrets is None:
            self.stub.secrets = {}
        # A re-issued secret keeps the old one valid (the connector's rotation window).
        self.stub.secrets.setdefault(gateway_id, []).insert(0, gateway.secret)
        return gateway

    # -- endpoints: each returns (status, JSON body) ---------------------------------------------

    def _identity(self, rec: Recorded) -> str | None:
        return self.identity_tokens.get(bearer_from_header(rec.headers.get("authorization"))
                                        or "")

    def enroll(self, rec: Recorded) -> tuple[int, Any]:
        tenant = self._identity(rec)
        if tenant is None:
            return 401, {"error": "unauthorized"}
        body = rec.json()
        if not isinstance(body, dict) or not all(
                isinstance(body.get(k), str) and body[k] for k in ("enrollmentToken",
                                                                   "gatewayId")):
            return 400, {"error": "enrollmentToken and gatewayId are required"}
        owner = self.enrollment_tokens.get(body["enrollmentToken"])
        if owner is None or owner != tenant:
            return 403, {"error": "enrollment token invalid, expired or already used"}
        del self.enrollment_tokens[body["enrollmentToken"]]
        gateway = self._issue(body["gatewayId"], tenant)
        return 200, {"secret": gateway.secret, "deliveryKey": gateway.delivery_key,
                     "tenant": tenant, "gatewayId": gateway.gateway_id}

    def provision(self, rec: Recorded) -> tuple[int, Any]:
        tenant = self._identity(rec)
        if tenant is None:
            return 401, {"error": "unauthorized"}
        if not rec.headers.get("content-type", "").startswith("application/json"):
            return 415, {"error": "expected application/json"}
        body = rec.json()
        if not isinstance(body, dict):
            return 400, {"error": "body must be a JSON object"}
        for key, kind in PROVISION_REQUIRED.items():
            if not isinstance(body.get(key), kind):
                return 400, {"error": f"{key} is required ({kind.__name__})"}
        if not body["gatewayId"] or not body["platform"]:
            return 400, {"error": "gatewayId and platform must not be empty"}
        if not all(isinstance(k, str) for k in body["routeKeys"]):
            return 400, {"error": "routeKeys must be strings"}
        for key in PROVISION_OPTIONAL:
            # Unset values are omitted, never sent as null or "".
            if key in body and not (isinstance(body[key], str) and body[key]):
                return 400, {"error": f"{key} must be omitted when unset"}
        unknown = set(body) - set(PROVISION_REQUIRED) - set(PROVISION_OPTIONAL)
        if unknown:
            return 400, {"error": f"unknown keys {sorted(unknown)}"}
        forced = self.provision_status.get(body["platform"])
        if forced is not None:
            return forced, {"error": "forced by the test"}
        gateway = self.gateways.get(body["gatewayId"])
        if gateway is not None and gateway.tenant != tenant:
            return 403, {"error": "gateway id belongs to another tenant"}
        replay = gateway is not None
        if gateway is None:
            gateway = self._issue(body["gatewayId"], tenant)
        gateway.routes[body["platform"]] = {"botId": body["botId"],
                                            "routeKeys": body["routeKeys"]}
        gateway.instance_id = body.get("instanceId", gateway.instance_id)
        gateway.wake_url = body.get("wakeUrl", gateway.wake_url)
        answer: dict[str, Any] = {"tenant": tenant, "gatewayId": gateway.gateway_id,
                                  "routeKeys": body["routeKeys"]}
        if replay and self.withhold_replays:
            answer["secretIssued"] = False
        else:
            answer.update(secret=gateway.secret, deliveryKey=gateway.delivery_key,
                          secretIssued=True)
        return 200, answer

    def policy(self, rec: Recorded) -> tuple[int, Any]:
        token = bearer_from_header(rec.headers.get("authorization"))
        gateway_id = self.stub.verify(token)
        if gateway_id is None:
            return 401, {"error": "unauthorized"}
        body = rec.json()
        if not isinstance(body, dict) or set(body) != POLICY_KEYS:
            return 400, {"error": f"expected exactly {sorted(POLICY_KEYS)}"}
        if not (isinstance(body["platform"], str) and body["platform"]
                and isinstance(body["requireAddress"], bool)
                and isinstance(body["allowOtherBots"], bool)
                and isinstance(body["freeResponseScopes"], list)
                and all(isinstance(s, str) for s in body["freeResponseScopes"])):
            return 400, {"error": "bad policy field types"}
        if self.policy_status != 200:
            return self.policy_status, {"error": "forced by the test"}
        self.policies[(gateway_id, body["platform"])] = body
        return 200, {"ok": True}

    def idp_token(self, rec: Recorded) -> tuple[int, Any]:
        if rec.headers.get("content-type", "") != "application/x-www-form-urlencoded":
            return 400, {"error": "invalid_request"}
        form = {k: v[0] for k, v in parse_qs(rec.body.decode("utf-8")).items()}
        if form.get("grant_type") != "client_credentials":
            return 400, {"error": "unsupported_grant_type"}
        client_id = form.get("client_id", "")
        if not client_id or self.idp_clients.get(client_id) != form.get("client_secret"):
            return 401, {"error": "invalid_client"}
        return 200, {"access_token": self.accept_identity(self.idp_tenant),
                     "token_type": "Bearer", "expires_in": 3600}

    def ambient(self, rec: Recorded) -> tuple[int, Any]:
        if self.ambient_body is not None:
            return self.ambient_status, self.ambient_body
        return self.ambient_status, self.accept_identity(self.idp_tenant).encode("ascii")

    def wake(self, rec: Recorded) -> tuple[int, Any]:
        self.wake_pokes += 1
        self.stub._poke()
        return 204, None


class _Endpoint(Resource):
    isLeaf = True

    def __init__(self, http: ConnectorHttp, handler: Callable[[Recorded], tuple[int, Any]],
                 methods: tuple[str, ...]) -> None:
        super().__init__()
        self.http = http
        self.handler = handler
        self.methods = methods

    def render(self, request: Any) -> bytes:
        path = request.path.decode("utf-8", "replace")
        headers = {k.decode("latin-1").lower(): v[-1].decode("latin-1")
                   for k, v in request.requestHeaders.getAllRawHeaders()}
        rec = Recorded(request.method.decode("ascii"), path, headers, request.content.read())
        self.http.requests.append(rec)
        self.http.stub._poke()
        location = self.http.redirects.get(path)
        if location:
            request.setResponseCode(307)
            request.setHeader(b"location", location.encode("utf-8"))
            return b""
        if rec.method not in self.methods:
            request.setResponseCode(405)
            return b""
        try:
            status, body = self.handler(rec)
        except Exception:
            self.http.log.failure("stub: {path} failed", path=path)
            status, body = 500, {"error": "stub failure"}
        request.setResponseCode(status)
        if body is None:
            return b""
        if isinstance(body, bytes):
            request.setHeader(b"content-type", b"text/plain")
            return body
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode("utf-8")


def http_children(http: ConnectorHttp) -> dict[str, dict[str, Resource]]:
    """C{{parent: {child: resource}}} for the stub's resource tree."""
    return {
        "relay": {"enroll": _Endpoint(http, http.enroll, ("POST",)),
                  "provision": _Endpoint(http, http.provision, ("POST",)),
                  "policy": _Endpoint(http, http.policy, ("POST",))},
        "idp": {"token": _Endpoint(http, http.idp_token, ("POST",)),
                "ambient": _Endpoint(http, http.ambient, ("GET",))},
        "": {"wake": _Endpoint(http, http.wake, ("GET", "POST"))},
    }
