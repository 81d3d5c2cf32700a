"""The package's layout is its architecture: the generator stands alone, the tuners build on it, the
applications on both; the import graph has no cycle."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "peft_qpa"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module_level_only: bool):
    """Modules of peft_qpa that ``path`` imports (resolved), at module level only or anywhere."""
    tree = ast.parse(path.read_text())
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("peft_qpa"):
                for alias in node.names:  # "from . import assets" imports a module
                    candidate = f"{target}.{alias.name}"
                    found.add(candidate if _exists(candidate) else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("peft_qpa"))
    return {m for m in found if m != name}


def _exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_module_level_import_graph_has_no_cycle():
    graph = {name: {m for m in _imports(path, True) if m in MODULES} for name, path in MODULES.items()}
    # A package's __init__ importing its own submodules is not a cycle risk when the submodule imports the
    # package only for a sibling; report real cycles through a depth-first search.
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


LAYERS = {
    # folder -> the parts of peft_qpa it may import (at module level or inside functions)
    "peft_qpa.peft_types": (),
    "peft_qpa.generator": ("peft_qpa.generator",),
    "peft_qpa.tuners": ("peft_qpa.generator", "peft_qpa.tuners", "peft_qpa.peft_types"),
    "peft_qpa.patches": ("peft_qpa.tuners", "peft_qpa.peft_types"),
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_each_layer_imports_only_what_is_below_it(layer):
    allowed = LAYERS[layer]
    wrong = {
        name: sorted(m for m in _imports(path, False) if not m.startswith(allowed or ("-",)))
        for name, path in MODULES.items()
        if name == layer or name.startswith(layer + ".")
    }
    wrong = {k: v for k, v in wrong.items() if v}
    assert not wrong, f"{layer} may import only {allowed}: {wrong}"


def test_generator_stands_alone_without_peft():
    # The generator imports neither PEFT nor the tuners, and works from a GeneratorConfig alone.
    code = (
        "import sys, torch\n"
        "from peft_qpa.generator import GeneratorConfig, QPAGenerator, TensorSpec\n"
        "g = QPAGenerator.from_config(GeneratorConfig(qnn_depth=2, chunk_size=8, mapping_hidden_sizes=[8]),\n"
        "                             [TensorSpec('w', (4, 6), 'kaiming_uniform'), TensorSpec('b', (4,))])\n"
        "t = g.split(g.generate())\n"
        "assert t['w'].shape == (4, 6) and torch.equal(t['b'], torch.zeros(4))\n"
        "t['w'].sum().backward()\n"
        "assert g.angles.grad is not None and g.angles.grad.abs().sum() > 0\n"
        "print(sorted(m for m in sys.modules if m == 'peft' or m.startswith(('peft.', 'peft_qpa.tuners', 'peft_qpa.apps'))))\n"
    )
    # Importing peft_qpa.generator runs peft_qpa/__init__.py first (Python imports parent packages), which
    # registers the tuners; so load the subpackage from a path that bypasses the parent's __init__.
    loader = (
        "import importlib.util, sys, types\n"
        f"root = {str(PACKAGE)!r}\n"
        "pkg = types.ModuleType('peft_qpa'); pkg.__path__ = [root]; sys.modules['peft_qpa'] = pkg\n"
    )
    proc = subprocess.run([sys.executable, "-c", loader + code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


def test_architecture_doc_snippet_runs(capsys):
    import re

    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/architecture.md", "exec"), {})
    assert "ratio to the tensors trained directly" in capsys.readouterr().out
