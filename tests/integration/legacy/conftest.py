"""Fixtures for the earlier pipeline's API and CLI on the real stack."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.samples import derived_image_set
from devstack.stack import LocalStack
from engine.store import VectorStore
from jax_embedding.config import ENVIRONMENT

N_IMAGES = 8


@pytest.fixture(autouse=True)
def no_earlier_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The earlier variables (TRITON_URL, ...) of the machine never leak into a test."""
    for variable in ENVIRONMENT:
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Distinct JPEGs, each its own nearest neighbour."""
    return derived_image_set(tmp_path_factory.mktemp("legacy") / "images", N_IMAGES)


@pytest.fixture
def collection(stack: LocalStack, unique: str) -> Iterator[str]:
    """A collection name of this test's own; dropped afterwards if the test created it."""
    name = f"legacy_{unique}"
    yield name
    store = VectorStore(stack.settings().milvus)
    try:
        if store.collection_exists(name):
            store.drop_collection(name)
    finally:
        store.close()
