"""Fail if any modules of a package import each other in a circle (function-level imports included).

``python tools/check_import_cycles.py [PACKAGE ...]`` (default: video_branch reward_models) builds the import graph
with grimp, the library import-linter uses, and prints every strongly connected group of more than one module.
"""

from __future__ import annotations

import sys
from typing import Dict, List, Set

import grimp


def cycles(graph, package: str) -> List[List[str]]:
    """Strongly connected groups (Tarjan) of more than one module of ``package``, each sorted."""
    nodes = sorted(m for m in graph.modules if m == package or m.startswith(package + "."))
    edges: Dict[str, Set[str]] = {m: {t for t in graph.find_modules_directly_imported_by(m) if t in nodes}
                                  for m in nodes}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in nodes:
        if v not in index:
            visit(v)
    return out


def main(argv: List[str]) -> int:
    packages = argv or ["video_branch", "reward_models"]
    graph = grimp.build_graph(*packages)
    found = False
    for package in packages:
        for group in cycles(graph, package):
            found = True
            print(f"import cycle in {package} ({len(group)} modules): {', '.join(group)}")
    if not found:
        print(f"no import cycles among the modules of {', '.join(packages)} ({len(graph.modules)} modules)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
