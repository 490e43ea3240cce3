"""One reason vocabulary: every reason literal in the code base is a member of ``Reason``."""

from __future__ import annotations

import re
from pathlib import Path

# Imported for their error classes, which the second test walks.
import engine.fetch
import engine.images
import engine.inference
import model_build.torch_pickle
from engine.errors import Reason, TridentError

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("schemas", "engine", "worker", "query_api", "producer", "devstack")
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
