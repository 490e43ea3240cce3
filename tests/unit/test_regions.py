"""Region recipes, crops and region pixels (issue 24): the registry's recipe, the crop
arithmetic against PIL, the JAX region pixels against the Pillow reference, and the region
model's conversion from Lite0's weights."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
from PIL import Image

from devstack.samples import skimage_images
from engine.errors import ConfigurationError, ImageContentError, ModelSpecError
from engine.models import (
    DEFAULT_MODEL_SPEC,
    LITE0_REGION_MODEL_SPEC,
    UINT8_MODEL_SPEC,
    Box,
    ModelSpec,
    model_registry,
    region_model_of,
    window_boxes,
)
from engine.regions import RegionPreprocessor, crop, crop_box, region_preprocess_settings
from engine.resampling import reference_pixels
from engine.settings import PreprocessSettings
from model_build.efficientnet_lite import build_embedding_model, load_packaged_weights
from model_build.triton_repository import render_config

RECIPE = UINT8_MODEL_SPEC.regions
SETTINGS = PreprocessSettings(device="cpu", batch_sizes=(16,))
Pixels = npt.NDArray[np.uint8]


def _reference(image: Pixels, box: Box, spec: ModelSpec) -> Pixels:
    """bench_regions.py's path: PIL crop of the box's pixels, then the whole-image reference."""
    width, height = image.shape[1], image.shape[0]
    x0, y0, x1, y1 = box
    left, top = round(x0 * width), round(y0 * height)
    right, bottom = max(left + 1, round(x1 * width)), max(top + 1, round(y1 * height))
    cropped = np.asarray(Image.fromarray(image).crop((left, top, right, bottom)))
    return reference_pixels(
        cropped, image_size=spec.image_size, resize_short_side=spec.resize_short_side
    )


@pytest.fixture(scope="module")
def photos() -> list[Pixels]:
    images = []
    for path in skimage_images()[:3]:
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("RGB")))
    return images


# The recipe -------------------------------------------------------------------------------


def test_lite0_uint8_has_16_windows_of_0_4_at_0_2_steps() -> None:
    assert RECIPE is not None
    boxes = RECIPE.boxes
    assert len(boxes) == 16 and len(set(boxes)) == 16
    starts = (0.0, 0.2, 0.4, 0.6)
    assert boxes == tuple(
        (x, y, round(x + 0.4, 6), round(y + 0.4, 6)) for y in starts for x in starts
    )
    assert window_boxes(0.5, 0.5) == (
        (0.0, 0.0, 0.5, 0.5),
        (0.5, 0.0, 1.0, 0.5),
        (0.0, 0.5, 0.5, 1.0),
        (0.5, 0.5, 1.0, 1.0),
    )


def test_the_region_model_is_lite0_at_a_smaller_input_in_the_same_space() -> None:
    region = region_model_of(UINT8_MODEL_SPEC)
    assert region is LITE0_REGION_MODEL_SPEC
    assert region.name in model_registry() and region.regions is None
    assert region.image_size < UINT8_MODEL_SPEC.image_size
    # The whole image's resize ratio, rounded to a pixel.
    assert region.resize_short_side == UINT8_MODEL_SPEC.resize_short_side_for(region.image_size)
    assert (region.model_version_tag, region.output_dim, region.input_format) == (
        UINT8_MODEL_SPEC.model_version_tag,
        UINT8_MODEL_SPEC.output_dim,
        UINT8_MODEL_SPEC.input_format,
    )
    assert region.weights_file == UINT8_MODEL_SPEC.weights_file
    dims = ", ".join(map(str, region.input_dims))
    assert f"dims: [ {dims} ]" in render_config(region, "python")


def test_a_model_without_a_recipe_or_of_another_space_has_no_region_model() -> None:
    with pytest.raises(ModelSpecError, match="no region recipe"):
        region_model_of(DEFAULT_MODEL_SPEC)
    other = LITE0_REGION_MODEL_SPEC.model_copy(update={"model_version_tag": "other-v1"})
    registry = {**model_registry(), other.name: other}
    with pytest.raises(ModelSpecError, match="does not share"):
        region_model_of(UINT8_MODEL_SPEC, registry)


# Crops ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(640, 427), (300, 301), (7, 5), (1, 1)])
def test_crop_arithmetic_is_pils_on_the_rounded_edges(size: tuple[int, int]) -> None:
    width, height = size
    rng = np.random.default_rng(width)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    assert RECIPE is not None
    for box in RECIPE.boxes:
        left, top, right, bottom = crop_box(width, height, box)
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        expected = np.asarray(Image.fromarray(image).crop((left, top, right, bottom)))
        np.testing.assert_array_equal(crop(image, box), expected)
    assert crop_box(640, 427, (0.6, 0.6, 1.0, 1.0)) == (384, 256, 640, 427)
    assert crop_box(1, 1, (0.6, 0.6, 1.0, 1.0)) == (0, 0, 1, 1)  # the one pixel there is


def test_a_box_is_at_least_one_pixel() -> None:
    assert crop_box(2, 2, (0.0, 0.0, 0.2, 0.2)) == (0, 0, 1, 1)
    assert crop_box(100, 50, (0.2, 0.4, 0.6, 0.8)) == (20, 20, 60, 40)


# Region pixels ----------------------------------------------------------------------------


def test_region_pixels_are_the_pillow_reference_within_one_level(photos: list[Pixels]) -> None:
    regions = RegionPreprocessor(UINT8_MODEL_SPEC, SETTINGS)
    batch = regions.preprocess(photos)
    spec = regions.region_model
    assert RECIPE is not None
    count = len(RECIPE.boxes)
    assert batch.pixels.shape == (len(photos) * count, *spec.input_dims)
    assert batch.pixels.dtype == np.uint8
    assert list(batch.items) == [i for i in range(len(photos)) for _ in range(count)]
    assert batch.boxes == RECIPE.boxes * len(photos)
    for row, (item, box) in enumerate(zip(batch.items, batch.boxes, strict=True)):
        expected = _reference(photos[item], box, spec).astype(np.int16)
        # The whole-image path's tolerance: one uint8 level.
        assert np.abs(batch.pixels[row].astype(np.int16) - expected).max() <= 1, (item, box)
    # Fixed batch shapes: 48 crops went through the one compiled batch size.
    assert {shape[0] for shape in regions.preprocessor.compiled_shapes} == {16}
    assert len(regions.preprocess([])) == 0


def test_region_preprocessing_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ConfigurationError, match="built-in preprocessing"):
        region_preprocess_settings(
            PreprocessSettings(**{"class": "tests.support.custom_preprocessing:Greyscale"}),
            LITE0_REGION_MODEL_SPEC,
        )
    regions = RegionPreprocessor(UINT8_MODEL_SPEC, SETTINGS)
    with pytest.raises(ImageContentError):
        regions.preprocess([np.zeros((4, 4), np.uint8)])


# The region model's conversion -------------------------------------------------------------


def test_the_region_model_converts_from_lite0s_weights_into_the_same_space(
    photos: list[Pixels],
) -> None:
    weights = load_packaged_weights(UINT8_MODEL_SPEC)
    region = LITE0_REGION_MODEL_SPEC
    sessions = {
        spec.name: ort.InferenceSession(
            build_embedding_model(weights, spec).SerializeToString(),
            providers=["CPUExecutionProvider"],
        )
        for spec in (region, UINT8_MODEL_SPEC)
    }

    def embed(spec: ModelSpec, pixels: Pixels) -> npt.NDArray[np.float32]:
        out: npt.NDArray[np.float32] = sessions[spec.name].run(
            [spec.output_name], {spec.input_name: pixels}
        )[0]
        return out

    small = np.stack(
        [
            reference_pixels(
                p, image_size=region.image_size, resize_short_side=region.resize_short_side
            )
            for p in photos
        ]
    )
    large = np.stack(
        [
            reference_pixels(
                p,
                image_size=UINT8_MODEL_SPEC.image_size,
                resize_short_side=UINT8_MODEL_SPEC.resize_short_side,
            )
            for p in photos
        ]
    )
    a, b = embed(region, small), embed(UINT8_MODEL_SPEC, large)
    assert a.shape == (len(photos), region.output_dim)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    # Same image at both sizes: nearer each other than to any other image.
    cosines = a @ b.T
    assert (np.argmax(cosines, axis=1) == np.arange(len(photos))).all()
    # Measured 0.68-0.81 on these photos, off the diagonal at most 0.31.
    assert float(np.diag(cosines).min()) > 0.6
    # The graph itself: its uint8 input gives the float32 graph's vectors at that size.
    floats = region.model_copy(update={"input_format": "float32_nchw", "name": "float32"})
    sessions[floats.name] = ort.InferenceSession(
        build_embedding_model(weights, floats).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    mean, std = np.asarray(region.input_mean), np.asarray(region.input_std)
    normalised = ((small - mean) / std).astype(np.float32).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(embed(floats, np.ascontiguousarray(normalised)), a, atol=1e-5)
