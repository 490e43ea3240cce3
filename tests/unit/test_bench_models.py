"""bench_models: a model Triton does not serve is reported (not timed, not a crash), a wrong
answer stops the run, and the table gives ratios against Lite0."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from engine.models import LITE1_MODEL_SPEC, LITE2_MODEL_SPEC, UINT8_MODEL_SPEC
from engine.settings import TritonSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_models  # after the path insert: the scripts' folder is not a package

SPECS = (UINT8_MODEL_SPEC, LITE1_MODEL_SPEC, LITE2_MODEL_SPEC)


class FakeEmbedder:
    """Serves the models in ``served``; answers unit rows, or rows of ``norm``."""

    served: ClassVar[set[str]] = set()
    norm = 1.0

    def __init__(self, settings: TritonSettings) -> None:
        self.name = settings.model_name

    def is_ready(self) -> bool:
        return self.name in self.served

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        rows = np.zeros((len(pixels), UINT8_MODEL_SPEC.output_dim), np.float32)
        rows[:, 0] = self.norm
        return rows

    def close(self) -> None:
        pass


def test_a_model_not_served_is_reported_with_the_command_that_serves_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench_models, "TritonEmbedder", FakeEmbedder)
    monkeypatch.setattr(FakeEmbedder, "served", {UINT8_MODEL_SPEC.name, LITE2_MODEL_SPEC.name})
    rates = bench_models.through_triton("127.0.0.1:1", SPECS, batch=2, rounds=2)
    assert rates[LITE1_MODEL_SPEC.name] is None
    assert all(rates[s.name] for s in (UINT8_MODEL_SPEC, LITE2_MODEL_SPEC))
    assert f"{LITE1_MODEL_SPEC.name} is not served" in capsys.readouterr().out
    assert "trident-stack up --models" in bench_models.__doc__


def test_a_wrong_answer_stops_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_models, "TritonEmbedder", FakeEmbedder)
    monkeypatch.setattr(FakeEmbedder, "served", {UINT8_MODEL_SPEC.name})
    monkeypatch.setattr(FakeEmbedder, "norm", 0.5)
    with pytest.raises(RuntimeError, match="not unit length"):
        bench_models.through_triton("127.0.0.1:1", SPECS[:1], batch=2, rounds=1)


def test_the_table_gives_ratios_against_lite0() -> None:
    class Spec:
        def __init__(self, spec: Any) -> None:
            self.spec = spec

    models: Any = {s.name: Spec(s) for s in SPECS}
    figures = {
        "in_process": {SPECS[0].name: 40.0, SPECS[1].name: 30.0, SPECS[2].name: 20.0},
        "in_process_cpu_ms_per_image": {
            SPECS[0].name: 50.0,
            SPECS[1].name: 75.0,
            SPECS[2].name: 100.0,
        },
        "triton": {SPECS[0].name: 30.0, SPECS[1].name: None, SPECS[2].name: 15.0},
        "e2e": {},
    }
    quality = {s.name: {"class_p_at_1": 0.5, "near_duplicate_r_at_1": 1.0} for s in SPECS}
    rows = bench_models.table(models, figures, quality).splitlines()
    assert len(rows) == 2 + len(SPECS)
    assert "20.0 (x0.50)" in rows[4] and "15.0 (x0.50)" in rows[4] and "100.0 (x2.00)" in rows[4]
    assert "not served" in rows[3]
