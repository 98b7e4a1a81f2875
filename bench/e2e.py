"""
End-to-end benchmark of a relay gateway (GitHub issue 7): connector (WebSocket) -> relay
client -> dispatcher -> run -> SSE upstream -> stream consumer -> relay C{outbound} -> connector.

Three processes per load, all on this machine: the load-driving connector
(C{bench/e2e_connector.py}, the repo's StubConnector plus scenarios), the fake Hermes API
(C{bench/e2e_upstream.py}) and the gateway under test, a real C{twistd hermes-gateway}
configured by the Hermes env vars only (or any command given with C{--gateway-cmd}).  A fresh
trio is started for every load, so each load's idle RSS, ready time and peak RSS are its own.

    python bench/e2e.py                          # loads a, b and c at full size
    python bench/e2e.py --load a --messages 100 --chats 10
    python bench/e2e.py --load b --streams 100 --hold 6 --interval 2
    python bench/e2e.py --load c --reps 5 --out bench/results/quick.json
    python bench/e2e.py --gateway-cmd 'hermes gateway run'      # another gateway
    python bench/e2e.py --floor --rounds 3       # us and bench/floor.py, alternating; ratios

Figures (all timestamps on CLOCK_MONOTONIC, which is system-wide on Linux, see
C{e2e_common.now}):
  - ready: gateway process spawned -> its first C{hello} read by the connector;
  - idle RSS: VmRSS 2 s after the handshake, before any message;
  - CPU: utime+stime from /proc/<pid>/stat over the load; peak RSS: VmHWM; steady RSS: VmRSS
    1 s after the load ended;
  - a: messages/s and latency from the C{inbound} frame to the C{outbound} frame carrying the
    complete reply;
  - b: first inbound push -> the upstream has seen every request; (VmRSS with all streams open
    - idle RSS) / streams; upstream's C{[DONE]} write -> final reply at the connector;
  - c: C{/stop} frame pushed -> the upstream sees the connection closed, for a slow stream
    and for a silent upstream (headers, then nothing).

Streaming: the gateway gets no config.yaml (so C{streaming.enabled} is at its default, false,
the same default as hermes-agent 0.19.0), and the connector's descriptor says
C{supports_edit: true} (the stub's default).  Each reply therefore reaches the connector as one
final C{send}: the same visible result a 0.19.0 gateway produces for relay chats, which never
stream.  C{--streaming} writes C{streaming: {enabled: true}} to the gateway's config.yaml to
measure progressive edits instead (the final text then arrives in an C{edit}).

This is a measurement, not a test: nothing here asserts a duration.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from e2e_common import now  # noqa: E402
from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred, ensureDeferred  # noqa: E402
from twisted.internet.protocol import ProcessProtocol  # noqa: E402

GATEWAY_ID, SECRET = "gw-bench", "bench-secret-0123456789"
DEFAULT_GATEWAY_CMD = ("{python} -c 'from twisted.scripts.twistd import run; run()' "
                       "-n --pidfile= --logfile={logfile} hermes-gateway")
FLOOR_CMD = "{python} {repo}/bench/floor.py"
_CLEAN_PREFIXES = ("GATEWAY_", "IRC_", "MATRIX_", "TELEGRAM_", "API_SERVER_", "HERMES_",
                   "SESSION_", "DISCORD_", "SLACK_")
TARGETS = {
    "a.messages_per_s": ">= 530", "a.latency_p99_ms": "<= 100", "a.cpu_ms_per_message": "<= 1.9",
    "b.all_open_ms": "<= 1000", "b.rss_kb_per_stream": "<= 20",
    "b.final_after_done_p99_ms": "<= 200",
    "c.slow.p99_ms": "<= 10", "c.slow.max_ms": "<= 20",
    "c.silent.p99_ms": "<= 10", "c.silent.max_ms": "<= 20",
    "idle_rss_mb": "<= 40", "ready_s": "<= 0.5",
}


# -- /proc --------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of C{pid} (its own threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reactor_thread_cpu_seconds(pid: int) -> float:
    """utime + stime of C{pid}'s main thread (the reactor's); the rest of L{cpu_seconds} is
    the thread pool's (store commits and fsync, DNS, file work)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of C{pid}, in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


def run_queue_wait(pid: int) -> float:
    """Seconds the main thread of C{pid} spent runnable but waiting for a CPU
    (/proc/<pid>/schedstat, second field): what other load on the machine cost it."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / tick, sum(fields) / tick


def children(pid: int) -> list[int]:
    found = []
    for task_dir in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task_dir / "children").read_text().split()]
        except OSError:
            pass
    return found


def measured_pid(pid: int) -> int:
    """The gateway itself: C{pid}, or, when C{pid} is a wrapper with exactly one child (a
    profiler, C{env}, ...), that child, recursively."""
    while True:
        kids = children(pid)
        if len(kids) != 1:
            return pid
        pid = kids[0]


# -- children -----------------------------------------------------------------------------------

class Child(ProcessProtocol):
    """A helper process printing one JSON event per line (or C{LISTENING url})."""

    def __init__(self, name: str, verbose: bool) -> None:
        self.name, self.verbose = name, verbose
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self.waiters: list[tuple[str, Deferred]] = []
        self.ended: Deferred = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            text = line.decode(errors="replace").strip()
            if not text:
                continue
            if text.startswith("LISTENING "):
                event = {"ev": "listening", "url": text.split()[1]}
            else:
                try:
                    event = json.loads(text)
                except ValueError:
                    sys.stderr.write(f"[{self.name}] {text}\n")
                    continue
            if event.get("ev") == "error":
                sys.stderr.write(f"[{self.name}] ERROR {event.get('error')}\n")
            self.events.append(event)
            for kind, d in list(self.waiters):
                if event.get("ev") == kind or (event.get("ev") == "error" and kind != "hello"):
                    self.waiters.remove((kind, d))
                    d.callback(event)

    def errReceived(self, data: bytes) -> None:
        if self.verbose:
            sys.stderr.write(f"[{self.name}] " + data.decode(errors="replace"))

    def processEnded(self, reason: Any) -> None:
        for kind, d in list(self.waiters):
            d.errback(RuntimeError(f"{self.name} exited while waiting for {kind!r}"))
        self.waiters.clear()
        self.ended.callback(None)

    def wait(self, kind: str) -> Deferred:
        for event in self.events:
            if event.get("ev") == kind:
                self.events.remove(event)
                return _fired(event)
        d: Deferred = Deferred()
        self.waiters.append((kind, d))
        return d

    def send(self, **command: Any) -> None:
        self.transport.write((json.dumps(command) + "\n").encode())


def _fired(value: Any) -> Deferred:
    d: Deferred = Deferred()
    d.callback(value)
    return d


class Gateway(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred = Deferred()
        self.exit: Any = None

    def processEnded(self, reason: Any) -> None:
        self.exit = reason.value
        self.ended.callback(None)


def renice(pid: int, nice: int | None) -> None:
    """Give C{pid} (spawned a moment ago, so before it starts threads, which inherit it)
    the scheduling priority C{nice}."""
    if nice is not None:
        os.setpriority(os.PRIO_PROCESS, pid, nice)


def spawn_helper(reactor: Any, name: str, script: str, *args: str, verbose: bool,
                 nice: int | None) -> Child:
    child = Child(name, verbose)
    transport = reactor.spawnProcess(child, sys.executable,
                                     [sys.executable, str(ROOT / "bench" / script), *args],
                                     env={**os.environ, "PYTHONPATH": str(ROOT)}, path=str(ROOT))
    renice(transport.pid, nice)
    return child


def gateway_env(home: Path, upstream: str, relay: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLEAN_PREFIXES)}
    env.update(HERMES_HOME=str(home), HOME=str(home), PYTHONPATH=str(ROOT),
               GATEWAY_PROXY_URL=upstream, GATEWAY_RELAY_URL=relay,
               GATEWAY_RELAY_ID=GATEWAY_ID, GATEWAY_RELAY_SECRET=SECRET,
               GATEWAY_RELAY_PLATFORMS="discord")
    return env


async def sleep(reactor: Any, seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def with_timeout(reactor: Any, d: Deferred, seconds: float, what: str) -> Any:
    d.addTimeout(seconds, reactor)
    try:
        return await d
    except Exception as e:
        raise RuntimeError(f"no {what} within {seconds} s ({e!r})") from None


async def wait_for_quiet(reactor: Any, max_wait: float, busy_cpus: float) -> float:
    """Wait (at most C{max_wait} s) for a second in which the whole machine used fewer than
    C{busy_cpus} CPUs; returns the CPUs used in the last second sampled."""
    deadline = now() + max_wait
    while True:
        before = machine_busy()
        await sleep(reactor, 1.0)
        after = machine_busy()
        used = (after[0] - before[0]) / max(1e-9, (after[1] - before[1]) / (os.cpu_count() or 1))
        if used < busy_cpus or now() >= deadline:
            return round(used, 2)


# -- one load -----------------------------------------------------------------------------------

async def run_load(reactor: Any, args: argparse.Namespace, load: str) -> dict[str, Any]:
    verbose = args.verbose
    quiet = None
    if args.quiet_wait > 0:
        quiet = await wait_for_quiet(reactor, args.quiet_wait, args.quiet_cpus)
    upstream = spawn_helper(reactor, "upstream", "e2e_upstream.py", "--port", "0",
                            verbose=verbose, nice=args.nice)
    up_url = (await with_timeout(reactor, upstream.wait("listening"), 30, "upstream"))["url"]
    connector = spawn_helper(reactor, "connector", "e2e_connector.py", "--port", "0",
                             "--secret", f"{GATEWAY_ID}:{SECRET}", "--upstream", up_url,
                             verbose=True, nice=args.nice)
    relay_url = (await with_timeout(reactor, connector.wait("listening"), 30,
                                    "connector"))["url"]
    home = Path(tempfile.mkdtemp(prefix=f"hermes-e2e-{load}-"))
    config = "streaming:\n  enabled: true\n" if args.streaming else ""
    if args.config_yaml and "floor.py" not in args.gateway_cmd:
        config += args.config_yaml.replace("\\n", "\n") + "\n"
    if config:
        (home / "config.yaml").write_text(config)
    logfile = home / "gateway.log"
    cmd = args.gateway_cmd.format(python=shlex.quote(sys.executable), logfile=logfile,
                                  home=home, repo=ROOT, load=load)
    out = open(home / "gateway.out", "wb")
    gateway = Gateway()
    t_spawn = now()
    gw_transport = reactor.spawnProcess(
        gateway, "/bin/sh", ["/bin/sh", "-c", "exec " + cmd],
        env=gateway_env(home, up_url, relay_url), path=str(ROOT),
        childFDs={0: "w", 1: out.fileno(), 2: out.fileno()})
    renice(gw_transport.pid, args.nice)
    figures: dict[str, Any] = {"load": load, "gateway_cmd": cmd, "home": str(home),
                               "machine_cpus_busy_before": quiet}
    profiler = None
    try:
        hello = await with_timeout(reactor, connector.wait("hello"), 60, "hello from the gateway")
        figures["ready_s"] = round(hello["t"] - t_spawn, 3)
        pid = measured_pid(gw_transport.pid)
        figures["pid"] = pid
        await sleep(reactor, 2.0)
        idle = memory_kb(pid)
        figures["idle_rss_mb"] = round(idle["VmRSS"] / 1024, 1)
        # The file-backed part is mostly shared libraries (libcrypto, libpython, ...) that
        # other processes share; the anonymous part is this process's own heap.
        figures["idle_rss_anon_mb"] = round(idle["RssAnon"] / 1024, 1)
        figures["idle_rss_file_mb"] = round(idle["RssFile"] / 1024, 1)
        if args.py_spy:
            profiler = start_py_spy(reactor, pid, Path(args.py_spy) / f"{load}.txt",
                                    args.py_spy_idle)
            await sleep(reactor, 0.5)
        helpers0 = {c.name: cpu_seconds(c.transport.pid) for c in (connector, upstream)}
        figures["loadavg_before"] = Path("/proc/loadavg").read_text().split()[0]
        busy0, wait0 = (machine_busy(),), run_queue_wait(pid)
        cpu0, t0 = cpu_seconds(pid), now()
        main0 = reactor_thread_cpu_seconds(pid)
        if load == "a":
            connector.send(cmd="a", messages=args.messages, chats=args.chats,
                           deltas=args.deltas, size=args.delta_chars, gap=args.gap)
        elif load == "b":
            connector.send(cmd="b", streams=args.streams, hold=args.hold,
                           interval=args.interval)
            opened = await with_timeout(reactor, connector.wait("all_open"), args.hold + 30,
                                        "all_open")
            if opened.get("ev") == "error":
                raise RuntimeError(opened["error"])
            if profiler is not None:  # profile the opening of the streams only
                await stop_py_spy(reactor, profiler)
                profiler = None
            # Let the gateway settle with every stream open, then sample, well before [DONE].
            await sleep(reactor, min(3.0, args.hold / 3))
            open_kb = memory_kb(pid)["VmRSS"]
            figures["rss_all_open_mb"] = round(open_kb / 1024, 1)
            figures["rss_kb_per_stream"] = round((open_kb - idle["VmRSS"]) / args.streams, 2)
            figures["cpu_s_to_open"] = round(cpu_seconds(pid) - cpu0, 3)
        elif load == "c":
            connector.send(cmd="c", reps=args.reps, interval=args.slow_interval,
                           settle=args.settle)
        result = await with_timeout(reactor, connector.wait("result"),
                                    args.timeout, f"load {load} result")
        if result.get("ev") == "error":
            raise RuntimeError(result["error"])
        cpu = cpu_seconds(pid) - cpu0
        wall = now() - t0
        figures["cpu_s_reactor_thread"] = round(reactor_thread_cpu_seconds(pid) - main0, 3)
        figures["cpu_s_other_threads"] = round(cpu - figures["cpu_s_reactor_thread"], 3)
        # The machine has few cores: a saturated driver would show up as gateway latency.
        helper_cpu = {c.name: round(cpu_seconds(c.transport.pid) - helpers0[c.name], 3)
                      for c in (connector, upstream)}
        figures["helper_cpu_s"] = helper_cpu
        busy1 = machine_busy()
        # Whatever else ran on the machine meanwhile (other jobs), in CPU seconds, and how
        # long the gateway's reactor thread waited for a CPU because of it.
        figures["other_cpu_s"] = round(busy1[0] - busy0[0][0] - cpu - sum(helper_cpu.values()), 2)
        figures["machine_cpu_s_available"] = round(busy1[1] - busy0[0][1], 2)
        figures["gateway_run_queue_wait_s"] = round(run_queue_wait(pid) - wait0, 3)
        if profiler is not None:
            await stop_py_spy(reactor, profiler)
            profiler = None
        result.pop("ev", None)
        figures.update(result)
        figures["cpu_s"] = round(cpu, 3)
        figures["wall_s"] = round(wall, 3)
        figures["cpu_utilisation"] = round(cpu / wall, 3) if wall else None
        if load == "a":
            figures["cpu_ms_per_message"] = round(cpu / args.messages * 1000, 3)
        await sleep(reactor, 1.0)
        mem = memory_kb(pid)
        figures["peak_rss_mb"] = round(mem["VmHWM"] / 1024, 1)
        figures["steady_rss_mb"] = round(mem["VmRSS"] / 1024, 1)
    finally:
        if profiler is not None:
            await stop_py_spy(reactor, profiler)
        if not gateway.ended.called:
            gw_transport.signalProcess("TERM")
            t_term = now()
            try:
                await with_timeout(reactor, gateway.ended, 20, "gateway exit")
                figures["stop_s"] = round(now() - t_term, 3)
            except RuntimeError:
                gw_transport.signalProcess("KILL")
                await gateway.ended
        out.close()
        for child in (connector, upstream):
            if not child.ended.called:
                child.transport.signalProcess("TERM")
            await child.ended
    return figures


# -- py-spy ---------------------------------------------------------------------------------

class _Quiet(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred = Deferred()
        self.err = b""

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


def start_py_spy(reactor: Any, pid: int, out: Path, idle: bool) -> tuple[Any, _Quiet]:
    """Sample C{pid} until stopped, as collapsed stacks (C{--format raw}) in C{out}; with
    C{idle}, also threads that wait (per thread), to see where wall time goes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    exe = str(Path(sys.executable).with_name("py-spy"))
    proto = _Quiet()
    transport = reactor.spawnProcess(proto, exe, [exe, "record", "--pid", str(pid),
                                                  "--format", "raw", "--rate", "1000",
                                                  "--nonblocking", "-o", str(out),
                                                  *(["--idle", "--threads"] if idle else [])],
                                     env=dict(os.environ))
    return transport, proto


async def stop_py_spy(reactor: Any, profiler: tuple[Any, _Quiet]) -> None:
    transport, proto = profiler
    if not proto.ended.called:
        transport.signalProcess("INT")
    await proto.ended


# -- report ---------------------------------------------------------------------------------

def flat(figures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The figures that have a target, by target name."""
    out: dict[str, Any] = {}
    a, b, c = figures.get("a"), figures.get("b"), figures.get("c")
    if a:
        out["a.messages_per_s"] = a.get("messages_per_s")
        out["a.latency_p99_ms"] = a.get("latency_p99_ms")
        out["a.cpu_ms_per_message"] = a.get("cpu_ms_per_message")
    if b:
        out["b.all_open_ms"] = b.get("all_open_after_first_push_ms")
        out["b.rss_kb_per_stream"] = b.get("rss_kb_per_stream")
        out["b.final_after_done_p99_ms"] = b.get("final_after_done_p99_ms")
    if c:
        for mode in ("slow", "silent"):
            out[f"c.{mode}.p99_ms"] = c[mode]["stop_to_upstream_closed_p99_ms"]
            out[f"c.{mode}.max_ms"] = c[mode]["stop_to_upstream_closed_max_ms"]
    runs = [f for f in figures.values() if "idle_rss_mb" in f]
    if runs:
        out["idle_rss_mb"] = max(f["idle_rss_mb"] for f in runs)
        out["ready_s"] = max(f["ready_s"] for f in runs)
    return out


def meets(value: Any, target: str) -> str:
    if value is None:
        return "n/a"
    op, limit = target.split()
    ok = value >= float(limit) if op == ">=" else value <= float(limit)
    return "yes" if ok else "NO"


def print_report(figures: dict[str, dict[str, Any]]) -> None:
    for load, f in figures.items():
        print(f"\n== load {load}  (ready {f.get('ready_s')} s, idle RSS {f.get('idle_rss_mb')} MB"
              f" [anon {f.get('idle_rss_anon_mb')}, file {f.get('idle_rss_file_mb')}],"
              f" peak RSS {f.get('peak_rss_mb')} MB, steady RSS {f.get('steady_rss_mb')} MB,"
              f" CPU {f.get('cpu_s')} s over {f.get('wall_s')} s)")
        if load == "a":
            print(f"  {f['messages']} messages over {f['chats']} chats, {f['deltas']} deltas of "
                  f"{f['delta_chars']} chars, gap {f['gap_s']} s")
            print(f"  {f['messages_per_s']} messages/s; latency p50 {f['latency_p50_ms']} ms, "
                  f"p99 {f['latency_p99_ms']} ms, max {f['latency_max_ms']} ms; "
                  f"CPU {f['cpu_ms_per_message']} ms/message")
            print(f"  inbound -> upstream request p50 {f['inbound_to_upstream_request_p50_ms']} ms"
                  f" p99 {f['inbound_to_upstream_request_p99_ms']} ms; upstream [DONE] -> final "
                  f"p50 {f['upstream_done_to_final_p50_ms']} ms p99 "
                  f"{f['upstream_done_to_final_p99_ms']} ms")
        elif load == "b":
            print(f"  {f['streams']} streams held {f['hold_s']} s (a delta every "
                  f"{f['delta_interval_s']} s); {f['requests_seen']} upstream requests seen")
            print(f"  all open {f['all_open_after_first_push_ms']} ms after the first push "
                  f"(pushes spread over {f['push_spread_ms']} ms); RSS all open "
                  f"{f['rss_all_open_mb']} MB = {f['rss_kb_per_stream']} KB/stream")
            print(f"  final after [DONE]: p50 {f['final_after_done_p50_ms']} ms, p99 "
                  f"{f['final_after_done_p99_ms']} ms, max {f['final_after_done_max_ms']} ms")
        elif load == "c":
            for mode in ("slow", "silent"):
                m = f[mode]
                print(f"  /stop -> upstream closed, {mode}: p50 "
                      f"{m['stop_to_upstream_closed_p50_ms']} ms, p99 "
                      f"{m['stop_to_upstream_closed_p99_ms']} ms, max "
                      f"{m['stop_to_upstream_closed_max_ms']} ms ({m['not_closed']} not closed)")
        print(f"  helper CPU {f.get('helper_cpu_s')}; other jobs on the machine "
              f"{f.get('other_cpu_s')} CPU s of {f.get('machine_cpu_s_available')} (load avg "
              f"{f.get('loadavg_before')}); gateway waited {f.get('gateway_run_queue_wait_s')} s "
              f"for a CPU")
        print(f"  outbound ops {f.get('outbound_ops')}; other sends {f.get('other_sends_sample')}")
    print("\n== against the issue 7 targets")
    for key, value in flat(figures).items():
        print(f"  {key:28} {value!s:>10}   target {TARGETS[key]:8} {meets(value, TARGETS[key])}")


# -- against the floor (issue 19) -------------------------------------------------------------

#: (figure, how to read it, issue 19 target for us / floor); "per" figures are better low.
FLOOR_FIGURES = {
    "a": [("cpu_ms_per_message", "<= 1.5"), ("messages_per_s", ">= 0.67"),
          ("cpu_s_reactor_thread", ""), ("cpu_s_other_threads", ""),
          ("latency_p50_ms", ""), ("latency_p99_ms", "<= 1.5"),
          ("inbound_to_upstream_request_p50_ms", ""), ("upstream_done_to_final_p50_ms", "")],
    "b": [("rss_kb_per_stream", "<= 1.2"), ("all_open_after_first_push_ms", "<= 1.5"),
          ("cpu_s_to_open", ""), ("final_after_done_p99_ms", "")],
    "c": [("slow.stop_to_upstream_closed_p50_ms", ""),
          ("silent.stop_to_upstream_closed_p50_ms", "")],
}


def figure(run: dict[str, Any], name: str) -> Any:
    value: Any = run
    for key in name.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def ratio(us: Any, floor: Any) -> float | None:
    if not isinstance(us, (int, float)) or not isinstance(floor, (int, float)) or not floor:
        return None
    return round(us / floor, 2)


def median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else round((values[mid - 1] + values[mid]) / 2, 3)


async def main_floor(reactor: Any, args: argparse.Namespace) -> None:
    """
    Every load C{--rounds} times with our gateway and with C{bench/floor.py}, alternating
    which goes first, so both see the same machine; the ratios are taken within a round.
    """
    ours, floor_cmd = args.gateway_cmd, FLOOR_CMD
    runs: dict[str, list[dict[str, Any]]] = {}
    for load in [x.strip() for x in args.load.split(",") if x.strip()]:
        for n in range(args.rounds):
            pair: dict[str, Any] = {}
            order = [("gateway", ours), ("floor", floor_cmd)]
            for who, cmd in order if n % 2 == 0 else order[::-1]:
                print(f"-- load {load}, round {n + 1}, {who} ...", file=sys.stderr, flush=True)
                args.gateway_cmd = cmd
                pair[who] = await run_load(reactor, args, load)
            args.gateway_cmd = ours
            runs.setdefault(load, []).append(pair)
    summary = print_floor_report(runs)
    if args.out:
        doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "commit": source_version(), "machine": machine(), "args": vars(args),
               "runs": runs, "ratios": summary}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {args.out}")


def print_floor_report(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Prints, per load and figure, us / floor / ratio for each round and the median ratio;
    returns the medians with their targets."""
    summary: dict[str, Any] = {}
    for load, pairs in runs.items():
        print(f"\n== load {load}: gateway vs floor, {len(pairs)} round(s)")
        for pair in pairs:
            g, f = pair["gateway"], pair["floor"]
            print(f"   round: load avg {g.get('loadavg_before')} / {f.get('loadavg_before')}, "
                  f"other jobs {g.get('other_cpu_s')} / {f.get('other_cpu_s')} CPU s, reactor "
                  f"waited {g.get('gateway_run_queue_wait_s')} / "
                  f"{f.get('gateway_run_queue_wait_s')} s for a CPU; idle RSS "
                  f"{g.get('idle_rss_mb')} / {f.get('idle_rss_mb')} MB")
        for name, target in FLOOR_FIGURES.get(load, []):
            cells = []
            ratios = []
            for pair in pairs:
                us, fl = figure(pair["gateway"], name), figure(pair["floor"], name)
                r = ratio(us, fl)
                ratios.append(r)
                cells.append(f"{us}/{fl}={r}")
            med = median([r for r in ratios if r is not None])
            verdict = meets(med, target) if target else ""
            summary[f"{load}.{name}"] = {"ratios": ratios, "median": med, "target": target,
                                         "met": verdict or None}
            print(f"  {name:40} {'  '.join(cells)}   median ratio {med}"
                  + (f"  target {target}: {verdict}" if target else ""))
    return summary


async def main(reactor: Any, args: argparse.Namespace) -> None:
    if args.floor:
        await main_floor(reactor, args)
        return
    figures: dict[str, dict[str, Any]] = {}
    for load in [x.strip() for x in args.load.split(",") if x.strip()]:
        print(f"-- load {load} ...", file=sys.stderr, flush=True)
        figures[load] = await run_load(reactor, args, load)
    print_report(figures)
    if args.out:
        doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "commit": source_version(), "machine": machine(), "args": vars(args),
               "loads": figures,
               "targets": {k: {"value": v, "target": TARGETS[k], "met": meets(v, TARGETS[k])}
                           for k, v in flat(figures).items()}}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {args.out}")


def source_version() -> str:
    """The commit under test, with C{+dirty} when tracked files differ from it."""
    import subprocess

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "?"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip()
                  for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    return {"nproc": os.cpu_count(), "cpu": model, "python": sys.version.split()[0],
            "kernel": os.uname().release}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", default="a,b,c", help="comma separated: a, b, c")
    p.add_argument("--gateway-cmd", default=DEFAULT_GATEWAY_CMD,
                   help="shell command starting the gateway; {python} {logfile} {home} {repo} "
                        "{load} are substituted; the Hermes env vars (GATEWAY_PROXY_URL, "
                        "GATEWAY_RELAY_URL/ID/SECRET/PLATFORMS, HERMES_HOME) are set")
    p.add_argument("--floor", action="store_true",
                   help="run every load with the gateway and with bench/floor.py (the I/O "
                        "floor), alternating, --rounds times, and print the ratios us/floor")
    p.add_argument("--rounds", type=int, default=1,
                   help="with --floor: rounds per load (the order alternates each round)")
    p.add_argument("--streaming", action="store_true",
                   help="write streaming.enabled: true to the gateway's config.yaml")
    p.add_argument("--config-yaml", default="", metavar="YAML",
                   help="more config.yaml for the gateway (not the floor), \\n for newlines, "
                        "e.g. 'display:\\n  typing_delay: 0' to measure one feature's cost")
    p.add_argument("--messages", type=int, default=500, help="load a: messages")
    p.add_argument("--chats", type=int, default=50, help="load a: chats")
    p.add_argument("--deltas", type=int, default=20, help="load a: deltas per reply")
    p.add_argument("--delta-chars", type=int, default=10, help="load a: characters per delta")
    p.add_argument("--gap", type=float, default=0.0,
                   help="load a: seconds a chat waits after its reply before its next message")
    p.add_argument("--streams", type=int, default=1000, help="load b: concurrent streams")
    p.add_argument("--hold", type=float, default=30.0, help="load b: seconds each stream lasts")
    p.add_argument("--interval", type=float, default=5.0, help="load b: seconds between deltas")
    p.add_argument("--reps", type=int, default=20, help="load c: repetitions per upstream kind")
    p.add_argument("--slow-interval", type=float, default=0.2,
                   help="load c: seconds between deltas of the slow stream")
    p.add_argument("--settle", type=float, default=0.5,
                   help="load c: seconds between the upstream seeing the request and /stop")
    p.add_argument("--nice", type=int, default=None,
                   help="run the gateway and both helpers at this nice level (e.g. -10, needs "
                        "root) so other jobs on a shared machine disturb the figures less")
    p.add_argument("--quiet-wait", type=float, default=0.0,
                   help="before each load, wait up to this many seconds for a second in which "
                        "the machine uses fewer than --quiet-cpus CPUs (a shared machine)")
    p.add_argument("--quiet-cpus", type=float, default=0.3)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per load")
    p.add_argument("--py-spy", metavar="DIR", default=None,
                   help="sample the gateway with py-spy during each load (collapsed stacks "
                        "in DIR/<load>.txt); adds overhead, so not for the headline figures")
    p.add_argument("--py-spy-idle", action="store_true",
                   help="with --py-spy: also sample waiting threads, one stack root per thread")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--verbose", action="store_true", help="show the helpers' stderr")
    return p.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    task.react(lambda reactor: ensureDeferred(main(reactor, arguments)))
