"""No module of peft_qpa imports, directly or through others, a module that imports it back: counting imports
inside functions and under ``TYPE_CHECKING`` too, since a cycle hidden in a function still ties the modules
together (the order they can load in, what can be moved or tested alone)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "peft_qpa"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> dict[str, int]:
    """{imported peft_qpa module: first line} for every import statement anywhere in the file.

    ``from .x import y`` names the module ``x.y`` when that is a module, else ``x``. Python also runs every
    package on the way to a submodule: those count, except the importer's own parent packages (which are
    already loading when it runs)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                targets.append(candidate if candidate in MODULES else module)
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for target in targets:
            parts = target.split(".")
            for cut in range(1, len(parts) + 1):
                module = ".".join(parts[:cut])
                if module in MODULES and module != name and not name.startswith(module + "."):
                    found.setdefault(module, node.lineno)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a closed path."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def connect(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(GRAPH[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(set(component))

    for node in sorted(GRAPH):
        if node not in index:
            connect(node)

    cycles = []
    for component in components:
        start = min(component)
        # breadth-first search inside the component for the shortest way back to start
        paths, seen = {start: [start]}, {start}
        frontier = [start]
        cycle = None
        while frontier and cycle is None:
            following = []
            for node in frontier:
                for nxt in sorted(GRAPH[node]):
                    if nxt == start:
                        cycle = paths[node] + [start]
                        break
                    if nxt in component and nxt not in seen:
                        seen.add(nxt)
                        paths[nxt] = paths[node] + [nxt]
                        following.append(nxt)
                if cycle:
                    break
            frontier = following
        cycles.append((cycle, component))
    return cycles


def _edge(a: str, b: str) -> str:
    return f"{a} -> {b} ({MODULES[a].relative_to(PACKAGE.parent)}:{GRAPH[a][b]})"


def _describe(found) -> str:
    """The shortest cycle through the component's first module, then every import inside the component."""
    cycle, component = found
    inside = [_edge(a, b) for a in sorted(component) for b in sorted(GRAPH[a]) if b in component]
    return "cycle: " + " -> ".join(cycle) + "\n  imports within it:\n    " + "\n    ".join(inside)


def test_graph_sees_function_level_and_relative_imports():
    # backends/__init__.py imports .statevector inside a function, relative to its own package
    assert "peft_qpa.generator.backends.statevector" in GRAPH["peft_qpa.generator.backends"]
    assert "peft_qpa.generator.circuit" in GRAPH["peft_qpa.generator.memory"]
    # the tuners reach the generator through its package's __init__; their own package is not an edge
    assert "peft_qpa.generator" in GRAPH["peft_qpa.tuners.lora.config"]
    assert "peft_qpa.tuners" not in GRAPH["peft_qpa.tuners.lora.config"]


def test_import_graph_has_no_cycle():
    cycles = _cycles()
    assert not cycles, "import cycles:\n" + "\n".join(map(_describe, cycles))
