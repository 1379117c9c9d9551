"""The layer order of DESIGN.md §3, enforced: every gammatrace import — module-level and
function-level — goes to the module's own layer or a lower one, and the module graph has
no cycle. Function-level imports are allowed only for optional third-party packages.

Run ``python tests/test_layers.py`` to print the import graph between layers and the
line counts per layer.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gammatrace"

# Bottom to top; a module may import its own layer or any lower one.
LAYERS: list[tuple[str, ...]] = [
    ("_version", "registry", "errors", "cliopts", "principles", "machine"),
    ("curvature",),
    ("probe",),
    ("data", "models"),
    ("techniques",),
    ("config",),
    ("store",),
    ("executors",),
    ("engine",),
    ("analysis",),
    ("landscape",),
    ("reporting",),
    ("experiments",),
    ("integrations",),
    ("cli", "__main__"),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}

# Third-party packages that may be imported inside a function, with a comment saying why:
# optional extras (ray, the integrations' frameworks, object storage: fsspec, s3fs, its aiobotocore) and packages costly to
# load that most commands never use (plotting, the dataset generators, numba's compiler).
LAZY_THIRD_PARTY = {"ray", "matplotlib", "mnist1d", "sklearn", "scipy", "numba", "pandas", "lightning",
                    "pytorch_lightning", "transformers", "tensorboard", "wandb", "fsspec", "s3fs",
                    "boto3", "aiobotocore", "PIL", "llvmlite"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "gammatrace":
        return None
    return parts[1] if len(parts) > 1 else ""  # "" is the package root (the public façade)


def imports(path: Path, root: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import statement in a file.

    "Inside a function" also holds for an import without a comment on its line or the
    line above when it is inside a function: the caller checks the comment separately.
    """
    mod = module_name(path, root)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                # `from pkg import sub` may import a submodule: count the finer name when it exists.
                for a in child.names:
                    sub = f"{target}.{a.name}"
                    is_mod = (root.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                        (root.parent / Path(*sub.split("."))).is_dir()
                    out.append((sub if is_mod else target, child.lineno, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text()), False)
    return out


def _commented(text: list[str], line: int) -> bool:
    """A comment on the import's line, or above the block of imports it belongs to."""
    if "#" in text[line - 1]:
        return True
    i = line - 2
    while i >= 0 and text[i].strip().startswith(("import ", "from ")):
        i -= 1
    return i >= 0 and text[i].strip().startswith("#")


def violations(root: Path = PACKAGE) -> list[str]:
    problems: list[str] = []
    graph: dict[str, set[str]] = defaultdict(set)
    for path in sorted(root.rglob("*.py")):
        mod = module_name(path, root)
        text = path.read_text().splitlines()
        src = layer_of(mod)
        if src not in RANK and src != "":
            problems.append(f"{mod}: layer '{src}' is not in the layer order (tests/test_layers.py LAYERS)")
            continue
        for target, line, in_function in imports(path, root):
            dst = layer_of(target)
            where = f"{path.relative_to(root.parent)}:{line}"
            if dst is None:
                top = target.split(".")[0]
                if in_function and top not in LAZY_THIRD_PARTY:
                    problems.append(f"{where}: function-level import of '{target}' (only optional third-party "
                                    "packages may be imported inside a function)")
                elif in_function and not _commented(text, line):
                    problems.append(f"{where}: function-level import of '{target}' without a comment saying why")
                continue
            if in_function:
                problems.append(f"{where}: function-level import of '{target}' (gammatrace modules are imported "
                                "at module level; a cycle or an upward edge is a layering bug)")
            if src == "":
                continue  # the package root is the public façade and sits above everything
            if dst == "":
                problems.append(f"{where}: imports the package root 'gammatrace' (import the defining module)")
                continue
            if dst not in RANK:
                problems.append(f"{where}: imports '{target}', whose layer is not in the layer order")
                continue
            if RANK[dst] > RANK[src]:
                problems.append(f"{where}: upward import {src} -> {dst} ('{target}')")
            if target != mod:
                graph[mod].add(target)
    problems += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One representative cycle per strongly connected component (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def resolve(name: str) -> str:
        # `gammatrace.data` means its __init__; edges into a package go to that node.
        return name

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in map(resolve, graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp) + [sorted(comp)[0]])

    # Deep import chains need more than the default depth; restored, because other tests
    # (the config fuzz) depend on the interpreter's usual limit.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10000))
    try:
        for v in list(graph):
            if v not in index:
                strong(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def test_layers_and_cycles():
    problems = violations()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("planted, expected", [
    ("from gammatrace.cli import main\n", "upward import probe -> cli"),
    ("def f():\n    from gammatrace.principles import derive\n", "function-level import of 'gammatrace.principles'"),
    ("import gammatrace\n", "imports the package root"),
    ("def f():\n    import json\n", "function-level import of 'json'"),
    ("def f():\n    import matplotlib\n", "without a comment"),
])
def test_planted_violation_is_caught(tmp_path, planted, expected):
    import shutil

    root = tmp_path / "gammatrace"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "probe" / "planted.py").write_text(planted)
    assert any(expected in p for p in violations(root)), violations(root)


def test_planted_cycle_is_caught(tmp_path):
    import shutil

    root = tmp_path / "gammatrace"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "store" / "a_.py").write_text("from gammatrace.store import b_\n")
    (root / "store" / "b_.py").write_text("from gammatrace.store import a_\n")
    assert any(p.startswith("import cycle") and "gammatrace.store.a_" in p for p in violations(root))


def test_import_gammatrace_loads_no_plotting():
    import subprocess

    code = ("import sys, gammatrace; assert 'matplotlib' not in sys.modules, 'matplotlib'; "
            "assert 'gammatrace.reporting' not in sys.modules, 'reporting'; "
            "print(gammatrace.train.__module__, gammatrace.report.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["gammatrace.analysis", "gammatrace.reporting.build"]


def _print_graph() -> None:
    edges: dict[tuple[str, str], int] = defaultdict(int)
    lines: dict[str, int] = defaultdict(int)
    for path in sorted(PACKAGE.rglob("*.py")):
        src = layer_of(module_name(path, PACKAGE)) or "(root)"
        lines[src] += len(path.read_text().splitlines())
        for target, _, _ in imports(path, PACKAGE):
            dst = layer_of(target)
            if dst is not None and dst != src:
                edges[(src, dst or "(root)")] += 1
    order = [n for names in LAYERS for n in names] + ["(root)"]
    for src in order:
        if src in lines:
            outs = ", ".join(f"{d}×{n}" for (s, d), n in sorted(edges.items(), key=lambda e: order.index(e[0][1]))
                             if s == src)
            print(f"{src:<12} {lines[src]:>6} lines  -> {outs or '-'}")


if __name__ == "__main__":
    _print_graph()
    print("\n".join(violations()) or "no violations")
