"""Every dotted ``peft_qpa.…`` name written in the code, docs, examples and benchmarks still exists, so a
module that moves cannot leave stale pointers behind in prose."""

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = re.compile(r"(?<![\w.])peft_qpa(?:\.[A-Za-z_]\w*)+")
# "from peft_qpa.x import a, b as c" (in docs too): each imported name is a reference peft_qpa.x.a
FROM_IMPORT = re.compile(r"\bfrom\s+(peft_qpa(?:\.\w+)*)\s+import\s+([\w\s,]+)")


def _sources():
    yield from sorted((ROOT / "peft_qpa").rglob("*.py"))
    yield from sorted((ROOT / "docs").glob("*.md"))
    yield ROOT / "README.md"
    yield from sorted((ROOT / "examples").glob("*.py"))
    yield from sorted((ROOT / "benchmarks").glob("*.py"))


def _resolves(dotted: str) -> bool:
    """An importable module, or the longest importable module prefix then attributes on the rest."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _references():
    for path in _sources():
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in REFERENCE.finditer(line):
                yield path.relative_to(ROOT), number, match.group(0)
            for match in FROM_IMPORT.finditer(line):
                for name in match.group(2).split(","):
                    name = name.split(" as ")[0].strip()
                    if name.isidentifier():
                        yield path.relative_to(ROOT), number, f"{match.group(1)}.{name}"


def test_scanner_finds_references():
    assert sum(1 for _ in _references()) > 20


def test_every_dotted_peft_qpa_reference_resolves():
    cache, unresolved = {}, []
    for path, number, dotted in _references():
        if dotted not in cache:
            cache[dotted] = _resolves(dotted)
        if not cache[dotted]:
            unresolved.append(f"{path}:{number}: {dotted}")
    assert not unresolved, "unresolved peft_qpa references:\n" + "\n".join(unresolved)
