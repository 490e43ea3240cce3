"""Throughput of image decoding and preprocessing, three preprocessors measured in one run.

Inputs are distinct 640x480 JPEGs (quality 90) made from scikit-image's sample photos. Measured,
each over the same batches of ``--batch`` images:

- ``decode``: :func:`engine.images.decode_image` alone;
- ``jax``: :class:`engine.preprocess.JaxPreprocessor` (banded bicubic, bucketed canvases);
- ``reference``: :func:`engine.preprocess.reference_preprocess` (Pillow + numpy), image by image;
- ``jax.image.resize``: ``jax.jit(jax.vmap(...))`` around ``jax.image.resize(..., "bicubic")``;
- ``decode + X``: end to end, bytes in, NCHW batch out.

Rounds interleave the methods and the median round is reported, so a busy machine slows every
method alike rather than whichever ran during a spike. Compilation happens before timing. From
the repository root::

    PYTHONPATH=. python benchmarks/bench_preprocess.py --batch 32 --rounds 5
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt
from PIL import Image
from skimage import data as skdata

from engine.images import decode_image
from engine.preprocess import MEAN, STD, JaxPreprocessor, reference_preprocess, resized_size

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
    return [decode_image(j, max_pixels=50_000_000).pixels for j in jpegs]


def timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main() -> None:
    """Run the benchmark and print images/s per method and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4, help="distinct batches per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    jpegs = make_jpegs(args.batch * args.batches)
    batches = [jpegs[i : i + args.batch] for i in range(0, len(jpegs), args.batch)]
    decoded = [decode_batch(batch) for batch in batches]
    preprocessor = JaxPreprocessor(batch_sizes=(args.batch,))
    baseline = jax_image_resize_baseline(HEIGHT, WIDTH)

    compile_started = time.perf_counter()
    preprocessor.warmup(max_scale=2.0)
    seconds = time.perf_counter() - compile_started
    print(f"JaxPreprocessor compile (batch {args.batch}): {seconds:.1f} s")
    compile_started = time.perf_counter()
    baseline(decoded[0])
    print(f"jax.image.resize compile: {time.perf_counter() - compile_started:.1f} s")
    worst = max(
        float(np.abs(preprocessor.preprocess(images) - reference_batch(images)).max())
        for images in decoded
    )
    print(f"max |jax - reference| on these inputs: {worst * STD:.2f} / 128")

    methods: dict[str, Callable[[int], object]] = {
        "decode": lambda i: decode_batch(batches[i]),
        "jax": lambda i: preprocessor.preprocess(decoded[i]),
        "reference": lambda i: reference_batch(decoded[i]),
        "jax.image.resize": lambda i: baseline(decoded[i]),
        "decode + jax": lambda i: preprocessor.preprocess(decode_batch(batches[i])),
        "decode + reference": lambda i: reference_batch(decode_batch(batches[i])),
        "decode + jax.image.resize": lambda i: baseline(decode_batch(batches[i])),
    }
    rates: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, method in methods.items():
            seconds = sum(timed(partial(method, i)) for i in range(len(batches)))
            rates[name].append(len(jpegs) / seconds)
    median = {name: statistics.median(values) for name, values in rates.items()}

    print(
        f"\n{WIDTH}x{HEIGHT} JPEG, batch {args.batch}, median of {args.rounds} rounds "
        f"({len(jpegs)} images each):"
    )
    for name, rate in median.items():
        spread = f"{min(rates[name]):.0f}-{max(rates[name]):.0f}"
        print(f"  {name:<27} {rate:8.1f} images/s   (rounds: {spread})")
    print("\nratios:")
    for stage in ("", "decode + "):
        jax_rate = median[f"{stage}jax"]
        for other in ("reference", "jax.image.resize"):
            print(f"  {stage}jax / {stage}{other}: {jax_rate / median[stage + other]:.2f}x")


if __name__ == "__main__":
    main()
