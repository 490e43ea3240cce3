"""The served models on the real Triton: the uint8-pixel model answers over both protocols and
agrees with the float32 model fed by the float32 preprocessing (issue 12.3)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from devstack.samples import skimage_images
from devstack.stack import LocalStack
from engine.inference import InferenceConfigurationError, TritonEmbedder
from engine.model.spec import DEFAULT_MODEL_SPEC, UINT8_MODEL_SPEC
from engine.preprocess import JaxPreprocessor
from engine.settings import TritonSettings

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def photos() -> list[npt.NDArray[np.uint8]]:
    images = []
    for path in skimage_images()[:12]:
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("RGB")))
    return images


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_uint8_model_matches_the_float32_path(
    stack: LocalStack, photos: list[npt.NDArray[np.uint8]], protocol: str
) -> None:
    url = stack.config.triton_grpc_url if protocol == "grpc" else stack.config.triton_url
    pixels = JaxPreprocessor(batch_sizes=(16,), output="uint8_nhwc").preprocess(photos)
    normalised = JaxPreprocessor(batch_sizes=(16,)).preprocess(photos)
    uint8 = TritonSettings(url=url, protocol=protocol)
    float32 = TritonSettings(url=url, protocol=protocol, model_name=DEFAULT_MODEL_SPEC.name)
    assert uint8.model_name == UINT8_MODEL_SPEC.name
    with TritonEmbedder(uint8) as pixel_model, TritonEmbedder(float32) as float_model:
        assert pixel_model.is_ready() and float_model.is_ready()
        got = pixel_model.embed(pixels)
        expected = float_model.embed(normalised)
        # What Triton refuses is refused before sending, as a configuration error.
        with pytest.raises(InferenceConfigurationError):
            pixel_model.embed(normalised)
    assert got.shape == (len(photos), DEFAULT_MODEL_SPEC.output_dim)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    assert np.sum(got * expected, axis=1).min() >= 0.999
