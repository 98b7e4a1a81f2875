"""
The house: which package may import which, and no import circle anywhere.

The imports are read with C{ast} from the source (top-level, function-local and
C{TYPE_CHECKING} imports alike: a circle hidden behind a lazy import is still a circle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "hermes_twisted"

#: Each part of the house, and the parts it may import (itself always).  The order reads
#: bottom-up; the table itself must be free of circles (checked below).
MAY_IMPORT: dict[str, frozenset[str]] = {
    "model": frozenset(),
    "net": frozenset(),
    "config": frozenset({"model"}),
    "sessions": frozenset({"model", "config"}),
    "upstream": frozenset({"model", "config", "net"}),
    "contract": frozenset({"model", "config"}),
    "delivery": frozenset({"model", "config", "net", "contract"}),
    "kit": frozenset({"model", "config", "net", "contract"}),
    "platform": frozenset({"model", "config", "net", "contract", "kit", "delivery",
                           "session-keys"}),
    "session-keys": frozenset({"model", "config"}),
    # Pairing's files are shared by the daemon (dispatch) and the admin command (cli).
    "pairing": frozenset({"config"}),
    # The fleet (several processes on one PostgreSQL store) works on the store's database
    # thread; the gateway calls it, never the other way round (it reports by callbacks).
    # Identity leases start and stop adapters, which it sees only through the contract.
    "fleet": frozenset({"model", "config", "net", "sessions", "contract"}),
    "dispatch": frozenset({"model", "config", "net", "contract", "delivery", "sessions",
                           "session-keys", "upstream", "pairing", "fleet"}),
    # The operations surface observes every layer (metrics, probes, the status page) but
    # sees adapters only through the contract; only the top imports it, so no circle.
    "ops": frozenset({"model", "config", "net", "contract", "sessions", "session-keys",
                      "upstream", "delivery", "dispatch", "fleet"}),
    "top": frozenset({"*"}),
}


def part_of(module: str) -> str:
    """The part of the house C{module} (a dotted name under the package) belongs to."""
    rest = module.split(".")[1:]
    if not rest or rest[0] in ("tap", "service", "cli"):
        return "top"
    head = rest[0]
    if head == "platforms":
        if len(rest) == 1 or rest[1] == "base":
            return "contract"
        return "kit" if rest[1] == "kit" else "platform"
    if head == "relay":
        return "platform"
    if module == f"{PACKAGE}.sessions.keys":
        return "session-keys"
    return head


def room_of(module: str) -> str:
    """Which platform's room C{module} is in (platforms never import one another)."""
    rest = module.split(".")[1:]
    if rest[0] == "relay":
        return "relay"
    return rest[1]


def may_import(importer: str, imported: str) -> bool:
    src, dst = part_of(importer), part_of(imported)
    if src == dst:
        return src != "platform" or room_of(importer) == room_of(imported)
    allowed = MAY_IMPORT[src]
    return "*" in allowed or dst in allowed


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def our_modules() -> dict[str, Path]:
    return {module_name(p): p for p in (ROOT / PACKAGE).rglob("*.py")}


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """Every module of ours that C{module} imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and (name == PACKAGE or name.startswith(PACKAGE + ".")):
                found.add(name)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = our_modules()
    known = set(modules)
    return {m: imports_of(m, p, known) for m, p in modules.items()}


def rule_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for importer, targets in sorted(graph.items()):
        for imported in sorted(targets):
            if imported == PACKAGE:
                continue  # the root package holds only the version
            if not may_import(importer, imported):
                out.append(f"{importer} imports {imported}: {part_of(importer)} may not "
                           f"import {part_of(imported)}")
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def describe_circle(graph: dict[str, set[str]], component: list[str]) -> str:
    members = set(component)
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in members]
    return "import circle: " + "; ".join(edges)


# -- the checks on the real tree -------------------------------------------------------------


def test_the_graph_sees_the_imports_it_must():
    graph = import_graph()
    assert f"{PACKAGE}.dispatch.gateway" in graph
    assert f"{PACKAGE}.dispatch.turn" in graph[f"{PACKAGE}.dispatch.gateway"]
    # A lazy (function-local) import is an import too.
    assert f"{PACKAGE}.config.loader" in graph[f"{PACKAGE}.tap"]


def test_no_import_circle_anywhere():
    graph = import_graph()
    assert [describe_circle(graph, c) for c in circles(graph)] == []


def test_dependencies_point_one_way():
    assert rule_violations(import_graph()) == []


def test_the_rules_themselves_have_no_circle():
    graph = {part: {p for p in allowed if p != "*"} for part, allowed in MAY_IMPORT.items()}
    assert circles(graph) == []


def test_every_package_says_what_it_is():
    for path in (ROOT / PACKAGE).rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc, f"{module_name(path)} has no docstring"


def test_top_level_holds_at_most_six_modules():
    modules = [p.name for p in (ROOT / PACKAGE).glob("*.py") if p.name != "__init__.py"]
    assert len(modules) <= 6, sorted(modules)


# -- the checker fails where it must ------------------------------------------------------------


def test_a_circle_is_reported_with_both_modules():
    graph = {"hermes_twisted.dispatch.gateway": {"hermes_twisted.dispatch.commands"},
             "hermes_twisted.dispatch.commands": {"hermes_twisted.dispatch.gateway"},
             "hermes_twisted.model": set()}
    [component] = circles(graph)
    text = describe_circle(graph, component)
    assert "hermes_twisted.dispatch.commands -> hermes_twisted.dispatch.gateway" in text
    assert "hermes_twisted.dispatch.gateway -> hermes_twisted.dispatch.commands" in text


@pytest.mark.parametrize("importer, imported", [
    ("hermes_twisted.platforms.telegram.adapter", "hermes_twisted.dispatch.gateway"),
    ("hermes_twisted.relay.adapter", "hermes_twisted.dispatch.interrupts"),
    ("hermes_twisted.dispatch.gateway", "hermes_twisted.platforms.irc.adapter"),
    ("hermes_twisted.dispatch.gateway", "hermes_twisted.relay.wire"),
    ("hermes_twisted.delivery.consumer", "hermes_twisted.platforms.matrix.format"),
    ("hermes_twisted.delivery.consumer", "hermes_twisted.dispatch.runs"),
    ("hermes_twisted.net.pool", "hermes_twisted.config.settings"),
    ("hermes_twisted.model", "hermes_twisted.net.pool"),
    ("hermes_twisted.config.layers", "hermes_twisted.platforms"),
    ("hermes_twisted.platforms.irc.adapter", "hermes_twisted.platforms.telegram.format"),
    ("hermes_twisted.platforms.matrix.adapter", "hermes_twisted.sessions.sqlite"),
    ("hermes_twisted.platforms.kit.polling", "hermes_twisted.platforms.telegram.botapi"),
    ("hermes_twisted.platforms.kit.polling", "hermes_twisted.delivery.splitting"),
    ("hermes_twisted.ops.metrics", "hermes_twisted.relay.client"),
    ("hermes_twisted.ops.probes", "hermes_twisted.platforms.irc.adapter"),
    ("hermes_twisted.dispatch.gateway", "hermes_twisted.ops.metrics"),
    ("hermes_twisted.platforms.base", "hermes_twisted.ops.metrics"),
])
def test_a_forbidden_import_is_reported_naming_both_modules(importer, imported):
    [message] = rule_violations({importer: {imported}})
    assert importer in message and imported in message


@pytest.mark.parametrize("importer, imported", [
    ("hermes_twisted.platforms.telegram.adapter", "hermes_twisted.platforms.base"),
    ("hermes_twisted.platforms.telegram.adapter", "hermes_twisted.delivery.splitting"),
    ("hermes_twisted.platforms.api_server.adapter", "hermes_twisted.sessions.keys"),
    ("hermes_twisted.dispatch.gateway", "hermes_twisted.platforms.base"),
    ("hermes_twisted.dispatch.turn", "hermes_twisted.upstream"),
    ("hermes_twisted.tap", "hermes_twisted.platforms.irc.adapter"),
    ("hermes_twisted.platforms.matrix.adapter", "hermes_twisted.platforms.kit.polling"),
    ("hermes_twisted.relay.client", "hermes_twisted.platforms.kit.inflight"),
    ("hermes_twisted.ops.metrics", "hermes_twisted.dispatch.observer"),
    ("hermes_twisted.ops.probes", "hermes_twisted.platforms.base"),
    ("hermes_twisted.tap", "hermes_twisted.ops.service"),
])
def test_an_allowed_import_passes(importer, imported):
    assert rule_violations({importer: {imported}}) == []
