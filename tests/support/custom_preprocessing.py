"""A user's own preprocessing, as someone coming from the earlier pipeline writes it.

Greyscale, then the model's normalisation: images embedded with it differ from the built-in
preprocessing's, which lets tests tell which preprocessor produced a stored vector. Named by
import path (``tests.support.custom_preprocessing:GreyscalePreprocessor``) in worker settings.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from engine import BaseJAXPreprocessor

LUMA = (0.299, 0.587, 0.114)


class GreyscalePreprocessor(BaseJAXPreprocessor):
    """Grey RGB at ``image_size``, ``(x - 127) / 128``, returned HWC (the base makes it NCHW)."""

    def __init__(self, image_size: Any = (224, 224), **kwargs: Any) -> None:
        super().__init__(image_size=image_size, **kwargs)

    def _preprocess_single_jax(self, image: jax.Array) -> jax.Array:
        resized = jax.image.resize(image, (*self.image_size, 3), method="bilinear")
        grey = resized @ jnp.asarray(LUMA, dtype=jnp.float32)
        return (jnp.repeat(grey[:, :, None], 3, axis=2) - 127.0) / 128.0
