"""The int8 model against float32: speed in-process and what it costs in retrieval quality.

Both models are built in this run (float32 from the packaged weights, int8 by
:func:`model_build.quantize.quantize_embedding_model`) and run in onnxruntime in-process on the
same ready tensors, rounds interleaved, at batch 1 and 32.

Quality, on a labelled set: the photo-like PNG stamps of Debian's ``tuxpaint-stamps-default``
(``apt-get install tuxpaint-stamps-default``; GPL-2, never committed), one class per leaf folder
(classes with at least 3 images), composited on white:

- class P@1: leave-one-out, is the nearest other image of the same class?
- near-duplicate R@1: a seeded crop shift, brightness change and JPEG re-encode of each image,
  searched among the originals: is the nearest its source?
- cosine of each image's int8 embedding to its float32 embedding.

From the repository root::

    .venv/bin/python benchmarks/bench_int8.py [--quick]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from PIL import Image

import benchlib
from engine.models import DEFAULT_MODEL_SPEC
from engine.resampling import reference_preprocess
from model_build.efficientnet_lite import build_embedding_model, load_packaged_weights
from model_build.quantize import INT8_MODEL_SPEC, quantize_embedding_model, sample_calibration

STAMPS = Path("/usr/share/tuxpaint/stamps")
Matrix = npt.NDArray[np.float32]


def labelled_set(root: Path, per_class: int, limit: int) -> tuple[list[Image.Image], list[str]]:
    """Images (RGB on white) and their class (leaf folder), classes of >= 3 images.

    Raises:
        SystemExit: the stamps are not installed.
    """
    if not root.is_dir():
        raise SystemExit(f"{root} missing: apt-get install tuxpaint-stamps-default")
    by_class: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.png")):
        if path.name.endswith(("_mirror.png", "_flip.png")):  # mirrored twins: not new images
            continue
        by_class.setdefault(str(path.parent.relative_to(root)), []).append(path)
    images, labels = [], []
    for label, paths in sorted(by_class.items()):
        if len(paths) < 3:
            continue
        for path in paths[:per_class]:
            with Image.open(path) as img:
                rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            images.append(Image.alpha_composite(canvas, rgba).convert("RGB"))
            labels.append(label)
            if len(images) >= limit:
                return images, labels
    return images, labels


def near_duplicate(image: Image.Image, seed: int) -> Image.Image:
    """A seeded small crop, brightness change and JPEG re-encode."""
    rng = np.random.default_rng(seed)
    w, h = image.size
    dx, dy = int(rng.integers(1, max(2, w // 30))), int(rng.integers(1, max(2, h // 30)))
    pixels = np.asarray(image.crop((dx, dy, w - dx // 2, h - dy // 2)), np.float32)
    pixels = np.clip(pixels * rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=80)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def embed(session: ort.InferenceSession, tensors: Matrix, batch: int = 32) -> Matrix:
    parts = [
        session.run(None, {DEFAULT_MODEL_SPEC.input_name: tensors[i : i + batch]})[0]
        for i in range(0, len(tensors), batch)
    ]
    out: Matrix = np.concatenate(parts)
    return out


def quality(originals: Matrix, duplicates: Matrix, labels: list[str]) -> dict[str, float]:
    """Class P@1 (leave-one-out) and near-duplicate R@1."""
    scores = originals @ originals.T
    np.fill_diagonal(scores, -np.inf)
    nearest = np.argmax(scores, axis=1)
    p_at_1 = float(np.mean([labels[j] == labels[i] for i, j in enumerate(nearest)]))
    found = np.argmax(duplicates @ originals.T, axis=1)
    r_at_1 = float(np.mean(found == np.arange(len(originals))))
    return {"class_p_at_1": round(p_at_1, 3), "near_duplicate_r_at_1": round(r_at_1, 3)}


def speed(sessions: dict[str, ort.InferenceSession], batch: int, rounds: int) -> dict[str, float]:
    """Median images/s per model on random ready tensors, rounds interleaved."""
    rng = np.random.default_rng(0)
    tensors = rng.standard_normal((batch, *DEFAULT_MODEL_SPEC.input_dims), dtype=np.float32)
    runs: dict[str, Callable[[], object]] = {
        name: partial(s.run, None, {DEFAULT_MODEL_SPEC.input_name: tensors})
        for name, s in sessions.items()
    }
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            began = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - began)
    return {name: round(batch / statistics.median(t), 1) for name, t in times.items()}


def main() -> int:
    """Run, print, record; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--stamps", type=Path, default=STAMPS)
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--limit", type=int, default=400, help="at most this many images")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="onnxruntime intra-op threads"
    )
    parser.add_argument("--quick", action="store_true", help="100 images, 3 rounds")
    parser.add_argument("--results", type=Path, default=benchlib.DEFAULT_RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.per_class, args.limit, args.rounds = 4, 100, 3

    with benchlib.LoadSampler() as sampler:
        float_model = build_embedding_model(load_packaged_weights())
        began = time.perf_counter()
        int8_model = quantize_embedding_model(float_model, sample_calibration())
        quantize_s = time.perf_counter() - began
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        models: dict[str, onnx.ModelProto] = {"float32": float_model, "int8": int8_model}
        sessions = {
            name: ort.InferenceSession(
                m.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
            for name, m in models.items()
        }
        images, labels = labelled_set(args.stamps, args.per_class, args.limit)
        originals = np.stack([reference_preprocess(np.asarray(i)) for i in images])
        duplicates = np.stack(
            [reference_preprocess(np.asarray(near_duplicate(i, n))) for n, i in enumerate(images)]
        )
        embedded = {n: (embed(s, originals), embed(s, duplicates)) for n, s in sessions.items()}
        qualities = {n: quality(o, d, labels) for n, (o, d) in embedded.items()}
        cosine = np.sum(embedded["float32"][0] * embedded["int8"][0], axis=1)
        rates = {f"b{b}": speed(sessions, b, args.rounds) for b in (1, 32)}

    tag = INT8_MODEL_SPEC.model_version_tag
    print(f"int8 ({tag}) against float32; quantized in {quantize_s:.1f} s")
    print(f"labelled set: {len(images)} images, {len(set(labels))} classes ({args.stamps})")
    for name, q in qualities.items():
        p1, r1 = q["class_p_at_1"], q["near_duplicate_r_at_1"]
        print(f"  {name:<8} class P@1 {p1:.3f}  near-dup R@1 {r1:.3f}")
    print(
        f"  cosine int8 vs float32: min {cosine.min():.3f}  median {np.median(cosine):.3f}  "
        f"mean {cosine.mean():.3f}"
    )
    for batch, rate in rates.items():
        ratio = rate["int8"] / rate["float32"]
        print(
            f"  {batch}: float32 {rate['float32']:.1f} img/s, int8 {rate['int8']:.1f} img/s "
            f"(int8 / float32 = {ratio:.2f})"
        )
    print(sampler.describe())
    benchlib.record(
        "int8",
        {
            "images": len(images),
            "classes": len(set(labels)),
            "quality": qualities,
            "cosine_to_float32": {
                "min": round(float(cosine.min()), 3),
                "mean": round(float(cosine.mean()), 3),
            },
            "images_per_s": rates,
            "quantize_s": round(quantize_s, 1),
        },
        headline={
            "int8_over_float32_b32": round(rates["b32"]["int8"] / rates["b32"]["float32"], 3),
            "int8_class_p_at_1": qualities["int8"]["class_p_at_1"],
            "float32_class_p_at_1": qualities["float32"]["class_p_at_1"],
        },
        sampler=sampler,
        quick=args.quick,
        path=args.results,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
