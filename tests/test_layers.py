"""The import structure of the converter (package `mergequant.convert`, folder converter/) and of the Python
skin (python/mergequant): layers that point one way and no cycles (docs/architecture.md, "The converter").

The graph is read from the source with `ast` (every import statement, the ones inside functions included),
so it holds for imports that run late as well. Importing `a.b.c` runs the `__init__` of `a.b` first, so such
an import is also an edge to the package `a.b` (unless the importer lives inside `a.b`, whose `__init__` is
then already running)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONVERTER = ROOT / "converter"
SKIN = ROOT / "python" / "mergequant"

# Bottom to top. A module may import modules of its own layer or of the layers below it, never above.
# (The package façades `mergequant` and `mergequant.convert` re-export the public names: they sit on top.)
LAYERS: list[tuple[str, list[str]]] = [
    ("engine binding", ["mergequant._engine"]),  # the compiled extension: imports nothing of the packages
    ("primitives", ["mergequant.convert.config", "mergequant.convert.quant.int4", "mergequant.convert.quant.blas",
                    "mergequant.convert.quant"]),
    ("loaders", ["mergequant.convert.loaders", "mergequant.convert.mqfile", "mergequant.convert.tokenizer",
                 "mergequant.convert.engine_tokenizer", "mergequant.convert.layers"]),
    ("schemes", ["mergequant.convert.quant.simulate_linear", "mergequant.convert.schemes"]),
    ("reference model", ["mergequant.convert.reference", "mergequant.convert.quant.simulate"]),
    ("calibration", ["mergequant.convert.quant.calibrate"]),
    ("methods", ["mergequant.convert.quant.clip", "mergequant.convert.quant.gptq",
                 "mergequant.convert.quant.lowrank", "mergequant.convert.quant.split",
                 "mergequant.convert.quant.rtn", "mergequant.convert.quant.mergequant",
                 "mergequant.convert.quant.kv_cache", "mergequant.convert.quant.blockwise",
                 "mergequant.convert.quant.gptq_w4a16", "mergequant.convert.quant.smoothquant",
                 "mergequant.convert.quant.qqq", "mergequant.convert.quant.fptq",
                 "mergequant.convert.quant.outliertune",
                 "mergequant.convert.quant.methods"]),
    ("writer", ["mergequant.convert.convert", "mergequant.convert.inspect"]),
    ("converter package", ["mergequant.convert"]),
    ("default model", ["mergequant.chat_template", "mergequant.default_model"]),
    ("skin", ["mergequant.llm"]),
    ("command line", ["mergequant.cli"]),
    ("package", ["mergequant"]),
]
# The one converter module allowed to load the compiled engine (its docstring says why).
ENGINE_SEAM = "mergequant.convert.engine_tokenizer"
ENGINE = "mergequant._engine"


def source_modules() -> dict[str, Path]:
    """Module name → file, for every .py file of both packages."""
    mods: dict[str, Path] = {}
    for base, pkg in ((CONVERTER, "mergequant.convert"), (SKIN, "mergequant")):
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            if pkg == "mergequant" and rel.parts[0] == "convert":
                continue  # python/mergequant/convert is the link to converter/, read above
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join([pkg, *parts])] = path
    return mods


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of the two packages that module `name` imports, each with the packages whose __init__
    the import runs; names outside the packages (numpy, …) are dropped."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # `from pkg import sub` imports the module pkg.sub where there is one
                sub = f"{mod}.{a.name}"
                targets.add(sub if sub in known or sub == ENGINE else mod)
    out: set[str] = set()
    for t in targets:
        if t != "mergequant" and not t.startswith("mergequant."):
            continue
        parts = t.split(".")
        for n in range(1, len(parts) + 1):
            step = ".".join(parts[:n])
            if n < len(parts) and (name == step or name.startswith(step + ".")):
                continue  # an enclosing package of the importer: its __init__ is already running
            out.add(step)
    out.discard(name)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = source_modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def test_every_module_has_a_layer(graph):
    declared = {m for _, mods in LAYERS for m in mods}
    assert sorted(set(graph) - declared) == [], "modules missing from LAYERS (add them to their layer)"
    assert sorted(declared - set(graph) - {ENGINE}) == [], "LAYERS names modules that do not exist"


def test_imports_resolve_to_modules(graph):
    """Every import of the packages names a module that exists: python never reaches past the nanobind
    module into the engine, and no import points at a file that was moved."""
    known = set(graph) | {ENGINE}
    bad = sorted((m, t) for m, ts in graph.items() for t in ts if t not in known)
    assert bad == []


def test_no_module_imports_a_layer_above(graph):
    rank = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}
    layer = {m: name for name, mods in LAYERS for m in mods}
    upward = sorted(f"{m} ({layer[m]}) imports {t} ({layer[t]})"
                    for m, ts in graph.items() for t in ts if m in rank and t in rank and rank[t] > rank[m])
    assert upward == []


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Depth-first search; a back edge closes a cycle, reported as its path."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def test_no_import_cycles(graph):
    assert find_cycles(graph) == []


def test_only_the_seam_loads_the_engine(graph):
    """In the converter only the tokenizer seam imports the compiled engine."""
    users = sorted(m for m, ts in graph.items() if ENGINE in ts and m.startswith("mergequant.convert"))
    assert users == [ENGINE_SEAM]


def test_analysis_sees_a_cycle_and_an_upward_import():
    """The analysis itself: relative, absolute and late imports, a package __init__ run by a submodule
    import, and both failures found on a small made-up graph."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d)
        (p / "quant").mkdir()
        (p / "quant" / "__init__.py").write_text("from ..convert import run\n")
        (p / "quant" / "low.py").write_text("import numpy\n")
        (p / "convert.py").write_text("def run():\n    from .quant import low\n")
        (p / "schemes.py").write_text("from mergequant.convert.quant.low import x\n")
        files = {"mergequant.convert.quant": p / "quant" / "__init__.py",
                 "mergequant.convert.quant.low": p / "quant" / "low.py",
                 "mergequant.convert.convert": p / "convert.py", "mergequant.convert.schemes": p / "schemes.py"}
        known = set(files)
        g = {n: imports_of(n, f, known) for n, f in files.items()}
    assert g["mergequant.convert.quant"] == {"mergequant.convert.convert"}
    assert g["mergequant.convert.quant.low"] == set()
    assert g["mergequant.convert.convert"] == {"mergequant.convert.quant", "mergequant.convert.quant.low"}
    assert g["mergequant.convert.schemes"] == {"mergequant.convert.quant", "mergequant.convert.quant.low"}
    rank = {"mergequant.convert.quant.low": 0, "mergequant.convert.schemes": 1, "mergequant.convert.convert": 2,
            "mergequant.convert.quant": 0}
    assert [(m, t) for m, ts in g.items() for t in ts if rank[t] > rank[m]] == [
        ("mergequant.convert.quant", "mergequant.convert.convert")]
    assert find_cycles(g) == [["mergequant.convert.convert", "mergequant.convert.quant", "mergequant.convert.convert"]]
