"""The earlier pipeline's preprocessing API, on this project's fetch, decode and JAX code.

- :class:`BaseJAXPreprocessor`: subclass it and implement ``_preprocess_single_jax(image)`` on
  one HWC float32 image (0-255). The base class fetches and decodes (with the worker's fetch
  safety), resizes every image on the host to ``image_size`` (bicubic) so one batch has one
  shape, pads batches to one of ``batch_sizes``, jit-compiles the ``vmap`` of the function once
  per batch size (cached), and returns NCHW float32 (an HWC result is transposed).
- :class:`JAXImagePreprocessor`: the built-in one, the project's banded resampling
  (:class:`engine.resampling.JaxPreprocessor`: shorter side resized by the model's ratio,
  :meth:`engine.models.ModelSpec.resize_short_side_for`, centre crop,
  ``(x / 255 - mean) / std``); with a uint8 ``output`` (``"uint8_nhwc"``) it stops before
  normalising and returns the cropped uint8 pixels, for a model that normalises itself. Its
  defaults are the earlier API's model (:data:`engine.models.DEFAULT_MODEL_SPEC`).
- :func:`build_preprocessor`: the one preprocessor the settings describe (``preprocess.class``
  names a subclass by import path), used by the worker, the query API and the pipeline so that
  what is searched is embedded exactly as what was stored. In a ``Settings`` its sizes,
  normalisation and output follow the named model's spec (``engine.settings``). Its output is
  ``preprocess.output`` (:attr:`BaseJAXPreprocessor.output_format`), the served model's input:
  callers pass it on without looking at its dtype.

Device: ``use_gpu=True`` takes the GPU JAX sees and otherwise falls back to the CPU, logged once
per preprocessor; ``jax_platform="cpu"`` or ``use_gpu=False`` forces the CPU.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import numpy.typing as npt
from PIL import Image
from pydantic import ValidationError

from engine.errors import ConfigurationError, ImageContentError, ImageReferenceError, TridentError
from engine.fetch import ImageFetcher
from engine.images import decode_image
from engine.models import (
    DEFAULT_MODEL_SPEC,
    PREPROCESS_BATCH_SIZES,
    InputFormat,
    ModelBatch,
    input_is_pixels,
)
from engine.resampling import Device, JaxPreprocessor, select_device
from engine.settings import FetchSettings, PreprocessSettings
from schemas.events import reference_from_string

logger = logging.getLogger(__name__)

ImageInput = str | Path | npt.NDArray[np.uint8]
FenceHints = Mapping[str, str]
"""What a user can do about a reference the fetch fence refused (by error reason), in the
terms of the API they called: the pipeline takes a config, a preprocessor its ``fetch``."""
# The earlier API's model, the defaults of its preprocessors.
_SPEC = DEFAULT_MODEL_SPEC
# That model's own normalisation, written on the earlier API's 0-1 scale.
MODEL_MEAN = (_SPEC.input_mean[0] / 255, _SPEC.input_mean[1] / 255, _SPEC.input_mean[2] / 255)
MODEL_STD = (_SPEC.input_std[0] / 255, _SPEC.input_std[1] / 255, _SPEC.input_std[2] / 255)
PREPROCESSOR_FENCE_HINTS: FenceHints = {
    "path_not_allowed": "pass the preprocessor fetch=FetchSettings(allowed_roots=[<its folder>]) "
    "(engine.settings; the default allows the current directory only)",
    "forbidden_address": "if the host is trusted, pass the preprocessor "
    "fetch=FetchSettings(allowed_hosts=[<the host>]) (engine.settings)",
}


@dataclass(frozen=True, slots=True)
class LoadedImage:
    """One fetched and decoded input: where it came from, its bytes' SHA-256, its pixels."""

    reference: str
    content_sha256: str
    pixels: npt.NDArray[np.uint8]


def load_images(
    fetcher: ImageFetcher,
    inputs: Sequence[str | Path],
    *,
    max_pixels: int,
    short_side: int,
    fence_hints: FenceHints,
) -> list[LoadedImage]:
    """Fetch (concurrently) and decode paths or http(s) URLs, in input order.

    ``fence_hints`` say, by error reason, how the caller's user lets the fence pass a reference.

    Raises:
        ImageReferenceError: an input cannot be followed (missing, outside the allowed roots,
            forbidden address); the message names it and, for a fenced-off one, the fix
            (``fence_hints``).
        ImageContentError: an input is not a usable image.
        FetchUnavailableError: an image host or the filesystem failed; try again.
    """
    references = [str(item) for item in inputs]
    try:
        refs = [reference_from_string(reference) for reference in references]
    except ValidationError as exc:
        raise ImageReferenceError(f"not a path or http(s) URL: {exc}") from exc
    loaded = []
    for reference, result in zip(references, fetcher.fetch_many(refs), strict=True):
        if isinstance(result, TridentError):
            hint = fence_hints.get(result.reason)
            if hint:
                raise ImageReferenceError(f"{result}; {hint}", reason=result.reason) from result
            raise result
        try:
            decoded = decode_image(result, max_pixels=max_pixels, target_short_side=short_side)
        except ImageContentError as exc:
            exc.args = (f"{reference}: {exc}",)
            raise
        loaded.append(LoadedImage(reference, hashlib.sha256(result).hexdigest(), decoded.pixels))
    return loaded


class BaseJAXPreprocessor:
    """Batches of decoded RGB images -> model input, with a user's JAX function per image.

    Thread-safe. Subclasses implement :meth:`_preprocess_single_jax`; the built-in
    :class:`JAXImagePreprocessor` overrides :meth:`preprocess` instead.
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = (_SPEC.image_size, _SPEC.image_size),
        use_gpu: bool = False,
        *,
        jax_platform: str | None = None,
        device: Device | None = None,
        batch_sizes: Sequence[int] = PREPROCESS_BATCH_SIZES,
        fetch: FetchSettings | None = None,
        data_format: str = "NCHW",
    ) -> None:
        """Sizes, batch sizes, device and how references are fetched.

        ``image_size`` is ``(height, width)`` or one side; ``device`` ("auto", "cpu", "gpu"),
        when given, overrides ``use_gpu`` and ``jax_platform``. ``fetch`` fences the paths and
        URLs :meth:`preprocess_single` and :meth:`preprocess_batch` may read (default: paths
        below the current directory, public URLs). ``data_format`` is the earlier keyword; the
        model takes NCHW, the only one.

        Raises:
            ConfigurationError: a bad size, batch size, platform or data format, or
                ``device="gpu"`` and JAX sees no GPU.
            TypeError: the subclass implements neither ``_preprocess_single_jax`` nor
                ``preprocess``.
        """
        cls = type(self)
        if (
            cls._preprocess_single_jax is BaseJAXPreprocessor._preprocess_single_jax
            and cls.preprocess is BaseJAXPreprocessor.preprocess
        ):
            raise TypeError(f"{cls.__name__} must implement _preprocess_single_jax(image)")
        if data_format != "NCHW":
            raise ConfigurationError(f"data_format must be 'NCHW', got {data_format!r}")
        self.image_size = _size_pair(image_size)
        self.use_gpu = use_gpu
        sizes = tuple(sorted(set(batch_sizes)))
        if not sizes or sizes[0] < 1:
            raise ConfigurationError(f"batch_sizes must be positive integers, got {batch_sizes!r}")
        self.batch_sizes = sizes
        if jax_platform not in (None, "cpu", "gpu"):
            raise ConfigurationError(f"jax_platform must be 'cpu', 'gpu' or None: {jax_platform!r}")
        choice: Device = device or ("auto" if use_gpu and jax_platform != "cpu" else "cpu")
        try:
            self.device = select_device(choice)
        except (RuntimeError, ValueError) as exc:
            raise ConfigurationError(
                f"{exc}; install the 'gpu' extra (jax[cuda12]) or choose the CPU"
            ) from exc
        self._fetch = fetch or FetchSettings(allowed_roots=[Path.cwd()])
        self._compiled: dict[int, Any] = {}
        self._lock = threading.Lock()

    @property
    def decode_short_side(self) -> int:
        """JPEGs are draft-decoded to a shorter side no smaller than this."""
        return min(self.image_size)

    @property
    def output_format(self) -> InputFormat:
        """What :meth:`preprocess` returns: float32 NCHW here (subclasses' results are cast)."""
        return "float32_nchw"

    @property
    def compiled_shapes(self) -> list[tuple[int, ...]]:
        """``(batch size, height, width)`` of every compiled batch function so far."""
        with self._lock:
            return [(batch, *self.image_size) for batch in sorted(self._compiled)]

    def _preprocess_single_jax(self, image: jax.Array) -> jax.Array:
        """One image, float32 ``[height, width, 3]`` in 0-255, to the model's input for it
        (``[3, h, w]`` or ``[h, w, 3]``). Traced by ``jax.jit``: use ``jax.numpy``."""
        raise NotImplementedError

    def warmup(self) -> None:
        """Compile the batch function for every batch size now rather than on first use."""
        for batch in self.batch_sizes:
            self._executable(batch)

    def preprocess(self, images: Sequence[npt.NDArray[np.uint8]]) -> ModelBatch:
        """The model's input batch (:attr:`output_format`) for decoded RGB uint8 ``[h, w, 3]``
        images, in order: here float32 NCHW.

        Raises:
            ImageContentError: an image is not a non-empty uint8 ``[h, w, 3]`` array.
        """
        height, width = self.image_size
        if not images:
            return np.zeros((0, 3, height, width), dtype=np.float32)
        canvas = np.stack([_resize(image, width, height) for image in images])
        parts = []
        step = self.batch_sizes[-1]
        for start in range(0, len(images), step):
            chunk = canvas[start : start + step]
            # Padded to a compiled batch size, so a new batch length never recompiles.
            batch = next(size for size in self.batch_sizes if size >= len(chunk))
            padded = np.zeros((batch, height, width, 3), dtype=np.float32)
            padded[: len(chunk)] = chunk
            output = self._executable(batch)(jax.device_put(padded, self.device))
            parts.append(np.asarray(output)[: len(chunk)])
        return _to_nchw(np.concatenate(parts))

    def preprocess_single(self, image: ImageInput) -> ModelBatch:
        """The model input for one path, http(s) URL or RGB uint8 array (``[3, h, w]`` float32
        unless :attr:`output_format` says otherwise).

        Raises:
            ImageReferenceError, ImageContentError, FetchUnavailableError: see
                :func:`load_images`.
        """
        single: ModelBatch = self.preprocess_batch([image])[0]
        return single

    def preprocess_batch(self, images: Sequence[ImageInput]) -> ModelBatch:
        """The model input ``[n, ...]`` (:attr:`output_format`) for paths, http(s) URLs or RGB
        uint8 arrays.

        Raises:
            ImageReferenceError, ImageContentError, FetchUnavailableError: see
                :func:`load_images`.
        """
        references = [item for item in images if not isinstance(item, np.ndarray)]
        fetched: list[npt.NDArray[np.uint8]] = []
        if references:
            with ImageFetcher(self._fetch) as fetcher:
                loaded = load_images(
                    fetcher,
                    references,
                    max_pixels=self._fetch.max_pixels,
                    short_side=self.decode_short_side,
                    fence_hints=PREPROCESSOR_FENCE_HINTS,
                )
            fetched = [item.pixels for item in loaded]
        remaining = iter(fetched)
        pixels = [item if isinstance(item, np.ndarray) else next(remaining) for item in images]
        return self.preprocess(pixels)

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> ModelBatch:
        """A batch ``[n, ...]``: a list is preprocessed as one, a single input as ``n=1``."""
        if isinstance(images, list | tuple):
            return self.preprocess_batch(images)
        return self.preprocess_batch([images])  # type: ignore[list-item]

    def _executable(self, batch: int) -> Any:
        with self._lock:
            if batch not in self._compiled:
                height, width = self.image_size
                spec = jax.ShapeDtypeStruct(  # type: ignore[no-untyped-call]
                    (batch, height, width, 3),
                    np.float32,
                    sharding=jax.sharding.SingleDeviceSharding(self.device),
                )
                function = jax.jit(jax.vmap(self._preprocess_single_jax))
                self._compiled[batch] = function.lower(spec).compile()
                logger.info("compiled %s for batch %d", type(self).__name__, batch)
            return self._compiled[batch]


class JAXImagePreprocessor(BaseJAXPreprocessor):
    """The built-in preprocessing: banded bicubic resize of the shorter side, centre crop,
    ``(x / 255 - mean) / std`` per RGB channel; the model's normalisation by default."""

    def __init__(
        self,
        image_size: int | Sequence[int] = (_SPEC.image_size, _SPEC.image_size),
        mean: Sequence[float] = MODEL_MEAN,
        std: Sequence[float] = MODEL_STD,
        cache_compiled: bool = True,
        *,
        resize_short_side: int | None = None,
        output: InputFormat = "float32_nchw",
        **kwargs: Any,
    ) -> None:
        """``image_size`` must be square; the shorter side is resized to ``resize_short_side``
        (default: the earlier API model's ratio, :meth:`ModelSpec.resize_short_side_for`).
        ``cache_compiled`` compiles every batch shape now (seconds) instead of on first use.
        A uint8 ``output`` (e.g. ``"uint8_nhwc"``) returns the cropped pixels for a model that
        normalises itself (``mean`` and ``std``, unused then, must be left as they are). Other
        keywords as :class:`BaseJAXPreprocessor`.

        Raises:
            ConfigurationError: a non-square size, or sizes, normalisation, output or device
                that do not fit together.
        """
        super().__init__(image_size, **kwargs)
        side, width = self.image_size
        if side != width:
            raise ConfigurationError(
                f"image_size must be square for the built-in preprocessing, got {self.image_size}"
            )
        short = resize_short_side or _SPEC.resize_short_side_for(side)
        if input_is_pixels(output) and not _is_model_normalisation(mean, std):
            raise ConfigurationError(
                f"output {output!r} leaves normalisation to the model; mean {tuple(mean)} and "
                f"std {tuple(std)} are not its own: use output 'float32_nchw'"
            )
        try:
            self._jax = JaxPreprocessor(
                image_size=side,
                resize_short_side=short,
                batch_sizes=self.batch_sizes,
                device="gpu" if self.device.platform == "gpu" else "cpu",
                mean=_channels(mean, "mean"),
                std=_channels(std, "std"),
                output=output,
            )
        except ValueError as exc:
            raise ConfigurationError(f"invalid preprocessing: {exc}") from exc
        if cache_compiled:
            self.warmup()

    @property
    def decode_short_side(self) -> int:
        return self._jax.resize_short_side

    @property
    def compiled_shapes(self) -> list[tuple[int, ...]]:
        return [(batch, side, side) for batch, side in self._jax.compiled_shapes]

    @property
    def output_format(self) -> InputFormat:
        return self._jax.output

    def warmup(self) -> None:
        self._jax.warmup()

    def preprocess(self, images: Sequence[npt.NDArray[np.uint8]]) -> ModelBatch:
        try:
            return self._jax.preprocess(images)
        except ValueError as exc:  # not an RGB uint8 array
            raise ImageContentError(str(exc)) from exc


def build_preprocessor(
    settings: PreprocessSettings, *, batch_sizes: Sequence[int] | None = None
) -> BaseJAXPreprocessor:
    """The preprocessor the settings describe: ``settings.class_`` by import path, or the
    built-in one, with output ``settings.output``. ``batch_sizes`` overrides the settings'
    (the query API embeds one at a time).

    Raises:
        ConfigurationError: the class cannot be imported, is not a
            :class:`BaseJAXPreprocessor` subclass, refuses its arguments, or outputs another
            format than ``settings.output`` (the served model's input).
    """
    sizes = tuple(batch_sizes or settings.batch_sizes)
    if not settings.class_:
        # Pixels go out as they are: the model normalises them with its own mean/std.
        normalisation = (
            {}
            if input_is_pixels(settings.output)
            else {
                "mean": tuple(m / 255 for m in settings.mean),
                "std": tuple(s / 255 for s in settings.std),
            }
        )
        return JAXImagePreprocessor(
            settings.image_size,
            **normalisation,
            cache_compiled=False,  # entry points call warmup() when they are ready to wait
            resize_short_side=settings.resize_short_side,
            output=settings.output,
            device=settings.device,
            batch_sizes=sizes,
        )
    cls = _import_class(settings.class_)
    try:
        preprocessor = cls(
            image_size=settings.image_size,
            use_gpu=settings.device != "cpu",
            batch_sizes=sizes,
            **settings.options,
        )
    except TypeError as exc:
        raise ConfigurationError(
            f"preprocess.class {settings.class_!r} refused its arguments: {exc}"
        ) from exc
    if preprocessor.output_format != settings.output:
        raise ConfigurationError(
            f"preprocess.class {settings.class_!r} outputs {preprocessor.output_format!r}, "
            f"but preprocess.output (the model's input) is {settings.output!r}"
        )
    return preprocessor


def _import_class(path: str) -> type[BaseJAXPreprocessor]:
    module_name, _, class_name = path.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"preprocess.class {path!r} cannot be imported: {exc}") from exc
    if not (isinstance(found, type) and issubclass(found, BaseJAXPreprocessor)):
        raise ConfigurationError(
            f"preprocess.class {path!r} is not a subclass of engine.BaseJAXPreprocessor"
        )
    return found


def _is_model_normalisation(mean: Sequence[float], std: Sequence[float]) -> bool:
    """True for the model's own ``(x - 127) / 128`` on the 0-1 scale (as the earlier API)."""
    pairs = [*zip(mean, MODEL_MEAN, strict=False), *zip(std, MODEL_STD, strict=False)]
    return len(pairs) == 6 and all(abs(a - b) < 1e-6 for a, b in pairs)


def _size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ConfigurationError(f"image_size must be a positive int or (height, width): {size!r}")
    return pair[0], pair[1]


def _channels(values: Sequence[float], name: str) -> tuple[float, float, float]:
    if len(values) != 3:
        raise ConfigurationError(f"{name} needs one value per RGB channel, got {values!r}")
    return values[0] * 255, values[1] * 255, values[2] * 255


def _resize(image: npt.NDArray[np.uint8], width: int, height: int) -> npt.NDArray[np.float32]:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
        raise ImageContentError(
            f"expected a non-empty RGB uint8 [h, w, 3] image, got {image.dtype} {image.shape}"
        )
    if image.shape[:2] != (height, width):
        image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))
    return image.astype(np.float32)


def _to_nchw(batch: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    if batch.ndim == 4 and batch.shape[-1] == 3 and batch.shape[1] != 3:
        batch = batch.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(batch, dtype=np.float32)
