"""The shape of the code: imports run down the layers, never in a circle.

Layers, lowest first: utils/ (I/O, CRF, metrics, pools: knows nothing of the others), then data/,
models/ and exporters/ (datasets and label sets; networks and their math; mask formats), then
engine/ (the stages, the config schema), then the entry scripts (stage*.py, evaluate.py, predict.py, demo.py, benchmarks/). Imports
inside functions count as much as those at the top.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAYERS = {"utils": 0, "data": 1, "models": 1, "exporters": 1, "engine": 2}


def project_modules() -> dict[str, Path]:
    mods = {}
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0].startswith(".") or rel.parts[0] == "tests":
            continue
        mods[".".join(rel.with_suffix("").parts)] = path
    return mods


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def import_graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {name: {t for t in imported(path) if t in mods and t != name}
            for name, path in mods.items()}


def entry_scripts() -> set[str]:
    """Modules run as scripts (`if __name__ == "__main__"`) that no other module imports: the
    top layer, wherever their file lies (e.g. data/bbox_setup.py, which reads a config)."""
    graph = import_graph()
    imported_somewhere = set().union(*graph.values())
    return {name for name, path in project_modules().items()
            if '__name__ == "__main__"' in path.read_text() and name not in imported_somewhere}


def test_imports_never_run_up_a_layer():
    scripts = entry_scripts()
    upward = [(a, b) for a, targets in import_graph().items() for b in targets
              if a not in scripts and a.split(".")[0] in LAYERS and b.split(".")[0] in LAYERS
              and LAYERS[b.split(".")[0]] > LAYERS[a.split(".")[0]]]
    assert upward == []


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
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


def test_there_are_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_argparse_stays_in_the_entry_scripts():
    """Options reach engine/ as keyword arguments; only scripts (and utils/cli.py) parse."""
    parsers = {name for name, path in project_modules().items() if "argparse" in imported(path)}
    scripts = {name for name, path in project_modules().items()
               if '__name__ == "__main__"' in path.read_text()}
    assert parsers - scripts == {"utils.cli"}
    assert not any(name.startswith(("engine.", "models.")) for name in parsers)
