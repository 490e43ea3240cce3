"""Throughput of image decoding and preprocessing, three preprocessors measured in one run.

Inputs are distinct 640x480 JPEGs (quality 90) made from scikit-image's sample photos. Measured,
each over the same batches of ``--batch`` images:

- ``decode``: :func:`engine.images.decode_image` alone;
- ``jax``: :class:`engine.resampling.JaxPreprocessor` (banded bicubic, bucketed canvases);
- ``jax uint8``: the same with ``output="uint8_nhwc"`` (what the worker runs: the served model
  normalises), timed without decode only;
- ``reference``: :func:`engine.resampling.reference_preprocess` (Pillow + numpy), image by image;
- ``jax.image.resize``: ``jax.jit(jax.vmap(...))`` around ``jax.image.resize(..., "bicubic")``;
- ``decode + X``: end to end, bytes in, NCHW batch out.

Each at batch sizes 1, 8, 32 and 64 (the ``jax.image.resize`` baseline at 32 only), with the
compile time of each batch shape, and the number of compiles that happened while timing (must
be 0: one input shape per bucket). And for 12-megapixel JPEGs, a full decode against the
service's draft-mode decode (DCT-domain downscaling).

Rounds interleave the methods and the median round is reported, so a busy machine slows every
method alike rather than whichever ran during a spike. Compilation happens before timing. From
the repository root::

    .venv/bin/python benchmarks/bench_preprocess.py [--quick]
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt
from apps import make_large_jpegs
from PIL import Image
from skimage import data as skdata

import benchlib
from engine.images import decode_image
from engine.models import UINT8_MODEL_SPEC
from engine.resampling import MEAN, STD, JaxPreprocessor, reference_preprocess, resized_size

logger = logging.getLogger(__name__)

Pixels = npt.NDArray[np.uint8]
Batch = npt.NDArray[np.float32]
WIDTH, HEIGHT = 640, 480
SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


def make_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """``count`` distinct 640x480 JPEGs: random crops and flips of scikit-image photos."""
    rng = np.random.default_rng(seed)
    photos = [getattr(skdata, name)() for name in SAMPLES]
    jpegs = []
    for i in range(count):
        photo = Image.fromarray(photos[i % len(photos)]).convert("RGB")
        scale = rng.uniform(1.0, 1.5) * max(WIDTH / photo.width, HEIGHT / photo.height)
        photo = photo.resize((round(photo.width * scale) + 1, round(photo.height * scale) + 1))
        left = int(rng.integers(0, photo.width - WIDTH + 1))
        top = int(rng.integers(0, photo.height - HEIGHT + 1))
        photo = photo.crop((left, top, left + WIDTH, top + HEIGHT))
        if rng.random() < 0.5:
            photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        photo.save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


def jax_image_resize_baseline(
    height: int, width: int, *, image_size: int = 224, short_side: int = 256
) -> Callable[[Sequence[Pixels]], Batch]:
    """The naive JAX baseline: vmapped ``jax.image.resize`` of same-sized images."""
    out_h, out_w = resized_size(height, width, short_side)
    top, left = (out_h - image_size) // 2, (out_w - image_size) // 2

    def one(image: jax.Array) -> jax.Array:
        resized = jax.image.resize(image.astype(jnp.float32), (out_h, out_w, 3), "bicubic")
        crop = jnp.clip(jnp.round(resized), 0, 255)[
            top : top + image_size, left : left + image_size
        ]
        return jnp.transpose((crop - MEAN) / STD, (2, 0, 1))

    batched = jax.jit(jax.vmap(one))

    def run(images: Sequence[Pixels]) -> Batch:
        return np.asarray(batched(np.stack(images)))

    return run


def reference_batch(images: Sequence[Pixels]) -> Batch:
    """The Pillow + numpy reference over a batch."""
    return np.stack([reference_preprocess(image) for image in images])


def decode_batch(jpegs: Sequence[bytes]) -> list[Pixels]:
    """Decode a batch of JPEGs with the service's decoder."""
    side = UINT8_MODEL_SPEC.resize_short_side  # as the worker decodes for the model
    return [decode_image(j, max_pixels=50_000_000, target_short_side=side).pixels for j in jpegs]


def timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def measure_batch(size: int, count: int, rounds: int, *, baseline: bool) -> dict[str, Any]:
    """Images/s of every method at one batch size, compile time, and recompiles while timing."""
    jpegs = make_jpegs(size * count, seed=size)
    batches = [jpegs[i : i + size] for i in range(0, len(jpegs), size)]
    decoded = [decode_batch(batch) for batch in batches]
    preprocessor = JaxPreprocessor(batch_sizes=(size,))
    compile_started = time.perf_counter()
    preprocessor.warmup(max_scale=2.0)
    compile_s = time.perf_counter() - compile_started
    # What the worker runs: the same resampling, uint8 pixels out (the model normalises).
    pixels = JaxPreprocessor(batch_sizes=(size,), output="uint8_nhwc")
    pixels.warmup(max_scale=2.0)
    methods: dict[str, Callable[[int], object]] = {
        "decode": lambda i: decode_batch(batches[i]),
        "jax": lambda i: preprocessor.preprocess(decoded[i]),
        "jax uint8": lambda i: pixels.preprocess(decoded[i]),
        "reference": lambda i: reference_batch(decoded[i]),
        "decode + jax": lambda i: preprocessor.preprocess(decode_batch(batches[i])),
        "decode + reference": lambda i: reference_batch(decode_batch(batches[i])),
    }
    result: dict[str, Any] = {"compile_s": round(compile_s, 2)}
    if baseline:
        naive = jax_image_resize_baseline(HEIGHT, WIDTH)
        compile_started = time.perf_counter()
        naive(decoded[0])
        result["jax_image_resize_compile_s"] = round(time.perf_counter() - compile_started, 2)
        methods["jax.image.resize"] = lambda i: naive(decoded[i])
        methods["decode + jax.image.resize"] = lambda i: naive(decode_batch(batches[i]))
    worst = max(
        float(np.abs(preprocessor.preprocess(images) - reference_batch(images)).max())
        for images in decoded
    )
    result["max_abs_diff_over_128"] = round(worst * STD, 3)
    compiled, compiled_pixels = preprocessor.compile_count, pixels.compile_count
    rates: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, method in methods.items():
            seconds = sum(timed(partial(method, i)) for i in range(len(batches)))
            rates[name].append(len(jpegs) / seconds)
    result["recompiles_while_timed"] = (
        preprocessor.compile_count - compiled + (pixels.compile_count - compiled_pixels)
    )
    result["images_per_s"] = {n: round(statistics.median(v), 1) for n, v in rates.items()}
    result["rounds_range"] = {n: [round(min(v)), round(max(v))] for n, v in rates.items()}
    return result


def measure_large(count: int) -> dict[str, float]:
    """12-megapixel JPEGs: full decode against the service's draft-mode decode, images/s."""
    with tempfile.TemporaryDirectory(prefix="bench-large-") as tmp:
        jpegs = [path.read_bytes() for path in make_large_jpegs(Path(tmp), count)]

    def full(data: bytes) -> object:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))

    out = {}
    for name, decode in (
        ("full decode", full),
        (
            "draft decode (decode_image)",
            lambda d: decode_image(
                d,
                max_pixels=50_000_000,
                target_short_side=UINT8_MODEL_SPEC.resize_short_side,
            ),
        ),
    ):
        decode(jpegs[0])
        seconds = sum(timed(partial(decode, data)) for data in jpegs)
        out[name] = round(len(jpegs) / seconds, 1)
    return out


def main() -> None:
    """Run the benchmark and print images/s per method and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--batches", type=int, default=4, help="distinct batches per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--large", type=int, default=16, help="12-megapixel JPEGs to decode")
    parser.add_argument("--quick", action="store_true", help="batches 1 and 32, 2 rounds")
    parser.add_argument("--results", type=Path, default=benchlib.DEFAULT_RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.batch_sizes, args.batches, args.rounds, args.large = [1, 32], 2, 2, 3
    logging.basicConfig(level=logging.WARNING)

    by_batch: dict[str, dict[str, Any]] = {}
    with benchlib.LoadSampler() as sampler:
        for size in args.batch_sizes:
            # Batch 1 runs more batches so each round still times a few dozen images.
            count = args.batches * max(1, 32 // size)
            by_batch[str(size)] = measure_batch(size, count, args.rounds, baseline=size == 32)
        large = measure_large(args.large)

    print(f"{WIDTH}x{HEIGHT} JPEG, median of {args.rounds} rounds; images/s")
    names = list(next(iter(by_batch.values()))["images_per_s"])
    names += [n for n in by_batch.get("32", {}).get("images_per_s", {}) if n not in names]
    print(f"  {'method':<27}" + "".join(f"{'b' + b:>10}" for b in by_batch))
    for name in names:
        cells = [f"{r['images_per_s'].get(name, float('nan')):10.1f}" for r in by_batch.values()]
        print(f"  {name:<27}" + "".join(cells))
    for size, r in by_batch.items():
        rate = r["images_per_s"]
        print(
            f"  batch {size}: compile {r['compile_s']} s, recompiles while timed "
            f"{r['recompiles_while_timed']}, max |jax - reference| {r['max_abs_diff_over_128']}"
            f"/128; jax / reference {rate['jax'] / rate['reference']:.2f}x, decode included "
            f"{rate['decode + jax'] / rate['decode + reference']:.2f}x"
        )
    print(f"  12-megapixel JPEG decode ({args.large} images): {large}")
    print(sampler.describe())
    headline = {}
    if "32" in by_batch:
        rate = by_batch["32"]["images_per_s"]
        headline["preprocess_jax_over_pillow_b32"] = round(rate["jax"] / rate["reference"], 3)
        headline["preprocess_jax_over_pillow_b32_with_decode"] = round(
            rate["decode + jax"] / rate["decode + reference"], 3
        )
    benchlib.record(
        "preprocess",
        {"by_batch": by_batch, "large_decode_images_per_s": large},
        headline=headline,
        sampler=sampler,
        quick=args.quick,
        path=args.results,
    )


if __name__ == "__main__":
    main()
