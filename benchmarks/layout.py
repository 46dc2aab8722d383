"""The source tree's shape: lines per concept, and every file's lines and largest function.

    python benchmarks/layout.py                 # this tree (src/amortized)
    python benchmarks/layout.py /path/to/src/amortized

A concept is a subpackage (families, inference, nets, measure, data, train, apps); the
modules at the top are the core. Prints Markdown tables; also flags files over 500 lines
and import circles between the package's modules (imports inside functions count).
"""

from __future__ import annotations

import argparse
import ast
from collections import defaultdict
from pathlib import Path


def largest_function(tree: ast.AST) -> tuple[str, int]:
    """(name, lines) of the longest function or method in a module."""
    best = ("-", 0)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = node.end_lineno - node.lineno + 1
            if lines > best[1]:
                best = (node.name, lines)
    return best


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([root.name, *parts])


def imports(root: Path, path: Path, tree: ast.AST) -> set[str]:
    """The package's modules this module imports, at its top or inside a function."""
    here = module_name(root, path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            if target.split(".")[0] != root.name:
                continue
            for alias in node.names:  # `from . import x` may name a submodule
                out.add(f"{target}.{alias.name}" if node.module is None else target)
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles among modules (packages' __init__ re-exports left out)."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", nargs="?", default=str(Path(__file__).parents[1] / "src/amortized"))
    root = Path(parser.parse_args().root).resolve()
    rows, concepts, graph = [], defaultdict(lambda: [0, 0]), {}
    packages = {module_name(root, p) for p in root.rglob("__init__.py")}
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        lines = len(text.splitlines())
        rel = path.relative_to(root)
        concept = rel.parts[0] if len(rel.parts) > 1 else "core"
        concepts[concept][0] += 1
        concepts[concept][1] += lines
        rows.append((str(rel), lines, *largest_function(tree)))
        if path.name != "__init__.py":
            graph[module_name(root, path)] = imports(root, path, tree) - packages
    print("| concept | files | lines |\n|---|---|---|")
    for concept, (files, lines) in sorted(concepts.items(), key=lambda kv: kv[0] != "core"):
        print(f"| {concept} | {files} | {lines} |")
    print("\n| file | lines | largest function (lines) |\n|---|---|---|")
    for rel, lines, name, size in rows:
        print(f"| {rel} | {lines} | {name} ({size}) |")
    big = [f"{rel} ({lines})" for rel, lines, *_ in rows if lines > 500]
    print(f"\nfiles over 500 lines: {', '.join(big) or 'none'}")
    cycles = circles(graph)
    print("import circles: " + ("; ".join(" -> ".join(c) for c in cycles) or "none"))


if __name__ == "__main__":
    main()
