"""
Soak benchmark: a real C{twistd hermes-gateway} under a steady mixed load for a long time,
read through its own C{/metrics} and C{/proc}, to show that it does not leak.

Same three processes as C{bench/e2e.py} (its helpers are reused): the load-driving connector
(C{bench/e2e_connector.py}, scenario C{bench/soak_load.py}), the fake Hermes API
(C{bench/e2e_upstream.py}) and the gateway, with its ops listener on a free port.

    python bench/soak.py                              # 20 minutes at half the measured maximum
    python bench/soak.py --minutes 3 --sample 10      # a quick check
    python bench/soak.py --minutes 1440 --sample 300 --out bench/results/soak-24h.json

The load: relay messages at C{--rate} messages/s (default: half of the rate the same mix
reaches in a 60 s calibration offered far more than it can take), mixed with upstream errors, silent streams
and endless streams stopped by C{/stop}; the connector drops the socket every
C{--drop-every} s.  Every C{--sample} s it records the gateway's RSS (VmRSS), open file
descriptors (/proc/<pid>/fd), the store's size (gateway.db + WAL), and from C{/metrics}:
pending reactor timers, active turns, turns by outcome, stale outputs dropped, relay
reconnects, reactor lag.  The connector reports per interval the echo latency p50/p99.

At the end: RSS slope after warm-up (least squares, KB/hour), the fd and timer ranges,
messages lost, superseded or answered twice, and the figures per sample.  Each unanswered
message is classified by C{bench/soak_ledger.py} (in flight at a socket drop; superseded by
a newer message of its chat, with the user told; lost), and each lost or superseded one is
reported with its chat, when it was sent, the chat's outstanding message, the frames the
connector saw for the chat, the gateway's log lines naming the chat and its transcript rows.
Targets: RSS slope under 1 MB/hour after warm-up, a constant fd count, no lost or doubled
message.

This is a measurement, not a test: nothing here asserts anything.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sqlite3
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: Seconds of the calibration that measures the mix's maximum rate.
CALIBRATION_S = 60.0
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from e2e import (  # noqa: E402
    DEFAULT_GATEWAY_CMD,
    GATEWAY_ID,
    SECRET,
    Gateway,
    cpu_seconds,
    gateway_env,
    machine,
    measured_pid,
    memory_kb,
    sleep,
    source_version,
    spawn_helper,
    with_timeout,
)
from e2e_common import now  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from twisted.internet import task  # noqa: E402
from twisted.internet.defer import ensureDeferred  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402

from tests.servers.irc import free_port  # noqa: E402


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def store_bytes(home: Path) -> int:
    return sum(p.stat().st_size for p in home.glob("gateway.db*") if p.is_file())


def scrape(url: str) -> dict[str, float]:
    """The samples of C{url}'s /metrics as C{{"name{labels}": value}}, in a thread."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def total(metrics: dict[str, float], name: str, **match: str) -> float:
    """Sum of C{name}'s samples whose labels include C{match}."""
    want = [f'{k}="{v}"' for k, v in match.items()]
    return sum(v for k, v in metrics.items()
               if (k == name or k.startswith(name + "{")) and all(w in k for w in want))


def lag_quantile(before: dict[str, float], after: dict[str, float], q: float) -> float | None:
    """The C{q} quantile of hermes_reactor_lag_seconds between two scrapes (bucket upper
    bound, as Prometheus' histogram_quantile without interpolation)."""
    buckets = []
    for key, value in after.items():
        if key.startswith("hermes_reactor_lag_seconds_bucket{"):
            bound = key.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if bound == "+Inf" else float(bound),
                            value - before.get(key, 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return None
    target = q * buckets[-1][1]
    return next((bound for bound, count in buckets if count >= target), None)


def heap_report(url: str, baseline: bool) -> dict[str, Any]:
    """The gateway's C{/debug/heap} (C{GATEWAY_OPS_DEBUG_HEAP}), in a thread."""
    with urllib.request.urlopen(url + ("?baseline=1" if baseline else ""),
                                timeout=120) as response:
        return json.loads(response.read())


def gateway_log_files(home: Path) -> list[Path]:
    """The gateway's log files, oldest first (twistd rotates gateway.log to .1, .2, ...)."""
    rotated = sorted(home.glob("gateway.log.*"), key=lambda p: -int(p.suffix[1:])
                     if p.suffix[1:].isdigit() else 0)
    return [*rotated, home / "gateway.log"]


def chat_log_lines(home: Path, chat: str, since: float, until: float,
                   limit: int = 60) -> list[str]:
    """The gateway's log lines that name C{chat} (its id, or its session key) and were
    written between C{since} and C{until} (epoch seconds; the log has whole seconds)."""
    mentions = re.compile(re.escape(chat) + r"(?![0-9])")
    out: list[str] = []
    for path in gateway_log_files(home):
        if not path.exists():
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not mentions.search(line):
                    continue
                try:
                    at = datetime.strptime(line[:24], "%Y-%m-%dT%H:%M:%S%z").timestamp()
                except ValueError:
                    continue
                if since - 1 <= at <= until + 1:
                    out.append(line.rstrip()[:300])
                    if len(out) >= limit:
                        return out
    return out


def transcript_rows(home: Path, message_id: str) -> list[dict[str, Any]]:
    """The gateway transcript's rows for inbound C{message_id} and the reply stored with it
    (read-only, after the gateway has exited)."""
    db = home / "gateway.db"
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT id, session_id, role, substr(content, 1, 80), active "
                            "FROM messages WHERE session_id IN (SELECT session_id FROM "
                            "messages WHERE platform_message_id = ?) AND id >= (SELECT "
                            "min(id) FROM messages WHERE platform_message_id = ?) "
                            "ORDER BY id LIMIT 4", (message_id, message_id)).fetchall()
    return [dict(zip(("row", "session", "role", "content", "active"), r, strict=True)) for r in rows]


def explain_unanswered(home: Path, load: dict[str, Any], end: float) -> None:
    """Add to each lost, superseded or sampled at-drop message of C{load} the gateway's
    log lines for its chat from its sending to C{end}, and its transcript rows (none: the
    gateway never ran it as a turn of its own)."""
    for detail in [*load.get("lost_detail", []), *load.get("superseded_sample", []),
                   *load.get("at_drop_sample", [])]:
        detail["gateway_log"] = chat_log_lines(home, detail["chat"], detail["at"], end)
        detail["transcript"] = transcript_rows(home, f"in-{detail['id']}")


def theil_sen_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Theil-Sen slope of C{(seconds, value)} points, per hour: the median of the slopes of
    all pairs.  Robust to steps and outliers: up to 29% of the points can be anything
    without moving it, where one step moves a least-squares line."""
    slopes = sorted((v2 - v1) / (t2 - t1) for i, (t1, v1) in enumerate(points)
                    for t2, v2 in points[i + 1:] if t2 != t1)
    if len(points) < 3 or not slopes:
        return None
    mid = len(slopes) // 2
    median = slopes[mid] if len(slopes) % 2 else (slopes[mid - 1] + slopes[mid]) / 2
    return median * 3600


def slopes(samples: list[dict[str, Any]], key: str) -> dict[str, float | None]:
    """Theil-Sen and least-squares slopes per hour of C{key} over C{samples}."""
    points = [(s["t_s"], s[key]) for s in samples if s.get(key) is not None]
    robust, ls = theil_sen_per_hour(points), slope_per_hour(points)
    return {"theil_sen": round(robust, 1) if robust is not None else None,
            "least_squares": round(ls, 1) if ls is not None else None,
            "first_last": [points[0][1], points[-1][1]] if points else None}


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of C{(seconds, value)} points, per hour."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var * 3600


def summarize(report: dict[str, Any], warmup_min: float) -> dict[str, Any]:
    """The figures of a run from its samples: slopes after C{warmup_min} minutes."""
    samples = report["samples"]
    args = report["args"]
    heap = report.get("heap_last") or {}
    load = report.get("load") or {}
    warm = [s for s in samples if s["t_s"] >= warmup_min * 60]
    # The later half of the post-warm-up window: a longer warm-up, from the same run.
    late = warm[len(warm) // 2:]
    rss, rss_late = slopes(warm, "rss_kb"), slopes(late, "rss_kb")
    return {
        "samples": len(samples),
        "warmup_min": warmup_min,
        "load_average_start_end": [report.get("loadavg_start"), report.get("loadavg_end")],
        "malloc_arena_max": args.get("malloc_arena_max"),
        "pythonmalloc": args.get("pythonmalloc"),
        "heap_debug": args.get("heap"),
        # Theil-Sen: the median of pairwise slopes, so a few outlying samples do not make a
        # trend; least squares beside it for comparison.
        "rss_slope_kb_per_hour": rss["theil_sen"],
        "rss_slope_kb_per_hour_least_squares": rss["least_squares"],
        "rss_kb_first_last_after_warmup": rss["first_last"],
        "rss_slope_kb_per_hour_later_half": rss_late["theil_sen"],
        "rss_kb_first_last_later_half": rss_late["first_last"],
        "later_half_from_s": late[0]["t_s"] if late else None,
        "heap_slopes_per_hour_after_warmup": {
            key: slopes(warm, key) for key in (
                "rss_anon_kb", "traced_kb", "gc_objects", "pymalloc_blocks",
                "malloc_in_use_kb", "malloc_free_kb", "sqlite_kb", "pymalloc_arenas",
                "deferreds", "fds",
                "delayed_calls")
            if any(s.get(key) is not None for s in warm)},
        "types_growth_top_since_warmup": heap.get("types_growth_top"),
        "traced_growth_top_since_warmup": heap.get("traced_growth_top"),
        "fds_min_max": ([min(s["fds"] for s in samples), max(s["fds"] for s in samples)]
                        if samples else None),
        "delayed_calls_min_max": ([min(s["delayed_calls"] for s in samples),
                                   max(s["delayed_calls"] for s in samples)]
                                  if samples else None),
        "store_bytes_first_last": ([samples[0]["store_bytes"], samples[-1]["store_bytes"]]
                                   if samples else None),
        "latency_p99_ms_per_interval": [s["latency_p99_ms"] for s in samples],
        "lag_p99_s_max": max((s["lag_p99_s"] or 0) for s in samples) if samples else None,
        "gc_full_collections_and_seconds": ([samples[-1].get("gc_full_collections"),
                                             samples[-1].get("gc_full_seconds")]
                                            if samples else None),
        "gc_seconds_total": samples[-1].get("gc_seconds") if samples else None,
        "sent": load.get("sent"),
        "lost": load.get("lost"),
        "superseded": load.get("superseded"),
        "doubled": load.get("doubled"),
        "unanswered_in_flight_at_a_drop": load.get("unanswered_in_flight_at_a_drop"),
    }


async def soak(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    upstream = spawn_helper(reactor, "upstream", "e2e_upstream.py", "--port", "0",
                            verbose=args.verbose, nice=None)
    up_url = (await with_timeout(reactor, upstream.wait("listening"), 30, "upstream"))["url"]
    connector = spawn_helper(reactor, "connector", "e2e_connector.py", "--port", "0",
                             "--secret", f"{GATEWAY_ID}:{SECRET}", "--upstream", up_url,
                             verbose=True, nice=None)
    relay_url = (await with_timeout(reactor, connector.wait("listening"), 30,
                                    "connector"))["url"]
    home = Path(tempfile.mkdtemp(prefix="hermes-soak-"))
    ops_port = free_port()
    metrics_url = f"http://127.0.0.1:{ops_port}/metrics"
    heap_url = f"http://127.0.0.1:{ops_port}/debug/heap"
    env = gateway_env(home, up_url, relay_url)
    env["GATEWAY_OPS_LISTEN"] = f"tcp:{ops_port}:interface=127.0.0.1"
    env["GATEWAY_OPS_DEBUG_HEAP"] = args.heap
    env.pop("MALLOC_ARENA_MAX", None)
    env.pop("PYTHONMALLOC", None)
    if args.malloc_arena_max:
        env["MALLOC_ARENA_MAX"] = str(args.malloc_arena_max)
    if args.pythonmalloc:
        env["PYTHONMALLOC"] = args.pythonmalloc
    cmd = DEFAULT_GATEWAY_CMD.format(python=shlex.quote(sys.executable),
                                     logfile=home / "gateway.log")
    out = open(home / "gateway.out", "wb")
    gateway = Gateway()
    transport = reactor.spawnProcess(gateway, "/bin/sh", ["/bin/sh", "-c", "exec " + cmd],
                                     env=env, path=str(ROOT),
                                     childFDs={0: "w", 1: out.fileno(), 2: out.fileno()})
    report: dict[str, Any] = {"home": str(home), "args": vars(args),
                              "loadavg_start": loadavg()}
    samples: list[dict[str, Any]] = []
    heap: dict[str, Any] = {}
    baseline_taken = False
    try:
        await with_timeout(reactor, connector.wait("hello"), 60, "hello from the gateway")
        pid = measured_pid(transport.pid)
        await sleep(reactor, 2.0)
        rate = args.rate
        mix = {"echo": args.echo, "error": args.error, "silent": args.silent,
               "slow": args.slow, "new": args.new}
        if rate is None:
            # The maximum of the soak's own mix, not of load a: /stop, errors and silent
            # streams cost more per message, and half of load a's rate saturated the mix
            # (2026-12-06: 198 msg/s offered, 133 sustained).  Offered far above what the
            # gateway answers, without drops; answered / elapsed is the maximum.
            connector.send(cmd="soak", duration=CALIBRATION_S, rate=2000.0,
                           chats=args.chats, drop_every=0, report_every=CALIBRATION_S,
                           stop_after=args.stop_after, grace=30.0, timeout=60.0, mix=mix,
                           seed=args.seed + 1)
            calibration = await with_timeout(reactor, connector.wait("result"), 300,
                                             "calibration")
            # Child keeps an event it handed to a waiter: forget it, or the next wait sees it.
            connector.events = [e for e in connector.events
                                if e.get("ev") not in ("result", "interval")]
            maximum = calibration["answered"] / calibration["duration_s"]
            report["calibration"] = {k: calibration.get(k) for k in
                                     ("duration_s", "sent", "answered", "skipped",
                                      "echo_latency_p99_ms")}
            report["calibration_messages_per_s"] = round(maximum, 1)
            rate = round(maximum / 2, 1)
        report["rate"] = rate
        print(f"soak: {args.minutes} min at {rate} msg/s, dropping the socket every "
              f"{args.drop_every} s; sampling every {args.sample} s", file=sys.stderr,
              flush=True)
        connector.send(cmd="soak", duration=args.minutes * 60, rate=rate, chats=args.chats,
                       drop_every=args.drop_every, report_every=args.sample,
                       stop_after=args.stop_after, grace=30.0, timeout=60.0,
                       mix=mix, seed=args.seed,
                       fresh_chats=args.fresh_chats, push_on_closing=args.push_on_closing)
        t0, cpu0 = now(), cpu_seconds(pid)
        previous = await deferToThread(scrape, metrics_url)
        result = connector.wait("result")
        while not result.called:
            await sleep(reactor, args.sample)
            metrics = await deferToThread(scrape, metrics_url)
            interval = next((e for e in reversed(connector.events) if e.get("ev") == "interval"),
                            {})
            connector.events = [e for e in connector.events if e.get("ev") != "interval"]
            mem = memory_kb(pid)
            sample = {
                "t_s": round(now() - t0, 1),
                "rss_kb": mem["VmRSS"], "rss_anon_kb": mem["RssAnon"],
                "fds": open_fds(pid), "store_bytes": store_bytes(home),
                "cpu_s": round(cpu_seconds(pid) - cpu0, 2),
                "delayed_calls": total(metrics, "hermes_reactor_delayed_calls"),
                "active_turns": total(metrics, "hermes_active_turns"),
                "turns_ok": total(metrics, "hermes_turns_finished_total", outcome="ok"),
                "turns_cancelled": total(metrics, "hermes_turns_finished_total",
                                         outcome="cancelled"),
                "turns_error": total(metrics, "hermes_turns_finished_total", outcome="error"),
                "stale_dropped": total(metrics, "hermes_stale_outputs_dropped_total"),
                "relay_reconnects": total(metrics, "hermes_platform_reconnects_total",
                                          platform="relay"),
                "lag_p99_s": lag_quantile(previous, metrics, 0.99),
                # Full collections and the time all collections took, since the start.
                "gc_full_collections": total(metrics, "hermes_gc_pause_seconds_count", gen="2"),
                "gc_full_seconds": round(total(metrics, "hermes_gc_pause_seconds_sum",
                                               gen="2"), 3),
                "gc_seconds": round(total(metrics, "hermes_gc_pause_seconds_sum"), 3),
                "latency_p99_ms": interval.get("latency_p99_ms"),
                "sent": interval.get("sent"), "answered": interval.get("answered"),
            }
            if args.heap != "off":
                # The diffs are against the first sample after warm-up.
                at_baseline = not baseline_taken and sample["t_s"] >= args.warmup * 60
                heap = await deferToThread(heap_report, heap_url, at_baseline)
                baseline_taken = baseline_taken or at_baseline
                malloc = heap.get("malloc") or {}
                sample.update({
                    "gc_objects": heap["gc_objects"],
                    "pymalloc_blocks": heap["pymalloc_blocks"],
                    "malloc_in_use_kb": malloc.get("in_use_kb"),
                    "malloc_free_kb": malloc.get("free_kb"),
                    "malloc_arena_kb": malloc.get("arena_kb"),
                    "sqlite_kb": heap.get("sqlite_kb"),
                    "pymalloc_arenas": (heap.get("pymalloc") or {}).get("arenas"),
                    "heap_walk_ms": heap.get("walk_ms"),
                    "traced_kb": heap.get("traced_kb"),
                    "deferreds": heap["deferreds"],
                    "delayed_call_objects": heap["delayed_call_objects"],
                })
            previous = metrics
            samples.append(sample)
            print(json.dumps(sample), file=sys.stderr, flush=True)
        final = await result
        if final.get("ev") == "error":
            raise RuntimeError(final["error"])
        final.pop("ev", None)
        report["load"] = final
        run_end = time.time()
    finally:
        if not gateway.ended.called:
            transport.signalProcess("TERM")
            try:
                await with_timeout(reactor, gateway.ended, 20, "gateway exit")
            except RuntimeError:
                transport.signalProcess("KILL")
                await gateway.ended
        out.close()
        for child in (connector, upstream):
            if not child.ended.called:
                child.transport.signalProcess("TERM")
            await child.ended
    if "load" in report:
        # The gateway has exited: its log and store are complete.
        await deferToThread(explain_unanswered, home, report["load"], run_end)
    report["samples"] = samples
    report["heap_last"] = heap
    report["loadavg_end"] = loadavg()
    report["summary"] = summarize(report, args.warmup)
    return report


async def main(reactor: Any, args: argparse.Namespace) -> None:
    # Read before the run: the tree the daemon imports is the one at its start.
    started = dict(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   commit=source_version(), machine=machine())
    report = await soak(reactor, args)
    report.update(started)
    write(report, args.out)


def write(report: dict[str, Any], out: str | None) -> None:
    print(json.dumps(report["summary"], indent=2))
    print(json.dumps(report.get("load"), indent=2))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0, help="how long the load runs")
    p.add_argument("--rate", type=float, default=None,
                   help="messages/s (default: half of the maximum a %d s calibration with the same mix reaches)" % CALIBRATION_S)
    p.add_argument("--chats", type=int, default=200, help="chats (one message in flight each)")
    p.add_argument("--drop-every", type=float, default=180.0,
                   help="seconds between socket drops by the connector (0: never)")
    p.add_argument("--stop-after", type=float, default=2.0,
                   help="seconds a silent or endless stream runs before /stop")
    p.add_argument("--echo", type=float, default=0.86, help="share of ordinary turns")
    p.add_argument("--error", type=float, default=0.04, help="share of upstream HTTP 500s")
    p.add_argument("--silent", type=float, default=0.04, help="share of silent streams")
    p.add_argument("--slow", type=float, default=0.04, help="share of endless streams")
    p.add_argument("--new", type=float, default=0.02,
                   help="share of /new (a chat's session then starts again, so transcripts "
                        "stay the length of a conversation: about 1/share turns)")
    p.add_argument("--sample", type=float, default=30.0, help="seconds between samples")
    p.add_argument("--warmup", type=float, default=5.0,
                   help="minutes left out of the RSS slope")
    p.add_argument("--heap", choices=("off", "counts", "tracemalloc"), default="counts",
                   help="the gateway's heap diagnostics (GATEWAY_OPS_DEBUG_HEAP), read from "
                        "/debug/heap at every sample; tracemalloc slows the gateway")
    p.add_argument("--malloc-arena-max", type=int, default=0,
                   help="MALLOC_ARENA_MAX for the gateway (0: glibc's default)")
    p.add_argument("--fresh-chats", action="store_true",
                   help="replace each chat whose message was answered by a new one, so every "
                        "message opens a session (what is kept per chat shows as growth)")
    p.add_argument("--push-on-closing", action="store_true",
                   help="push messages on a connection the connector has just dropped (the "
                        "soak before 2026-12-06's fix, whose pushes went nowhere)")
    p.add_argument("--pythonmalloc", default=None,
                   help="PYTHONMALLOC for the gateway (malloc: no pymalloc arenas)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--summarize", metavar="JSON", default=None,
                   help="run nothing: recompute the summary of a saved report with this "
                        "--warmup and write it to --out (default: the same file)")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--verbose", action="store_true", help="show the helpers' stderr")
    return p.parse_args(argv)


def resummarize(path: str, warmup_min: float, out: str | None) -> None:
    report = json.loads(Path(path).read_text())
    report.setdefault("heap_last", {
        "types_growth_top": report["summary"].get("types_growth_top_since_warmup"),
        "traced_growth_top": report["summary"].get("traced_growth_top_since_warmup")})
    report["summary"] = summarize(report, warmup_min)
    write(report, out or path)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.summarize:
        resummarize(arguments.summarize, arguments.warmup, arguments.out)
    else:
        task.react(lambda reactor: ensureDeferred(main(reactor, arguments)))
