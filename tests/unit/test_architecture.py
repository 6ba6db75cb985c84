"""The package's shape (ARCHITECTURE.md): the import graph built from the source has no cycle and no arrow from a
lower layer to a higher one; the loss library imports nothing heavy; no module outgrows 400 lines."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "mallows_ray"

# Lowest first. A module may import from its own layer or below, never above (the longest prefix decides).
LAYERS = [
    ("mallows_ray", "mallows_ray.losses", "mallows_ray.lambdas", "mallows_ray.runtime", "mallows_ray.console"),
    ("mallows_ray.config", "mallows_ray.typed_config"),
    ("mallows_ray.models", "mallows_ray.attention", "mallows_ray.data", "mallows_ray.export_format"),
    ("mallows_ray.train",),
    ("mallows_ray.drivers", "mallows_ray.tune"),
    ("mallows_ray.demo", "mallows_ray.bandit"),
    ("mallows_ray.cli",),
]
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its source (function-local imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            # `from package import module` imports the module; `from module import name` the module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def layer(name: str) -> int:
    matches = [(len(prefix), rank) for rank, prefixes in enumerate(LAYERS) for prefix in prefixes
               if name == prefix or name.startswith(prefix + ".")]
    assert matches, f"{name} is in no layer of LAYERS: add it (and to ARCHITECTURE.md)"
    return max(matches)[1]


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    colour, stack = {}, []

    def visit(node: str) -> list[str] | None:
        colour[node] = "grey"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if colour.get(nxt) == "grey":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        colour[node] = "black"
        return None

    for node in sorted(edges):
        if node not in colour and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    edges = graph()
    assert len(edges) > 40 and edges["mallows_ray.cli"]  # the graph was really built
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges))}"


def test_no_import_from_a_higher_layer():
    upward = [f"{source} (layer {layer(source)}) -> {target} (layer {layer(target)})"
              for source, targets in graph().items() for target in targets if layer(target) > layer(source)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_losses_and_lambdas_import_nothing_else_of_the_package():
    for library in ("mallows_ray.losses", "mallows_ray.lambdas"):
        for source, targets in graph().items():
            if source == library or source.startswith(library + "."):
                outside = [t for t in targets if not (t == library or t.startswith(library + "."))]
                assert not outside, f"{source} imports {outside}"


def test_losses_import_no_ray_deepspeed_transformers():
    out = subprocess.run([sys.executable, "-c", "import sys, mallows_ray.losses; "
                          "print([m for m in ('ray', 'deepspeed', 'transformers') if m in sys.modules])"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_module_over_400_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def _readme_layout() -> str:
    text = (PACKAGE.parent / "README.md").read_text()
    return text[text.index("## Layout"):]


def test_readme_layout_names_every_module_and_only_real_files():
    layout = _readme_layout()
    for name, path in modules().items():
        if path.name != "__init__.py":
            assert path.name in layout, f"README's layout section does not name {path.relative_to(PACKAGE.parent)}"
        elif name != "mallows_ray":
            assert f"{name.replace('.', '/')}/" in layout, f"README's layout section does not name package {name}"
    repo = PACKAGE.parent
    named = set(re.findall(r"\b(\w+\.py)\b", layout))
    real = {p.name for folder in ("mallows_ray", "jobs", "benchmarks", "tests") for p in (repo / folder).rglob("*.py")}
    assert named <= real, f"README's layout section names files that do not exist: {sorted(named - real)}"


def test_architecture_doc_names_every_layer():
    doc = (PACKAGE.parent / "ARCHITECTURE.md").read_text()
    for prefix in (p for layer_prefixes in LAYERS for p in layer_prefixes if p != "mallows_ray"):
        short = prefix.removeprefix("mallows_ray.")
        assert f"`{short}/`" in doc or f"`{short}.py`" in doc, f"ARCHITECTURE.md does not place {prefix}"
