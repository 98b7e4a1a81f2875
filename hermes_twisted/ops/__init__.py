"""
The operations surface: what an orchestrator, a Prometheus server, a log shipper and a
human operator see of the running daemon (docs/operations.md).

 - C{metrics}: the Prometheus registry (C{hermes_*}) and what feeds it.
 - C{reactor}: the reactor lag monitor, which also feeds the systemd watchdog.
 - C{probes}: liveness, readiness and the status snapshot, from in-memory state only.
 - C{http}: the ops listener's resources (C{/livez /readyz /metrics /status /status.json}),
   with the loopback / bearer / trusted-proxy rule.
 - C{page}: the server-rendered status page.
 - C{upstream}: the upstream client wrapped to measure requests and first tokens.
 - C{upstream_probe}: the upstream's reachability while no turn runs.
 - C{sends}: adapters' outbound calls measured.
 - C{jsonlog}: the flat JSON log observer for C{twistd --logger}.
 - C{sdnotify}: READY/WATCHDOG/STOPPING for systemd.
 - C{trim}: glibc's free heap pages handed back every minute (C{malloc_trim}).
 - C{heap}: heap diagnostics for leak hunts (C{/debug/heap}, off unless configured).
 - C{service}: the service that listens and runs the monitor.

May import everything below the top (model, config, net, the contract, sessions, upstream,
dispatch) but never a platform room: it sees adapters through the contract only.  Only the
top (C{tap}) imports it, so it creates no circle.
"""
