"""A model's input size, resize size and dimension are written in its spec and nowhere else.

The registry (``engine/models.py``) is the one place that knows them (issue 23.1): this scans
the packages' source (not the tests, not the docs: numbers in code and the strings that are not
docstrings) and the deployment files' values (not their comments) for the built-in models' sizes
and dimensions, and fails
on any outside the specs. The allow-list names each occurrence that means something else, with
what it means; an entry that no longer matches anything fails too, so the list stays true.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from engine.models import BUILTIN_MODEL_SPECS

REPO = Path(__file__).resolve().parents[2]
PACKAGES = (
    "schemas",
    "producer",
    "worker",
    "query_api",
    "engine",
    "jax_embedding",
    "model_build",
    "reembed",
    "devstack",
)
DEPLOYMENT = ("deploy", "docker", "compose.yaml", "Makefile")
SPECS = "engine/models.py"
LITERALS = frozenset(
    value
    for spec in BUILTIN_MODEL_SPECS
    for value in (spec.image_size, spec.resize_short_side, spec.output_dim)
)
# (file, text of the line, what the number means there)
ALLOWED = (
    ("schemas/api.py", "max_length=256", "an item id's length"),
    ("schemas/api.py", "SHA-256", "the hash's name"),
    ("schemas/events.py", "ID_MAX_BYTES: Final = 256", "an event id's length in bytes"),
    ("schemas/search.py", "max_length=256", "an item id's length"),
    ("query_api/ingest.py", "1 to 256 UTF-8", "an event id's length"),
    ("jax_embedding/pipeline.py", "1 to 256 UTF-8", "an event id's length"),
    ("worker/metrics.py", "buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)", "batch-size buckets"),
    ("engine/images.py", "0x0112", "the EXIF orientation tag (274)"),
    ("engine/settings.py", "thumbnail_size: int = Field(256", "a thumbnail's longest side"),
    ("jax_embedding/config.py", "batch_size: int = Field(32, ge=1, le=256)", "a batch size cap"),
    ("model_build/models_cli.py", "rng.integers(0, 256", "the uint8 range of a trial batch"),
    ("engine/resampling.py", "_CANVAS_BUDGET_BYTES = 128 << 20", "a memory budget in MiB"),
    ("engine/store.py", "MODEL_VERSION_MAX_BYTES = 128", "a model tag's length in bytes"),
    ("engine/store_requests.py", "value & 0x7F | 0x80", "a varint's continuation bit"),
)
_WORD = re.compile(r"(?<![\w.])(\d+)(?![\w.])")
_COMMENT = re.compile(r"(^|\s)#.*$")


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _python_hits(path: Path) -> list[tuple[int, int, str]]:
    """(line, number, source text) of every model literal in the code of one file: numbers, and
    numbers written in strings that are not docstrings (the text is the whole constant's)."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source, str(path))
    docstrings = _docstrings(tree)
    hits = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or id(node) in docstrings:
            continue
        text = " ".join(line.strip() for line in lines[node.lineno - 1 : node.end_lineno])
        value = node.value
        if isinstance(value, int | float) and not isinstance(value, bool) and value in LITERALS:
            hits.append((node.lineno, int(value), text))
        elif isinstance(value, str):
            numbers = [int(m) for m in _WORD.findall(value) if int(m) in LITERALS]
            hits += [(node.lineno, number, text) for number in numbers]
    return hits


def _text_hits(path: Path) -> list[tuple[int, int, str]]:
    """The same in a deployment file's values; its comments are docs (sizing notes)."""
    return [
        (number, int(m), line.strip())
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        for m in _WORD.findall(_COMMENT.sub("", line))
        if int(m) in LITERALS
    ]


def _occurrences() -> list[tuple[str, int, int, str]]:
    """(file, line, number, source text) of every model literal outside the specs."""
    found = []
    files = [p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))]
    for name in DEPLOYMENT:
        root = REPO / name
        others = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        files += [p for p in others if p.is_file() and p.suffix != ".py"]
    for path in files:
        relative = path.relative_to(REPO).as_posix()
        if relative == SPECS:
            continue
        hits = _python_hits(path) if path.suffix == ".py" else _text_hits(path)
        found += [(relative, line, value, text) for line, value, text in hits]
    return found


def _allowed(file: str, text: str) -> bool:
    return any(file == where and snippet in text for where, snippet, _ in ALLOWED)


def test_the_scan_knows_the_models_literals() -> None:
    assert {224, 256, 1280, 240, 274, 260, 297, 128, 146} <= LITERALS


def test_no_model_size_or_dimension_outside_the_specs() -> None:
    stray = [
        f"{file}:{line}: {value} in {text!r}"
        for file, line, value, text in _occurrences()
        if not _allowed(file, text)
    ]
    assert stray == [], (
        "a model's size or dimension written outside engine/models.py: take it from the "
        "spec (engine.models), or add the occurrence to ALLOWED with what it means"
    )


def test_every_allowance_still_matches_something() -> None:
    occurrences = _occurrences()
    stale = [
        (where, snippet)
        for where, snippet, _ in ALLOWED
        if not any(file == where and snippet in text for file, _, _, text in occurrences)
    ]
    assert stale == []


def test_the_scan_finds_a_stray_literal(tmp_path: Path) -> None:
    # The scan itself can fail: a model size in code or in a string is found, a docstring not.
    source = tmp_path / "stray.py"
    source.write_text(
        '"""Module docs may say 224."""\n'
        "SIZE = 224\n"
        "ARGS = ['--dim', '1280']\n"
        "def f():\n"
        '    """Nor here: 260."""\n'
        "    return (297, 12)\n"
    )
    assert sorted(hit[:2] for hit in _python_hits(source)) == [(2, 224), (3, 1280), (6, 297)]
    deployment = tmp_path / "settings.yaml"
    deployment.write_text(
        "# 1280-d vectors, sized in the docs\nmilvus: {dimension: 1280}  # 1280\n"
    )
    assert [hit[:2] for hit in _text_hits(deployment)] == [(2, 1280)]
