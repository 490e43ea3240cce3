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
    """Create and register a region; unregister and destroy it on exit, whatever happened."""
    # The key names the file in /dev/shm; the pid keeps concurrent runs apart.
    key = f"/bench_triton_{os.getpid()}_{name}"
    handle = shm.create_shared_memory_region(name, key, size)
    try:
        client.register_system_shared_memory(name, key, size)
        try:
            yield Region(name, handle, size)
        finally:
            client.unregister_system_shared_memory(name)
    finally:
        shm.destroy_shared_memory_region(handle)


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


def main() -> int:
    """Run the benchmark and print one table; returns the exit code."""
    config = StackConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--http-url", default=config.triton_url)
    parser.add_argument("--grpc-url", default=config.triton_grpc_url)
    parser.add_argument(
        "--model", help="served model with the spec's tensors (default: the spec's name)"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1, help="untimed, checked rounds")
    parser.add_argument("--onnx", type=Path, help="model.onnx for an in-process baseline")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec = DEFAULT_MODEL_SPEC.model_copy(update={"name": args.model or DEFAULT_MODEL_SPEC.name})
    rng = np.random.default_rng(0)
    largest = max(args.batches)
    in_bytes = largest * int(np.prod(spec.input_dims)) * 4
    out_bytes = largest * spec.output_dim * 4

    http = httpclient.InferenceServerClient(args.http_url, network_timeout=300.0)
    grpc = grpcclient.InferenceServerClient(args.grpc_url)
    with contextlib.ExitStack() as stack:
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

            session = ort.InferenceSession(str(args.onnx), providers=["CPUExecutionProvider"])
            transports["onnx in-process"] = lambda b: session.run(None, {spec.input_name: b})[0]

        print(f"model {spec.name}; median (min) ms per request; ratio = median / http median")
        print(f"{'batch':>5} {'MiB':>6}  " + "  ".join(f"{t:>22}" for t in transports))
        for rows in args.batches:
            batch = rng.standard_normal((rows, *spec.input_dims), dtype=np.float32)
            for _ in range(args.warmup):
                for transport, infer in transports.items():
                    check(infer(batch), rows, spec, transport)
            times = measure(transports, batch, args.repeat)
            baseline = statistics.median(times["http"])
            cells = []
            for t in times.values():
                median = statistics.median(t)
                cells.append(f"{median:8.1f} ({min(t):6.1f}) x{median / baseline:4.2f}")
            print(f"{rows:>5} {batch.nbytes / 2**20:6.1f}  " + "  ".join(f"{c:>22}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
