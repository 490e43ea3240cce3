"""Request latency of the running Triton server per batch size and transport.

Transports: HTTP and gRPC with the tensors in the request body (binary), and HTTP/gRPC with the
tensors in system shared memory (``tritonclient.utils.shared_memory``; client and server on one
host). The shared-memory timings include writing the batch into the region and copying the
embeddings out, as a caller would. Every transport's output is checked (shape, unit-norm rows),
so an empty or wrong answer cannot pass for a fast one. With ``--onnx`` the same batches also run
in-process in onnxruntime, which estimates each transport's overhead over pure compute.

Needs a running server (``TritonService.start()``); from the repository root::

    PYTHONPATH=. python benchmarks/bench_triton.py --batches 1 8 32 \\
        --onnx <model repository>/efficientnet_lite0_embedding/1/model.onnx
"""

from __future__ import annotations

import argparse
import contextlib
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
from engine.model.spec import DEFAULT_MODEL_SPEC, ModelSpec

logger = logging.getLogger(__name__)

Batch = npt.NDArray[np.float32]
Infer = Callable[[Batch], Batch]


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


def measure(transports: dict[str, Infer], batch: Batch, repeat: int) -> dict[str, list[float]]:
    """Latencies in ms per transport, taking turns so that load from elsewhere hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in transports}
    for _ in range(repeat):
        for name, infer in transports.items():
            started = time.perf_counter()
            infer(batch)
            times[name].append((time.perf_counter() - started) * 1000)
    return times


def transfer_formats(
    rows: int, spec: ModelSpec, fixed_ms: float, ms_per_mib: float
) -> dict[str, dict[str, float]]:
    """Bytes per batch of each candidate input format and the transfer cost that implies.

    The served model takes float32 only, so uint8 and float16 cannot be sent to it as they
    are; their cost is the line fitted through the float32 measurements of this run (fixed
    cost per request + cost per MiB), applied to their sizes. uint8 needs normalisation and
    layout folded into the model, float16 a cast in it (issue 12.3).
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


def main() -> int:
    """Run the benchmark, print one table, record it; returns the exit code."""
    config = StackConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--http-url", default=config.triton_url)
    parser.add_argument("--grpc-url", default=config.triton_grpc_url)
    parser.add_argument(
        "--model", help="served model with the spec's tensors (default: the spec's name)"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=1, help="untimed, checked rounds")
    parser.add_argument("--onnx", type=Path, help="model.onnx for an in-process baseline")
    parser.add_argument("--quick", action="store_true", help="batches 1 and 32, 4 rounds")
    parser.add_argument("--results", type=Path, default=benchlib.DEFAULT_RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.batches, args.repeat = [1, 32], 4
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec = DEFAULT_MODEL_SPEC.model_copy(update={"name": args.model or DEFAULT_MODEL_SPEC.name})
    rng = np.random.default_rng(0)
    largest = max(args.batches)
    in_bytes = largest * int(np.prod(spec.input_dims)) * 4
    out_bytes = largest * spec.output_dim * 4

    http = httpclient.InferenceServerClient(args.http_url, network_timeout=300.0)
    grpc = grpcclient.InferenceServerClient(args.grpc_url)
    figures: dict[str, dict[str, dict[str, float]]] = {}
    with contextlib.ExitStack() as stack, benchlib.LoadSampler() as sampler:
        stack.callback(http.close)
        stack.callback(grpc.close)
        transports: dict[str, Infer] = {
            "http": body_infer(httpclient, http, spec),
            "grpc": body_infer(grpcclient, grpc, spec),
        }
        for label, module, client in (("http", httpclient, http), ("grpc", grpcclient, grpc)):
            inp = stack.enter_context(shm_region(client, f"{label}_in", in_bytes))
            out = stack.enter_context(shm_region(client, f"{label}_out", out_bytes))
            transports[f"{label}+shm"] = shm_infer(module, client, spec, inp, out)
        if args.onnx:
            import onnxruntime as ort  # noqa: PLC0415 (optional baseline only)

            # One thread per CPU, explicitly: not onnxruntime's per-physical-core default.
            options = ort.SessionOptions()
            options.intra_op_num_threads = os.cpu_count() or 1
            session = ort.InferenceSession(
                str(args.onnx), options, providers=["CPUExecutionProvider"]
            )
            transports["onnx in-process"] = lambda b: session.run(None, {spec.input_name: b})[0]

        print(
            f"model {spec.name}; per request: median ms (p99), images/s; "
            "ratio = median / http median"
        )
        print(f"{'batch':>5} {'MiB':>6}  " + "  ".join(f"{t:>30}" for t in transports))
        for rows in args.batches:
            batch = rng.standard_normal((rows, *spec.input_dims), dtype=np.float32)
            for _ in range(args.warmup):
                for transport, infer in transports.items():
                    check(infer(batch), rows, spec, transport)
            times = measure(transports, batch, args.repeat)
            baseline = statistics.median(times["http"])
            cells = []
            for transport, t in times.items():
                median = statistics.median(t)
                p99 = benchlib.percentile(t, 99)
                figures.setdefault(transport, {})[str(rows)] = {
                    "p50_ms": round(median, 2),
                    "p99_ms": round(p99, 2),
                    "images_per_s": round(rows / median * 1000, 1),
                    "mib": round(batch.nbytes / 2**20, 2),
                }
                rate = rows / median * 1000
                cells.append(f"{median:7.1f} ({p99:6.1f}) {rate:5.0f}/s x{median / baseline:4.2f}")
            print(f"{rows:>5} {batch.nbytes / 2**20:6.1f}  " + "  ".join(f"{c:>30}" for c in cells))
    print(sampler.describe())

    headline: dict[str, float] = {}
    section: dict[str, object] = {"by_transport": figures, "batches": args.batches}
    if "onnx in-process" in figures:
        # Overhead of the gRPC body path over pure compute, as a line in the payload size.
        compute = figures["onnx in-process"]
        grpc_rows = figures["grpc"]
        xs = [grpc_rows[b]["mib"] for b in grpc_rows]
        ys = [grpc_rows[b]["p50_ms"] - compute[b]["p50_ms"] for b in grpc_rows]
        fixed, per_mib = fit_line(xs, ys)
        formats = transfer_formats(32, spec, fixed, per_mib)
        section["grpc_overhead_fit"] = {
            "fixed_ms": round(fixed, 2),
            "ms_per_mib": round(per_mib, 2),
        }
        section["transfer_formats_batch32"] = formats
        print(f"gRPC overhead over in-process: {fixed:.1f} ms + {per_mib:.2f} ms/MiB (fitted)")
        for label, value in formats.items():
            mib, cost = value["mib"], value["overhead_ms"]
            print(f"  batch 32 as {label:<8} {mib:6.1f} MiB  ~{cost:.1f} ms")
        if "32" in compute and "32" in grpc_rows:
            headline["triton_grpc_over_onnx_b32"] = round(
                grpc_rows["32"]["images_per_s"] / compute["32"]["images_per_s"], 3
            )
    benchlib.record(
        "triton", section, headline=headline, sampler=sampler, quick=args.quick, path=args.results
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
