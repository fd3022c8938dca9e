"""The structure check of CI (``make structure``, part of ``make test``): the import graph has no
cycle and keeps its layers, and no module is oversized without a reason.

1. **No import cycle** among the modules of ``pricing_service``, ``sync_worker``,
   ``pricing_testing``, ``bench`` and ``scripts``. Every import counts: function-local ones and
   those under ``if TYPE_CHECKING:`` too (a cycle hidden in a function is still one).
   ``from a.b import c`` is an import of the module ``a.b.c`` when there is one, else of
   ``a.b``; a module importing an ancestor package (its ``__init__``) is no edge of a cycle
   (the package's ``__init__`` runs first anyway).
2. **Layers** (:data:`LAYERS`): within ``pricing_service`` a module imports only from its own
   layer or the layers below it, never upwards. Independent modules of one layer (named with
   ``|``) may not import each other either.
3. **Forbidden imports** (:data:`FORBIDDEN`): ``pricing_service`` never imports ``sync_worker``;
   neither service imports ``pricing_testing``, ``bench`` or ``tests``; ``pricing_testing``
   imports neither ``bench`` nor ``tests``; ``bench`` does not import ``tests``.
4. **Entry points**: no module imports a ``__main__`` module.
5. **Size**: no module above :data:`MAX_LINES` lines unless its docstring states why, on a line
   starting with ``Size:`` (e.g. ``Size: one state machine; split, its transitions would ...``).

Prints one line per finding and exits 1 if there is any.

    python scripts/check_structure.py            # in the project's root
    python scripts/check_structure.py --graph pricing_service   # the edges, for a look
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOTS = ("pricing_service", "sync_worker", "pricing_testing", "bench", "scripts")
MAX_LINES = 500
SIZE_REASON = "Size:"

#: ``pricing_service``'s layers, top first, as today's import graph has them. A module may import
#: its own entry's modules and the layers below; in a layer written ``a | b``, ``a`` and ``b``
#: are independent (neither imports the other). A module belongs to the longest entry naming it
#: or an ancestor package (the last entry, ``pricing_service``, names only the package's
#: ``__init__``); a module of ``pricing_service`` that no entry names is reported: a new module
#: is placed here when it is added.
#:
#: The call pipeline (``interceptors``: failures, request ids, the canonical line) sits below
#: the stores, not between the servicers and the core: ``tracing`` builds on it, and the stores'
#: Redis round trips (``redis_pipe``) and the rule index are traced. ``membership.layout`` and
#: ``membership.derive`` (the record encoding and what a fact writes) are pure, below every
#: store; ``crowds`` (the crowd definitions) reads the layout's facts.
LAYERS: tuple[str, ...] = (
    # the process's entry point
    "pricing_service.__main__",
    # the server's assembly; the client tool
    "pricing_service.server | pricing_service.client_cli",
    # the serving runtimes, the worker-process model, the admin tools
    "pricing_service.runtime | pricing_service.workers | pricing_service.rules.cli"
    " | pricing_service.rules.crowd_cli",
    # the RPC handlers
    "pricing_service.servicers",
    # the pricing core: a request's lookups, decided by the pure engine
    "pricing_service.pricing",
    "pricing_service.engine",
    # the stores: rules (SQL, index, crowds), membership (Redis), the Redis clients
    "pricing_service.rules",
    "pricing_service.membership | pricing_service.replica_acks",
    "pricing_service.redis_client | pricing_service.redis_pipe | pricing_service.crowds"
    " | pricing_service.watermark",
    # redis-py's cluster client, bounded (the client factory builds it)
    "pricing_service.redis_cluster",
    # tracing, over the call pipeline's failure model
    "pricing_service.tracing",
    "pricing_service.interceptors",
    # observability, resilience and settings primitives
    "pricing_service.metrics | pricing_service.breaker | pricing_service.ratelimit"
    " | pricing_service.auth | pricing_service.logging | pricing_service.otel_config"
    " | pricing_service.client_flags | pricing_service.redis_errors",
    "pricing_service.config",
    # the membership record's encoding and derivation (pure)
    "pricing_service.membership.derive",
    "pricing_service.membership.layout",
    # the domain, its errors
    "pricing_service.domain | pricing_service.currency | pricing_service.ids",
    "pricing_service.errors | pricing_service.iso4217_data",
    "pricing_service",
)

#: (importer prefix, imported prefix, why)
FORBIDDEN: tuple[tuple[str, str, str], ...] = (
    ("pricing_service", "sync_worker", "the server never imports the worker"),
    ("pricing_service", "pricing_testing", "the services never import the testing helpers"),
    ("sync_worker", "pricing_testing", "the services never import the testing helpers"),
    ("pricing_service", "bench", "the services never import the benchmarks"),
    ("sync_worker", "bench", "the services never import the benchmarks"),
    ("pricing_service", "tests", "the services never import the tests"),
    ("sync_worker", "tests", "the services never import the tests"),
    ("pricing_testing", "bench", "the testing helpers never import the benchmarks"),
    ("pricing_testing", "tests", "the testing helpers never import the tests"),
    ("bench", "tests", "the benchmarks take their helpers from pricing_testing"),
)


@dataclass(frozen=True, slots=True)
class Module:
    """A module's name, its source, and whether it is a package's ``__init__``."""

    name: str
    source: str
    is_package: bool = False
    path: str = ""


@dataclass(frozen=True, slots=True)
class Edge:
    importer: str
    imported: str
    line: int


@dataclass(slots=True)
class Graph:
    modules: dict[str, Module]
    #: importer -> imported -> first line of the import
    edges: dict[str, dict[str, int]] = field(default_factory=dict)
    #: imports of names outside the scanned modules (``tests.*``, third parties)
    external: list[Edge] = field(default_factory=list)

    def all_edges(self) -> Iterator[Edge]:
        for a, targets in sorted(self.edges.items()):
            for b, line in sorted(targets.items()):
                yield Edge(a, b, line)


# --- the graph ---------------------------------------------------------------------------------


def discover(root: Path, tops: Iterable[str] = ROOTS) -> list[Module]:
    """Every ``.py`` file under ``root/<top>`` as a module."""
    out = []
    for top in tops:
        for p in sorted((root / top).rglob("*.py")):
            parts = list(p.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            out.append(Module(".".join(parts), p.read_text(), is_package, str(p.relative_to(root))))
    return out


def _imported_names(module: Module) -> Iterator[tuple[str, int]]:
    """Every name the module imports (absolute), with its line; function-local imports and
    ``TYPE_CHECKING`` ones included."""
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    for node in ast.walk(ast.parse(module.source, module.path or module.name)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            for alias in node.names:
                yield (f"{base}.{alias.name}" if base else alias.name), node.lineno
            if base:
                yield base, node.lineno


def build_graph(modules: Iterable[Module]) -> Graph:
    mods = {m.name: m for m in modules}
    graph = Graph(mods, {name: {} for name in mods})

    def resolve(name: str) -> str | None:
        while name:
            if name in mods:
                return name
            name = name.rpartition(".")[0]
        return None

    for m in mods.values():
        for name, line in _imported_names(m):
            target = resolve(name)
            if target is None:
                graph.external.append(Edge(m.name, name, line))
                continue
            if target == m.name:
                continue
            if mods[target].is_package and m.name.startswith(target + "."):
                continue  # an ancestor package: it runs first, no edge of a cycle
            graph.edges[m.name].setdefault(target, line)
    return graph


# --- the checks --------------------------------------------------------------------------------


def cycles(graph: Graph) -> list[list[str]]:
    """The modules of each import cycle (a strongly connected component of more than one
    module), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []
    counter = 0
    # iterative Tarjan (no recursion limit on deep graphs)
    for start in sorted(graph.edges):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = []
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        work.append((start, iter(sorted(graph.edges[start]))))
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.edges[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        sccs.append(sorted(comp))
    return sorted(sccs)


def cycle_path(graph: Graph, comp: Sequence[str]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside it."""
    members = set(comp)
    first = comp[0]
    prev: dict[str, str] = {}
    queue = [first]
    seen = {first}
    while queue:
        nxt = []
        for v in queue:
            for w in sorted(graph.edges[v]):
                if w == first:
                    path = [v]
                    while path[-1] != first:
                        path.append(prev[path[-1]])
                    return [*reversed(path), first]
                if w in members and w not in seen:
                    seen.add(w)
                    prev[w] = v
                    nxt.append(w)
        queue = nxt
    return [*comp, first]  # unreachable for a strongly connected component


def _layer_of(name: str, layers: Sequence[str]) -> tuple[int, str] | None:
    """(layer index, entry) of the longest entry naming the module or an ancestor package
    (the last entry, the layered package itself, names only its ``__init__``); None if none
    does."""
    root = layers[-1].split("|")[0].strip()  # the layered package: names only its __init__
    best: tuple[int, str, int] | None = None
    for i, layer in enumerate(layers):
        for entry in (e.strip() for e in layer.split("|")):
            named = name == entry or (entry != root and name.startswith(entry + "."))
            if named and (best is None or len(entry) > best[2]):
                best = (i, entry, len(entry))
    return None if best is None else (best[0], best[1])


def layer_violations(graph: Graph, layers: Sequence[str]) -> list[str]:
    """Upward imports, imports between independent modules of one layer, and modules of the
    layered package that no layer names."""
    out = []
    top = layers[-1].split("|")[0].strip()
    for m in sorted(graph.modules):
        if (m == top or m.startswith(top + ".")) and _layer_of(m, layers) is None:
            out.append(f"layers: {m} is in no layer")
    for e in graph.all_edges():
        a, b = _layer_of(e.importer, layers), _layer_of(e.imported, layers)
        if a is None or b is None:
            continue
        if b[0] < a[0]:
            out.append(
                f"layers: {e.importer} (line {e.line}) imports {e.imported}, a layer above it "
                f"({a[1]} is below {b[1]})"
            )
        elif a[0] == b[0] and a[1] != b[1]:
            out.append(
                f"layers: {e.importer} (line {e.line}) imports {e.imported}: {a[1]} and {b[1]} "
                "are independent modules of one layer"
            )
    return out


def forbidden_imports(graph: Graph, rules: Sequence[tuple[str, str, str]] = FORBIDDEN) -> list[str]:
    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    out = []
    edges = [*graph.all_edges(), *graph.external]
    for e in edges:
        for importer, imported, why in rules:
            if under(e.importer, importer) and under(e.imported, imported):
                out.append(f"forbidden: {e.importer} (line {e.line}) imports {e.imported}: {why}")
    return sorted(set(out))


def entry_point_imports(graph: Graph) -> list[str]:
    """Imports of a ``__main__`` module: a program's entry point is imported by nobody (what
    others need lives in a module of the package)."""
    return [
        f"entry point: {e.importer} (line {e.line}) imports {e.imported}"
        for e in graph.all_edges()
        if e.imported.endswith(".__main__") or e.imported == "__main__"
    ]


def docstring_states_size(module: Module) -> bool:
    try:
        doc = ast.get_docstring(ast.parse(module.source)) or ""
    except SyntaxError:
        return False
    return any(line.strip().startswith(SIZE_REASON) for line in doc.splitlines())


def oversized(modules: Iterable[Module], limit: int = MAX_LINES) -> list[str]:
    out = []
    for m in sorted(modules, key=lambda m: m.name):
        n = len(m.source.splitlines())
        if n > limit and not docstring_states_size(m):
            out.append(
                f"size: {m.name} has {n} lines (over {limit}; or state why in its docstring, "
                f"on a line starting {SIZE_REASON!r})"
            )
    return out


def check(modules: Sequence[Module], layers: Sequence[str] = LAYERS) -> list[str]:
    graph = build_graph(modules)
    findings = [
        f"cycle among {', '.join(comp)}: {' -> '.join(cycle_path(graph, comp))}"
        for comp in cycles(graph)
    ]
    findings += entry_point_imports(graph)
    findings += layer_violations(graph, layers)
    findings += forbidden_imports(graph)
    findings += oversized(modules)
    return findings


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/check_structure.py", description=__doc__)
    p.add_argument("--root", default=".", help="the project's root (default: here)")
    p.add_argument("--graph", metavar="PREFIX", help="print the edges among PREFIX's modules")
    args = p.parse_args(argv)
    modules = discover(Path(args.root))
    if args.graph:
        _print_graph(build_graph(modules).edges, args.graph)
        return 0
    findings = check(modules)
    for f in findings:
        print(f)
    print(f"structure: {len(findings)} findings in {len(modules)} modules", file=sys.stderr)
    return 1 if findings else 0


def _print_graph(edges: Mapping[str, Mapping[str, int]], prefix: str) -> None:
    for a in sorted(edges):
        if a.startswith(prefix):
            targets = [b for b in sorted(edges[a]) if b.startswith(prefix)]
            print(f"{a} -> {', '.join(targets)}")


if __name__ == "__main__":
    sys.exit(main())
