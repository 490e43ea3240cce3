"""Batch preprocessing for the embedding model, in JAX: resize, centre crop, normalise.

Per image: shorter side resized to ``resize_short_side`` with Pillow's bicubic filter
(antialiased when downscaling), centre crop ``image_size`` square, then the served model's
input (``output``, an :data:`~engine.models.InputFormat`):

- ``"float32_nchw"`` / ``"float32_nhwc"``: ``(x - mean) / std`` per channel, float32
  (4 bytes a value);
- ``"uint8_nhwc"`` / ``"uint8_nchw"``: the cropped pixels as they are, uint8 (a quarter of the
  bytes), for a model that normalises inside its graph. The float32 output is exactly this one
  normalised: the resampling rounds to uint8 after each pass, as Pillow does.

Sizes and normalisation are a model's (:class:`~engine.models.ModelSpec`):
:meth:`JaxPreprocessor.for_model` takes them from a spec; the keyword defaults are the default
model's (:data:`~engine.models.DEFAULT_MODEL_SPEC`, the earlier API's).

:func:`reference_pixels` / :func:`reference_preprocess` do the same with Pillow and numpy and
are the definition the JAX path is tested against. Both take the two passes in the order
:func:`vertical_first` fixes, whatever the installed Pillow's own ``resize`` does.

How the JAX path stays fast and compiles once:

- Only the crop is computed, as two banded passes with Pillow's uint8 rounding in between, in a
  fixed order (:func:`vertical_first`: Pillow 13's; the installed Pillow never changes it, so
  neither does a rebuild). Each output pixel gathers the few input taps it needs; the weights
  are computed inside ``jit`` from each image's true scale.
- ``vmap`` needs one input shape per batch, so each image's source region (the input pixels the
  crop depends on) is copied to a square canvas of a fixed size per scale bucket: a region is
  about ``image_size * scale`` pixels wide, so bucket ``b`` (scale <= b) has canvas side
  ~``image_size * b`` and ``2 * ceil(2 * b) + 1`` taps. Images beyond the last bucket are first
  box-reduced by an integer factor on the host (Pillow's ``Image.reduce``), the only step that
  departs from the reference.
- Batches are padded to a size in ``batch_sizes``; each (bucket, batch size) is compiled ahead of
  time exactly once and called directly, so nothing can recompile silently.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt
from PIL import Image

from engine.models import (
    DEFAULT_MODEL_SPEC,
    INPUT_FORMATS,
    PREPROCESS_BATCH_SIZES,
    InputFormat,
    ModelBatch,
    ModelSpec,
    input_is_channels_last,
    input_is_pixels,
)

logger = logging.getLogger(__name__)

# Per-channel (R, G, B) normalisation on the 0-255 scale; the default model's by default.
Channels = tuple[float, float, float]
MODEL_MEAN: Channels = DEFAULT_MODEL_SPEC.input_mean
MODEL_STD: Channels = DEFAULT_MODEL_SPEC.input_std
# The default model's normalisation is the same for every channel: its one mean and std.
MEAN = MODEL_MEAN[0]
STD = MODEL_STD[0]
# The default model's input size and the shorter side it is cropped from.
_SIZE = DEFAULT_MODEL_SPEC.image_size
_SHORT_SIDE = DEFAULT_MODEL_SPEC.resize_short_side
DEFAULT_SCALE_BUCKETS = (1.0, 2.0, 4.0, 8.0)
# Larger buckets get only the batch sizes whose canvases (RGB + packed words) fit in this.
_CANVAS_BUDGET_BYTES = 128 << 20
_BICUBIC_A = -0.5  # Pillow's cubic kernel parameter
_BICUBIC_SUPPORT = 2.0

Device = Literal["auto", "cpu", "gpu"]


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """``(height, width)`` after resizing the shorter side to ``short_side`` (aspect kept).

    The longer side is rounded half up: ``round(long * short_side / short)``.
    """
    if height <= width:
        return short_side, (2 * width * short_side + height) // (2 * height)
    return (2 * height * short_side + width) // (2 * width), short_side


def vertical_first(height: int, width: int, short_side: int) -> bool:
    """Whether an image is resampled vertically first: when resizing its shorter side to
    ``short_side`` shrinks the height by more than twice as many pixels as the width.

    The order of the two passes changes the uint8 rounding in between, so it is part of what an
    embedding is: it is fixed here, whatever Pillow is installed, so that a rebuild cannot change
    the vectors stored under one model tag. It is the order of Pillow 13 (found by matching its
    output; python-pillow/Pillow#9549), the Pillow the kernel was built against; Pillow before
    13 always goes horizontal first. The JAX kernel and :func:`reference_pixels` both follow it.
    """
    out_h, out_w = resized_size(height, width, short_side)
    return out_h < height and height - out_h > 2 * (width - out_w)


def reference_pixels(
    image: npt.NDArray[np.uint8],
    *,
    image_size: int = _SIZE,
    resize_short_side: int = _SHORT_SIDE,
) -> npt.NDArray[np.uint8]:
    """Pillow resize + centre crop of one RGB uint8 ``[h, w, 3]`` image to uint8 ``[s, s, 3]``.

    Raises:
        ValueError: ``image`` is not a non-empty uint8 ``[h, w, 3]`` array.
    """
    height, width = _check_image(image)
    out_h, out_w = resized_size(height, width, resize_short_side)
    # Pillow skips the pass of an axis whose size stays, so two one-axis resizes are its two
    # passes in our order, whatever order its own two-axis resize takes in this version.
    if vertical_first(height, width, resize_short_side):
        steps = ((width, out_h), (out_w, out_h))
    else:
        steps = ((out_w, height), (out_w, out_h))
    resized = Image.fromarray(image)
    for size in steps:
        resized = resized.resize(size, Image.Resampling.BICUBIC)
    top, left = (out_h - image_size) // 2, (out_w - image_size) // 2
    return np.ascontiguousarray(
        np.asarray(resized)[top : top + image_size, left : left + image_size]
    )


def reference_preprocess(
    image: npt.NDArray[np.uint8],
    *,
    image_size: int = _SIZE,
    resize_short_side: int = _SHORT_SIDE,
    mean: Channels = MODEL_MEAN,
    std: Channels = MODEL_STD,
) -> npt.NDArray[np.float32]:
    """:func:`reference_pixels` normalised: float32 ``[3, s, s]``.

    Raises:
        ValueError: ``image`` is not a non-empty uint8 ``[h, w, 3]`` array.
    """
    crop = reference_pixels(image, image_size=image_size, resize_short_side=resize_short_side)
    normalised = (crop.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(
        std, np.float32
    )
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))


@dataclass(frozen=True)
class _Bucket:
    max_scale: float
    canvas: int  # side of the square canvas
    taps: int  # static tap count per output pixel and axis
    batch_sizes: tuple[int, ...]


@dataclass(frozen=True)
class _Placement:
    """Where one image's source region sits and how the kernel should resample it."""

    bucket: int
    region: npt.NDArray[np.uint8]  # the source pixels the crop depends on, maybe transposed
    params: tuple[float, ...]  # per canvas axis: scale, first centre, lower, upper bound
    transposed: bool  # region stored [x, y]: the kernel's first pass then runs vertically


class JaxPreprocessor:
    """Resize + centre crop + normalise batches of decoded RGB images with ``jax.jit``/``vmap``.

    Thread-safe. Compiles one executable per (scale bucket, padded batch size) on first use, or
    all of them in :meth:`warmup`; :attr:`compile_count` and :attr:`compiled_shapes` report them.
    """

    def __init__(
        self,
        *,
        image_size: int = _SIZE,
        resize_short_side: int = _SHORT_SIDE,
        batch_sizes: Sequence[int] = PREPROCESS_BATCH_SIZES,
        device: Device = "auto",
        scale_buckets: Sequence[float] = DEFAULT_SCALE_BUCKETS,
        mean: Channels = MODEL_MEAN,
        std: Channels = MODEL_STD,
        output: InputFormat = "float32_nchw",
    ) -> None:
        """Choose sizes, batch sizes, scale buckets, normalisation, output and the device.

        ``device``: "gpu" needs a GPU, "auto" uses one when JAX sees one, "cpu" never does.
        ``mean`` and ``std`` are per RGB channel, on the 0-255 scale; the uint8 outputs ignore
        them (the model normalises).

        Raises:
            ValueError: inconsistent sizes, batch sizes or buckets.
            RuntimeError: ``device="gpu"`` and JAX sees no GPU.
        """
        if not 0 < image_size <= resize_short_side:
            raise ValueError(
                f"need 0 < image_size <= resize_short_side, got {image_size}, {resize_short_side}"
            )
        sizes = tuple(sorted(set(batch_sizes)))
        if not sizes or sizes[0] < 1:
            raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes!r}")
        scales = tuple(sorted(set(scale_buckets)))
        if not scales or scales[0] <= 0:
            raise ValueError(f"scale_buckets must be positive, got {scale_buckets!r}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"need 3 means and 3 positive stds, got {mean!r}, {std!r}")
        if output not in INPUT_FORMATS:
            raise ValueError(f"output must be one of {INPUT_FORMATS}, got {output!r}")
        self.output: InputFormat = output
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(d) for d in std)
        self.image_size = image_size
        self.resize_short_side = resize_short_side
        self.batch_sizes = sizes
        self.device = select_device(device)
        self._buckets = tuple(self._make_bucket(scale) for scale in scales)
        self._executables: dict[tuple[int, int], tuple[Any, Any]] = {}
        self._lock = threading.Lock()
        self.compile_count = 0
        logger.info(
            "preprocessing on %s; buckets (max scale, canvas, taps, batch sizes): %s",
            self.device,
            [(b.max_scale, b.canvas, b.taps, b.batch_sizes) for b in self._buckets],
        )

    @classmethod
    def for_model(cls, spec: ModelSpec, **options: Any) -> JaxPreprocessor:
        """The preprocessing ``spec``'s model takes: its sizes, normalisation and input format.
        ``options``: ``batch_sizes``, ``device``, ``scale_buckets``.

        Raises:
            ValueError, RuntimeError: as the constructor.
        """
        return cls(
            image_size=spec.image_size,
            resize_short_side=spec.resize_short_side,
            mean=spec.input_mean,
            std=spec.input_std,
            output=spec.input_format,
            **options,
        )

    @property
    def compiled_shapes(self) -> list[tuple[int, int]]:
        """``(batch size, canvas side)`` of every executable compiled so far."""
        with self._lock:
            keys = sorted(self._executables)
        return [(batch, self._buckets[bucket].canvas) for bucket, batch in keys]

    def warmup(self, max_scale: float | None = None) -> None:
        """Compile every (bucket, batch size) executable, up to buckets of ``max_scale``.

        The default compiles all of them, so steady state never compiles (the 18 default shapes
        took ~9 s on 2 cores, 0.3-1 s each).
        """
        started, before = time.perf_counter(), self.compile_count
        for index, bucket in enumerate(self._buckets):
            if max_scale is None or bucket.max_scale <= max_scale:
                for batch in bucket.batch_sizes:
                    self._executable(index, batch)
        logger.info(
            "preprocessing warm-up compiled %d shapes in %.1f s",
            self.compile_count - before,
            time.perf_counter() - started,
        )

    def preprocess(self, images: Sequence[npt.NDArray[np.uint8]]) -> ModelBatch:
        """The model's input batch for RGB uint8 ``[h, w, 3]`` images in ``output``'s dtype and
        layout: ``[n, s, s, 3]`` or ``[n, 3, s, s]``, ``s = image_size``.

        Row ``i`` belongs to ``images[i]``; padding rows never reach the result.

        Raises:
            ValueError: an image is not a non-empty uint8 ``[h, w, 3]`` array.
        """
        out = self.image_size
        last = input_is_channels_last(self.output)
        shape = (len(images), out, out, 3) if last else (len(images), 3, out, out)
        result = np.empty(shape, dtype=np.uint8 if input_is_pixels(self.output) else np.float32)
        # A transposed placement comes back with height and width swapped.
        swapped = (1, 0, 2) if last else (0, 2, 1)
        groups: dict[int, list[tuple[int, _Placement]]] = {}
        for row, image in enumerate(images):
            placement = self._place(image)
            groups.setdefault(placement.bucket, []).append((row, placement))
        # Dispatch every chunk before reading any result: JAX runs them asynchronously, so
        # filling the next canvas overlaps the previous computation.
        pending = []
        for index, members in groups.items():
            for chunk, batch in _chunks(members, self._buckets[index].batch_sizes):
                pending.append((chunk, self._run(index, batch, chunk)))
        for chunk, output in pending:
            values = np.asarray(output)
            for position, (row, placement) in enumerate(chunk):
                value = values[position]
                result[row] = value.transpose(swapped) if placement.transposed else value
        return result

    def _make_bucket(self, max_scale: float) -> _Bucket:
        # A source region spans at most out*s + 2*support + 3 pixels (see _axis_plan); 8-align.
        support = _BICUBIC_SUPPORT * max(max_scale, 1.0)
        canvas = math.ceil(self.image_size * max_scale + 2 * support + 4)
        canvas = -(-canvas // 8) * 8
        taps = 2 * math.ceil(support) + 1  # Pillow's kernel size for this support
        per_image = canvas * canvas * (3 + 4)
        sizes = tuple(b for b in self.batch_sizes if b * per_image <= _CANVAS_BUDGET_BYTES)
        return _Bucket(max_scale, canvas, taps, sizes or self.batch_sizes[:1])

    def _place(self, image: npt.NDArray[np.uint8]) -> _Placement:
        height, width = _check_image(image)
        largest = self._buckets[-1].max_scale
        factor = 1
        while True:
            out_h, out_w = resized_size(height, width, self.resize_short_side)
            scale = max(height / out_h, width / out_w)
            if scale <= largest:
                break
            # Rare (non-JPEG images several times larger than needed): box-reduce on the host
            # first, as Pillow's reducing_gap does, so the taps stay bounded.
            factor = max(factor + 1, math.ceil(scale / largest * factor))
            height, width = -(-image.shape[0] // factor), -(-image.shape[1] // factor)
        if factor > 1:
            logger.debug("pre-reducing a %s image by %d", image.shape[:2], factor)
            image = np.asarray(Image.fromarray(image).reduce(factor))
        bucket = next(i for i, b in enumerate(self._buckets) if scale <= b.max_scale)
        y0, y1, y_params = _axis_plan(height, out_h, self.image_size)
        x0, x1, x_params = _axis_plan(width, out_w, self.image_size)
        canvas = self._buckets[bucket].canvas
        if y1 - y0 > canvas or x1 - x0 > canvas:  # _make_bucket's bound guarantees otherwise
            raise AssertionError(f"region {y1 - y0}x{x1 - x0} exceeds canvas {canvas}")
        region = image[y0:y1, x0:x1]
        if vertical_first(height, width, self.resize_short_side):
            return _Placement(bucket, region.transpose(1, 0, 2), x_params + y_params, True)
        return _Placement(bucket, region, y_params + x_params, False)

    def _run(self, index: int, batch: int, chunk: list[tuple[int, _Placement]]) -> jax.Array:
        side = self._buckets[index].canvas
        canvases = np.zeros((batch, side, side, 3), dtype=np.uint8)
        # Padding rows: a harmless identity resample of a black canvas.
        params = np.tile(np.array([1.0, 0.5, 0.0, side] * 2, dtype=np.float32), (batch, 1))
        for position, (_, placement) in enumerate(chunk):
            h, w = placement.region.shape[:2]
            canvases[position, :h, :w] = placement.region
            params[position] = placement.params
        pack, resample = self._executable(index, batch)
        words = pack(jax.device_put(canvases, self.device))
        return resample(words, jax.device_put(params, self.device))  # type: ignore[no-any-return]

    def _spec(self, shape: tuple[int, ...], dtype: Any) -> Any:
        sharding = jax.sharding.SingleDeviceSharding(self.device)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # type: ignore[no-untyped-call]

    def _executable(self, index: int, batch: int) -> tuple[Any, Any]:
        """The (pack, resample) executables of one shape, compiled ahead of time once.

        Two executables, because in one XLA fuses the pixel packing into the resampling
        gathers (each tap then re-reads 3 bytes; ~6x slower), and optimization_barrier does
        not stop it on CPU. Calling compiled executables directly also means a shape mismatch
        raises instead of silently recompiling.
        """
        key = (index, batch)
        with self._lock:
            if key not in self._executables:
                bucket = self._buckets[index]
                started = time.perf_counter()
                side = bucket.canvas
                canvas = self._spec((batch, side, side, 3), jnp.uint8)
                words = self._spec((batch, side, side), jnp.uint32)
                params = self._spec((batch, 8), jnp.float32)
                kernel = partial(
                    _resize_crop_normalise,
                    out=self.image_size,
                    taps=bucket.taps,
                    normalise=None if input_is_pixels(self.output) else (self.mean, self.std),
                    channels_first=not input_is_channels_last(self.output),
                )
                self._executables[key] = (
                    jax.jit(jax.vmap(_pack_pixels)).lower(canvas).compile(),
                    jax.jit(jax.vmap(kernel)).lower(words, params).compile(),
                )
                self.compile_count += 1
                logger.info(
                    "compiled preprocessing for batch %d, canvas %d, %d taps in %.2f s",
                    batch,
                    bucket.canvas,
                    bucket.taps,
                    time.perf_counter() - started,
                )
            return self._executables[key]


def select_device(device: Device) -> jax.Device:
    """The JAX device for ``device``: "cpu", "gpu" (required) or "auto" (GPU when JAX sees one).

    "auto" on a machine without a usable GPU logs the CPU fallback once per call.

    Raises:
        ValueError: ``device`` is not one of the three.
        RuntimeError: ``device="gpu"`` and JAX sees no GPU.
    """
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    if device == "cpu":
        return jax.devices("cpu")[0]
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:  # JAX raises when no GPU backend is installed or initialisable
        gpus = []
    if gpus:
        return gpus[0]
    if device == "gpu":
        raise RuntimeError("preprocessing device 'gpu' requested, but JAX sees no GPU")
    logger.info(
        "JAX sees no GPU (the 'gpu' extra installs jax[cuda12]): preprocessing falls back to CPU"
    )
    return jax.devices("cpu")[0]


def _check_image(image: npt.NDArray[np.uint8]) -> tuple[int, int]:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
        raise ValueError(
            f"expected a non-empty uint8 [h, w, 3] image, got {image.dtype} {image.shape}"
        )
    return image.shape[0], image.shape[1]


def _axis_plan(size: int, resized: int, out: int) -> tuple[int, int, tuple[float, ...]]:
    """The source span ``[first, last)`` the crop needs along one axis, and the kernel's params.

    Output pixel ``i`` of the crop is resized pixel ``crop + i``, centred at source coordinate
    ``(crop + i + 0.5) * scale`` (Pillow's convention); its taps lie within ``support`` of it.
    Params are relative to ``first``, computed here in float64 so float32 stays exact enough.
    """
    scale = size / resized
    support = _BICUBIC_SUPPORT * max(scale, 1.0)
    crop = (resized - out) // 2
    first_centre = (crop + 0.5) * scale
    # One spare pixel each side absorbs float32-vs-float64 differences in the kernel.
    first = max(0, math.floor(first_centre - support + 0.5) - 1)
    last = min(size, math.floor((crop + out - 0.5) * scale + support + 0.5) + 1)
    return first, last, (scale, first_centre - first, -first, size - first)


def _chunks(
    members: list[tuple[int, _Placement]], sizes: tuple[int, ...]
) -> list[tuple[list[tuple[int, _Placement]], int]]:
    """Split into (chunk, padded batch size) pairs, trading padding waste against extra calls."""
    chunks = []
    start = 0
    while start < len(members):
        remaining = len(members) - start
        up = next((s for s in sizes if s >= remaining), None)
        down = max((s for s in sizes if s <= remaining), default=None)
        if up is None or (down is not None and up - remaining > remaining - down):
            batch = down if down is not None else sizes[0]
            take = min(batch, remaining)
        else:
            batch, take = up, remaining
        chunks.append((members[start : start + take], batch))
        start += take
    return chunks


def _cubic(x: jax.Array) -> jax.Array:
    """Pillow's bicubic kernel (a = -0.5), zero outside [-2, 2]."""
    x = jnp.abs(x)
    a = _BICUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def _axis_taps(
    params: jax.Array, *, out: int, taps: int, canvas: int
) -> tuple[jax.Array, jax.Array]:
    """Canvas indices and normalised weights ``[out, taps]`` along one axis (Pillow's coeffs).

    ``params`` = (scale, centre of output 0, lower and upper bound of valid source pixels), all
    relative to the canvas origin. Pillow clips taps at the image edge and renormalises; taps
    beyond the last one Pillow would use get weight exactly 0 from the kernel's support.
    """
    scale, centre0, lower, upper = params[0], params[1], params[2], params[3]
    filter_scale = jnp.maximum(scale, 1.0)
    support = _BICUBIC_SUPPORT * filter_scale
    centre = centre0 + jnp.arange(out, dtype=jnp.float32) * scale
    first = jnp.maximum(jnp.floor(centre - support + 0.5), lower)
    source = first[:, None] + jnp.arange(taps, dtype=jnp.float32)
    weights = jnp.where(
        source < upper, _cubic((source + 0.5 - centre[:, None]) / filter_scale), 0.0
    )
    weights = weights / jnp.sum(weights, axis=1, keepdims=True)
    index = jnp.clip(source.astype(jnp.int32), 0, canvas - 1)
    return index, weights


def _tap_sum(rows: jax.Array, index: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum_k weights[i, k] * rows[index[i, k]]``: gathers whole rows (contiguous), unrolled
    over the few taps so XLA fuses gather, convert, multiply and add into one loop."""
    total = rows[index[:, 0]].astype(jnp.float32) * weights[:, 0, None, None]
    for k in range(1, index.shape[1]):
        total = total + rows[index[:, k]].astype(jnp.float32) * weights[:, k, None, None]
    return total


def _pack_pixels(canvas: jax.Array) -> jax.Array:
    """Canvas uint8 ``[c, c, 3]`` -> uint32 ``[c, c]`` words ``R | G << 8 | B << 16``.

    The passes below move whole pixels (transposes, row gathers); as single uint32 words that
    is several times faster in XLA than as 3 or 4 separate bytes.
    """
    wide = canvas.astype(jnp.uint32)
    return wide[:, :, 0] | (wide[:, :, 1] << 8) | (wide[:, :, 2] << 16)


def _transpose_pixels(words: jax.Array) -> jax.Array:
    """Packed pixels uint32 ``[a, b]`` -> uint8 ``[b, a, 4]`` (RGBX; CPUs and GPUs are
    little-endian, so byte 0 is R)."""
    return jax.lax.bitcast_convert_type(words.T, jnp.uint8)


def _to_uint8(values: jax.Array) -> jax.Array:
    # Pillow rounds half up and clips to 0..255 after each pass.
    return jnp.clip(jnp.floor(values + 0.5), 0.0, 255.0)


def _resize_crop_normalise(
    words: jax.Array,
    params: jax.Array,
    *,
    out: int,
    taps: int,
    normalise: tuple[tuple[float, ...], tuple[float, ...]] | None,
    channels_first: bool,
) -> jax.Array:
    """One image: packed canvas uint32 ``[c, c]`` -> ``(x - mean) / std`` float32 with
    ``normalise=(mean, std)``, else the uint8 pixels; ``[3, out, out]`` if ``channels_first``,
    else ``[out, out, 3]``."""
    side = words.shape[0]
    y_index, y_weights = _axis_taps(params[0:4], out=out, taps=taps, canvas=side)
    x_index, x_weights = _axis_taps(params[4:8], out=out, taps=taps, canvas=side)
    columns = _transpose_pixels(words)  # [x, y, 4]
    horizontal = _to_uint8(_tap_sum(columns, x_index, x_weights)).astype(jnp.uint8)
    rows = _transpose_pixels(jax.lax.bitcast_convert_type(horizontal, jnp.uint32))  # [y, x, 4]
    vertical = _to_uint8(_tap_sum(rows[:, :, :3], y_index, y_weights))
    if normalise is None:
        result = vertical.astype(jnp.uint8)
    else:
        mean, std = normalise
        result = (vertical - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return jnp.transpose(result, (2, 0, 1)) if channels_first else result
