"""The package's import graph, function-level imports included: no cycle, no upward arrow.

Each module belongs to one layer (`LAYERS`, lowest first). A module may import from its own layer
or any layer below it, never from a layer above. The arrows the architecture forbids by name
(methods -> surgery/store/cli, arch -> observe/methods, anything -> cli) are upward arrows here,
and are also checked on their own so a reordering of `LAYERS` cannot silently allow them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "moeprune"

# lowest first; a module is in the first layer whose prefix matches it (most specific prefix wins)
LAYERS: list[tuple[str, ...]] = [
    ("errors", "compat", "runtime", "settings", "outputs"),
    ("plan", "data"),
    ("arch",),
    ("observe", "distributed"),
    ("methods",),
    ("surgery",),
    ("store",),
    ("evaluate",),
    ("pipeline",),
    ("api", "evaluation", "sweep", "analyze"),
    ("testbed",),
    ("demo",),
    ("cli", "__main__"),
]

FORBIDDEN = [
    ("methods", ("surgery", "store", "pipeline", "cli")),
    ("arch", ("observe", "methods")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def imports_of(path: Path) -> set[str]:
    """Every moeprune module `path` imports, at any depth of the code (function bodies included)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif (node.module or "").startswith("moeprune"):
                target = node.module.removeprefix("moeprune").lstrip(".")
            else:
                continue
            names_a_module = False
            for alias in node.names:  # `from moeprune.methods import options` imports the module options
                sub = f"{target}.{alias.name}" if target else alias.name
                if (PACKAGE / sub.replace(".", "/")).with_suffix(".py").exists() or (
                        PACKAGE / sub.replace(".", "/")).is_dir():
                    found.add(sub)
                else:
                    names_a_module = True
            if names_a_module or not node.names:
                found.add(target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("moeprune"):
                    found.add(alias.name.removeprefix("moeprune").lstrip("."))
    return {m for m in found if m and m != me}


def layer_of(module: str) -> int | None:
    best, rank = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    return rank


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in graph() if m and layer_of(m) is None)
    assert not unplaced, f"modules with no layer in LAYERS: {unplaced}"


def test_no_upward_import():
    upward = []
    for mod, targets in graph().items():
        if not mod:
            continue  # the package's lazy __init__ re-exports the public API
        for t in targets:
            if layer_of(t) is not None and layer_of(mod) is not None and layer_of(t) > layer_of(mod):
                upward.append(f"{mod} -> {t}")
    assert not upward, "imports from a higher layer:\n" + "\n".join(sorted(upward))


@pytest.mark.parametrize("source,targets", FORBIDDEN)
def test_forbidden_arrows(source, targets):
    bad = [f"{m} -> {t}" for m, ts in graph().items() if m == source or m.startswith(source + ".")
           for t in ts if any(t == x or t.startswith(x + ".") for x in targets)]
    assert not bad, "\n".join(sorted(bad))


def test_nothing_imports_the_cli():
    bad = [f"{m} -> {t}" for m, ts in graph().items() if m not in ("cli", "__main__") for t in ts
           if t == "cli" or t.startswith("cli.")]
    assert not bad, "\n".join(sorted(bad))


def find_cycles(g: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(g.get(m, ())):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    return cycles


def test_no_module_cycle():
    full = graph()
    g = {m: {t for t in ts if t in full} for m, ts in full.items() if m}
    cycles = find_cycles(g)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_package_cycle():
    """Between top-level parts (observe, distributed, api, evaluate ...), counted as one node each."""
    g: dict[str, set[str]] = {}
    for m, ts in graph().items():
        if m:
            top = m.split(".")[0]
            g.setdefault(top, set()).update(t.split(".")[0] for t in ts if t.split(".")[0] != top)
    cycles = find_cycles(g)
    assert not cycles, "import cycles between parts:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cli_talks_only_to_the_public_api():
    """cli imports the package's public names, `moeprune.api`, and the demo driver; nothing deeper."""
    allowed = {"api", "demo"}
    deeper = sorted(t for t in graph()["cli"] if t and t not in allowed)
    assert not deeper, f"cli imports {deeper}; reach them through moeprune.api"
