"""The earlier preprocessing API (engine.preprocess): user subclasses, the built-in one,
building from settings, and the GPU / CPU-fallback choice."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from engine.errors import ConfigurationError, ImageContentError, ImageReferenceError
from engine.models import DEFAULT_MODEL_SPEC
from engine.preprocess import build_preprocessor
from engine.resampling import reference_preprocess
from engine.settings import FetchSettings, PreprocessSettings
from jax_embedding import BaseJAXPreprocessor, JAXImagePreprocessor
from tests.support.custom_preprocessing import LUMA, GreyscalePreprocessor

CUSTOM = "tests.support.custom_preprocessing:GreyscalePreprocessor"


def picture(height: int, width: int, seed: int = 0) -> npt.NDArray[np.uint8]:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))


def gpu_present() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def test_a_user_subclass_is_vmapped_and_returned_nchw() -> None:
    preprocessor = GreyscalePreprocessor(image_size=(64, 64), batch_sizes=(1, 4))
    images = [picture(64, 64, seed) for seed in range(3)]
    batch = preprocessor.preprocess(images)
    assert batch.shape == (3, 3, 64, 64) and batch.dtype == np.float32
    for row, image in zip(batch, images, strict=True):
        grey = image.astype(np.float32) @ np.asarray(LUMA, dtype=np.float32)
        np.testing.assert_allclose(row[0], (grey - 127) / 128, atol=1e-4)
        np.testing.assert_array_equal(row[0], row[2])
    # Three images ran as a padded batch of 4; a second call of another length reuses shapes.
    assert preprocessor.compiled_shapes == [(4, 64, 64)]
    preprocessor.preprocess(images[:1] + images)
    assert preprocessor.compiled_shapes == [(4, 64, 64)]


def test_images_of_other_sizes_are_brought_to_the_common_shape_first() -> None:
    preprocessor = GreyscalePreprocessor(image_size=(32, 48), batch_sizes=(2,))
    batch = preprocessor.preprocess([picture(100, 70), picture(20, 300), picture(32, 48)])
    assert batch.shape == (3, 3, 32, 48)
    assert preprocessor.compiled_shapes == [(2, 32, 48)]


def test_a_subclass_must_implement_the_per_image_function() -> None:
    class Forgetful(BaseJAXPreprocessor):
        pass

    with pytest.raises(TypeError, match="_preprocess_single_jax"):
        Forgetful()


def test_the_built_in_one_is_the_banded_reference_preprocessing() -> None:
    images = [picture(480, 640), picture(300, 200, seed=1)]
    default = JAXImagePreprocessor(cache_compiled=False, batch_sizes=(1, 2))
    batch = default.preprocess(images)
    for row, image in zip(batch, images, strict=True):
        assert np.abs(row - reference_preprocess(image)).max() <= 1 / 128 + 1e-6
    # The earlier API's 0-1 scale mean/std: the reference with the same values on 0-255.
    imagenet = JAXImagePreprocessor(
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), cache_compiled=False
    )
    expected = reference_preprocess(
        images[0],
        mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
        std=(0.229 * 255, 0.224 * 255, 0.225 * 255),
    )
    np.testing.assert_allclose(imagenet.preprocess(images[:1])[0], expected, atol=1 / 0.224 / 255)
    assert not np.allclose(imagenet.preprocess(images[:1])[0], batch[0], atol=0.05)


def test_cache_compiled_compiles_every_shape_up_front() -> None:
    preprocessor = JAXImagePreprocessor(image_size=64, cache_compiled=True, batch_sizes=(1, 2))
    compiled = preprocessor.compiled_shapes
    assert {batch for batch, _, _ in compiled} == {1, 2} and len(compiled) >= 4
    preprocessor.preprocess([picture(64, 80)])
    assert preprocessor.compiled_shapes == compiled


def test_the_built_in_one_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ConfigurationError, match="square"):
        JAXImagePreprocessor(image_size=(224, 300), cache_compiled=False)
    with pytest.raises(ConfigurationError, match="one value per RGB channel"):
        JAXImagePreprocessor(mean=(0.5, 0.5), cache_compiled=False)
    with pytest.raises(ConfigurationError, match="NCHW"):
        JAXImagePreprocessor(data_format="NHWC", cache_compiled=False)
    with pytest.raises(ImageContentError, match="uint8"):
        JAXImagePreprocessor(cache_compiled=False).preprocess([np.zeros((4, 4, 3), np.float32)])


def test_references_are_fetched_with_the_worker_fence(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    Image.fromarray(picture(40, 60)).save(allowed / "a.png")
    Image.fromarray(picture(40, 60)).save(tmp_path / "outside.png")
    preprocessor = GreyscalePreprocessor(
        image_size=(32, 32), batch_sizes=(1, 2), fetch=FetchSettings(allowed_roots=[allowed])
    )
    single = preprocessor.preprocess_single(str(allowed / "a.png"))
    assert single.shape == (3, 32, 32)
    mixed = preprocessor.preprocess_batch([picture(10, 10), allowed / "a.png"])
    np.testing.assert_array_equal(mixed[1], single)
    assert preprocessor([str(allowed / "a.png")]).shape == (1, 3, 32, 32)
    with pytest.raises(ImageReferenceError, match="allowed_roots"):
        preprocessor.preprocess_single(str(tmp_path / "outside.png"))


def test_a_refused_reference_names_what_the_standalone_preprocessor_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It has no config: the fix it names is its own fetch= argument (the pipeline's names
    # config.fetch, tests/integration/legacy).
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # the default fence: the current directory
    Image.fromarray(picture(40, 60)).save(tmp_path / "outside.png")
    preprocessor = JAXImagePreprocessor(cache_compiled=False, batch_sizes=(1,))
    with pytest.raises(ImageReferenceError) as caught:
        preprocessor.preprocess_single(str(tmp_path / "outside.png"))
    assert "fetch=FetchSettings(allowed_roots=" in str(caught.value)
    assert "config." not in str(caught.value)
    with pytest.raises(ImageReferenceError) as caught:
        preprocessor.preprocess_single("http://127.0.0.1:9/cat.jpg")  # loopback: private
    assert "fetch=FetchSettings(allowed_hosts=" in str(caught.value)
    assert "config." not in str(caught.value)


def test_the_built_in_one_resizes_by_the_models_ratio() -> None:
    for side, short in ((224, 256), (256, 293), (64, 73)):
        preprocessor = JAXImagePreprocessor(image_size=side, cache_compiled=False)
        assert (
            preprocessor.decode_short_side
            == short
            == DEFAULT_MODEL_SPEC.resize_short_side_for(side)
        )


def test_settings_name_a_custom_class_by_import_path() -> None:
    built = build_preprocessor(
        PreprocessSettings.model_validate({"class": CUSTOM, "image_size": 96}), batch_sizes=(1,)
    )
    assert isinstance(built, GreyscalePreprocessor)
    assert (built.image_size, built.batch_sizes) == ((96, 96), (1,))
    default = build_preprocessor(PreprocessSettings(batch_sizes=(1, 4)))
    assert type(default) is JAXImagePreprocessor
    assert default.batch_sizes == (1, 4)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("tests.support.no_such_module:Thing", "cannot be imported"),
        ("tests.support.custom_preprocessing:Missing", "cannot be imported"),
        ("tests.support.custom_preprocessing:LUMA", "not a subclass"),
    ],
)
def test_a_wrong_class_path_is_a_configuration_error(path: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        build_preprocessor(PreprocessSettings.model_validate({"class": path}))


def test_gpu_when_present_else_one_logged_cpu_fallback(caplog: pytest.LogCaptureFixture) -> None:
    images = [picture(120, 160, seed) for seed in range(3)]
    caplog.set_level(logging.INFO, logger="engine.resampling")
    preprocessor = JAXImagePreprocessor(use_gpu=True, cache_compiled=False, batch_sizes=(1, 4))
    batch = preprocessor.preprocess(images)
    preprocessor.preprocess(images[:1])
    fallbacks = [r for r in caplog.records if "falls back to CPU" in r.getMessage()]
    if gpu_present():
        assert preprocessor.device.platform == "gpu"
        assert not fallbacks
        cpu = JAXImagePreprocessor(use_gpu=False, cache_compiled=False, batch_sizes=(1, 4))
        np.testing.assert_allclose(batch, cpu.preprocess(images), atol=1 / 128 + 1e-6)
    else:
        assert preprocessor.device.platform == "cpu"
        assert len(fallbacks) == 1, [r.getMessage() for r in caplog.records]
        # Only device="gpu" (the project's settings) insists on a GPU.
        with pytest.raises(ConfigurationError, match="JAX sees no GPU"):
            JAXImagePreprocessor(device="gpu", cache_compiled=False)
