"""Every public module of gammatrace shows an example that runs, and every skipped one says why.

pytest runs the examples themselves: pyproject.toml puts ``gammatrace`` among the test paths
with ``--doctest-modules``, so a new module's examples run without being listed anywhere.
This file checks what doctest cannot, for every module found by walking the package's files:

* A public module has at least one example that runs: a ``>>>`` example not under
  ``+SKIP``. Public: no part of the dotted name starts with ``_`` (a package's
  ``__init__.py`` stands for the package; ``__main__`` is private) and it is not a
  ``conftest``.
* ``+SKIP`` states its reason, as a comment in front of the directive on the same line
  (``SKIP_CONVENTION`` below shows it). doctest reads only the option names after
  ``# doctest:`` (anything else there is an error), so the reason comes before it. A
  skipped example that directly follows a skipped example with a reason, in the same
  docstring, shares that reason (the second line of ``SKIP_CONVENTION``). Reasons that
  justify a skip: a data folder the user has, a GPU, a trained run or a long training,
  a Ray instance. Anything that can run in under a second should run instead.
* Collecting the examples imports every module, so no module imports an optional
  dependency (``[project.optional-dependencies]``: ray, pytest, ...) when it is imported:
  such imports belong inside the function that needs them.

Each check is shown to fail on a planted package (``test_checks_catch_a_planted_package``).
"""

from __future__ import annotations

import ast
import doctest
import functools
import importlib
import io
import re
import sys
import textwrap
import tokenize
import tomllib
from pathlib import Path

import gammatrace

PACKAGE_DIR = Path(gammatrace.__file__).parent
PYPROJECT = PACKAGE_DIR.parent / "pyproject.toml"
# Not in a docstring, where doctest would collect it.
SKIP_CONVENTION = """
>>> ds = load_dataset("cifar10", data_dir="/datasets")  # needs CIFAR-10 in /datasets  # doctest: +SKIP
>>> ds.num_classes  # doctest: +SKIP
10
"""
DIRECTIVE = re.compile(r"#\s*doctest:(?P<options>[^\n'\"]*)$")


def modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file of every module under ``root`` (the package ``package``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join([package, *parts])] = path
    return out


def is_public(name: str) -> bool:
    parts = name.split(".")
    return not any(p.startswith("_") for p in parts) and parts[-1] != "conftest"


def doctests(name: str) -> list[doctest.DocTest]:
    """The examples pytest collects from module ``name`` (docstrings of what it defines)."""
    return doctest.DocTestFinder().find(importlib.import_module(name), name)


def skip_reason(example: doctest.Example) -> str | None:
    """The comment in front of ``# doctest: +SKIP`` on the directive's line, or None."""
    try:
        comments = [t.string for t in tokenize.generate_tokens(io.StringIO(example.source).readline)
                    if t.type == tokenize.COMMENT]
    except (tokenize.TokenError, SyntaxError):
        comments = [line[line.index("#"):] for line in example.source.splitlines() if "#" in line]
    for comment in comments:
        match = DIRECTIVE.search(comment)
        if match and "+SKIP" in match["options"]:
            reason = comment[:match.start()].strip().lstrip("#").strip()
            return reason if re.search(r"[A-Za-z]{3}", reason) else None
    return None


def where(test: doctest.DocTest, example: doctest.Example) -> str:
    """``file:line`` of an example (the file relative to the repository when inside it)."""
    path = Path(test.filename)
    if path.is_relative_to(PACKAGE_DIR.parent):
        path = path.relative_to(PACKAGE_DIR.parent)
    return f"{path}:{(test.lineno or 0) + example.lineno + 1}"


def example_problems(root: Path, package: str) -> tuple[list[str], list[str]]:
    """(public modules without a running example, skipped examples without a reason)."""
    missing, unexplained = [], []
    for name in modules(root, package):
        if not is_public(name):
            continue
        try:
            tests = doctests(name)
        except Exception as e:  # report every module, not only the first that fails
            missing.append(f"{name} (cannot be imported: {type(e).__name__}: {e})")
            continue
        running = 0
        for test in tests:
            explained = False  # the previous example was skipped with a reason
            for ex in test.examples:
                if not ex.options.get(doctest.SKIP, False):
                    running, explained = running + 1, False
                    continue
                explained = skip_reason(ex) is not None or explained
                if not explained:
                    first = ex.source.splitlines()[0]
                    unexplained.append(f"{where(test, ex)} {test.name}: {first.strip()}")
        if not running:
            missing.append(name)
    return missing, unexplained


def optional_packages(pyproject: Path = PYPROJECT) -> set[str]:
    """Import names of every optional dependency of the project (all extras)."""
    extras = tomllib.loads(pyproject.read_text())["project"].get("optional-dependencies", {})
    names = set()
    for requirements in extras.values():
        for req in requirements:
            names.add(re.match(r"[A-Za-z0-9_.-]+", req)[0].lower().replace("-", "_"))
    return names


def _catches_import_error(node: ast.Try) -> bool:
    def names(t: ast.expr | None) -> list[str]:
        if t is None:
            return ["BaseException"]
        elts = t.elts if isinstance(t, ast.Tuple) else [t]
        return [e.id for e in elts if isinstance(e, ast.Name)]

    caught = {n for h in node.handlers for n in names(h.type)}
    return bool(caught & {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"})


def import_time_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, top-level package) of each import that runs when the module is imported.

    Function bodies run later; ``if TYPE_CHECKING:`` never runs; a ``try`` that catches
    ImportError is guarded.
    """
    out: list[tuple[int, str]] = []

    def visit(stmts: list[ast.stmt]) -> None:
        for node in stmts:
            if isinstance(node, ast.Import):
                out.extend((node.lineno, a.name.split(".")[0]) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                out.append((node.lineno, node.module.split(".")[0]))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
            elif isinstance(node, ast.Try) and _catches_import_error(node):
                for clause in node.handlers:  # the guarded body may fail; its fallback runs
                    visit(clause.body)
                visit(node.orelse)
                visit(node.finalbody)
            else:  # class bodies and compound statements run at import
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(node, field, []))
                for clause in getattr(node, "handlers", []) + getattr(node, "cases", []):
                    visit(clause.body)

    visit(tree.body)
    return out


def optional_import_problems(root: Path, package: str, optional: set[str]) -> list[str]:
    return [f"{name}:{line} imports {top} when imported (an optional dependency: import it inside "
            "the function that needs it)"
            for name, path in modules(root, package).items()
            for line, top in import_time_imports(ast.parse(path.read_text()))
            if top in optional]


# ----------------------------------------------------------------------------- the package


def test_the_package_is_a_doctest_path():
    options = tomllib.loads(PYPROJECT.read_text())["tool"]["pytest"]["ini_options"]
    assert "gammatrace" in options["testpaths"]
    assert "--doctest-modules" in options["addopts"].split()


@functools.cache
def package_problems() -> tuple[list[str], list[str]]:
    return example_problems(PACKAGE_DIR, "gammatrace")


def test_every_public_module_has_an_example_that_runs():
    missing, _ = package_problems()
    assert not missing, "public modules without a running >>> example:\n  " + "\n  ".join(missing)


def test_every_skip_states_its_reason():
    _, unexplained = package_problems()
    assert not unexplained, ("+SKIP without a reason (write `# <reason>  # doctest: +SKIP`):\n  "
                             + "\n  ".join(unexplained))


def test_no_module_imports_an_optional_dependency_when_imported():
    optional = optional_packages()
    assert "ray" in optional  # the check reads the extras it is meant to guard
    problems = optional_import_problems(PACKAGE_DIR, "gammatrace", optional)
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- the checks fail


PLANTED = {
    "__init__.py": '''
        """A package.

        >>> 1 + 1
        2
        """
    ''',
    "bare.py": '''
        """A public module whose docstring shows no example."""

        def f():
            """Nor does this one."""
    ''',
    "only_skipped.py": '''
        """Every example skipped (with a reason).

        >>> 1 + 1  # needs a GPU  # doctest: +SKIP
        3
        """
    ''',
    "unexplained.py": '''
        """One example runs; one is skipped with no reason.

        >>> 1 + 1
        2
        """

        def g():
            """
            >>> g()  # doctest: +SKIP
            >>> g()  # doctest:+SKIP,+ELLIPSIS
            """
    ''',
    "explained.py": '''
        """A reason on the first line of a run of skipped examples covers the run.

        >>> 2 * 3
        6
        >>> ds = load("cifar10")  # needs a CIFAR-10 folder  # doctest: +SKIP
        >>> ds.n_train  # doctest: +SKIP
        50000
        >>> "# not a comment"  # needs the GPU  # doctest: +SKIP
        '# not a comment'
        """
    ''',
    "eager.py": '''
        """Imports an optional dependency at import time.

        >>> 1
        1
        """
        import pytest  # flagged: an optional (dev) dependency, imported with the module
        from typing import TYPE_CHECKING

        if TYPE_CHECKING:
            import ray  # never runs: fine

        try:
            import ray  # guarded: fine
        except ImportError:
            ray = None


        def f():
            import ray  # runs when called: fine
    ''',
    "_private.py": '''
        """Private: no example needed."""
    ''',
    "sub/__init__.py": '''
        """A subpackage with no example."""
    ''',
}


def test_checks_catch_a_planted_package(tmp_path, monkeypatch):
    package = "gammatrace_planted_doctests"
    root = tmp_path / package
    for rel, text in PLANTED.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text).lstrip())
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        missing, unexplained = example_problems(root, package)
    finally:
        for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
            del sys.modules[name]
    assert missing == [f"{package}.bare", f"{package}.only_skipped", f"{package}.sub"]
    assert [u.split(" ", 1)[1] for u in unexplained] == [
        f"{package}.unexplained.g: g()  # doctest: +SKIP",
        f"{package}.unexplained.g: g()  # doctest:+SKIP,+ELLIPSIS",
    ]
    assert unexplained[0].split(" ")[0].endswith("unexplained.py:9")
    assert optional_import_problems(root, package, {"pytest", "ray"}) == [
        f"{package}.eager:6 imports pytest when imported (an optional dependency: import it inside "
        "the function that needs it)"]


def test_skip_reason_convention():
    def reason(source: str) -> str | None:
        return skip_reason(doctest.DocTestParser().get_examples(source)[0])

    first, second = doctest.DocTestParser().get_examples(SKIP_CONVENTION)
    assert first.options == second.options == {doctest.SKIP: True}  # doctest accepts the form
    assert skip_reason(first) == "needs CIFAR-10 in /datasets" and skip_reason(second) is None

    assert reason(">>> f()  # needs a CIFAR folder  # doctest: +SKIP\n") == "needs a CIFAR folder"
    assert reason(">>> f(1,\n...   2)  # a GPU  # doctest: +SKIP\n") == "a GPU"
    assert reason(">>> f()  # doctest: +SKIP\n") is None
    assert reason(">>> f()  #  # doctest: +SKIP\n") is None
    assert reason(">>> f('# x')  # doctest: +SKIP\n") is None  # a '#' in a string is no comment
    assert reason(">>> f()  # needs a GPU  # doctest: +ELLIPSIS\n") is None  # not a skip
