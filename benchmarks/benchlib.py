"""What every benchmark script shares: the machine, load sampling and the results file.

Contract:

- :func:`machine` describes the host (cores, CPU model) for ``latest.json``.
- :class:`LoadSampler` is a context manager that samples the 1-minute load average and the CPU
  time of the stack's processes (Milvus, Triton, Kafka, workers, query API, the benchmark
  itself) from ``/proc`` while a benchmark runs; :meth:`LoadSampler.summary` gives the average
  load and each role's share of one core. Linux only; elsewhere the shares are empty.
- :func:`record` merges one benchmark's section and headline figures into the results file
  (``bench/results/latest.json`` by default), so the scripts of one ``make bench`` build one file
  whichever order they run in. Writing is atomic (temp file + rename).

Nothing here asserts timings: the scripts print figures and ratios, humans judge them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import signal
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

DEFAULT_RESULTS = Path("bench/results/latest.json")

# Which process is which, by a fragment of its command line; first match wins.
ROLES: tuple[tuple[str, str], ...] = (
    ("milvus", "milvus"),
    ("triton", "tritonserver"),
    ("triton", "triton_python_backend_stub"),
    ("kafka", "kafka.Kafka"),
    ("worker", "worker.cli"),
    ("worker", "trident-worker"),
    ("query-api", "query_api.cli"),
    ("query-api", "trident-api"),
)


def machine() -> dict[str, Any]:
    """Cores, CPU model and OS of this host."""
    model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _role(cmdline: str) -> str | None:
    for role, fragment in ROLES:
        if fragment in cmdline:
            return role
    return None


def _cpu_seconds() -> dict[int, tuple[str, float]]:
    """Role and CPU seconds (user + system) used so far of each process that has a role."""
    ticks = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    totals: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            # Fields after the parenthesised name; utime and stime are fields 14 and 15.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        role = "benchmark" if int(entry.name) == me else _role(cmdline)
        if role is None:
            continue
        totals[int(entry.name)] = (role, (int(fields[11]) + int(fields[12])) / ticks)
    return totals


class LoadSampler:
    """Samples load and per-role CPU while a benchmark runs (a daemon thread, ``every`` s)."""

    def __init__(self, every: float = 1.0) -> None:
        self.every = every
        self.loads: list[float] = []
        self._start_cpu: dict[int, tuple[str, float]] = {}
        self._end_cpu: dict[int, tuple[str, float]] = {}
        self._last: dict[int, tuple[str, float]] = {}
        self._started = self._ended = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.loads.append(os.getloadavg()[0])
            # Remember every process seen, so one that ends before the run does still counts.
            self._last.update(_safe_cpu())

    def __enter__(self) -> LoadSampler:
        self._started = time.monotonic()
        self._start_cpu = _safe_cpu()
        self.loads.append(os.getloadavg()[0])
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._ended = time.monotonic()
        self._end_cpu = {**self._last, **_safe_cpu()}
        self.loads.append(os.getloadavg()[0])

    def summary(self) -> dict[str, Any]:
        """Mean and max 1-minute load, and each role's mean share of one core (1.0 = a core).

        Processes that started during the run count from zero; processes that ended during it
        count up to their last sample (at most ``every`` seconds of their CPU are missed).
        """
        wall = max(self._ended - self._started, 1e-9)
        used: dict[str, float] = {}
        for pid, (role, seconds) in self._end_cpu.items():
            before = self._start_cpu.get(pid, (role, 0.0))[1]
            used[role] = used.get(role, 0.0) + seconds - before
        cores = {role: round(seconds / wall, 3) for role, seconds in used.items()}
        return {
            "seconds": round(wall, 1),
            "load_avg_mean": round(sum(self.loads) / len(self.loads), 2) if self.loads else None,
            "load_avg_max": round(max(self.loads), 2) if self.loads else None,
            "cpu_cores_by_role": dict(sorted(cores.items(), key=lambda kv: -kv[1])),
        }

    def describe(self) -> str:
        """One line for the console."""
        s = self.summary()
        roles = ", ".join(f"{role} {share:.2f}" for role, share in s["cpu_cores_by_role"].items())
        return (
            f"load average mean {s['load_avg_mean']} (max {s['load_avg_max']}) over "
            f"{s['seconds']} s; cores used by {roles or 'nothing sampled'}"
        )


def role_cores(role: str, seconds: float) -> float:
    """Cores (1.0 = one core) that the processes of ``role`` used over the next ``seconds``."""

    def used() -> float:
        return sum(cpu for r, cpu in _safe_cpu().values() if r == role)

    before = used()
    time.sleep(seconds)
    return (used() - before) / seconds


def wait_idle(
    role: str, *, below: float = 0.15, window: float = 5.0, timeout: float = 900.0
) -> tuple[float, float]:
    """Wait until ``role`` uses under ``below`` cores over a ``window``; return the seconds
    waited and the last window's cores.

    Milvus keeps building indexes and compacting segments for minutes after a bulk write:
    queries timed during that background work measure it, not the search.

    Raises:
        TimeoutError: still busy after ``timeout`` seconds.
    """
    began = time.monotonic()
    while True:
        cores = role_cores(role, window)
        if cores < below:
            return time.monotonic() - began, cores
        if time.monotonic() - began > timeout:
            raise TimeoutError(f"{role} still used {cores:.2f} cores after {timeout:.0f} s")


def _safe_cpu() -> dict[int, tuple[str, float]]:
    try:
        return _cpu_seconds()
    except OSError:  # no /proc: not Linux
        return {}


def record(
    section: str,
    figures: dict[str, Any],
    *,
    headline: dict[str, Any] | None = None,
    sampler: LoadSampler | None = None,
    quick: bool = False,
    path: Path = DEFAULT_RESULTS,
) -> Path:
    """Merge ``figures`` under ``section`` (and ``headline`` at the top level) into ``path``.

    Raises:
        OSError: the results folder cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
    body = dict(figures)
    body["quick"] = quick
    body["measured_at"] = _now()
    if sampler is not None:
        body["load"] = sampler.summary()
    data.setdefault("benchmarks", {})[section] = body
    data.update(headline or {})
    data["machine"] = machine()
    data["timestamp"] = _now()
    # Any quick section makes the whole file a quick (not-a-result) run.
    data["quick"] = any(b.get("quick") for b in data["benchmarks"].values())
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".latest.")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=float)
    os.replace(tmp, path)
    return path


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so ``finally`` blocks stop the processes a script started
    and drop its collections when it is stopped (``timeout``, ``kill``), not only on Ctrl-C."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation); ``nan`` for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
