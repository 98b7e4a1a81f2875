"""
The ops surface checked with the real tools, against a real C{twistd hermes-gateway}:
Debian's Prometheus scrapes C{/metrics} and answers PromQL, C{promtool check metrics} lints a
scrape, and headless Chromium renders C{/status} (operations.md §8 checks 7 and 8).

The daemon runs three platforms: the API server (connected), IRC and the relay pointed at
closed ports (reconnecting).  The upstream agent refuses connections.  One chat completion
carries a message text that must never appear on the page or in /status.json.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, clean_env
from tests.servers.irc import free_port

API_KEY = "api-key-ops-test-0123456789"
RELAY_SECRET = "relay-secret-ops-test-987654"
OPS_TOKEN = "ops-token-ops-test-13579bdf"
MESSAGE_TEXT = "where-is-the-purple-elephant-42"
PLATFORMS = {"api_server", "irc", "relay"}


def http_get(url: str, *, headers: dict[str, str] | None = None,
             timeout: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_for(predicate: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"{what} did not happen within {timeout}s")


@pytest.fixture(scope="module")
def gateway():
    home = Path(tempfile.mkdtemp(prefix="hermes-ops-"))
    ops_port, api_port = free_port(), free_port()
    closed = free_port()  # nothing listens here: IRC, the relay and the agent are refused
    env = clean_env(
        home,
        GATEWAY_OPS_LISTEN=f"tcp:{ops_port}:interface=127.0.0.1",
        GATEWAY_OPS_TOKEN=OPS_TOKEN,
        GATEWAY_PROXY_URL=f"http://127.0.0.1:{closed}",
        API_SERVER_ENABLED="true", API_SERVER_KEY=API_KEY, API_SERVER_PORT=str(api_port),
        IRC_SERVER="127.0.0.1", IRC_PORT=str(closed), IRC_NICKNAME="hermes",
        IRC_USE_TLS="false", IRC_CHANNEL="#ops",
        GATEWAY_RELAY_URL=f"http://127.0.0.1:{closed}", GATEWAY_RELAY_ID="gw-ops",
        GATEWAY_RELAY_SECRET=RELAY_SECRET,
    )
    daemon = Daemon(home, env)
    try:
        daemon.wait_for_log("Ops listener on", timeout=30)
        # The ops listener comes up before the platforms: under load the API server may not
        # listen yet when the ops one does, and the request below would be refused.
        daemon.wait_for_log(f"API server listening on http://127.0.0.1:{api_port}", timeout=30)
        base = f"http://127.0.0.1:{ops_port}"
        body = json.dumps({"model": "hermes-agent",
                           "messages": [{"role": "user", "content": MESSAGE_TEXT}]}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{api_port}/v1/chat/completions", data=body,
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()  # the agent is unreachable: an error notice, but a finished turn
        yield base, home, api_port
    finally:
        daemon.terminate(30)
        daemon.kill()
        shutil.rmtree(home, ignore_errors=True)


def test_a_real_scrape_passes_promtool(gateway):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool missing: apt-get install prometheus (Debian) to run this test")
    base, _, _ = gateway
    code, body = http_get(f"{base}/metrics")
    assert code == 200
    text = body.decode()
    for name in ("hermes_platform_up", "hermes_turns_finished_total",
                 "hermes_stale_outputs_dropped_total", "hermes_reactor_lag_seconds_bucket",
                 "hermes_agent_requests_total", "hermes_db_transaction_seconds_bucket",
                 'hermes_threadpool_threads{pool="reactor",state="max"}'):
        assert name in text, name
    assert 'hermes_agent_requests_total{outcome="connect_error"} 1.0' in text
    assert 'hermes_api_requests_total{code="2xx",route="chat_completions"} 1.0' in text
    assert MESSAGE_TEXT not in text and API_KEY not in text and "agent:main" not in text
    lint = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                          timeout=30)
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()


def test_prometheus_scrapes_and_answers_platform_up_per_platform(gateway, tmp_path):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus missing: apt-get install prometheus (Debian) to run this test")
    base, _, _ = gateway
    target = urllib.parse.urlsplit(base).netloc
    (tmp_path / "token").write_text(OPS_TOKEN)
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: hermes
    metrics_path: /metrics
    authorization:
      credentials_file: {tmp_path / "token"}
    static_configs:
      - targets: ["{target}"]
""")
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {proc.stderr.read().decode()}")
            try:
                return http_get(f"{api}/-/ready", timeout=1)[0] == 200
            except OSError:
                return False

        wait_for(ready, "prometheus ready", timeout=60)

        def query(expr: str) -> list[dict[str, Any]]:
            code, body = http_get(f"{api}/api/v1/query?" + urllib.parse.urlencode(
                {"query": expr}))
            assert code == 200, body
            return json.loads(body)["data"]["result"]

        samples = wait_for(lambda: len(query("hermes_platform_up")) == len(PLATFORMS)
                           and query("hermes_platform_up"), "a scrape of every platform",
                           timeout=60)
        up = {s["metric"]["platform"]: s["value"][1] for s in samples}
        assert up == {"api_server": "1", "irc": "0", "relay": "0"}
        _, targets = http_get(f"{api}/api/v1/targets")
        [active] = json.loads(targets)["data"]["activeTargets"]
        assert active["health"] == "up" and active["lastError"] == ""
        states = query('hermes_platform_state{platform="irc"} == 1')
        assert [s["metric"]["state"] for s in states] == ["reconnecting"]
        finished = query("sum(hermes_turns_finished_total)")
        assert float(finished[0]["value"][1]) >= 1
        lag = wait_for(lambda: query(
            "histogram_quantile(0.99, rate(hermes_reactor_lag_seconds_bucket[30s]))"),
            "a lag quantile", timeout=30)
        assert float(lag[0]["value"][1]) < 5
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()


class PlatformRows(HTMLParser):
    """The rows of the platforms table: C{{name: state class}}."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, str] = {}
        self.cells: list[str] = []
        self._row: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "tr" and attributes.get("class") == "platform":
            self._row = attributes.get("data-platform")
        if tag == "td" and self._row and "state" in (attributes.get("class") or "").split():
            self.rows[self._row] = (attributes.get("class") or "").split()[-1]

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None


def chromium_dump(url: str, profile: Path) -> str:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium missing: apt-get install chromium (Debian) to run this test")
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True, timeout=120)
    # The Debian launcher prints a harmless shell warning on stderr; only the DOM matters.
    return result.stdout.decode(errors="replace")


def test_chromium_renders_one_row_per_platform_with_its_state_and_no_secret(gateway, tmp_path):
    base, _, _ = gateway
    dom = chromium_dump(f"{base}/status", tmp_path / "profile")
    assert "hermes-gateway" in dom, dom[:2000]
    parser = PlatformRows()
    parser.feed(dom)
    assert parser.rows == {"api_server": "connected", "irc": "reconnecting",
                           "relay": "reconnecting"}
    _, status_json = http_get(f"{base}/status.json")
    for text in (dom, status_json.decode()):
        for secret in (API_KEY, RELAY_SECRET, OPS_TOKEN, MESSAGE_TEXT, "agent:main:"):
            assert secret not in text


def test_the_page_and_details_are_refused_off_loopback_without_the_token(gateway):
    base, _, _ = gateway
    # The TCP peer is loopback here; a forged X-Forwarded-For from it changes nothing (no
    # trusted proxy), and the bearer is accepted.
    code, body = http_get(f"{base}/readyz", headers={"X-Forwarded-For": "203.0.113.1"})
    assert "conditions" in json.loads(body)
    code, _ = http_get(f"{base}/status", headers={"Authorization": f"Bearer {OPS_TOKEN}"})
    assert code == 200


def test_the_api_server_keeps_hermes_health_bodies(gateway):
    _, _, api_port = gateway
    code, body = http_get(f"http://127.0.0.1:{api_port}/health")
    assert code == 200 and json.loads(body) == {"status": "ok", "platform": "hermes-agent",
                                                "version": "0.19.0"}
    assert http_get(f"http://127.0.0.1:{api_port}/health/detailed")[0] == 401
    code, body = http_get(f"http://127.0.0.1:{api_port}/health/detailed",
                          headers={"Authorization": f"Bearer {API_KEY}"})
    detailed = json.loads(body)
    assert code == 200 and detailed["platform"] == "hermes-agent"
    assert set(detailed["platforms"]) == PLATFORMS
    assert detailed["platforms"]["api_server"]["state"] == "connected"
