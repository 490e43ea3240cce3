"""The served models on the real Triton: the uint8-pixel model answers over both protocols and
agrees with the float32 model fed by the float32 preprocessing (issue 12.3); a model Triton does
not serve is a configuration error, an unreachable server an outage; one embedder serves many
threads at once."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image

from devstack.samples import skimage_images
from devstack.stack import LocalStack
from engine.errors import InferenceConfigurationError, InferenceUnavailableError
from engine.inference import TritonEmbedder
from engine.models import DEFAULT_MODEL_SPEC, UINT8_MODEL_SPEC
from engine.priorities import INGEST_PRIORITY, PRIORITY_LEVELS, QUERY_INSTANCES
from engine.resampling import JaxPreprocessor
from engine.settings import TritonSettings
from jax_embedding.triton_client import TritonClient

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def photos() -> list[npt.NDArray[np.uint8]]:
    images = []
    for path in skimage_images()[:12]:
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("RGB")))
    return images


@pytest.fixture(scope="module")
def pixels(photos: list[npt.NDArray[np.uint8]]) -> npt.NDArray[np.uint8]:
    """The photos as the uint8 model takes them."""
    return JaxPreprocessor(batch_sizes=(16,), output="uint8_nhwc").preprocess(photos)


# What the session's Triton serves at least: models loaded into it since (serve_models) may join.
LITE0 = {DEFAULT_MODEL_SPEC.name, UINT8_MODEL_SPEC.name}


def _listed_as_served(message: str) -> set[str]:
    """The models an "it serves: A, B" message names."""
    found = re.search(r"it serves: ([^)]*)\)", message)
    assert found, message
    return set(found.group(1).split(", "))


def _url(stack: LocalStack, protocol: str) -> str:
    return stack.config.triton_grpc_url if protocol == "grpc" else stack.config.triton_url


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_uint8_model_matches_the_float32_path(
    stack: LocalStack,
    photos: list[npt.NDArray[np.uint8]],
    pixels: npt.NDArray[np.uint8],
    protocol: str,
) -> None:
    url = _url(stack, protocol)
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


def _rows_per_request(monkeypatch: pytest.MonkeyPatch, protocol: str) -> list[int]:
    """The rows of every request this process sends to Triton from now on, in order (counted
    at the client: Triton's own statistics also count the other tests' requests, which run
    at the same time on the shared stack)."""
    client_class = (grpcclient if protocol == "grpc" else httpclient).InferenceServerClient
    sent: list[int] = []
    for method in ("infer", "async_infer"):
        original = getattr(client_class, method)

        def counted(
            self: Any,
            model_name: str,
            inputs: list[Any],
            *args: Any,
            _original: Any = original,
            **kwargs: Any,
        ) -> Any:
            sent.append(int(inputs[0].shape()[0]))
            return _original(self, model_name, inputs, *args, **kwargs)

        monkeypatch.setattr(client_class, method, counted)
    return sent


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_batch_split_into_parallel_requests_comes_back_whole_and_in_order(
    stack: LocalStack,
    photos: list[npt.NDArray[np.uint8]],
    pixels: npt.NDArray[np.uint8],
    protocol: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = _url(stack, protocol)
    whole = TritonSettings(url=url, protocol=protocol, parallel_requests=1)
    with TritonEmbedder(whole) as embedder:
        expected = embedder.embed(pixels)
    sent = _rows_per_request(monkeypatch, protocol)
    for parallel in (2, 3, 5):
        settings = TritonSettings(url=url, protocol=protocol, parallel_requests=parallel)
        sent.clear()
        with TritonEmbedder(settings) as embedder:
            got = embedder.embed(pixels)
        # One request per part of ceil(rows / parallel) rows: 12 rows go as 2, 3 and 4 requests.
        part = -(-len(photos) // parallel)
        requests = -(-len(photos) // part)
        assert len(sent) == requests, (parallel, sent)
        assert sum(sent) == len(photos) and max(sent) == part, (parallel, sent)
        assert got.shape == expected.shape
        # Row i is still image i's vector: a mix-up of parts would pair it with another image.
        assert np.sum(got * expected, axis=1).min() >= 0.9999, parallel


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_model_triton_does_not_serve_is_a_configuration_error(
    stack: LocalStack, pixels: npt.NDArray[np.uint8], protocol: str
) -> None:
    settings = TritonSettings(
        url=_url(stack, protocol),
        protocol=protocol,
        model_name="not_served_here",
        input_format="uint8_nhwc",
        parallel_requests=2,
    )
    with TritonEmbedder(settings) as embedder:
        for batch in (pixels, pixels[:1]):  # parts sent at once, and a single request
            with pytest.raises(InferenceConfigurationError, match="'not_served_here'") as raised:
                embedder.embed(batch)
            assert _listed_as_served(str(raised.value)) >= LITE0
        assert not embedder.is_ready()
        began = time.monotonic()
        with pytest.raises(InferenceConfigurationError) as raised:
            embedder.wait_until_ready(60.0)
        assert _listed_as_served(str(raised.value)) >= LITE0
        assert time.monotonic() - began < 5.0  # waiting cannot make it appear: no wait


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_earlier_client_tells_an_unknown_model_from_an_outage(
    stack: LocalStack, protocol: str
) -> None:
    batch = np.zeros((1, 3, 224, 224), np.float32)
    proto: Any = protocol
    with TritonClient(url=_url(stack, protocol), model_name="nope", protocol=proto) as client:
        assert not client.is_ready()
        with pytest.raises(InferenceConfigurationError, match=r"does not serve model 'nope'"):
            client.infer(batch)
    with (
        TritonClient(url="127.0.0.1:9", model_name="nope", protocol=proto, timeout=5) as down,
        pytest.raises(InferenceUnavailableError),
    ):
        down.infer(batch)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_waiting_for_a_served_model_returns_at_once(stack: LocalStack, protocol: str) -> None:
    settings = TritonSettings(url=_url(stack, protocol), protocol=protocol)
    with TritonEmbedder(settings) as embedder:
        began = time.monotonic()
        embedder.wait_until_ready(settings.ready_timeout_s)
        assert time.monotonic() - began < 5.0
        embedder.check_ready(2.0)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_one_embedder_serves_many_threads_at_once(
    stack: LocalStack, pixels: npt.NDArray[np.uint8], protocol: str
) -> None:
    """The query API shares one embedder between its request threads: over HTTP, tritonclient's
    client must not be shared between threads (it runs on the calling thread's gevent hub)."""
    settings = TritonSettings(url=_url(stack, protocol), protocol=protocol, parallel_requests=2)
    threads, rounds = 6, 3
    with TritonEmbedder(settings) as embedder:
        whole, single = embedder.embed(pixels), embedder.embed(pixels[:1])  # one at a time
        start = threading.Barrier(threads)

        def embed_at_once(_: int) -> list[tuple[npt.NDArray[np.float32], ...]]:
            start.wait(timeout=60)
            # Batches split in parts sent at once, and single requests, interleaved.
            return [(embedder.embed(pixels), embedder.embed(pixels[:1])) for _ in range(rounds)]

        with ThreadPoolExecutor(threads) as pool:
            answers = [future.result(timeout=300) for future in
                       [pool.submit(embed_at_once, n) for n in range(threads)]]  # fmt: skip
    for per_thread in answers:
        for got_whole, got_single in per_thread:
            np.testing.assert_allclose(got_whole, whole, atol=1e-5)
            np.testing.assert_allclose(got_single, single, atol=1e-5)


def test_searches_get_an_instance_of_their_own_and_go_first(
    stack: LocalStack, pixels: npt.NDArray[np.uint8]
) -> None:
    """Issue 25: the served config keeps an instance beyond a batch's parts and gives the
    query's requests the higher priority level; a query embedder's vectors are the ingest's."""
    settings = TritonSettings(url=stack.config.triton_grpc_url, protocol="grpc")
    client = grpcclient.InferenceServerClient(settings.url)
    try:
        config = client.get_model_config(settings.model_name, as_json=True)["config"]
    finally:
        client.close()
    assert [int(group["count"]) for group in config["instance_group"]] == [
        UINT8_MODEL_SPEC.instance_count + QUERY_INSTANCES
    ]
    batching = config["dynamic_batching"]
    assert int(batching["priority_levels"]) == PRIORITY_LEVELS
    assert int(batching["default_priority_level"]) == INGEST_PRIORITY
    with (
        TritonEmbedder(settings) as ingest,
        TritonEmbedder(settings, role="query") as query,
    ):
        np.testing.assert_allclose(query.embed(pixels[:1]), ingest.embed(pixels[:1]), atol=1e-5)
        np.testing.assert_allclose(query.embed(pixels), ingest.embed(pixels), atol=1e-5)
