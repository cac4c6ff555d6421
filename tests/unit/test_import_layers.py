"""The package's import graph: no loops anywhere, and runtime's layers import only downward.

Every import counts, those inside functions and under TYPE_CHECKING too (read with `ast`, nothing imported).
`python tests/unit/test_import_layers.py` prints the graph's edges between runtime's layers.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "aisandbox"

# runtime's layers, lowest first: a module may import its own layer and those before it, never one after it.
RUNTIME_LAYERS = [
    ("aisandbox.runtime.types",),
    ("aisandbox.runtime.structured",),
    ("aisandbox.runtime.request",),
    ("aisandbox.runtime.text",),
    ("aisandbox.runtime.collector", "aisandbox.runtime.engine", "aisandbox.runtime.admission"),
    ("aisandbox.runtime.torch", "aisandbox.runtime.trtllm"),
    ("aisandbox.runtime.null",),  # serves the default model's tokenizer, which runtime.torch resolves
    ("aisandbox.runtime.loader",),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, modules: set[str]) -> Iterator[str]:
    """The package modules that `path` imports (`from a import b` counts as a.b when a.b is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` where c is a name: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): set(imports(p, modules)) for p in paths}


def layer(module: str) -> int | None:
    for rank, prefixes in enumerate(RUNTIME_LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_runtime_layers_import_only_downward() -> None:
    upward = []
    for module, targets in graph().items():
        here = layer(module)
        if here is None:
            continue
        upward += [f"{module} -> {t}" for t in targets if (there := layer(t)) is not None and there > here]
    assert not upward, "\n".join(upward)


def test_runtime_never_imports_http_or_falcon_and_http_never_imports_torch_or_tensorrt_llm() -> None:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            for mod in mods:
                top = mod.split(".")[0]
                if name.startswith("aisandbox.runtime") and (top == "falcon" or mod.startswith("aisandbox.http")):
                    bad.append(f"{name} imports {mod}")
                if name.startswith("aisandbox.http") and top in {"torch", "tensorrt_llm"}:
                    bad.append(f"{name} imports {mod}")
    assert not bad, bad


def test_the_checker_sees_a_cycle_and_an_upward_import() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert layer("aisandbox.runtime.text.tokenizer") > layer("aisandbox.runtime.structured.tools.specs")  # type: ignore[operator]
    assert layer("aisandbox.runtime.types") == 0


if __name__ == "__main__":
    seen = set()
    for module, targets in sorted(graph().items()):
        for target in sorted(targets):
            a, b = layer(module), layer(target)
            if a is not None and b is not None:
                seen.add((RUNTIME_LAYERS[a][0], RUNTIME_LAYERS[b][0]))
    for a, b in sorted(seen):
        if a != b:
            print(f"{a} -> {b}")
    sys.exit(0)
