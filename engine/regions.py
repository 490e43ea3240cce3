"""Region pixels: the regions of decoded images, cropped and preprocessed for the region model.

A model whose spec has a :class:`~engine.models.RegionSpec` (Lite0 uint8: 16 windows of
0.4 x 0.4 at 0.2 steps) stores, in a collection with regions, one vector per region beside the
image's global vector (issue 24; the method and its figures: docs/PERFORMANCE.md, "Region
vectors: what was tried"). Each region is

1. cropped in pixels from the decoded image (:func:`crop_box`: normalised box to pixel edges,
   at least one pixel wide and high), then
2. preprocessed exactly like a whole image, at the region model's input size (shorter side to
   its ``resize_short_side``, centre crop), by the project's JAX preprocessing
   (:func:`engine.preprocess.build_preprocessor`: ``jit`` + ``vmap``, batches padded to fixed
   sizes, so nothing recompiles), and
3. embedded by the region model (:func:`engine.models.region_model_of`), not here.

:class:`RegionPreprocessor` does 1 and 2 for a batch of images and says which image and box
each row belongs to (:class:`RegionBatch`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from engine.errors import ConfigurationError, ImageContentError
from engine.models import Box, ModelBatch, ModelSpec, region_model_of
from engine.preprocess import BaseJAXPreprocessor, build_preprocessor
from engine.settings import PreprocessSettings

logger = logging.getLogger(__name__)

PixelBox = tuple[int, int, int, int]
"""A crop in pixels: ``(left, top, right, bottom)``, right and bottom exclusive (PIL's)."""


def crop_box(width: int, height: int, box: Box) -> PixelBox:
    """The pixels of normalised ``box`` in a ``width`` x ``height`` image: each edge rounded
    to the nearest pixel (Python's ``round``), and at least one pixel wide and high, inside the
    image (only a 1-pixel side moves a left or top edge: there every region is that pixel).
    PIL's ``Image.crop`` takes the result as it is."""
    x0, y0, x1, y1 = box
    left, top = min(round(x0 * width), width - 1), min(round(y0 * height), height - 1)
    right = max(left + 1, round(x1 * width))
    bottom = max(top + 1, round(y1 * height))
    return left, top, right, bottom


def crop(image: npt.NDArray[np.uint8], box: Box) -> npt.NDArray[np.uint8]:
    """The pixels of normalised ``box`` in an ``[h, w, 3]`` image (a view, not a copy)."""
    height, width = image.shape[:2]
    left, top, right, bottom = crop_box(width, height, box)
    return image[top:bottom, left:right]


@dataclass(frozen=True, slots=True)
class RegionBatch:
    """Region pixels of a batch of images: row ``r`` is region ``boxes[r]`` of image
    ``items[r]`` (its index in the batch given), ready for the region model."""

    items: npt.NDArray[np.int64]
    boxes: tuple[Box, ...]
    pixels: ModelBatch

    def __len__(self) -> int:
        return len(self.items)


def region_decode_short_side(boxes: Sequence[Box], region_model: ModelSpec) -> int:
    """The image's shorter side at which every box's shorter side, at least the smallest box
    side times the image's shorter side, is ``region_model``'s ``resize_short_side``."""
    smallest = min(min(x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes)
    return math.ceil(region_model.resize_short_side / smallest - 1e-9)


def region_preprocess_settings(
    base: PreprocessSettings, region_model: ModelSpec
) -> PreprocessSettings:
    """``base`` (the whole images' preprocessing: device, batch sizes) at the region model's
    sizes and input format.

    Raises:
        ConfigurationError: ``base`` names a custom preprocessing class (``preprocess.class``):
            regions are preprocessed by the built-in one only, as they were measured.
    """
    if base.class_:
        raise ConfigurationError(
            f"preprocess.class {base.class_!r} is set: collections with regions need the "
            "built-in preprocessing (leave preprocess.class empty)"
        )
    return base.model_copy(
        update={
            "image_size": region_model.image_size,
            "resize_short_side": region_model.resize_short_side,
            "mean": region_model.input_mean,
            "std": region_model.input_std,
            "output": region_model.input_format,
        }
    )


class RegionPreprocessor:
    """Crops every region of ``model``'s recipe from each image and preprocesses the crops for
    the region model, on the JAX preprocessing (compiled once per batch shape).

    Thread-safe as the JAX preprocessor is.
    """

    def __init__(
        self,
        model: ModelSpec,
        settings: PreprocessSettings,
        *,
        registry: Mapping[str, ModelSpec] | None = None,
    ) -> None:
        """``model``: the collection's model (its :class:`~engine.models.RegionSpec` says the
        boxes and the region model); ``settings``: the whole images' preprocessing.

        Raises:
            ModelSpecError: ``model`` has no region recipe, or its region model another space.
            UnknownModelError: the region model is not in ``registry``.
            ConfigurationError: a custom preprocessing class, or sizes the JAX preprocessing
                refuses.
        """
        self.region_model = region_model_of(model, registry)
        assert model.regions is not None  # region_model_of refuses a model without
        self.boxes: tuple[Box, ...] = model.regions.boxes
        self._preprocessor: BaseJAXPreprocessor = build_preprocessor(
            region_preprocess_settings(settings, self.region_model)
        )

    @property
    def decode_short_side(self) -> int:
        """The shorter side an image must be decoded at for its regions: the smallest region's
        shorter side then reaches the region model's ``resize_short_side``, so no region is
        upscaled for want of decoded pixels (JPEGs are draft-decoded no smaller than this)."""
        return region_decode_short_side(self.boxes, self.region_model)

    @property
    def preprocessor(self) -> BaseJAXPreprocessor:
        """The JAX preprocessor at the region size (its compiled shapes, its warm-up)."""
        return self._preprocessor

    def warmup(self) -> None:
        """Compile every batch shape now (seconds) rather than on first use."""
        self._preprocessor.warmup()

    def preprocess(self, images: Sequence[npt.NDArray[np.uint8]]) -> RegionBatch:
        """Every region of every image, ``len(images) * len(self.boxes)`` rows, image by image
        and box by box in the recipe's order.

        Raises:
            ImageContentError: an image is not a non-empty RGB uint8 ``[h, w, 3]`` array.
        """
        for image in images:
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or not image.size:
                raise ImageContentError(
                    f"expected a non-empty uint8 [h, w, 3] image, got {image.dtype} {image.shape}"
                )
        crops = [crop(image, box) for image in images for box in self.boxes]
        pixels = self._preprocessor.preprocess(crops) if crops else self._empty()
        items = np.repeat(np.arange(len(images), dtype=np.int64), len(self.boxes))
        return RegionBatch(items=items, boxes=self.boxes * len(images), pixels=pixels)

    def _empty(self) -> ModelBatch:
        spec = self.region_model
        dtype = np.uint8 if spec.input_dtype == "UINT8" else np.float32
        return np.empty((0, *spec.input_dims), dtype=dtype)
