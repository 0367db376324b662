"""The package's folders are layers: each imports only its own and lower layers, nothing imports the CLI,
and the folder import graph has no cycle. ``python tests/test_layers.py`` prints the graph.

Every ``import app.x`` / ``from app.x import`` counts, including the ones inside functions.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "app"
ROOT = "(app)"  # app/__init__.py, errors.py, resources.py
# Lower numbers are lower layers; a folder may import folders of its own layer or below.
LAYERS = {
    ROOT: 0,
    "io": 1,
    "transforms": 2,
    "losses": 2,
    "networks": 2,
    "data": 2,
    "runtime": 2,
    "reporting": 2,
    "planning": 3,
    "bundle": 3,
    "training": 4,
    "evaluation": 4,
    "inference": 4,
    "node": 5,
    "cli": 6,
}


def folder_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) < 2 or not (APP / parts[1]).is_dir():
        return ROOT
    return parts[1]


def imports_of(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name == "app" or a.name.startswith("app.")}
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and node.module
            and (node.module == "app" or node.module.startswith("app."))
        ):
            out |= {
                f"{node.module}.{a.name}"
                if (APP / node.module.replace("app.", "", 1).replace(".", "/") / a.name).is_dir()
                else node.module
                for a in node.names
            }
    return out


def folder_graph() -> dict[str, dict[str, list[str]]]:
    """``{folder: {imported folder: [importing files]}}`` over every module under app/."""
    graph: dict[str, dict[str, list[str]]] = {f: {} for f in LAYERS}
    for path in sorted(APP.rglob("*.py")):
        rel = path.relative_to(APP.parent)
        src = folder_of(".".join(rel.with_suffix("").parts))
        assert src in LAYERS, f"{rel}: folder {src!r} has no layer in tests/test_layers.py"
        for mod in imports_of(path):
            dst = folder_of(mod)
            if dst != src:
                graph[src].setdefault(dst, []).append(str(rel))
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, {}):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_cycle_between_folders():
    assert find_cycle(folder_graph()) is None, f"import cycle: {' -> '.join(find_cycle(folder_graph()) or [])}"


def test_nothing_imports_the_cli():
    offenders = {src: files["cli"] for src, files in folder_graph().items() if "cli" in files}
    assert not offenders, offenders


def test_io_imports_nothing_above_it():
    assert set(folder_graph()["io"]) <= {ROOT}, folder_graph()["io"]


def test_each_folder_imports_only_its_layer_or_below():
    bad = [
        (src, dst, files[:3])
        for src, deps in folder_graph().items()
        for dst, files in deps.items()
        if LAYERS[dst] > LAYERS[src]
    ]
    assert not bad, bad


def test_the_checker_sees_a_cycle_and_a_lazy_import(tmp_path):
    lazy = tmp_path / "m.py"
    lazy.write_text("def f():\n    from app.cli.main import main\n")
    assert imports_of(lazy) == {"app.cli.main"}
    assert find_cycle({"a": {"b": []}, "b": {"a": []}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b": []}, "b": {}}) is None


def main() -> int:
    graph = folder_graph()
    for src in sorted(graph, key=lambda f: (LAYERS[f], f)):
        deps = ", ".join(sorted(graph[src], key=lambda f: (LAYERS[f], f))) or "-"
        print(f"{LAYERS[src]}  {src:12s} -> {deps}")
    cycle = find_cycle(graph)
    print("no cycle" if cycle is None else f"CYCLE: {' -> '.join(cycle)}")
    return 0 if cycle is None else 1


if __name__ == "__main__":
    sys.exit(main())


def test_readme_layout_names_only_modules_that_exist():
    """Every ``name.py`` the README's Layout block lists under ``app/<stage>/`` is a file there."""
    import re

    block = (APP.parent / "README.md").read_text(encoding="utf-8").split("## Layout", 1)[1].split("```")[1]
    named: dict[str, set[str]] = {}
    stage = None
    for line in block.splitlines():
        if m := re.match(r"^  (\w+)/", line):
            stage = m.group(1)
        elif re.match(r"^\S", line):
            stage = None
        if stage:
            named.setdefault(stage, set()).update(re.findall(r"\b([a-z_0-9]+\.py)\b", line))
    assert "gc_pause.py" in named["io"] and len(named) >= 10
    absent = {f"app/{s}/{n}" for s, names in named.items() for n in names if not (APP / s / n).is_file()}
    assert not absent, sorted(absent)
