"""The local stack serves another built-in model when asked (issue 23.2): a Triton of the stack,
on its own ports beside the session's (whose models stay as they are), serves EfficientNet-Lite2
next to Lite0 and answers a batch with the vectors the converted model gives in-process."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image

from devstack.samples import skimage_images
from devstack.stack import LocalStack
from engine.models import LITE2_MODEL_SPEC, UINT8_MODEL_SPEC
from engine.resampling import reference_pixels
from model_build.efficientnet_lite import build_embedding_model, load_packaged_weights

pytestmark = pytest.mark.stack

SPEC = LITE2_MODEL_SPEC


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture(scope="module")
def lite2_stack(stack: LocalStack) -> Iterator[LocalStack]:
    """A stack on the session's install whose Triton also serves Lite2; stopped afterwards.

    Its root lies under the session stack's, so a later run finds the repository written and
    converts nothing again.
    """
    http, grpc, metrics = _free_ports(3)
    config = stack.config.model_copy(
        update={
            "root": stack.config.root / "models-on-demand",
            "triton_http_port": http,
            "triton_grpc_port": grpc,
            "triton_metrics_port": metrics,
        }
    )
    local = LocalStack(config, models=[SPEC.name])
    local.triton.install()  # the session's cached install: nothing to do
    local.build_model_repository()
    local.triton.start()
    try:
        yield local
    finally:
        local.triton.stop()


@pytest.fixture(scope="module")
def pixels() -> npt.NDArray[np.uint8]:
    crops = []
    for path in skimage_images()[:6]:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
        crops.append(
            reference_pixels(
                rgb, image_size=SPEC.image_size, resize_short_side=SPEC.resize_short_side
            )
        )
    return np.stack(crops)


def test_triton_serves_lite2_beside_lite0_when_asked(
    lite2_stack: LocalStack, pixels: npt.NDArray[np.uint8]
) -> None:
    assert set(lite2_stack.triton.models) == {
        UINT8_MODEL_SPEC.name,
        UINT8_MODEL_SPEC.name.removesuffix("_uint8"),
        SPEC.name,
    }
    client = grpcclient.InferenceServerClient(lite2_stack.config.triton_grpc_url)
    try:
        assert client.is_model_ready(SPEC.name)
        metadata = client.get_model_metadata(SPEC.name)
        assert [list(map(int, i.shape)) for i in metadata.inputs] == [[-1, *SPEC.input_dims]]
        tensor = grpcclient.InferInput(SPEC.input_name, list(pixels.shape), SPEC.input_dtype)
        tensor.set_data_from_numpy(pixels)
        result = client.infer(SPEC.name, [tensor])
        served = result.as_numpy(SPEC.output_name)
    finally:
        client.close()

    assert served.shape == (len(pixels), SPEC.output_dim)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    model = build_embedding_model(load_packaged_weights(SPEC), SPEC)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run([SPEC.output_name], {SPEC.input_name: pixels})[0]
    # Row for row the converted Lite2 (Lite0 under that name would give other vectors).
    assert np.sum(served * expected, axis=1).min() > 0.9999
