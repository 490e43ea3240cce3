"""The service's own processes for benchmarks: workers, the query API, publishing, waiting.

Contract:

- :func:`add_stack_arguments` adds the stack's addresses to a script's command line;
  :func:`bench_settings` gives settings on the given stack addresses with the benchmark's own
  topic, group and collection (nothing shared with tests or other runs).
- :class:`AppProcess` runs ``trident-worker`` / ``trident-api`` from this venv with a settings
  file written as devstack's ``LocalStack.write_settings`` does; it reports its RSS and stops
  (SIGTERM, then SIGKILL after a grace period) only the process it started.
- :func:`publish_paths` publishes path events through the producer's ``EventPublisher``;
  :func:`wait_stored` waits for a collection's count.
- :func:`make_large_jpegs` writes camera-sized (12-megapixel) JPEGs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import yaml
from PIL import Image
from skimage import data as skdata

from engine.kafka import ensure_topics
from engine.settings import Settings
from engine.store import VectorStore
from producer.publisher import EventPublisher
from schemas import IngestEvent, PathImage

BIN = Path(sys.executable).parent


def post_json(client: httpx.Client, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    """POST ``body`` as JSON encoded with orjson.

    httpx's ``json=`` uses the standard library's json: ~1.7 ms per 1280-float vector here
    (orjson 0.06), client time that the search latencies would count.
    """
    headers = {"Content-Type": "application/json"}
    return client.post(path, content=orjson.dumps(body), headers=headers, **kwargs)


def add_stack_arguments(parser: argparse.ArgumentParser, *, api_port: int) -> None:
    """The stack's addresses (defaults: the quick start's) and the query API's port and key."""
    parser.add_argument("--kafka", default="127.0.0.1:19092")
    parser.add_argument("--triton-grpc", default="127.0.0.1:18001")
    parser.add_argument("--milvus", default="http://127.0.0.1:19530")
    parser.add_argument(
        "--milvus-token-file",
        type=Path,
        default=Path(".stack/milvus/secret"),
        help="root password of the stack's Milvus, when its authentication is on",
    )
    parser.add_argument("--api-port", type=int, default=api_port)
    parser.add_argument(
        "--api-key", default="", help="X-API-Key for the query API, if it wants one"
    )


def milvus_token(path: Path) -> str:
    """``root:<password>`` from the stack's secret file, or "" (no authentication) without one."""
    return f"root:{path.read_text().strip()}" if path.is_file() else ""


def bench_settings(
    *,
    kafka: str,
    triton_grpc: str,
    milvus: str,
    image_root: Path,
    milvus_token: str = "",
    batch: int = 32,
    partitions: int = 4,
    quick: bool = False,
    **sections: Any,
) -> Settings:
    """Settings on the stack at these addresses, with a topic, group and collection of its own.

    ``quick`` compiles one preprocessing batch shape instead of the production set: a worker's
    JAX warm-up is most of a quick run's fixed cost (batches are padded up to it, so the figures
    stay comparable; the warm-up is never timed anyway).
    """
    unique = uuid.uuid4().hex[:8]
    values: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": kafka,
            "topic": f"bench-{unique}",
            "dead_letter_topic": f"bench-{unique}.dlq",
            "group_id": f"bench-{unique}",
            "topic_partitions": partitions,
        },
        "triton": {"url": triton_grpc, "protocol": "grpc"},
        "milvus": {"uri": milvus, "token": milvus_token, "collection": f"bench_{unique}"},
        "fetch": {"allowed_roots": [str(image_root)]},
        "batch": {"max_size": batch, "max_wait_ms": 250},
        "worker": {"health_port": 0},
        # The benchmarks time searches, not the per-client limiter (600/min would answer 429).
        "api": {"rate_limit_per_minute": 0},
    }
    if quick:
        values["preprocess"] = {"batch_sizes": [batch]}
    for name, section in sections.items():
        # Merged into the section above, so that e.g. the API's port keeps its rate limit off.
        values[name] = {**values.get(name, {}), **section}
    return Settings(**values)


def write_settings(settings: Settings, path: Path) -> Path:
    """Write settings as YAML, as ``LocalStack.write_settings`` does."""
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
    return path


class AppProcess:
    """One of the service's commands running in the background, its output in a log file."""

    def __init__(self, command: Sequence[str], log: Path) -> None:
        self.log = log
        self._handle = log.open("wb")
        self.process = subprocess.Popen(
            list(command), stdout=self._handle, stderr=subprocess.STDOUT
        )

    @classmethod
    def worker(cls, settings_file: Path, name: str, folder: Path) -> AppProcess:
        command = [str(BIN / "trident-worker"), "--config", str(settings_file)]
        return cls(
            [*command, "--worker-id", name, "--log-level", "WARNING"], folder / f"{name}.log"
        )

    @classmethod
    def api(cls, settings_file: Path, port: int, folder: Path) -> AppProcess:
        command = [str(BIN / "trident-api"), "--config", str(settings_file), "--port", str(port)]
        return cls([*command, "--log-level", "WARNING"], folder / "query-api.log")

    def rss_bytes(self) -> int:
        """Resident memory of the process now; 0 once it has ended."""
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def check_running(self) -> None:
        """Raises: RuntimeError: the process has exited (the message quotes its log)."""
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.log.stem} exited with {self.process.returncode}:\n{tail}")

    def stop(self, grace: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._handle.close()


@contextlib.contextmanager
def running(processes: list[AppProcess]) -> Iterator[list[AppProcess]]:
    """Stop every process on exit, whatever happened."""
    try:
        yield processes
    finally:
        for process in processes:
            process.stop()


def wait_http(url: str, process: AppProcess, timeout: float = 120.0) -> None:
    """Wait until ``url`` answers 200.

    Raises:
        RuntimeError: the process exited; TimeoutError: no answer within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.check_running()
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def prepare(settings: Settings) -> VectorStore:
    """Create the topics and the collection; return a store on it."""
    ensure_topics(settings.kafka)
    store = VectorStore(settings.milvus)
    store.create_collection(settings.milvus.collection, model_tag=settings.triton.model_tag)
    return store


def publish_paths(settings: Settings, paths: Sequence[Path], prefix: str) -> None:
    """Publish one path event per file (ids ``<prefix>-<n>``) and wait for Kafka's answers.

    Raises:
        RuntimeError: some events were not delivered.
    """
    with EventPublisher(settings.kafka) as publisher:
        report = publisher.publish_many(
            IngestEvent(id=f"{prefix}-{n:06d}", image=PathImage(path=str(path)))
            for n, path in enumerate(paths)
        )
    if report.failed:
        raise RuntimeError(f"{report.failed} events not delivered: {report.failures[:3]}")


def wait_stored(
    store: VectorStore,
    collection: str,
    count: int,
    processes: Sequence[AppProcess],
    timeout: float,
) -> float:
    """Wait until ``collection`` holds ``count`` rows; return the monotonic time it did.

    Raises:
        RuntimeError: a worker exited; TimeoutError: not stored within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            process.check_running()
        if store.count(collection) >= count:
            return time.monotonic()
        time.sleep(0.25)
    raise TimeoutError(f"{collection}: fewer than {count} rows after {timeout:.0f}s")


def make_large_jpegs(folder: Path, count: int, size: tuple[int, int] = (4000, 3000)) -> list[Path]:
    """``count`` distinct 12-megapixel JPEGs (quality 90): upscaled, shifted sample photos."""
    photos = [getattr(skdata, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")]
    rng = np.random.default_rng(7)
    paths = []
    for n in range(count):
        photo = Image.fromarray(photos[n % len(photos)]).convert("RGB")
        big = photo.resize((size[0] + 200, size[1] + 150), Image.Resampling.BILINEAR)
        left, top = int(rng.integers(0, 200)), int(rng.integers(0, 150))
        big = big.crop((left, top, left + size[0], top + size[1]))
        buffer = io.BytesIO()
        big.save(buffer, format="JPEG", quality=90)
        path = folder / f"large-{n:04d}.jpg"
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths
