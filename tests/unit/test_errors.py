"""One reason vocabulary (every reason literal in the code base is a member of ``Reason``) and
one error tree (every exception class of the project is defined in an errors module and drawn,
as it is, in ``engine.errors``' docstring)."""

from __future__ import annotations

import ast
import builtins
import importlib
import re
from pathlib import Path

# Imported for their error classes, which the second test walks.
import engine.errors
import engine.fetch
import engine.images
import engine.inference
import model_build.torch_pickle
from engine.errors import Reason, TridentError

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("schemas", "engine", "worker", "query_api", "producer", "devstack", "reembed")
# reason="x", reason = "x", and the two branches of reason = "x" if ... else "y"
_LITERAL = re.compile(r"""\breason\s*[:=][^=\n]*?["']([a-z0-9_]+)["']""")
_ELSE = re.compile(r"""\breason\s*=.*\belse\s+["']([a-z0-9_]+)["']""")


def _reason_literals() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                for pattern in (_LITERAL, _ELSE):
                    for match in pattern.finditer(line):
                        where = f"{path.relative_to(REPO)}:{number}"
                        found.setdefault(match.group(1), []).append(where)
    return found


def test_every_reason_in_the_code_is_enumerated() -> None:
    literals = _reason_literals()
    assert "malformed_json" in literals  # the scan finds the contracts' reasons
    unknown = {reason: where for reason, where in literals.items() if reason not in set(Reason)}
    assert unknown == {}, f"add these to engine.errors.Reason: {unknown}"


def test_every_error_class_default_reason_is_enumerated() -> None:
    assert engine.fetch and engine.images and engine.inference and model_build.torch_pickle

    def subclasses(cls: type[TridentError]) -> list[type[TridentError]]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    for cls in subclasses(TridentError):
        assert cls.reason in set(Reason), cls


# One error tree ------------------------------------------------------------------------------

ALL_PACKAGES = (
    "schemas",
    "producer",
    "worker",
    "query_api",
    "engine",
    "jax_embedding",
    "model_build",
    "devstack",
    "reembed",
)
ERROR_MODULES = ("engine/errors.py", "schemas/errors.py", "devstack/errors.py")
# A base named like this is an exception of a library (grpc.RpcError, httpx.HTTPError, ...).
_EXCEPTION_SUFFIXES = ("Error", "Exception", "Warning")
_BUILTIN_EXCEPTIONS = {
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
}


def _sources() -> dict[str, ast.Module]:
    return {
        str(path.relative_to(REPO)): ast.parse(path.read_text(), str(path))
        for package in ALL_PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
    }


def _exception_classes(sources: dict[str, ast.Module]) -> dict[str, str]:
    """Every exception class the sources define: name -> where (file:line)."""
    classes = [
        (node, where)
        for where, tree in sources.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
    ]
    found: dict[str, str] = {}
    grew = True
    while grew:  # a class is an exception when one of its bases is (known so far)
        grew = False
        for node, where in classes:
            bases = {ast.unparse(base).rsplit(".", 1)[-1] for base in node.bases}
            if node.name not in found and any(
                base in found or base in _BUILTIN_EXCEPTIONS or base.endswith(_EXCEPTION_SUFFIXES)
                for base in bases
            ):
                found[node.name] = f"{where}:{node.lineno}"
                grew = True
    return found


def _raised_names(sources: dict[str, ast.Module]) -> dict[str, list[str]]:
    """The class names in ``raise X(...)``, ``raise X`` and ``raise module.X(...)``."""
    raised: dict[str, list[str]] = {}
    for where, tree in sources.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            name = ast.unparse(target).rsplit(".", 1)[-1]
            raised.setdefault(name, []).append(f"{where}:{node.lineno}")
    return raised


def _drawn_tree() -> dict[str, str | None]:
    """The tree in engine.errors' docstring: each class drawn -> the class drawn above it."""
    doc = engine.errors.__doc__ or ""
    block = doc.split("::\n", 1)[1]
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in block.splitlines():
        match = re.match(r"^    [\s│├└─]*?([a-z_.]*[A-Z]\w*)(\s|$)", line)
        if match is None:
            continue
        depth = match.start(1) // 4
        stack = [(d, n) for d, n in stack if d < depth]
        parents[match.group(1)] = stack[-1][1] if stack else None
        stack.append((depth, match.group(1)))
    return parents


def _resolve(drawn: str) -> type[BaseException]:
    module, _, name = drawn.rpartition(".")
    where = importlib.import_module(module) if module else engine.errors
    found = getattr(where, name, None) or getattr(builtins, name)
    assert isinstance(found, type) and issubclass(found, BaseException), drawn
    return found


def test_every_exception_class_is_defined_in_an_errors_module() -> None:
    defined = _exception_classes(_sources())
    assert {"TridentError", "ContractError", "StackError", "BatchAbandonedError"} <= set(defined)
    elsewhere = {
        name: where for name, where in defined.items() if where.split(":")[0] not in ERROR_MODULES
    }
    assert elsewhere == {}, "move these into an errors module (and draw them in engine.errors)"


def test_every_raised_project_exception_is_drawn_in_the_tree() -> None:
    sources = _sources()
    defined = _exception_classes(sources)
    drawn = {name.rsplit(".", 1)[-1] for name in _drawn_tree()}
    raised = _raised_names(sources)
    assert {"StoreUnavailableError", "EventLimitError", "StackError"} <= set(raised)
    missing = {name: raised[name] for name in raised if name in defined and name not in drawn}
    assert missing == {}, "draw these in engine/errors.py's docstring tree"


def test_the_drawn_tree_is_the_real_one() -> None:
    tree = _drawn_tree()
    assert {"Exception", "TridentError", "schemas.errors.EventLimitError"} <= set(tree)
    for drawn, parent in tree.items():
        cls = _resolve(drawn)
        if parent is not None:
            assert _resolve(parent) in cls.__bases__, f"{drawn} is drawn under {parent}"
    # A second base is drawn as "(also ValueError)".
    doc = engine.errors.__doc__ or ""
    for name, also in re.findall(r"(\w+)\s+\(also (\w+)\)", doc):
        assert _resolve(also) in _resolve(name).__bases__, f"{name} is drawn as also {also}"
    # ... and every class of the errors modules is in it.
    defined = _exception_classes(_sources())
    assert set(defined) == {name.rsplit(".", 1)[-1] for name in tree} - _BUILTIN_EXCEPTIONS


def test_the_scan_finds_a_class_outside_the_tree() -> None:
    # The scanner itself: a class defined (and raised) outside an errors module is found.
    source = {
        "worker/x.py": ast.parse(
            "class Stray(engine.errors.PermanentError): ...\n"
            "class Deeper(Stray): ...\n"
            "def f():\n    raise Deeper('x')\n"
        )
    }
    assert set(_exception_classes(source)) == {"Stray", "Deeper"}
    assert _raised_names(source) == {"Deeper": ["worker/x.py:4"]}
