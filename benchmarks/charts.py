"""Draw PNG charts of ``bench/results/latest.json`` next to it (matplotlib, no display).

One chart per benchmark section present; a section missing from the file is skipped (its
script has not run). Charts of a quick run say so in their title: they check the scripts,
they are not results. Prints the headline figures of the file. From the repository root::

    .venv/bin/python benchmarks/charts.py [bench/results/latest.json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # after use(): the backend must be chosen first

import benchlib

HEADLINE = (
    "e2e_images_per_s",
    "e2e_over_ceiling",
    "e2e_over_naive",
    "preprocess_jax_over_pillow_b32",
    "milvus_upsert_vectors_per_s",
    "search_vector_p99_ms",
    "search_image_p99_ms",
    "search_vector_p99_ms_during_ingest",
    "worker_rss_growth_ratio",
)


def _title(text: str, section: dict[str, Any]) -> str:
    return f"{text} (QUICK RUN: not a result)" if section.get("quick") else text


def e2e(section: dict[str, Any], ax: Any) -> None:
    labels = ["ceiling (model alone)", "naive loop"]
    values = [section["ceiling_images_per_s"], section["naive_images_per_s"]]
    for workers, rates in section["by_workers"].items():
        labels.append(f"e2e {workers} worker(s) 640x480")
        values.append(rates["vga"])
        labels.append(f"e2e {workers} worker(s) 12 MP")
        values.append(rates["12mp"])
    ax.barh(labels, values)
    ax.set_xlabel("images/s")
    ax.set_title(_title("End-to-end ingest", section))


def preprocess(section: dict[str, Any], ax: Any) -> None:
    by_batch = section["by_batch"]
    sizes = list(by_batch)
    for method in ("jax", "reference", "decode + jax", "decode + reference"):
        ax.plot(
            sizes, [by_batch[b]["images_per_s"][method] for b in sizes], marker="o", label=method
        )
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s")
    ax.legend()
    ax.set_title(_title("Preprocessing 640x480 (JAX vs Pillow+numpy)", section))


def triton(section: dict[str, Any], ax: Any) -> None:
    for transport, rows in section["by_transport"].items():
        sizes = list(rows)
        ax.plot(sizes, [rows[b]["images_per_s"] for b in sizes], marker="o", label=transport)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s")
    ax.legend()
    ax.set_title(_title("Triton by transport vs onnxruntime in-process", section))


def search(section: dict[str, Any], ax: Any) -> None:
    indexes = list(section["by_index"])
    width = 0.25
    for n, what in enumerate(("vector", "id", "image")):
        values = [section["by_index"][i][what]["p99_ms"] for i in indexes]
        ax.bar([x + n * width for x in range(len(indexes))], values, width, label=f"by {what}")
    ax.set_xticks([x + width for x in range(len(indexes))], indexes)
    ax.set_ylabel("p99 ms")
    ax.legend()
    ax.set_title(_title(f"Search through the API, {section['count']:,} vectors", section))


def int8(section: dict[str, Any], ax: Any) -> None:
    models = ["float32", "int8"]
    speeds = [section["images_per_s"]["b32"][m] for m in models]
    p_at_1 = [section["quality"][m]["class_p_at_1"] for m in models]
    ax.bar([0, 1], speeds, 0.4, label="images/s, batch 32")
    ax.set_xticks([0.2, 1.2], models)
    ax.set_ylabel("images/s")
    twin = ax.twinx()
    twin.bar([0.4, 1.4], p_at_1, 0.4, color="tab:orange", label="class P@1")
    twin.set_ylim(0, 1)
    twin.set_ylabel("class P@1")
    ax.set_title(_title("int8 vs float32", section))


CHARTS: dict[str, Callable[[dict[str, Any], Any], None]] = {
    "e2e": e2e,
    "preprocess": preprocess,
    "triton": triton,
    "search": search,
    "int8": int8,
}


def main() -> int:
    """Draw every chart the file has data for; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("results", type=Path, nargs="?", default=benchlib.DEFAULT_RESULTS)
    args = parser.parse_args()
    data = json.loads(args.results.read_text())
    sections = data.get("benchmarks", {})
    for name, draw in CHARTS.items():
        if name not in sections:
            print(f"no {name} section: chart skipped")
            continue
        figure, ax = plt.subplots(figsize=(9, 5))
        draw(sections[name], ax)
        figure.tight_layout()
        target = args.results.parent / f"{name}.png"
        figure.savefig(target, dpi=100)
        plt.close(figure)
        print(f"wrote {target}")
    kind = "QUICK RUN (checks the scripts; not results)" if data.get("quick") else "full run"
    machine = data.get("machine", {})
    print(f"\n{kind} on {machine.get('cores')} cores, {machine.get('cpu_model')}:")
    for key in HEADLINE:
        print(f"  {key:<40} {data.get(key, 'not measured')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
