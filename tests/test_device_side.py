"""kiln/device_side/*.py runs ON devices (JetPack 4 ships Python 3.6): keep it 3.6 + stdlib.

Every .py file in kiln/device_side/ (discovered, not listed) is checked for
1. syntax: `ast.parse(source, feature_version=(3, 6))`, plus explicit checks for the
   newer syntax that feature_version lets through (see SYNTAX_GAPS below);
2. imports: module level = standard library of 3.6 only; the optional OPTIONAL_MODULES
   only inside functions; no `kiln` and no relative imports (the file is sent alone);
3. a short, explicit list of 3.7+ library APIs (FORBIDDEN_*), found by walking the AST.

The negative cases below prove each check rejects what it is meant to reject.
Not covered (on purpose, to stay small): other 3.7+ APIs and keyword arguments, new
`typing` names, and on CPython >= 3.12 the PEP 701 f-string forms (same quotes nested,
`#` or backslashes in the expression), which feature_version does not reject there.
"""
import ast
import sys
from pathlib import Path

import pytest

DEVICE_DIR = Path(__file__).resolve().parent.parent / "kiln" / "device_side"
DEVICE_FILES = sorted(DEVICE_DIR.glob("*.py"))

# Imported lazily, inside functions, by the subcommands that need them; optional on devices.
OPTIONAL_MODULES = frozenset({"numpy", "onnxruntime", "tensorrt", "cuda"})  # cuda: cuda-python, for INT8 calibration

# Standard-library modules that Python 3.6 does not have (sys.stdlib_module_names is the
# running interpreter's list). A name matches itself and its submodules.
POST_36_STDLIB = {
    "dataclasses": "3.7",
    "contextvars": "3.7",
    "_contextvars": "3.7",
    "importlib.resources": "3.7",
    "importlib.metadata": "3.8",
    "multiprocessing.shared_memory": "3.8",
    "graphlib": "3.9",
    "zoneinfo": "3.9",
    "_zoneinfo": "3.9",
    "tomllib": "3.11",
    "wsgiref.types": "3.11",
}

# 3.7+ functions, by qualified name (import aliases are resolved).
FORBIDDEN_NAMES = {
    "time.time_ns": "3.7",
    "time.monotonic_ns": "3.7",
    "time.perf_counter_ns": "3.7",
    "time.process_time_ns": "3.7",
    "time.thread_time_ns": "3.7",
    "time.clock_gettime_ns": "3.7",
    "asyncio.run": "3.7",
}
# Methods refused on any receiver (their names are distinctive enough).
FORBIDDEN_METHODS = {
    "isascii": "3.7 (str/bytes.isascii)",
    "fromisoformat": "3.7 (date/datetime/time.fromisoformat)",
    "removeprefix": "3.9 (str.removeprefix)",
    "removesuffix": "3.9 (str.removesuffix)",
}
# Keyword arguments of subprocess.* calls that 3.6 does not accept.
FORBIDDEN_SUBPROCESS_KWARGS = {
    "capture_output": "3.7 (use stdout=PIPE, stderr=PIPE)",
    "text": "3.7 (use universal_newlines=True)",
}


def _read(path):
    return path.read_text(encoding="utf-8")


# -- 1. syntax ------------------------------------------------------------------------

def _pos(node):
    return (node.lineno, node.col_offset)


def _end(node):
    return (node.end_lineno, node.end_col_offset)


def _bare_starred_tuple(node):
    """A Tuple with a *starred element and no parentheses of its own (3.8+ in return/yield/for)."""
    if not isinstance(node, ast.Tuple) or not any(isinstance(e, ast.Starred) for e in node.elts):
        return False
    # A parenthesised tuple's span includes its parentheses, so it starts before its first
    # element and ends after its last; a bare one shares an end with its last element.
    return not (_pos(node) < _pos(node.elts[0]) and _end(node) > _end(node.elts[-1]))


def _dotted(node):
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name)


def _continues_in(stmts):
    """`continue` statements in stmts that belong to no loop inside stmts."""
    found = []
    todo = list(stmts)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Continue):
            found.append(node)
        elif isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
            todo.extend(node.orelse)  # the body's continue targets this loop
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))
    return found


def syntax_gaps(tree):
    """Newer syntax that ast.parse(feature_version=(3, 6)) accepts (checked on CPython 3.11)."""
    out = []
    for node in ast.walk(tree):
        where = "line %d: " % getattr(node, "lineno", 0)
        if isinstance(node, ast.ImportFrom) and node.module == "__future__" and any(
                a.name == "annotations" for a in node.names):
            out.append(where + "`from __future__ import annotations` is 3.7+")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for d in node.decorator_list:
                if not _dotted(d.func if isinstance(d, ast.Call) else d):
                    out.append("line %d: decorator other than a dotted name or a call of one is 3.9+"
                               % d.lineno)
            args = getattr(node, "args", None)
            if args is not None and args.vararg is not None and isinstance(args.vararg.annotation, ast.Starred):
                out.append(where + "starred *args annotation is 3.11+")
        elif isinstance(node, (ast.Return, ast.Yield)) and _bare_starred_tuple(node.value):
            out.append(where + "unparenthesised *unpacking in return/yield is 3.8+")
        elif isinstance(node, (ast.For, ast.AsyncFor)) and _bare_starred_tuple(node.iter):
            out.append(where + "unparenthesised *unpacking in a for iterable is 3.9+")
        elif isinstance(node, ast.Subscript) and (
                isinstance(node.slice, ast.Starred) or _bare_starred_tuple(node.slice)):
            out.append(where + "*unpacking in a subscript is 3.11+")
        elif isinstance(node, ast.Try):
            for c in _continues_in(node.finalbody):
                out.append("line %d: `continue` in a finally block is 3.8+" % c.lineno)
    return out


def syntax_problems(source, filename="<snippet>"):
    try:
        tree = ast.parse(source, filename, feature_version=(3, 6))
    except SyntaxError as exc:
        return ["%s:%s: not Python 3.6 syntax: %s" % (filename, exc.lineno, exc.msg)]
    return ["%s: %s" % (filename, p) for p in syntax_gaps(tree)]


# -- 2. imports -----------------------------------------------------------------------

def _post_36(name):
    for m, version in POST_36_STDLIB.items():
        if name == m or name.startswith(m + "."):
            return version
    return None


def _imports(tree):
    """(node, module names, inside a function) for every import, including
    `__import__("x")` / `importlib.import_module("x")` with a literal name."""
    out = []

    def visit(node, in_function):
        if isinstance(node, ast.Import):
            out.append((node, [a.name for a in node.names], in_function))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                out.append((node, ["." * node.level + (node.module or "")], in_function))
            else:
                out.append((node, [node.module] + ["%s.%s" % (node.module, a.name) for a in node.names],
                            in_function))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Name) and node.func.id == "__import__")
                   or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"))):
            out.append((node, [node.args[0].value], in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return out


def import_problems(source, filename="<snippet>"):
    out = []
    for node, names, in_function in _imports(ast.parse(source, filename)):
        where = "%s:%d: " % (filename, node.lineno)
        first = names[0]
        root = first.split(".")[0]
        if first.startswith("."):
            out.append(where + "relative import %s (the file is sent alone to the device)" % first)
            continue
        if root == "kiln":
            out.append(where + "imports %s (the file is sent alone to the device)" % first)
        elif root in OPTIONAL_MODULES:
            if not in_function:
                out.append(where + "optional module %s imported at module level (import it inside "
                           "the function that needs it)" % first)
        elif root not in sys.stdlib_module_names:
            out.append(where + "%s is not in the standard library" % first)
        for name in names:
            version = _post_36(name)
            if version:
                out.append(where + "%s is new in Python %s" % (name, version))
                break
    return out


# -- 3. 3.7+ library calls --------------------------------------------------------------

def library_problems(source, filename="<snippet>"):
    tree = ast.parse(source, filename)
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and not node.level:
            for a in node.names:
                aliases[a.asname or a.name] = "%s.%s" % (node.module, a.name)

    def qualified(node):
        if isinstance(node, ast.Name):
            return aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = qualified(node.value)
            return base and base + "." + node.attr
        return None

    out = []
    for node in ast.walk(tree):
        where = "%s:%d: " % (filename, getattr(node, "lineno", 0))
        if isinstance(node, (ast.Name, ast.Attribute)):
            name = qualified(node)
            if name in FORBIDDEN_NAMES:
                out.append(where + "%s is new in Python %s" % (name, FORBIDDEN_NAMES[name]))
            if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_METHODS:
                out.append(where + ".%s() is new in Python %s" % (node.attr, FORBIDDEN_METHODS[node.attr]))
        elif isinstance(node, ast.ImportFrom) and not node.level:
            for a in node.names:
                name = "%s.%s" % (node.module, a.name)
                if name in FORBIDDEN_NAMES:
                    out.append(where + "%s is new in Python %s" % (name, FORBIDDEN_NAMES[name]))
        elif isinstance(node, ast.Call) and (qualified(node.func) or "").startswith("subprocess."):
            for kw in node.keywords:
                if kw.arg in FORBIDDEN_SUBPROCESS_KWARGS:
                    out.append(where + "%s(%s=...) is new in Python %s" % (
                        qualified(node.func), kw.arg, FORBIDDEN_SUBPROCESS_KWARGS[kw.arg]))
    return out


# -- the device-side files ------------------------------------------------------------

def test_device_files_are_discovered():
    names = {p.name for p in DEVICE_FILES}
    assert {"agent.py", "trt_api_build.py"} <= names, names


@pytest.mark.parametrize("path", DEVICE_FILES, ids=lambda p: p.name)
def test_python36_syntax(path):
    assert syntax_problems(_read(path), path.name) == []


@pytest.mark.parametrize("path", DEVICE_FILES, ids=lambda p: p.name)
def test_stdlib_imports_only(path):
    assert import_problems(_read(path), path.name) == []


@pytest.mark.parametrize("path", DEVICE_FILES, ids=lambda p: p.name)
def test_no_python37_library_calls(path):
    assert library_problems(_read(path), path.name) == []


# -- the checks reject what they must ---------------------------------------------------

# Valid on the interpreter running the tests, SyntaxError under feature_version=(3, 6).
REJECTED_BY_FEATURE_VERSION = {
    "walrus": "if (n := len(x)) > 1:\n    pass\n",
    "walrus_comprehension": "y = [z for v in x if (z := v)]\n",
    "positional_only": "def f(a, /, b):\n    pass\n",
    "fstring_self_documenting": "x = 1\ny = f'{x=}'\n",
    "match": "match x:\n    case 1:\n        pass\n",
    "parenthesised_with": "with (open('a') as a, open('b') as b):\n    pass\n",
    "except_star": "try:\n    pass\nexcept* ValueError:\n    pass\n",
}

# Accepted by ast.parse(feature_version=(3, 6)) on CPython 3.11, so checked explicitly.
SYNTAX_GAPS = {
    "future_annotations": "from __future__ import annotations\n",
    "future_annotations_among_others": "from __future__ import division, annotations\n",
    "relaxed_decorator": "@buttons[0].clicked.connect\ndef f():\n    pass\n",
    "lambda_decorator": "@(lambda f: f)\ndef f():\n    pass\n",
    "return_bare_unpack": "def f():\n    return 1, *a\n",
    "return_bare_unpack_parenthesised_first": "def f():\n    return (a), *b\n",
    "yield_bare_unpack": "def f():\n    yield 1, *a\n",
    "for_bare_unpack": "for x in *a, *b:\n    pass\n",
    "subscript_star": "a[*b]\n",
    "subscript_star_tuple": "a[1, *b]\n",
    "starred_vararg_annotation": "def f(*args: *Ts):\n    pass\n",
    "continue_in_finally": "for x in y:\n    try:\n        pass\n    finally:\n        continue\n",
    "continue_in_finally_if": "while x:\n    try:\n        pass\n    finally:\n        if x:\n            continue\n",
}

# Python 3.6 syntax close to the above: no check may flag it.
VALID_36 = {
    "future_other": "from __future__ import absolute_import, division, print_function\n",
    "decorators": "@a\n@a.b.c\n@a.b(1, *x, k=2)\ndef f():\n    pass\n",
    "return_parenthesised_unpack": "def f():\n    return (1, *a)\n",
    "return_tuple_starting_with_parens": "def f():\n    return (a, b)[0], c\n",
    "yield_parenthesised_unpack": "def f():\n    yield (1, *a)\n",
    "for_parenthesised_unpack": "for x in (*a, *b):\n    pass\n",
    "subscript_parenthesised_unpack": "a[(1, *b)]\n",
    "call_unpack": "f(*a, *b, **c, **d)\n",
    "continue_in_loop_in_finally": "try:\n    pass\nfinally:\n    for x in y:\n        continue\n",
    "fstring": "x = 1\ny = f'{x!r:>{10}} {\"q\"}'\n",
    "annotations_underscores_async":
        "n: int = 1_000\nasync def f(x):\n    async with x as y:\n        return [v async for v in y]\n",
}


@pytest.mark.parametrize("source", REJECTED_BY_FEATURE_VERSION.values(), ids=REJECTED_BY_FEATURE_VERSION)
def test_feature_version_rejects_newer_syntax(source):
    ast.parse(source)  # valid on this interpreter...
    with pytest.raises(SyntaxError):
        ast.parse(source, feature_version=(3, 6))  # ...but not in 3.6
    assert syntax_problems(source)


@pytest.mark.parametrize("source", SYNTAX_GAPS.values(), ids=SYNTAX_GAPS)
def test_syntax_gaps_are_detected(source):
    ast.parse(source)
    assert syntax_problems(source)


@pytest.mark.parametrize("source", VALID_36.values(), ids=VALID_36)
def test_python36_syntax_passes(source):
    assert syntax_problems(source) == []


@pytest.mark.xfail(sys.version_info >= (3, 12), strict=True,
                   reason="CPython >= 3.12 accepts PEP 701 f-strings whatever feature_version says")
def test_pep701_fstring_rejected():
    assert syntax_problems("d = {}\nx = f'{d['k']}'\n")


@pytest.mark.parametrize("source", [
    "import dataclasses\n",
    "import contextvars\n",
    "import importlib.metadata\n",
    "from importlib import metadata\n",
    "from importlib.resources import read_text\n",
    "import graphlib\n",
    "from zoneinfo import ZoneInfo\n",
    "import tomllib\n",
    "def f():\n    import dataclasses\n",
    "import numpy\n",
    "import numpy as np\n",
    "try:\n    import tensorrt\nexcept ImportError:\n    tensorrt = None\n",
    "from onnxruntime import InferenceSession\n",
    "import requests\n",
    "def f():\n    import requests\n",
    "import kiln.device_side.agent\n",
    "def f():\n    from kiln import config\n",
    "from . import agent\n",
    "from .agent import sha256_of\n",
    "import importlib\nm = importlib.import_module('yaml')\n",
    "m = __import__('numpy')\n",
])
def test_import_check_rejects(source):
    assert import_problems(source)


def test_import_check_allows():
    source = ("import os, sys\nimport urllib.request\nfrom importlib import import_module\n"
              "def f():\n    import numpy as np\n    import onnxruntime as ort\n"
              "    try:\n        import tensorrt as trt\n    except ImportError:\n        trt = None\n"
              "    from numpy.lib import format\n    import shutil\n    return __import__('numpy')\n")
    assert import_problems(source) == []


@pytest.mark.parametrize("source", [
    "import subprocess\nsubprocess.run(['ls'], capture_output=True)\n",
    "import subprocess\nsubprocess.run(['ls'], text=True)\n",
    "import subprocess as sp\nsp.check_output(['ls'], text=True)\n",
    "from subprocess import run\nrun(['ls'], capture_output=True)\n",
    "import time\nt = time.time_ns()\n",
    "import time\nclock = time.perf_counter_ns\n",
    "from time import time_ns\n",
    "ok = 'abc'.isascii()\n",
    "import datetime\nd = datetime.datetime.fromisoformat('2020-01-01')\n",
    "from datetime import date\nd = date.fromisoformat('2020-01-01')\n",
    "import asyncio\nasyncio.run(main())\n",
    "s = 'v1.2'.removeprefix('v')\n",
])
def test_library_check_rejects(source):
    assert library_problems(source)


def test_library_check_allows():
    source = ("import subprocess, time, datetime\n"
              "p = subprocess.run(['ls'], stdout=subprocess.PIPE, stderr=subprocess.PIPE,\n"
              "                   universal_newlines=True, check=False)\n"
              "t = time.time() + time.perf_counter() + time.monotonic()\n"
              "d = datetime.datetime.strptime('2020-01-01', '%Y-%m-%d')\n"
              "ok = 'abc'.isdigit() and 'abc'.startswith('a')\n"
              "text = {'text': 1}\nf(text=True)\n")
    assert library_problems(source) == []
