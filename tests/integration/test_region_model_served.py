"""The region model (issue 24) on the real stack: ``serve_models`` loads Lite0 at the regions'
input into the running Triton, which answers with the vectors onnxruntime gives in-process."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from devstack.samples import skimage_images
from devstack.stack import LocalStack
from engine.inference import TritonEmbedder
from engine.models import LITE0_REGION_MODEL_SPEC, UINT8_MODEL_SPEC
from engine.regions import RegionPreprocessor
from engine.settings import PreprocessSettings, TritonSettings
from model_build.efficientnet_lite import build_embedding_model, load_packaged_weights

pytestmark = pytest.mark.stack

SPEC = LITE0_REGION_MODEL_SPEC


def test_triton_serves_the_region_model_as_onnxruntime_computes_it(stack: LocalStack) -> None:
    stack.serve_models([SPEC.name])  # [] when an earlier run's stack serves it already
    assert stack.triton.model_states()[SPEC.name] == "READY"
    photos = []
    for path in skimage_images()[:2]:
        with Image.open(path) as image:
            photos.append(np.asarray(image.convert("RGB")))
    regions = RegionPreprocessor(
        UINT8_MODEL_SPEC, PreprocessSettings(device="cpu", batch_sizes=(32,))
    ).preprocess(photos)
    settings = TritonSettings(url=stack.config.triton_grpc_url, model_name=SPEC.name)
    with TritonEmbedder(settings) as embedder:
        served = embedder.embed(regions.pixels)
    session = ort.InferenceSession(
        build_embedding_model(load_packaged_weights(SPEC), SPEC).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    local = session.run([SPEC.output_name], {SPEC.input_name: regions.pixels})[0]
    assert served.shape == (len(regions), SPEC.output_dim)
    assert float(np.sum(served * local, axis=1).min()) >= 0.9999
