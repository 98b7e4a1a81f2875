# -*- test-case-name: tests.test_ops_http -*-
"""
The status page: server-rendered HTML from the status snapshot, no script, refreshing
itself every 10 s.  It shows states, counts and error codes; the snapshot it renders holds
no secret, no message text and no identifier, and every value is escaped anyway.
"""

from __future__ import annotations

from html import escape
from typing import Any

REFRESH_SECONDS = 10

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em;margin:0 0 .5em} h2{font-size:1.05em;margin:1.2em 0 .4em}
table{border-collapse:collapse} th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3} .connected,.dormant,.yes{background:#e5f6e5}
.connecting,.reconnecting{background:#fff4d6} .disabled,.stopped{background:#eee}
.failed,.no{background:#fbe0e0} .summary td:first-child{font-weight:600}
"""


def _text(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return escape(str(value), quote=True)


def _age(seconds: Any) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def _yes_no_class(value: Any) -> str:
    return "" if value is None else ("yes" if value else "no")


def render_status_page(snap: dict[str, Any]) -> bytes:
    """The page for one L{OpsState.snapshot}."""
    rows = []
    for p in snap["platforms"]:
        state = p["state"]
        retry = ""
        if state == "reconnecting":
            retry = f"attempt {_text(p['attempt'])}"
            if p["next_retry_in_s"] is not None:
                retry += f", next in {_age(p['next_retry_in_s'])}"
        rows.append(
            f'<tr class="platform" id="platform-{_text(p["name"])}" '
            f'data-platform="{_text(p["name"])}" data-state="{_text(state)}">'
            f'<td>{_text(p["name"])}</td>'
            f'<td class="state {_text(state)}">{_text(state)}</td>'
            f'<td>{_text(p["reason"])}</td><td>{retry or "–"}</td>'
            f'<td class="error-code">{_text(p["last_error_code"])}</td>'
            f'<td>{_age(p["since_s"])}</td><td>{_text(p["required"])}</td></tr>')
    upstream, store, turns, reactor = (snap["upstream"], snap["store"], snap["turns"],
                                       snap["reactor"])
    failing = ", ".join(_text(f) for f in snap["failing"]) or "–"
    lag = reactor.get("lag_max_s")
    summary = [
        ("Version", _text(snap["version"])),
        ("Python / Twisted", f"{_text(snap['python'])} / {_text(snap['twisted'])}"),
        ("Gateway state", f'<span id="gateway-state">{_text(snap["state"])}</span>'),
        ("Uptime", f'<span id="uptime">{_age(snap["uptime_s"])}</span>'),
        ("Ready", f'<span id="ready" class="{_yes_no_class(snap["ready"])}">'
                  f'{_text(snap["ready"])}</span> (failing: {failing})'),
        ("Running turns", f'<span id="turns-running">{_text(turns["running"])}</span>'),
        ("Queued messages", f'<span id="turns-queued">{_text(turns["queued"])}</span>'),
        ("Upstream configured", _text(upstream["configured"])),
        ("Upstream reachable", f'<span id="upstream-reachable" class="'
                               f'{_yes_no_class(upstream["reachable"])}">'
                               f'{_text(upstream["reachable"])}</span>'
                               f' (last ok {_age(upstream["last_ok_age_s"])} ago)'),
        ("Store writable", f'<span id="store-writable">{_text(store["writable"])}</span>'),
        ("Store writer queue", _text(store["writer_queue_depth"])),
        ("Inbox pending", _text(store["inbox_pending"])),
        ("Reactor lag (max)", "–" if lag is None else f"{lag * 1000:.1f} ms"),
    ]
    summary_rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in summary)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<meta name="viewport" content="width=device-width">
<title>hermes-gateway status</title><style>{_STYLE}</style></head>
<body><h1>hermes-gateway</h1>
<table class="summary" id="summary">{summary_rows}</table>
<h2>Platforms</h2>
<table id="platforms"><thead><tr><th>Platform</th><th>State</th><th>Reason</th>
<th>Retry</th><th>Last error</th><th>Since</th><th>Required</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table>
<p><a href="/metrics">metrics</a> · <a href="/readyz">readyz</a> ·
<a href="/status.json">status.json</a></p>
</body></html>
"""
    return page.encode("utf-8")
