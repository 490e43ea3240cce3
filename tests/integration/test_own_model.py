"""Bring your own model, on the real services: an ONNX model this test writes (tensor names,
size, normalisation and dimension unlike ours) is added with ``trident-models add``, served by
a real Triton (the test stack's install, started on the repository the command wrote, on ports
of its own so the stack's Triton and the other tests are left alone), embedded end to end by a
worker into Milvus, and searched by image through the query API. The worker and the API refuse
to start when the served model does not match its spec; ``trident-models list`` shows both the
registry and what Triton serves.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import yaml
from litestar.testing import TestClient

from devstack.samples import derived_image_set
from devstack.stack import LocalStack
from devstack.triton import TritonService
from engine.errors import ModelMismatchError
from engine.images import decode_image
from engine.inference import TritonEmbedder
from engine.models import MODEL_SPEC_FILE, ModelSpec
from engine.resampling import reference_pixels
from engine.settings import Settings
from engine.store import VectorStore
from model_build.models_cli import main as trident_models
from producer import EventPublisher, events_from_folder
from query_api import create_app
from tests.integration.conftest import committed_everything, running_worker, wait_for
from tests.support.own_model import (
    FLOAT_NCHW,
    build_model,
    second_triton,
    spec_of,
    write_files,
)
from worker import build_worker

pytestmark = pytest.mark.stack

SPEC = spec_of(FLOAT_NCHW)
N_IMAGES = 12


@pytest.fixture(scope="module")
def own_model() -> onnx.ModelProto:
    return build_model(SPEC)


@pytest.fixture(scope="module")
def own_triton(
    stack: LocalStack, tmp_path_factory: pytest.TempPathFactory, own_model: onnx.ModelProto
) -> Iterator[tuple[TritonService, Path]]:
    """A real Triton serving the repository ``trident-models add`` wrote; stopped after."""
    root = tmp_path_factory.mktemp("own-triton")
    spec_file, onnx_file = write_files(root / "files", FLOAT_NCHW, own_model)
    repository = root / "models"
    assert (
        trident_models(["add", str(spec_file), str(onnx_file), "--repository", str(repository)])
        == 0
    )
    with second_triton(stack, root / "stack", repository, port_shift=10) as triton:
        yield triton, repository


def _own_settings(settings: Settings, triton: TritonService, repository: Path) -> Settings:
    """The test's settings, serving the user's model instead of the default one."""
    values = settings.model_dump(by_alias=True, exclude_unset=True)
    values["triton"] = {
        **values.get("triton", {}),
        "url": triton.grpc_url,
        "model_repository": str(repository),
        "model_name": SPEC.name,
    }
    return Settings(**values)


def _reference_embeddings(model: onnx.ModelProto, paths: list[Path]) -> np.ndarray:
    """What the model gives for the images preprocessed by the spec's rule (Pillow reference):
    resize to 110, crop 96, CLIP's normalisation, NCHW; run in-process by onnxruntime. (With
    Lite0's normalisation instead the cosines fall below 0: the check below can fail.)"""
    session = onnxruntime.InferenceSession(model.SerializeToString())
    mean, std = np.asarray(SPEC.input_mean, np.float32), np.asarray(SPEC.input_std, np.float32)
    batch = []
    for path in paths:
        # JPEGs draft-decoded no smaller than the spec's resize, as the worker decodes them.
        pixels = decode_image(
            path.read_bytes(), max_pixels=10**8, target_short_side=SPEC.resize_short_side
        ).pixels
        crop = reference_pixels(
            pixels, image_size=SPEC.image_size, resize_short_side=SPEC.resize_short_side
        )
        batch.append(((crop.astype(np.float32) - mean) / std).transpose(2, 0, 1))
    output: np.ndarray = session.run([SPEC.output_name], {SPEC.input_name: np.stack(batch)})[0]
    return output.astype(np.float32)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cosines: np.ndarray = np.sum(a * b, axis=1) / (
        np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    )
    return cosines


def test_a_model_of_ones_own_is_embedded_end_to_end_and_searchable(
    settings: Settings,
    own_triton: tuple[TritonService, Path],
    own_model: onnx.ModelProto,
    tmp_path: Path,
) -> None:
    settings = _own_settings(settings, *own_triton)
    assert (settings.model, settings.milvus.dimension) == (SPEC, SPEC.output_dim)
    assert settings.preprocess.image_size == SPEC.image_size
    images = derived_image_set(tmp_path / "images", N_IMAGES)
    store = VectorStore(settings.milvus)
    store.create_collection(settings.milvus.collection, model_tag=settings.triton.model_tag)
    try:
        with running_worker(settings):
            with EventPublisher(settings.kafka) as publisher:
                report = publisher.publish_many(events_from_folder(tmp_path / "images"))
            assert (report.delivered, report.failed) == (N_IMAGES, 0)
            wait_for(lambda: store.count() == N_IMAGES, timeout=300, what="stored vectors")
            wait_for(lambda: committed_everything(settings), timeout=60, what="offsets committed")

        rows = store.get([p.name for p in images], with_vectors=True)
        by_id = {row["id"]: row for row in rows}
        stored = np.asarray([by_id[p.name]["embedding"] for p in images], np.float32)
        assert stored.shape == (N_IMAGES, SPEC.output_dim)
        assert {row["model_version"] for row in rows} == {SPEC.model_version_tag}
        # The worker preprocessed as the spec says (size, crop, CLIP's normalisation, NCHW):
        # its vectors are the in-process reference's. Lite0's normalisation would not be.
        expected = _reference_embeddings(own_model, images)
        assert _cosines(stored, expected).min() >= 0.999

        with TestClient(app=create_app(settings)) as client:
            for path in images:
                with path.open("rb") as handle:
                    response = client.post(
                        "/search", files={"file": (path.name, handle, "image/jpeg")}
                    )
                assert response.status_code == 200, response.text
                hits = response.json()
                assert hits[0]["id"] == path.name, (path.name, hits[:3])
                assert hits[0]["score"] >= 0.99
    finally:
        store.drop_collection(settings.milvus.collection)
        store.close()


def test_a_served_model_unlike_its_spec_is_refused_at_start(
    settings: Settings, own_triton: tuple[TritonService, Path], tmp_path: Path
) -> None:
    triton, repository = own_triton
    # Another spec under the same name, saying 32 dimensions and other tensor names: Triton
    # still serves the 64-dimensional model.
    lying = tmp_path / "lying-repository" / SPEC.name
    lying.mkdir(parents=True)
    values = yaml.safe_load((repository / SPEC.name / MODEL_SPEC_FILE).read_text())
    values.update(output_dim=32, input_name="images")
    (lying / MODEL_SPEC_FILE).write_text(yaml.safe_dump(values))
    wrong = _own_settings(settings, triton, lying.parent)
    assert wrong.model == ModelSpec(**values)

    with pytest.raises(ModelMismatchError) as refused:
        TritonEmbedder(wrong.triton, model=wrong.model).wait_until_ready(30)
    message = str(refused.value)
    assert "output 'feats' has shape ['batch', 64], the spec says ['batch', 32]" in message
    assert "inputs are ['pixel_values'], the spec says one input 'images'" in message

    with pytest.raises(BaseExceptionGroup) as raised, TestClient(app=create_app(wrong)):
        pass  # the lifespan's
    assert raised.group_contains(ModelMismatchError, match="the spec says")
    store = VectorStore(wrong.milvus)
    try:
        with pytest.raises(ModelMismatchError, match="the spec says"):
            build_worker(wrong, worker_id="mismatch").close()
    finally:
        if store.collection_exists(wrong.milvus.collection):
            store.drop_collection(wrong.milvus.collection)
        store.close()
    # The right spec passes the same check.
    right = _own_settings(settings, triton, repository)
    TritonEmbedder(right.triton, model=right.model).wait_until_ready(30)


def test_trident_models_list_shows_the_registry_and_what_is_served(
    stack: LocalStack,
    own_triton: tuple[TritonService, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    triton, repository = own_triton
    config = tmp_path / "trident.yaml"
    triton_values = {"url": triton.grpc_url, "model_repository": str(repository)}
    config.write_text(yaml.safe_dump({"triton": {**triton_values, "model_name": SPEC.name}}))
    assert trident_models(["list", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    registry, served = out.split("Served by Triton")
    assert f"* {SPEC.name}" in registry
    assert "efficientnet_lite2_embedding_uint8" in registry and "1280" in registry
    assert "FP32 NCHW 96x96 (resize 110) -> feats[64] tag own-clip-tower-v1" in registry
    assert SPEC.name in served and "READY" in served and "matches its spec" in served
    assert "efficientnet" not in served  # this Triton serves the user's model alone

    # The stack's own Triton serves the built-in models, which match their specs.
    stack_config = tmp_path / "stack.yaml"
    stack_config.write_text(yaml.safe_dump({"triton": {"url": stack.config.triton_grpc_url}}))
    assert trident_models(["list", "--config", str(stack_config)]) == 0
    served = capsys.readouterr().out.split("Served by Triton")[1]
    assert "efficientnet_lite0_embedding_uint8" in served and "DIFFERS" not in served

    dead = tmp_path / "dead.yaml"
    dead.write_text(yaml.safe_dump({"triton": {"url": "127.0.0.1:9"}}))
    assert trident_models(["list", "--config", str(dead), "--timeout", "3"]) == 1
    out = capsys.readouterr().out
    assert "efficientnet_lite0_embedding_uint8" in out  # the registry all the same
    assert "Triton is unreachable within 3 s" in out
