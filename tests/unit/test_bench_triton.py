"""bench_triton: shared-memory clean-up (a region Triton still counts as in use is retried)
and the two formats it compares."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from engine.models import DEFAULT_MODEL_SPEC

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_triton  # after the path insert: the scripts' folder is not a package


class FakeClient:
    """Refuses to unregister ``busy`` times with Triton's "in use" error, then succeeds."""

    def __init__(self, busy: int, message: str = "currently in use") -> None:
        self.busy, self.message, self.calls = busy, message, 0

    def unregister_system_shared_memory(self, name: str) -> None:
        self.calls += 1
        if self.calls <= self.busy:
            raise InferenceServerException(
                f"Cannot unregister shared memory region '{name}', it is {self.message}"
            )


def test_unregister_retries_while_the_region_is_in_use() -> None:
    client = FakeClient(busy=3)
    bench_triton.unregister(client, "r", timeout=5.0)
    assert client.calls == 4


def test_unregister_gives_up_with_a_warning_not_an_exception(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = FakeClient(busy=10**6)
    with caplog.at_level(logging.WARNING):
        bench_triton.unregister(client, "r", timeout=0.3)
    assert "could not unregister" in caplog.text
    assert client.calls > 1


def test_other_errors_are_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    client = FakeClient(busy=1, message="not found")
    with caplog.at_level(logging.WARNING):
        bench_triton.unregister(client, "r", timeout=5.0)
    assert client.calls == 1 and "could not unregister" in caplog.text


def test_both_formats_carry_the_same_images() -> None:
    batches = bench_triton.batches_for(2, np.random.default_rng(0))
    pixels, normalised = batches["uint8"], batches["float32"]
    assert pixels.dtype == np.uint8 and pixels.shape == (2, 224, 224, 3)
    assert normalised.dtype == np.float32 and normalised.shape == (2, 3, 224, 224)
    np.testing.assert_array_equal(
        (pixels.astype(np.float32).transpose(0, 3, 1, 2) - 127) / 128, normalised
    )


def test_a_tuning_variant_replaces_only_the_uint8_model() -> None:
    specs = bench_triton.model_specs("t_variant")
    assert specs["uint8"].name == "t_variant" and specs["uint8"].input_format == "uint8_nhwc"
    assert specs["float32"] == DEFAULT_MODEL_SPEC
