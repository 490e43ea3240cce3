"""EfficientNet-Lite0, Lite1 and Lite2 side by side: speed in-process, through Triton and end to
end, and retrieval quality on a labelled set (issue 23.2).

Every model is its uint8-pixel variant, the one the workers use (``engine.models``), converted
in this run from its packaged weights; Lite0 is the baseline of every ratio.

- **in-process**: onnxruntime, one session of ``--threads`` (2) intra-op threads per model
  (spinning off, as Triton's instances run), on the same kind of ready uint8 batch of
  ``--batch`` (32) images at each model's input size; rounds interleaved over the models,
  median; then, the same way, the CPU time per image (every thread of the process), which a
  busy machine moves far less than the wall time.
- **Triton**: the stack's Triton (``--triton-grpc``), a batch of ``--batch`` sent as the workers
  send it (``TritonEmbedder``, split into ``triton.parallel_requests`` requests at once); rounds
  interleaved, median; every answer checked (shape, unit rows). A model the server does not
  serve is reported as such, with the command that serves it (``trident-stack up --models``).
- **end to end** (skipped with ``--no-e2e``): one ``trident-worker`` per model in turn, on a
  topic, group and collection of its own (the collection bound to the model); a warm-up batch
  first, then ``--images`` 640x480 JPEGs: first publish to all stored.
- **quality**: the photo-like PNG stamps of Debian's ``tuxpaint-stamps-default``
  (``apt-get install tuxpaint-stamps-default``; GPL-2, never committed), one class per leaf
  folder (classes of >= 3 images), composited on white, as ``bench_int8.py`` builds them; each
  model's own centre crop (``reference_pixels`` at its spec's sizes). Class P@1: leave-one-out,
  is the nearest other image of the same class? Near-duplicate R@1: a seeded crop shift,
  brightness change and JPEG re-encode of each image, searched among the originals.

From the repository root, with a stack whose Triton serves the three models (for the quick
start: ``.venv/bin/trident-stack up --models
efficientnet_lite1_embedding_uint8,efficientnet_lite2_embedding_uint8``)::

    .venv/bin/python benchmarks/bench_models.py [--quick] [--no-e2e]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from apps import add_stack_arguments, bench_settings, milvus_token
from bench_e2e import ingest, write_jpegs
from bench_int8 import STAMPS, labelled_set, near_duplicate, quality
from PIL import Image

import benchlib
from engine.inference import TritonEmbedder
from engine.models import LITE1_MODEL_SPEC, LITE2_MODEL_SPEC, UINT8_MODEL_SPEC, ModelSpec
from engine.resampling import reference_pixels
from engine.settings import TritonSettings
from model_build.efficientnet_lite import build_embedding_model, load_packaged_weights

MODELS: tuple[ModelSpec, ...] = (UINT8_MODEL_SPEC, LITE1_MODEL_SPEC, LITE2_MODEL_SPEC)
BASELINE = UINT8_MODEL_SPEC.name
Pixels = npt.NDArray[np.uint8]
Matrix = npt.NDArray[np.float32]


@dataclass
class Model:
    spec: ModelSpec
    session: ort.InferenceSession
    build_s: float

    def embed(self, pixels: Pixels, batch: int) -> Matrix:
        parts = [
            self.session.run(
                [self.spec.output_name], {self.spec.input_name: pixels[i : i + batch]}
            )[0]
            for i in range(0, len(pixels), batch)
        ]
        out: Matrix = np.concatenate(parts)
        return out


def build(spec: ModelSpec, threads: int) -> Model:
    """Convert ``spec``'s weights and open an onnxruntime session of ``threads`` threads."""
    began = time.perf_counter()
    model = build_embedding_model(load_packaged_weights(spec), spec)
    build_s = time.perf_counter() - began
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # As Triton's instances run (ModelSpec.allow_spinning): spin-waiting threads on a shared
    # 2-core machine burn the CPU the other thread needs, and count as CPU time here.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return Model(spec, session, build_s)


def ready_batch(spec: ModelSpec, batch: int) -> Pixels:
    rng = np.random.default_rng(0)
    pixels: Pixels = rng.integers(0, 256, (batch, *spec.input_dims), dtype=np.uint8)
    return pixels


def interleaved(
    runs: dict[str, Callable[[], object]],
    rounds: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median ``clock`` seconds of each run, one call of each per round (after one untimed call
    each)."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            began = clock()
            run()
            times[name].append(clock() - began)
    return {name: statistics.median(t) for name, t in times.items()}


def in_process(
    models: dict[str, Model], batch: int, rounds: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Images/s of each model alone in-process on a ready batch, and CPU ms per image.

    The CPU time (every thread of this process: onnxruntime's pool) moves much less with what
    else runs on the machine than the wall time: the figure to compare models by on a busy one.
    """
    runs: dict[str, Callable[[], object]] = {
        name: partial(m.session.run, None, {m.spec.input_name: ready_batch(m.spec, batch)})
        for name, m in models.items()
    }
    rates = {name: batch / s for name, s in interleaved(runs, rounds).items()}
    cpu = interleaved(runs, rounds, time.process_time)
    return rates, {name: 1000 * s / batch for name, s in cpu.items()}


def through_triton(
    url: str, specs: tuple[ModelSpec, ...], batch: int, rounds: int
) -> dict[str, float | None]:
    """Images/s of each model through Triton as the workers send a batch; None: not served."""
    embedders: dict[str, TritonEmbedder] = {}
    rates: dict[str, float | None] = {}
    try:
        for spec in specs:
            embedder = TritonEmbedder(
                TritonSettings(url=url, protocol="grpc", model_name=spec.name)
            )
            if not embedder.is_ready():
                embedder.close()
                print(
                    f"  {spec.name} is not served by Triton at {url}: start the stack with "
                    f"trident-stack up --models {','.join(s.name for s in specs[1:])}"
                )
                rates[spec.name] = None
                continue
            embedders[spec.name] = embedder

        def checked(embedder: TritonEmbedder, pixels: Pixels, dim: int) -> None:
            vectors = embedder.embed(pixels)
            if vectors.shape != (len(pixels), dim):
                raise RuntimeError(f"Triton answered {vectors.shape}, not {(len(pixels), dim)}")
            if not np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3):
                raise RuntimeError("Triton answered vectors that are not unit length")

        runs: dict[str, Callable[[], object]] = {}
        for name, embedder in embedders.items():
            spec = next(s for s in specs if s.name == name)
            runs[name] = partial(checked, embedder, ready_batch(spec, batch), spec.output_dim)
        rates.update({name: batch / s for name, s in interleaved(runs, rounds).items()})
    finally:
        for embedder in embedders.values():
            embedder.close()
    return rates


def retrieval_quality(
    models: dict[str, Model], images: list[Image.Image], labels: list[str], batch: int
) -> dict[str, dict[str, float]]:
    """Class P@1 and near-duplicate R@1 of each model, each on its own centre crop."""
    duplicates = [near_duplicate(image, n) for n, image in enumerate(images)]
    results = {}
    for name, model in models.items():
        spec = model.spec

        def crops(pictures: list[Image.Image], spec: ModelSpec = spec) -> Pixels:
            return np.stack(
                [
                    reference_pixels(
                        np.asarray(p),
                        image_size=spec.image_size,
                        resize_short_side=spec.resize_short_side,
                    )
                    for p in pictures
                ]
            )

        originals = model.embed(crops(images), batch)
        copies = model.embed(crops(duplicates), batch)
        results[name] = quality(originals, copies, labels)
    return results


def end_to_end(
    args: argparse.Namespace, specs: tuple[ModelSpec, ...], served: set[str]
) -> dict[str, float | None]:
    """Images/s of one worker per model, publish to stored, on ``args.images`` VGA JPEGs."""
    rates: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        folder = Path(tmp)
        vga = write_jpegs(folder, args.images, seed=0)
        warmup = write_jpegs(folder, args.batch, seed=1)
        for spec in specs:
            if spec.name not in served:
                rates[spec.name] = None
                continue
            settings = bench_settings(
                kafka=args.kafka,
                triton_grpc=args.triton_grpc,
                milvus=args.milvus,
                milvus_token=milvus_token(args.milvus_token_file),
                image_root=folder,
                batch=args.batch,
                quick=args.quick,
                triton={"model_name": spec.name},
            )
            rates[spec.name] = ingest(settings, folder, 1, {"vga": vga}, warmup)["vga"]
            print(f"  e2e {spec.name}: {rates[spec.name]:.1f} images/s")
    return rates


def _fmt(value: float | None, base: float | None, digits: int = 1) -> str:
    if value is None:
        return "not served"
    ratio = f" (x{value / base:.2f})" if base else ""
    return f"{value:.{digits}f}{ratio}"


def table(
    models: dict[str, Model], figures: dict[str, dict[str, Any]], quality_: dict[str, Any]
) -> str:
    """The side-by-side table, one row per model (ratios against Lite0)."""
    head = (
        "| model | input | in-process img/s | in-process CPU ms/img | Triton img/s | e2e img/s "
        "| class P@1 | near-dup R@1 |\n|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    cpu = figures["in_process_cpu_ms_per_image"]
    for name, model in models.items():
        side = model.spec.image_size
        rows.append(
            f"| {name} | {side}x{side} (resize {model.spec.resize_short_side}) | "
            f"{_fmt(figures['in_process'][name], figures['in_process'][BASELINE])} | "
            f"{_fmt(cpu[name], cpu[BASELINE])} | "
            f"{_fmt(figures['triton'][name], figures['triton'][BASELINE])} | "
            f"{_fmt(figures['e2e'].get(name), figures['e2e'].get(BASELINE))} | "
            f"{quality_[name]['class_p_at_1']:.3f} | "
            f"{quality_[name]['near_duplicate_r_at_1']:.3f} |"
        )
    return "\n".join(rows)


def main() -> int:
    """Run, print, record; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_stack_arguments(parser, api_port=28391)
    parser.add_argument("--stamps", type=Path, default=STAMPS)
    parser.add_argument("--per-class", type=int, default=1000, help="images per class, at most")
    parser.add_argument("--limit", type=int, default=1000, help="labelled images, at most")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--images", type=int, default=640, help="640x480 JPEGs per e2e run")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end runs")
    parser.add_argument("--quick", action="store_true", help="100 images, 3 rounds, 64 e2e")
    parser.add_argument("--results", type=Path, default=benchlib.DEFAULT_RESULTS)
    args = parser.parse_args()
    benchlib.exit_on_sigterm()
    if args.quick:
        args.per_class, args.limit, args.rounds, args.images = 4, 100, 3, 64

    with benchlib.LoadSampler() as sampler:
        models = {spec.name: build(spec, args.threads) for spec in MODELS}
        images, labels = labelled_set(args.stamps, args.per_class, args.limit)
        qualities = retrieval_quality(models, images, labels, args.batch)
        rates, cpu_ms = in_process(models, args.batch, args.rounds)
        figures: dict[str, dict[str, Any]] = {
            "in_process": rates,
            "in_process_cpu_ms_per_image": cpu_ms,
            "triton": through_triton(args.triton_grpc, MODELS, args.batch, args.rounds),
        }
        served = {name for name, rate in figures["triton"].items() if rate is not None}
        figures["e2e"] = {} if args.no_e2e else end_to_end(args, MODELS, served)

    print(
        f"models side by side: batch {args.batch}, in-process {args.threads} threads, Triton at "
        f"{args.triton_grpc}; labelled set {len(images)} images, {len(set(labels))} classes "
        f"({args.stamps}); ratios against {BASELINE}"
    )
    print(table(models, figures, qualities))
    if args.no_e2e:
        print("end to end: skipped (--no-e2e)")
    print(sampler.describe())
    rounded = {
        key: {n: None if v is None else round(v, 1) for n, v in values.items()}
        for key, values in figures.items()
    }
    benchlib.record(
        "models",
        {
            "models": {
                name: {
                    "image_size": m.spec.image_size,
                    "resize_short_side": m.spec.resize_short_side,
                    "model_version_tag": m.spec.model_version_tag,
                    "build_s": round(m.build_s, 2),
                }
                for name, m in models.items()
            },
            "images_per_s": rounded,
            "quality": qualities,
            "labelled_images": len(images),
            "classes": len(set(labels)),
            "batch": args.batch,
            "threads": args.threads,
            "e2e_images": 0 if args.no_e2e else args.images,
        },
        headline={f"{name}_class_p_at_1": q["class_p_at_1"] for name, q in qualities.items()},
        sampler=sampler,
        quick=args.quick,
        path=args.results,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
