"""The Python API reference, docs/api.md, is generated from the docstrings (docs/gen_api.py) and
current; every public name has a numpydoc docstring with the sections it needs; and the
docstrings' examples run, as doctests against the installed pybn.

The docstrings are read from the source files with `ast` (through docs/gen_api.py's parser), not
from the installed package, which may be older than the source tree."""
import ast
import doctest
import importlib.util
import io
import os
import subprocess
import sys

import numpy as np
import pytest

import pybn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GEN = os.path.join(ROOT, "docs", "gen_api.py")


def _load_generator():
    spec = importlib.util.spec_from_file_location("pybn_docs_gen_api", GEN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen = _load_generator()
SECTIONS = gen.public_entries()
ENTRIES = {e.qualname: e for _, _, entries in SECTIONS for e in entries}

# the methods of the layer that must be documented (the public interface of BatchNorm)
LAYER_METHODS = ["forward", "__call__", "backward", "train", "eval", "fold_into", "state_dict", "load_state_dict"]
# public objects that raise nothing themselves (no Raises section needed); checked against the source below
NO_RAISE = {"get_include", "get_library_dir", "get_cmake_dir", "get_pkgconfig_dir", "has_cuda", "cpu_isa",
            "cpu_isas", "get_num_threads", "memory_pool_info", "__version__", "BatchNorm.train", "BatchNorm.eval",
            "BatchNorm.state_dict"}


def test_api_md_is_current():
    """docs/api.md is exactly what `python docs/gen_api.py` writes from the docstrings now."""
    p = subprocess.run([sys.executable, GEN, "--check"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (f"docs/api.md is stale: run `python docs/gen_api.py` from the repository root\n"
                               f"{p.stdout}\n{p.stderr}")


def test_every_public_name_is_documented():
    """pybn.__all__ (from the source), pybn.distributed.__all__ and the layer's methods all have an entry."""
    public = gen.module("").all_names()
    assert "batchnorm" in public and "BatchNorm" in public
    short = {e.short for e in ENTRIES.values()}
    assert set(public) <= short, f"not in docs/api.md: {sorted(set(public) - short)}"
    dist = {"distributed." + n for n in gen.module("distributed").all_names()}
    assert "distributed.SyncBatchNorm" in dist and dist <= short, sorted(dist - short)
    assert {f"BatchNorm.{m}" for m in LAYER_METHODS} <= short
    assert [title for title, _, _ in SECTIONS][:6] == ["Functional API", "Composable primitives", "Folding",
                                                       "The layer", "Distributed", "Library helpers"]


def _own_nodes(fn):
    """The nodes of a function's body, without those of nested classes."""
    stack = list(fn.body)
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, ast.ClassDef):
            stack.extend(ast.iter_child_nodes(node))


def _returns_value(entry):
    fn = entry.node
    if not isinstance(fn, ast.FunctionDef):
        return False
    if fn.returns is not None and not (isinstance(fn.returns, ast.Constant) and fn.returns.value is None):
        return True
    return any(isinstance(n, ast.Return) and n.value is not None and not
               (isinstance(n.value, ast.Constant) and n.value.value is None) for n in _own_nodes(fn))


def _raised(entry):
    """Exception classes the object's own code raises (`raise TypeError(...)`)."""
    fn = entry.function
    if fn is None:
        return set()
    names = set()
    for n in _own_nodes(fn):
        if isinstance(n, ast.Raise) and n.exc is not None:
            exc = n.exc.func if isinstance(n.exc, ast.Call) else n.exc
            if isinstance(exc, ast.Name) and exc.id[:1].isupper():
                names.add(exc.id)
    return names


@pytest.mark.parametrize("qualname", sorted(ENTRIES))
def test_numpydoc_sections(qualname):
    """Parameters (every parameter, stream included), Returns, Raises and Examples where due."""
    e = ENTRIES[qualname]
    assert e.doc, f"{qualname} ({e.module.relpath}) has no docstring"
    d = gen.Docstring(e.doc)
    problems = []
    if not d.summary:
        problems.append("no summary line")
    params = [p.lstrip("*") for p in e.parameters()]
    documented = [n.lstrip("*") for n in d.documented_parameters()]
    if params and not d.has("Parameters"):
        problems.append("no Parameters section")
    missing = [p for p in params if p not in documented]
    unknown = [n for n in documented if n not in params]
    if missing:
        problems.append(f"parameters not documented: {missing}")
    in_order = [n for n in documented if n in params]
    if in_order != sorted(in_order, key=params.index):
        problems.append(f"parameters documented out of the signature's order: {in_order}")
    untyped = [it.head for it in d.items("Parameters") if " : " not in it.head and not it.head.startswith("*")]
    if untyped:
        problems.append(f"parameters without a type: {untyped}")
    if unknown:
        problems.append(f"documented parameters that do not exist: {unknown}")
    if _returns_value(e) and not d.has("Returns"):
        problems.append("returns a value but has no Returns section")
    if isinstance(e.node, ast.FunctionDef) and isinstance(e.node.returns, ast.Constant) \
            and e.node.returns.value is None and d.has("Returns"):
        problems.append("returns None but has a Returns section")
    raised = _raised(e)
    if e.short in NO_RAISE:
        if raised:
            problems.append(f"raises {sorted(raised)}: document them in a Raises section (and drop it from NO_RAISE)")
    else:
        if not d.has("Raises"):
            problems.append("no Raises section")
        listed = {n for it in d.items("Raises") for n in it.names}
        if raised - listed:
            problems.append(f"raises {sorted(raised - listed)} but the Raises section does not list them")
    if not d.has("Examples"):
        problems.append("no Examples section")
    assert not problems, f"{qualname} ({e.module.relpath}): " + "; ".join(problems)


def _doctests():
    """name -> (docstring, file, line) of every docstring with examples: the public objects' and
    their modules'."""
    out = {}
    for title, intro, entries in SECTIONS:
        for e in ([intro] if intro is not None else []) + entries:
            if e.doc and ">>>" in e.doc:
                out[e.qualname] = (e.doc, str(e.module.path), getattr(e.node, "lineno", 0))
    pkg = gen.module("")
    doc = ast.get_docstring(pkg.tree)
    if doc and ">>>" in doc:
        out["pybn"] = (doc, str(pkg.path), 0)
    return out


DOCTESTS = _doctests()


def test_docstrings_have_examples_to_run():
    assert len(DOCTESTS) >= 30, sorted(DOCTESTS)


@pytest.mark.parametrize("name", sorted(DOCTESTS))
def test_docstring_examples_run(name):
    doc, filename, lineno = DOCTESTS[name]
    if "mpi4py" in doc:
        pytest.importorskip("mpi4py.MPI", reason="mpi4py is not installed (pip install 'pybn-kernels[mpi]')")
    test = doctest.DocTestParser().get_doctest(doc, {"np": np, "pybn": pybn}, name, filename, lineno)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    report = io.StringIO()
    result = runner.run(test, out=report.write)
    assert result.failed == 0, f"{name} ({filename}): {result.failed} of {result.attempted} examples failed\n" \
                               + report.getvalue()


@pytest.mark.parametrize("path", sorted({str(e.module.path) for e in ENTRIES.values()}))
def test_docstring_lines_fit(path):
    """Docstring lines are at most 120 characters."""
    text = open(path, encoding="utf-8").read()
    lines = text.split("\n")
    long = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            long += [i + 1 for i in range(node.lineno - 1, node.end_lineno) if len(lines[i]) > 120]
    assert not long, f"{path}: docstring lines over 120 characters: {long}"
