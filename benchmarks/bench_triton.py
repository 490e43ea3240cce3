"""Request latency of the running Triton server per batch size, transport and input format.

Formats: the chosen one, uint8 pixels ``[N, 224, 224, 3]`` to the uint8 model (150 KB an image),
against today's float32 ``[N, 3, 224, 224]`` to the float32 model (602 KB), in the same run and
on the same images (the float32 batch is the uint8 one normalised), so their embeddings must
agree (cosine printed). Transports: HTTP and gRPC with the tensors in the request body
(binary), and HTTP/gRPC with the tensors in system shared memory
(``tritonclient.utils.shared_memory``; client and server on one host). The shared-memory timings
include writing the batch into the region and copying the embeddings out, as a caller would.
Every output is checked (shape, unit-norm rows), so an empty or wrong answer cannot pass for a
fast one. With ``--onnx`` (the float32 model.onnx; the uint8 one is its sibling folder) the
same batches also run in-process in onnxruntime, taking turns with the requests: the estimate
of each transport's overhead over pure compute, and of what the server leaves of the CPU to
whatever runs next (spinning threads show up as a slower in-process run).

Needs a running server (``TritonService.start()``); from the repository root::

    PYTHONPATH=. python benchmarks/bench_triton.py --batches 1 8 32 \\
        --onnx <model repository>/efficientnet_lite0_embedding/1/model.onnx
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

import benchlib
from devstack.config import StackConfig
from engine.models import DEFAULT_MODEL_SPEC, UINT8_MODEL_SPEC, ModelSpec

logger = logging.getLogger(__name__)

Batch = npt.NDArray[Any]
Infer = Callable[[Batch], Batch]
FORMATS = ("uint8", "float32")


@dataclass
class Region:
    """One system shared-memory region, registered with the server."""

    name: str
    handle: Any
    size: int


@contextlib.contextmanager
def shm_region(client: Any, name: str, size: int) -> Iterator[Region]:
    """Create and register a region; unregister and destroy it on exit, whatever happened.

    The region name carries the pid: Triton's region names are server-global, so two runs (or
    a run and an earlier crashed one) must not share one.
    """
    name = f"{name}_{os.getpid()}"
    # The key names the file in /dev/shm.
    key = f"/bench_triton_{name}"
    handle = shm.create_shared_memory_region(name, key, size)
    try:
        client.register_system_shared_memory(name, key, size)
        try:
            yield Region(name, handle, size)
        finally:
            unregister(client, name)
    finally:
        shm.destroy_shared_memory_region(handle)


def unregister(client: Any, name: str, timeout: float = 10.0) -> None:
    """Unregister a region, waiting while Triton still counts a request as using it.

    Triton >= 2.50 refuses to unregister a region an inference still references ("currently in
    use"); with the python backend the last response releases its reference a moment after the
    client has its answer. So retry for ``timeout`` seconds, then warn and leave the region to
    the server (it is unmapped when Triton stops; the client-side file is removed anyway): a
    leaked registration must not fail the benchmark run and stop the scripts after it.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.unregister_system_shared_memory(name)
            return
        except InferenceServerException as exc:
            if "in use" not in str(exc) or time.monotonic() > deadline:
                logger.warning("could not unregister shared memory %s: %s", name, exc)
                return
            time.sleep(0.1)


def body_infer(module: Any, client: Any, spec: ModelSpec) -> Infer:
    """Inference with the tensors in the request/response bodies."""

    def infer(batch: Batch) -> Batch:
        tensor = module.InferInput(spec.input_name, list(batch.shape), spec.input_dtype)
        # HTTP: binary tensor data instead of JSON lists; gRPC ignores the flag.
        if module is httpclient:
            tensor.set_data_from_numpy(batch, binary_data=True)
            output = module.InferRequestedOutput(spec.output_name, binary_data=True)
        else:
            tensor.set_data_from_numpy(batch)
            output = module.InferRequestedOutput(spec.output_name)
        result = client.infer(spec.name, [tensor], outputs=[output])
        embeddings: Batch = result.as_numpy(spec.output_name)
        return embeddings

    return infer


def shm_infer(module: Any, client: Any, spec: ModelSpec, inp: Region, out: Region) -> Infer:
    """Inference with input and output tensors in registered shared-memory regions."""

    def infer(batch: Batch) -> Batch:
        shm.set_shared_memory_region(inp.handle, [batch])
        tensor = module.InferInput(spec.input_name, list(batch.shape), spec.input_dtype)
        tensor.set_shared_memory(inp.name, batch.nbytes)
        output = module.InferRequestedOutput(spec.output_name)
        out_bytes = len(batch) * spec.output_dim * 4
        output.set_shared_memory(out.name, out_bytes)
        client.infer(spec.name, [tensor], outputs=[output])
        view = shm.get_contents_as_numpy(out.handle, np.float32, [len(batch), spec.output_dim])
        # Copy: the region is overwritten by the next request.
        embeddings: Batch = np.array(view)
        return embeddings

    return infer


def check(embeddings: Batch, rows: int, spec: ModelSpec, transport: str) -> None:
    """Raise if the answer does not look like ``rows`` L2-normalised embeddings."""
    if embeddings.shape != (rows, spec.output_dim):
        raise SystemExit(
            f"{transport}: shape {embeddings.shape}, expected {(rows, spec.output_dim)}"
        )
    norms = np.linalg.norm(embeddings, axis=1)
    if not np.allclose(norms, 1.0, atol=1e-3):
        raise SystemExit(f"{transport}: row norms {norms.min():.4f}..{norms.max():.4f}, not 1")


def measure(runs: dict[str, Callable[[], Batch]], repeat: int) -> dict[str, list[float]]:
    """Latencies in ms per run, taking turns so that load from elsewhere hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - started) * 1000)
    return times


def transfer_formats(
    rows: int, spec: ModelSpec, fixed_ms: float, ms_per_mib: float
) -> dict[str, dict[str, float]]:
    """Bytes per batch of each candidate input format and the transfer cost that implies.

    The line fitted through the float32 measurements of this run (fixed cost per request +
    cost per MiB), applied to each format's size. uint8 is also measured directly (its own
    served model); float16 is not served (it would need a cast in the graph and halves the
    bytes of float32 only), so for it this estimate is all there is.
    """
    pixels = rows * int(np.prod(spec.input_dims))
    out = {}
    for label, width in (("uint8", 1), ("float16", 2), ("float32", 4)):
        mib = pixels * width / 2**20
        out[label] = {"mib": round(mib, 2), "overhead_ms": round(fixed_ms + ms_per_mib * mib, 1)}
    return out


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``; ``(mean y, 0)`` when the xs do not vary."""
    if len(set(xs)) < 2:
        return (statistics.fmean(ys), 0.0)
    slope, intercept = np.polyfit(xs, ys, 1)
    return (float(intercept), float(slope))


def model_specs(uint8_model: str | None) -> dict[str, ModelSpec]:
    """The served spec per format; ``uint8_model`` names a variant of the uint8 model (tuning)."""
    uint8 = UINT8_MODEL_SPEC.model_copy(update={"name": uint8_model or UINT8_MODEL_SPEC.name})
    return {"uint8": uint8, "float32": DEFAULT_MODEL_SPEC}


def batches_for(rows: int, rng: np.random.Generator) -> dict[str, Batch]:
    """One batch of random pixels in both formats: the float32 one is the uint8 one normalised."""
    pixels = rng.integers(0, 256, (rows, 224, 224, 3), dtype=np.uint8)
    normalised = (pixels.astype(np.float32).transpose(0, 3, 1, 2) - 127.0) / 128.0
    return {"uint8": pixels, "float32": np.ascontiguousarray(normalised)}


def in_process(onnx_path: Path, spec: ModelSpec) -> Infer:
    """onnxruntime on the served model file with the threads of one served instance: each
    request runs on one instance. The spec's ``intra_op_threads`` is passed as the served
    ``model.py`` passes it (0: onnxruntime's default, one per physical core)."""
    import onnxruntime as ort  # noqa: PLC0415 (optional baseline only)

    options = ort.SessionOptions()
    options.intra_op_num_threads = spec.intra_op_threads
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def infer(batch: Batch) -> Batch:
        embeddings: Batch = session.run(None, {spec.input_name: batch})[0]
        return embeddings

    return infer


def transports_for(
    stack: contextlib.ExitStack,
    clients: dict[str, tuple[Any, Any]],
    specs: dict[str, ModelSpec],
    largest: int,
) -> dict[tuple[str, str], Infer]:
    """(format, transport) -> inference, body and shared-memory transports for every format."""
    transports: dict[tuple[str, str], Infer] = {}
    out_bytes = largest * DEFAULT_MODEL_SPEC.output_dim * 4
    for fmt, spec in specs.items():
        in_bytes = largest * int(np.prod(spec.input_dims)) * (1 if fmt == "uint8" else 4)
        for label, (module, client) in clients.items():
            transports[(fmt, label)] = body_infer(module, client, spec)
            inp = stack.enter_context(shm_region(client, f"{label}_{fmt}_in", in_bytes))
            out = stack.enter_context(shm_region(client, f"{label}_{fmt}_out", out_bytes))
            transports[(fmt, f"{label}+shm")] = shm_infer(module, client, spec, inp, out)
    return transports


def main() -> int:
    """Run the benchmark, print one table, record it; returns the exit code."""
    config = StackConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--http-url", default=config.triton_url)
    parser.add_argument("--grpc-url", default=config.triton_grpc_url)
    parser.add_argument(
        "--uint8-model", help="served variant of the uint8 model (default: the spec's name)"
    )
    parser.add_argument(
        "--formats", nargs="+", choices=FORMATS, default=list(FORMATS), help="(tuning: uint8)"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=1, help="untimed, checked rounds")
    parser.add_argument("--onnx", type=Path, help="float32 model.onnx for an in-process baseline")
    parser.add_argument("--quick", action="store_true", help="batches 1 and 32, 4 rounds")
    parser.add_argument("--results", type=Path, default=benchlib.DEFAULT_RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.batches, args.repeat = [1, 32], 4
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    specs = {
        fmt: spec for fmt, spec in model_specs(args.uint8_model).items() if fmt in args.formats
    }
    rng = np.random.default_rng(0)

    http = httpclient.InferenceServerClient(args.http_url, network_timeout=300.0)
    grpc = grpcclient.InferenceServerClient(args.grpc_url)
    figures: dict[str, dict[str, dict[str, float]]] = {}
    agreement: dict[str, float] = {}
    with contextlib.ExitStack() as stack, benchlib.LoadSampler() as sampler:
        stack.callback(http.close)
        stack.callback(grpc.close)
        clients = {"http": (httpclient, http), "grpc": (grpcclient, grpc)}
        transports = transports_for(stack, clients, specs, max(args.batches))
        if args.onnx:
            files = {
                "float32": args.onnx,
                "uint8": args.onnx.parents[2] / UINT8_MODEL_SPEC.name / "1" / "model.onnx",
            }
            for fmt, spec in specs.items():
                if files[fmt].exists():
                    transports[(fmt, "onnx in-process")] = in_process(files[fmt], spec)

        names = {key: f"{key[1]} {key[0]}" for key in transports}
        reference = names[next(iter(transports))]
        print(
            f"models {', '.join(s.name for s in specs.values())}; per request: median ms (p99), "
            f"images/s; ratio = median / {reference!r} median"
        )
        print(f"{'batch':>5}  " + "  ".join(f"{names[k]:>30}" for k in transports))
        for rows in args.batches:
            inputs = batches_for(rows, rng)
            runs = {
                names[k]: functools.partial(infer, inputs[k[0]]) for k, infer in transports.items()
            }
            outputs = {}
            for _ in range(args.warmup):
                for name, run in runs.items():
                    outputs[name] = run()
                    check(outputs[name], rows, DEFAULT_MODEL_SPEC, name)
            if len(specs) == 2:
                agreement[str(rows)] = round(
                    float(np.sum(outputs["grpc uint8"] * outputs["grpc float32"], axis=1).min()), 6
                )
            times = measure(runs, args.repeat)
            baseline = statistics.median(times[reference])
            cells = []
            for name, t in times.items():
                median = statistics.median(t)
                p99 = benchlib.percentile(t, 99)
                fmt = name.rsplit(" ", 1)[1]
                figures.setdefault(name, {})[str(rows)] = {
                    "p50_ms": round(median, 2),
                    "p99_ms": round(p99, 2),
                    "images_per_s": round(rows / median * 1000, 1),
                    "mib": round(inputs[fmt].nbytes / 2**20, 2),
                }
                rate = rows / median * 1000
                cells.append(f"{median:7.1f} ({p99:6.1f}) {rate:5.0f}/s x{median / baseline:4.2f}")
            print(f"{rows:>5}  " + "  ".join(f"{c:>30}" for c in cells))
    print(f"min cosine, uint8 model vs float32 model on the same images, by batch: {agreement}")
    print(sampler.describe())
    section: dict[str, object] = {
        "by_transport": figures,
        "batches": args.batches,
        "models": {fmt: spec.name for fmt, spec in specs.items()},
        "uint8_vs_float32_min_cosine": agreement,
    }
    headline = summarise(figures, section)
    benchlib.record(
        "triton", section, headline=headline, sampler=sampler, quick=args.quick, path=args.results
    )
    return 0


def summarise(
    figures: dict[str, dict[str, dict[str, float]]], section: dict[str, object]
) -> dict[str, float]:
    """Print and record the chosen format against float32, and the fitted transfer cost."""
    headline: dict[str, float] = {}
    if "32" in figures.get("grpc uint8", {}) and "grpc float32" in figures:
        for transport in ("grpc", "http", "grpc+shm", "http+shm"):
            ratio = (
                figures[f"{transport} uint8"]["32"]["images_per_s"]
                / figures[f"{transport} float32"]["32"]["images_per_s"]
            )
            print(f"batch 32, {transport}: uint8 over float32 x{ratio:.2f} images/s")
        headline["triton_grpc_uint8_over_float32_b32"] = round(
            figures["grpc uint8"]["32"]["images_per_s"]
            / figures["grpc float32"]["32"]["images_per_s"],
            3,
        )
    compute = figures.get("onnx in-process float32")
    if compute is None or "grpc uint8" not in figures:
        return headline
    # Overhead of the gRPC body path over pure compute, as a line in the payload size.
    grpc_rows = figures["grpc float32"]
    xs = [grpc_rows[b]["mib"] for b in grpc_rows]
    ys = [grpc_rows[b]["p50_ms"] - compute[b]["p50_ms"] for b in grpc_rows]
    fixed, per_mib = fit_line(xs, ys)
    formats = transfer_formats(32, DEFAULT_MODEL_SPEC, fixed, per_mib)
    section["grpc_overhead_fit"] = {"fixed_ms": round(fixed, 2), "ms_per_mib": round(per_mib, 2)}
    section["transfer_formats_batch32"] = formats
    print(
        f"gRPC overhead over in-process (float32): {fixed:.1f} ms + {per_mib:.2f} ms/MiB (fitted)"
    )
    for label, value in formats.items():
        print(f"  batch 32 as {label:<8} {value['mib']:6.1f} MiB  ~{value['overhead_ms']:.1f} ms")
    measured = figures["grpc uint8"].get("32", {}).get("p50_ms")
    if measured is not None and "32" in compute:
        print(f"  measured uint8 overhead at batch 32: {measured - compute['32']['p50_ms']:.1f} ms")
        headline["triton_grpc_over_onnx_b32"] = round(
            figures["grpc uint8"]["32"]["images_per_s"] / compute["32"]["images_per_s"], 3
        )
    return headline


if __name__ == "__main__":
    raise SystemExit(main())
