"""The local stack serves another built-in model when asked (issue 23.2): a Triton of the stack,
on its own ports beside the session's (whose models stay as they are), starts with Lite0 alone,
is made to serve EfficientNet-Lite2 too without a restart (``LocalStack.serve_models``) while
Lite0 keeps answering every request, and answers a batch with the vectors the converted model
gives in-process; the stack remembers the model, so a later start keeps that server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image

from devstack.samples import skimage_images
from devstack.stack import LocalStack
from engine.inference import TritonEmbedder
from engine.models import LITE0_REGION_MODEL_SPEC, LITE2_MODEL_SPEC, UINT8_MODEL_SPEC
from engine.resampling import reference_pixels
from engine.settings import TritonSettings
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


@dataclass
class _Traffic:
    """Requests to Lite0 sent one after another from a thread, over gRPC or HTTP."""

    protocol: str
    answered: list[float] = field(default_factory=list)  # when each answer came
    errors: list[BaseException] = field(default_factory=list)


@dataclass
class _Served:
    """What ``serve_models`` did on a stack while Lite0 answered requests."""

    local: LocalStack
    loaded: list[str]
    traffic: list[_Traffic]
    began: float
    ended: float


@pytest.fixture(scope="module")
def lite0_stack(stack: LocalStack) -> Iterator[LocalStack]:
    """A stack on the session's install whose Triton serves Lite0 alone; stopped afterwards.

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
    local = LocalStack(config, models=[])
    local.triton.install()  # the session's cached install: nothing to do
    local.build_model_repository()
    local.triton.start()
    try:
        yield local
    finally:
        local.triton.stop()


def _embed_lite0(
    local: LocalStack, traffic: _Traffic, batch: npt.NDArray[np.uint8], stop: threading.Event
) -> None:
    config = local.config
    url = config.triton_grpc_url if traffic.protocol == "grpc" else config.triton_url
    settings = TritonSettings(url=url, protocol=traffic.protocol, request_timeout_s=60)
    with TritonEmbedder(settings) as embedder:
        while not stop.is_set():
            try:
                embedder.embed(batch)
            except Exception as exc:  # every failure is what the test counts
                traffic.errors.append(exc)
            else:
                traffic.answered.append(time.monotonic())


@pytest.fixture(scope="module")
def lite2_stack(lite0_stack: LocalStack, lite0_pixels: npt.NDArray[np.uint8]) -> _Served:
    """The Lite0 stack made to serve Lite2 by ``serve_models`` while Lite0 answers requests
    from two threads; with what it returned, the traffic and when the load began and ended."""
    stop = threading.Event()
    traffic = [_Traffic("grpc"), _Traffic("http")]
    threads = [
        threading.Thread(target=_embed_lite0, args=(lite0_stack, t, lite0_pixels, stop))
        for t in traffic
    ]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 60
        while not all(t.answered for t in traffic) and time.monotonic() < deadline:
            time.sleep(0.05)  # both clients answered once: the load starts under traffic
        began = time.monotonic()
        loaded = lite0_stack.serve_models([SPEC.name])
        ended = time.monotonic()
        time.sleep(0.5)  # requests sent while the load finished come back
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    return _Served(lite0_stack, loaded, traffic, began, ended)


def _crops(size: int, short_side: int) -> npt.NDArray[np.uint8]:
    crops = []
    for path in skimage_images()[:6]:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"))
        crops.append(reference_pixels(rgb, image_size=size, resize_short_side=short_side))
    return np.stack(crops)


@pytest.fixture(scope="module")
def pixels() -> npt.NDArray[np.uint8]:
    return _crops(SPEC.image_size, SPEC.resize_short_side)


@pytest.fixture(scope="module")
def lite0_pixels() -> npt.NDArray[np.uint8]:
    return _crops(UINT8_MODEL_SPEC.image_size, UINT8_MODEL_SPEC.resize_short_side)


def test_lite0_answers_every_request_while_lite2_loads(
    lite2_stack: _Served,
) -> None:
    assert lite2_stack.loaded == [SPEC.name]
    began, ended = lite2_stack.began, lite2_stack.ended
    for sent in lite2_stack.traffic:
        assert sent.errors == [], sent.protocol
        # Answers kept coming while the model loaded, not only before and after it.
        during = [at for at in sent.answered if began <= at <= ended]
        assert during, (sent.protocol, ended - began)


def test_the_stack_remembers_a_served_model_and_keeps_its_server(
    lite2_stack: _Served,
) -> None:
    local = lite2_stack.local
    pid = local.triton.process.pid()
    assert local.serve_models([SPEC.name]) == []  # served already: nothing loaded again
    again = LocalStack(local.config)  # a later `up` without --models
    assert again.extra_models == [SPEC.name]
    again.triton.start()  # its repository and flags are what the server runs: no restart
    assert again.triton.process.pid() == pid
    assert again.triton.model_states()[SPEC.name] == "READY"


def test_triton_serves_lite2_beside_lite0_when_asked(
    lite2_stack: _Served,
    pixels: npt.NDArray[np.uint8],
) -> None:
    local = lite2_stack.local
    assert set(local.triton.models) == {
        UINT8_MODEL_SPEC.name,
        UINT8_MODEL_SPEC.name.removesuffix("_uint8"),
        LITE0_REGION_MODEL_SPEC.name,  # Lite0's regions' model, served with it (issue 24)
        SPEC.name,
    }
    client = grpcclient.InferenceServerClient(local.config.triton_grpc_url)
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
