"""The architecture as an executable contract: one import root, no import cycles, the layer rule, small
sub-packages that state their contracts.  Imports are read with ``ast`` (every ``import`` statement, also
those inside functions and ``TYPE_CHECKING`` blocks: a cycle hidden in a function is still a cycle)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("operators", "pipeline")


def _modules() -> dict[str, Path]:
    """``liquidstream.<dotted>`` -> file, for every module of both packages."""
    out = {}
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(["liquidstream", *parts])] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    found: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names} & known
            found.update(subs)
            if len(subs) < len(node.names):  # some name is an attribute of ``base`` itself
                found.add(base)
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_operators_never_import_pipeline() -> None:
    bad = {m: sorted(d for d in deps if d.startswith("liquidstream.pipeline"))
           for m, deps in _graph().items() if m.startswith("liquidstream.operators")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_one_import_root() -> None:
    """Code imports ``liquidstream.*`` only: the bare ``operators`` / ``pipeline`` names are not installed."""
    offenders = []
    for top in (*PACKAGES, "tests", "benchmarks"):
        for path in (ROOT / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in PACKAGES]
    assert offenders == []
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["liquidstream*"]


def test_pipeline_is_cut_into_sub_packages() -> None:
    flat = sorted(p.name for p in (ROOT / "pipeline").glob("*.py"))
    assert len(flat) <= 12, flat


@pytest.mark.parametrize("package", sorted(
    str(p.parent.relative_to(ROOT)) for top in PACKAGES for p in (ROOT / top).rglob("__init__.py")))
def test_every_package_states_its_contract(package: str) -> None:
    tree = ast.parse((ROOT / package / "__init__.py").read_text(encoding="utf-8"))
    doc = ast.get_docstring(tree)
    assert doc and len(doc) > 80, f"{package}/__init__.py needs a docstring stating the package's contract"
    assert any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in n.targets)
               for n in tree.body), f"{package}/__init__.py needs a short __all__"


def test_every_doctest_runs_under_make_test() -> None:
    """pytest collects the doctests of every module through ``liquidstream/`` (the installed names)."""
    opts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--doctest-modules" in opts["addopts"] and "liquidstream" in opts["testpaths"]
    for top in PACKAGES:
        assert (ROOT / "liquidstream" / top).resolve() == (ROOT / top).resolve()
