"""The layout's rules, checked on the source: a newcomer can walk it only while they hold.

Imports are read with :mod:`ast` (nothing is imported), every import counted: module
level, inside functions and under ``TYPE_CHECKING`` alike, since each is a dependency a
reader has to follow.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

from twisted.trial import unittest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "shtalk"
MAX_LINES = 500
MAX_MODULES_PER_PACKAGE = 25


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the shtalk package but its tests."""
    found: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if "test" in parts:
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The shtalk modules ``name`` imports, wherever in the file the import stands."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names]
            yield from (sub for sub in subs if sub in known)
            if target in known and not all(sub in known for sub in subs):
                yield target  # names from the module itself, not only its submodules


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {
        name: {t for t in imports_of(name, path, known) if t != name}
        for name, path in known.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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


class ImportGraphTests(unittest.TestCase):
    def test_the_checker_finds_a_cycle(self) -> None:
        graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
        self.assertEqual(cycles(graph), [["a", "b", "c"]])

    def test_the_graph_is_read(self) -> None:
        graph = import_graph()
        self.assertIn("shtalk.wire.frames", graph["shtalk.server.net.connection"])

    def test_no_import_cycle(self) -> None:
        self.assertEqual(cycles(import_graph()), [])

    def test_the_sans_io_cores_import_no_reactor(self) -> None:
        for name, path in modules().items():
            if name.startswith(("shtalk.wire", "shtalk.crypto")):
                self.assertNotIn("twisted.internet", path.read_text(), name)


class SizeTests(unittest.TestCase):
    def test_no_module_over_the_limit(self) -> None:
        sources = [*modules().values(), *sorted((ROOT / "bench").glob("*.py"))]
        long = {
            str(p.relative_to(ROOT)): n
            for p in sources
            if (n := len(p.read_text().splitlines())) > MAX_LINES
        }
        self.assertEqual(long, {})

    def test_no_flat_package(self) -> None:
        crowded = {}
        for package in PACKAGE.rglob("__init__.py"):
            if "test" in package.parts:
                continue
            count = len(list(package.parent.glob("*.py"))) - 1
            if count > MAX_MODULES_PER_PACKAGE:
                crowded[str(package.parent.relative_to(ROOT))] = count
        self.assertEqual(crowded, {})


class HistoryTests(unittest.TestCase):
    PATTERN = re.compile(r"(?i:\bissue #?\d+\b)|\bSEAM\b")

    def test_no_comment_names_an_issue(self) -> None:
        hits = []
        for folder in ("shtalk", "bench", "tests", "twisted"):
            for path in sorted((ROOT / folder).rglob("*.py")):
                for n, line in enumerate(path.read_text().splitlines(), 1):
                    if self.PATTERN.search(line) and path.name != "test_layout.py":
                        hits.append(f"{path.relative_to(ROOT)}:{n}")
        self.assertEqual(hits, [])
