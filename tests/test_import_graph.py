"""The shape of the package, read from its source (nothing is imported): no import cycle among the
modules of ``moe_tune``, and one module that creates CUDA timing events.

Module-level imports only: an import inside a function runs when the function does, after both
modules exist, so it cannot deadlock an import (it is how the CLI and the runtime stay cheap to
import). ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module, else
of ``pkg``. Imports under ``if TYPE_CHECKING:`` never run and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "moe_tune"


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level(body: list[ast.stmt]):
    """Import statements that run when the module is imported (also inside module-level if/try)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node):
                yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _module_level(block)


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in _module_level(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            edges.update(t for t in targets if t in known and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_the_imports_it_must():
    # The test would pass vacuously if it missed imports: check a few known edges.
    graph = import_graph()
    assert "moe_tune.problem" in graph["moe_tune.space"]
    assert "moe_tune.tuning.protocol" in graph["moe_tune.tuning.engine"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_moe_tune():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _creates_cuda_events(tree: ast.AST) -> bool:
    """``torch.cuda.Event(...)``, ``cuda.Event(...)`` or ``Event`` imported from ``torch.cuda``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "Event":
            value = node.value
            if (isinstance(value, ast.Attribute) and value.attr == "cuda") or (
                    isinstance(value, ast.Name) and value.id == "cuda"):
                return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.cuda"):
            if any(alias.name == "Event" for alias in node.names):
                return True
    return False


def _calls_do_bench(tree: ast.AST) -> bool:
    return any(isinstance(node, (ast.Name, ast.Attribute)) and getattr(node, "id", getattr(node, "attr", None))
               in ("do_bench", "do_bench_cudagraph") for node in ast.walk(tree))


def test_one_module_times_on_the_gpu():
    # Two timers once disagreed by 4-10% on which config was faster: the sweep, verify and the
    # bench time with moe_tune/timer.py only.
    trees = {name: ast.parse(path.read_text(), str(path)) for name, path in modules().items()}
    assert [name for name, tree in trees.items() if _creates_cuda_events(tree)] == ["moe_tune.timer"]
    assert [name for name, tree in trees.items() if _calls_do_bench(tree)] == ["moe_tune.timer"]
    assert _creates_cuda_events(ast.parse("import torch\nstart = torch.cuda.Event(enable_timing=True)"))
    assert _creates_cuda_events(ast.parse("from torch.cuda import Event"))
